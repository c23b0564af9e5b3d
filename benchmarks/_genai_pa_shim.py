"""Stands in for `perf_analyzer` under genai-perf 0.0.16 (benchmarks/perf_analyzer.sh --genai-perf).

genai-perf writes `"model": "<served model name>"` into every input-data row, which clashes with
deltazip_llm's `model` input (the delta name): perf_analyzer rejects the file as malformed. This rewrites
each row's `model` to a delta name (round robin over DELTAZIP_PA_VARIANTS, "" = base), then runs the real
perf_analyzer (DELTAZIP_PA_BINARY) with the same arguments.
"""

import json
import os
import sys


def main() -> None:
    args = sys.argv[1:]
    variants = json.loads(os.environ["DELTAZIP_PA_VARIANTS"])
    if "--input-data" in args:
        path = args[args.index("--input-data") + 1]
        with open(path) as f:
            data = json.load(f)
        for i, row in enumerate(data.get("data", [])):
            if isinstance(row.get("model"), str):
                row["model"] = [variants[i % len(variants)]]
        with open(path, "w") as f:
            json.dump(data, f)
    binary = os.environ["DELTAZIP_PA_BINARY"]
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
