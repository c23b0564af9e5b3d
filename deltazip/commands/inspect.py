"""`deltazip inspect ART`: per-tensor codec, bits per weight, bytes and ratio of a delta artifact."""

from __future__ import annotations

import math

import click


@click.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--verify/--no-verify", default=True,
              help="Load it as the server does (every checksum, every tensor decoded); --no-verify reads and "
                   "validates only the manifest.")
def inspect(artifact: str, verify: bool) -> None:
    """Show what a delta artifact holds."""
    from pathlib import Path

    from rich.markup import escape

    from deltazip.format import load_delta, read_manifest
    from deltazip.ui import console, print_table

    path = Path(artifact)
    # the one loader the server uses: "checksums ok" means the artifact loads, not only that files hash
    manifest = load_delta(path, verify=True).manifest if verify else read_manifest(path)
    rows = []
    for name, entry in manifest["tensors"].items():
        numel = math.prod(entry["shape"])
        stored = sum(stored_bytes for _, _, stored_bytes in entry["streams"])
        codec = entry["codec"]
        if entry["kind"] == "linear":
            codec = f"{entry['bits']}-bit" + (" 2:4" if entry["sparse24"] else "")
            if entry.get("precisions"):
                codec = f"any-precision {'/'.join(map(str, entry['precisions']))}-bit" + codec[len("4-bit"):]
            per_row = entry["group_size"] == entry["shape"][1]
            codec += " per-row" if per_row else f" g{entry['group_size']}"
        else:
            codec = f"exact {entry['dtype']}"
        rows.append([name, codec, entry["encoding"], f"{8 * stored / max(numel, 1):.3f}", stored,
                     f"{2 * numel / max(stored, 1):.1f}x"])
    columns = ["tensor", "codec", "lossless", "bits/weight", "bytes", "ratio"]
    print_table(escape(f"{manifest['name']} ({path})"), columns, rows)
    stats = manifest.get("stats", {})
    settings = manifest.get("settings", {})
    # informational fields are free text: shown cut short and escaped (never read as rich markup)
    base = manifest["base"]
    console.print(escape(f"base {base.get('name', '?')[:200]} {base['fingerprint'][:23]}…  "
                         f"target {manifest.get('target', '?')[:200]}  settings {str(settings)[:1000]}"))
    print_table("totals", ["parameters", "artifact bytes", "ratio vs fp16", "bits/weight", "lossless gain",
                           "compress s", "checksums"],
                [[stats.get("num_parameters"), stats.get("artifact_bytes"), f"{stats.get('ratio', 0):.2f}x",
                  stats.get("bits_per_weight"), stats.get("lossless_gain"), stats.get("compress_seconds"),
                  "ok" if verify else "not checked"]])
    from deltazip.format.precision import precision_sizes

    sizes = precision_sizes(manifest)
    if any(e.get("precisions") for e in manifest["tensors"].values()):
        stored_total = sum(s[2] for e in manifest["tensors"].values() for s in e["streams"])
        fixed = stats.get("artifact_bytes", stored_total) - stored_total  # manifest + payload header
        fp16 = stats.get("fp16_bytes", 0)
        print_table("per precision (bytes read to install it)", ["precision", "tensor bytes",
                                                                  "artifact bytes", "ratio vs fp16"],
                    [[f"{bits}-bit", nbytes, nbytes + fixed, f"{fp16 / max(nbytes + fixed, 1):.2f}x"]
                     for bits, nbytes in sizes.items()])
