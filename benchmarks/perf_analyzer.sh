#!/usr/bin/env bash
# Load test of deltazip_llm with the perf_analyzer of tritonclient[all]==2.51.0: gRPC, --streaming, input data
# spread over several deltas and the base, bounded measurement windows, loopback only. Rows → RESULTS.md.
#
#   benchmarks/perf_analyzer.sh [BUILD_DIR] [--concurrency 1:4:3] [--max-tokens 8] [--request-count 64]
#                               [--url HOST:GRPC_PORT]            # a running server instead of starting one
#                               [--genai-perf PATH --tokenizer DIR] # optional TTFT/ITL with genai-perf 0.0.16
#   (genai-perf's own input rows carry `"model": "<model name>"`, which clashes with deltazip_llm's `model`
#   input: benchmarks/_genai_pa_shim.py rewrites them to delta names before the real perf_analyzer runs.)
#   genai-perf has heavy dependencies, so it lives in a venv of its own, e.g.
#     python3 -m venv /tmp/gpvenv && /tmp/gpvenv/bin/pip install genai-perf==0.0.16 "numpy<2" "tritonclient[all]==2.51.0"
#
# BUILD_DIR defaults to [build].out of deltazip.toml. perf_analyzer needs libb64.so.0d and libcudart.so.12,
# which the nvidia-pytriton wheel ships under other names: link them into $VENV/pa_libs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
[ -x "$VENV/bin/perf_analyzer" ] || { echo "error: $VENV/bin/perf_analyzer missing (pip install 'tritonclient[all]==2.51.0')" >&2; exit 2; }
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LIBS=$VENV/pa_libs
mkdir -p "$LIBS"
for pattern in "libb64-*.so.0d:libb64.so.0d" "libcudart-*.so.12*:libcudart.so.12"; do
  src=$(ls "$SP"/nvidia_pytriton.libs/${pattern%%:*} 2>/dev/null | head -n1)
  [ -n "$src" ] || { echo "error: ${pattern%%:*} not found in $SP/nvidia_pytriton.libs (pip install nvidia-pytriton==0.7.0)" >&2; exit 2; }
  ln -sf "$src" "$LIBS/${pattern##*:}"
done
export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$ROOT"
exec "$PY" benchmarks/_perf_analyzer.py --perf-analyzer "$VENV/bin/perf_analyzer" "$@"
