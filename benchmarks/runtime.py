"""Runtime claims, each measured side by side in one run (ratios; the machine is noisy):

1. cold swap-in of a compressed delta (disk → host decode + checksum → slot) vs loading the full fp16
   fine-tune with safetensors into a model (target ≥ 8x faster); cold = both sides' files dropped from the
   page cache before each timed load (posix_fadvise DONTNEED), warm rows alongside;
2. decode-step time of 16 sequences spread over 1, 4, 8 and 16 distinct deltas vs the base alone;
3. resident bytes per delta vs per full model.

Uses the real family when given (--family DIR; with --deltas DIR, a store of NAME.dz/ made against its
base, else its first three fine-tunes are compressed with the default settings first), else a synthetic
base of the chosen preset's shape with random 2-bit 2:4 deltas (random codes compress worse than real
ones, so the swap-in figure is conservative).

    OMP_NUM_THREADS=1 python benchmarks/runtime.py [--preset small|tiny] [--family DIR [--deltas DIR]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, markdown_table, write_section  # noqa: E402

from deltazip.format import decode, fingerprint_model, save_delta  # noqa: E402
from deltazip.runtime.delta_linear import (  # noqa: E402
    clear_model_delta,
    enable_deltas,
    resident_delta_bytes,
    set_model_delta,
)
from deltazip.runtime.model import Segment, load_llama  # noqa: E402
from deltazip.runtime.pool import DeltaPool, artifact_nbytes  # noqa: E402

SHAPES = {  # the family presets' shapes (deltazip/family/train.py), vocab of the character tokenizer
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2),
}
NUM_SEQS = 16
SWAP_APPROACHES = (  # issue 10 part 2; figures of load_delta alone, before/after alternated, load average 6-7
    "Approaches tried (load_delta of this 5.2 MB artifact, wall / CPU ms, and the host → slot install, "
    "measured alternately on the shared machine at load average 6-7): before (numpy word transforms, "
    "fresh 4 KiB pages for every buffer, the slot zeroed then copied tensor by tensor) 57-62 / 28-30, "
    "install 6.1-6.5; A: native nibble pass straight into the slot layout (kernels/native/swapin.cpp), "
    "every output carved from one huge-page block, one decode job per tensor, install = one "
    "torch._foreach_copy_ with no zeroing: 42-45 / 20-21, install 1.6-1.7; B (kept): A with one job per "
    "decoder thread taking tensors in file order, the tensor-table hash and the output carving done "
    "before the threads start (beside busy decoders the table hash alone waited 9 ms on the GIL) and "
    "small zstd streams in one call: 28-33 / 20-21, install 1.4-1.8. The numpy fallback row shows the "
    "native pass's share. What is left is mostly the zstd Huffman decode of the 6 MB nibble stream (about"
    " 8 ms CPU here, the system libzstd no faster), blake3 (1.4 ms) and, cold, the 6-7 ms disk read of "
    "5.2 MB: 8x the full cold load (about 9 ms) needs two free cores. C (dropped): every zstd frame in "
    "one multi_decompress_to_buffer call (python-zstandard's C threads) once the whole payload is read, "
    "then the native pass: 51-92 / 17-17.5 (2.5 ms less CPU, but its stages run one after another: no "
    "overlap with the read or the hash). Not tried: one native call per tensor (zstd through libzstd and "
    "the nibble pass in C++, no Python per stream).")


def synthetic_family(root: Path, preset: str, num_deltas: int) -> tuple[Path, Path, Path]:
    """A random base and fine-tune (HF, fp16 files) of the preset's shape, and a store of random deltas."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltazip.kernels.synthetic import random_packed

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, max_position_embeddings=256, **SHAPES[preset])
    model = LlamaForCausalLM(cfg).to(torch.float16)
    base, finetune, store = root / "base", root / "finetune", root / "deltas"
    model.save_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    model.save_pretrained(finetune)
    fingerprint = fingerprint_model(base)
    gen = torch.Generator().manual_seed(1)
    for i in range(num_deltas):
        linears, exact = {}, {}
        for name, p in model.named_parameters():
            if "norm" in name:
                exact[name] = torch.randn(p.shape, generator=gen) * 1e-3
            else:
                linears[name.removesuffix(".weight")] = random_packed(*p.shape, 2, p.shape[1], True, gen)
        save_delta(store / f"d{i}.dz", f"d{i}", fingerprint, linears, exact)
    return base, finetune, store


def spread_store(store: Path, root: Path, count: int) -> list[str]:
    """A store with `count` distinct names, reusing the artifacts in `store` round-robin (symlinks)."""
    sources = sorted(p for p in store.glob("*.dz") if (p / "manifest.json").is_file())
    if not sources:
        raise SystemExit(f"no NAME.dz artifacts in {store}")
    out = root / "spread"
    out.mkdir()
    names = [f"slot{i:02d}" for i in range(count)]
    for name, src in zip(names, sources * count, strict=False):
        (out / f"{name}.dz").symlink_to(src.resolve(), target_is_directory=True)
    return names


def fp16_copy(model_dir: Path, out: Path) -> Path:
    """The model's safetensors as fp16 (the fine-tune a server would otherwise load), config alongside."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for f in model_dir.glob("*.safetensors"):
        save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(f).items()}, str(out / f.name))
    shutil.copy2(model_dir / "config.json", out / "config.json")
    return out


def compress_family(family_dir: Path, tasks: list[str], store: Path) -> Path:
    """Default-setting artifacts (deltazip.toml [compress] defaults) of `tasks`, in a new store."""
    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig

    for task in tasks:
        compress_model(family_dir / "base", family_dir / task, store / f"{task}.dz", CompressConfig(),
                       name=task, calib=family_dir / "calib.jsonl")
    return store


def make_pool(model, store: Path, fingerprint: str, num_slots: int) -> DeltaPool:
    return DeltaPool(store, fingerprint, num_slots, 1 << 34,
                     install=lambda slot, art: set_model_delta(model, slot, art.linears, art.exact),
                     uninstall=lambda slot: clear_model_delta(model, slot))


def drop_from_page_cache(paths: list[Path]) -> None:
    """Make the next read of each file come from disk: fsync, then POSIX_FADV_DONTNEED (Linux)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_ms(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    return (time.perf_counter() - start) * 1e3


def eviction_works(paths: list[Path], repeats: int = 3) -> tuple[bool, float, float]:
    """Whether dropping `paths` from the page cache makes reading them slower: (works, cold ms, warm ms)."""
    cold, warm = [], []
    for _ in range(repeats):
        drop_from_page_cache(paths)
        cold.append(read_ms(paths))
        warm.append(read_ms(paths))
    cold_ms, warm_ms = statistics.median(cold), statistics.median(warm)
    return cold_ms > 1.5 * warm_ms, cold_ms, warm_ms


def bench_swap_in(base: Path, finetune: Path, store: Path, repeats: int) -> tuple[list[list[object]], str]:
    """Median ms, cold and warm page cache: full fp16 fine-tune (safetensors → model params) vs compressed
    delta (disk → host decode incl. checksum → slot); and a note on whether cold reads were really cold."""
    from safetensors.torch import load_file

    model = load_llama(base, "float16")
    enable_deltas(model, 1, "torch")
    fingerprint = fingerprint_model(base)
    name = sorted(p.name[:-3] for p in store.glob("*.dz"))[0]
    full_files = sorted(finetune.glob("*.safetensors"))
    delta_files = sorted((store / f"{name}.dz").resolve().iterdir())
    full_model = load_llama(base, "float16")
    wanted = set(full_model.state_dict())
    cold_ok, cold_read, warm_read = eviction_works(full_files)
    states = ("cold", "warm") if cold_ok else ("warm",)

    def load_full() -> float:
        start = time.perf_counter()
        state = {}
        for f in full_files:
            state.update(load_file(f))
        full_model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
        return time.perf_counter() - start

    pool = make_pool(model, store, fingerprint, 1)

    def load_delta_slot(native: bool = True) -> tuple[float, float]:
        pool.release(name)
        pool.evict(name)  # neither in the slot nor on the host
        disk_before = pool.stats()["disk_load_s"]
        passes = dict(decode.NATIVE)
        if not native:  # the numpy fallback of the swap-in decode (what runs where native code cannot build)
            decode.NATIVE.clear()
        try:
            start = time.perf_counter()
            pool.acquire(name)  # checksum + lossless decode + validation + slot copy
            return time.perf_counter() - start, pool.stats()["disk_load_s"] - disk_before
        finally:
            decode.NATIVE.update(passes)

    load_full()
    pool.acquire(name)  # warm-up: the loader thread starts, first-call costs are paid on both sides
    times: dict[str, list[float]] = {key: [] for key in
                                     ("full cold", "delta cold", "disk cold", "full warm", "delta warm",
                                      "disk warm", "disk warm numpy", "host hit")}
    for _ in range(repeats):  # interleaved, so both sides see the same machine state
        for state in states:
            if state == "cold":
                drop_from_page_cache(full_files)
            times[f"full {state}"].append(load_full())
            if state == "cold":
                drop_from_page_cache(delta_files)
            total, disk = load_delta_slot()
            times[f"delta {state}"].append(total)
            times[f"disk {state}"].append(disk)
        times["disk warm numpy"].append(load_delta_slot(native=False)[1])
        pool.release(name)
        pool.evict(name)
        pool.prefetch(name).result()  # on the host only
        start = time.perf_counter()
        pool.acquire(name)  # host-tier hit: validation + slot copy
        times["host hit"].append(time.perf_counter() - start)
    pool.close()
    med = {key: statistics.median(v) * 1e3 for key, v in times.items() if v}
    full_bytes = sum(f.stat().st_size for f in full_files)
    delta_bytes = sum(f.stat().st_size for f in delta_files)
    rows = []
    for state in states:
        full = med[f"full {state}"]
        rows += [[f"full fp16 fine-tune (safetensors → model params), {state}", full_bytes, full, 1.0],
                 [f"compressed delta (disk → host decode + checksum → slot), {state}", delta_bytes,
                  med[f"delta {state}"], full / med[f"delta {state}"]],
                 [f"  of which disk → host (read + checksum + decode), {state}", delta_bytes,
                  med[f"disk {state}"], full / med[f"disk {state}"]]]
    rows.append(["  disk → host with the numpy fallback decode (no native pass), warm", delta_bytes,
                 med["disk warm numpy"], med["full warm"] / med["disk warm numpy"]])
    rows.append(["compressed delta, host-tier hit (host → slot), vs full warm", delta_bytes, med["host hit"],
                 med["full warm"] / med["host hit"]])
    if cold_ok:
        note = (f"Cold = both sides' files dropped from the page cache (fsync + posix_fadvise DONTNEED) "
                f"before each timed load; checked here: reading the fp16 files took {cold_read:.1f} ms cold "
                f"vs {warm_read:.1f} ms warm. Warm = the same loads right after, files in the page cache.")
    else:
        note = (f"Page-cache eviction did NOT work on this machine (fp16 files read in {cold_read:.1f} ms "
                f"after posix_fadvise DONTNEED vs {warm_read:.1f} ms warm), only warm figures are reported.")
    return rows, note


def bench_decode(base: Path, store: Path, root: Path, steps: int, rounds: int) -> tuple[list, list]:
    """Median decode-step ms of 16 sequences over 0 (base), 1, 4, 8, 16 distinct deltas; resident bytes."""
    model = load_llama(base, "float32")
    enable_deltas(model, NUM_SEQS, "auto")  # the delta op: native CPU kernel (torch path if it cannot build)
    names = spread_store(store, root, NUM_SEQS)
    pool = make_pool(model, root / "spread", fingerprint_model(base), NUM_SEQS)
    slots = [pool.acquire(n) for n in names]
    art = pool.prefetch(names[0]).result()
    context = 32
    gen = torch.Generator().manual_seed(0)
    caches = [model.new_cache(context + 1) for _ in range(NUM_SEQS)]
    with torch.inference_mode():
        prompt = torch.randint(0, model.args.vocab_size, (NUM_SEQS * context,), generator=gen)
        model(prompt, [Segment(c, 0, context) for c in caches])
        tokens = torch.randint(0, model.args.vocab_size, (NUM_SEQS,), generator=gen)
        segments = [Segment(c, context, 1) for c in caches]
        layouts = {0: None}
        for distinct in (1, 4, 8, 16):
            spread = [slots[i % distinct] for i in range(NUM_SEQS)]
            layouts[distinct] = torch.tensor(spread, dtype=torch.int32)
        times: dict[int, list[float]] = {k: [] for k in layouts}
        for _ in range(rounds):
            for distinct, row_slot in layouts.items():
                start = time.perf_counter()
                for _ in range(steps):
                    model(tokens, segments, row_slot)
                times[distinct].append((time.perf_counter() - start) / steps)
    base_ms = statistics.median(times[0]) * 1e3
    decode_rows = [["base only" if d == 0 else f"{d} distinct deltas", statistics.median(t) * 1e3,
                    statistics.median(t) * 1e3 / base_ms] for d, t in times.items()]
    full_fp16 = 2 * sum(p.numel() for p in model.parameters())
    per_slot = resident_delta_bytes(model) / NUM_SEQS
    host_bytes = artifact_nbytes(art)
    resident_rows = [["full model (fp16)", full_fp16, 1.0],
                     ["delta, host tier (packed + exact)", host_bytes, full_fp16 / host_bytes],
                     ["delta, one device slot", int(per_slot), full_fp16 / per_slot]]
    pool.close()
    return decode_rows, resident_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SHAPES), default="small")
    parser.add_argument("--family", type=Path, help="family directory (real weights)")
    parser.add_argument("--deltas", type=Path, help="store of NAME.dz artifacts made against --family's base "
                                                    "(default: compress three of its fine-tunes first)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=("swap", "decode"),
                        help="run one section (swap: swap-in; decode: decode step + resident bytes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="deltazip-bench-runtime-"))
    try:
        if args.family:
            family = json.loads((args.family / "family.json").read_text())
            base = args.family / "base"
            if args.deltas is None:
                args.deltas = compress_family(args.family, family["tasks"][:3], root / "deltas")
            task = next(t for t in family["tasks"] if (args.deltas / f"{t}.dz").is_dir())
            finetune, store = fp16_copy(args.family / task, root / "finetune-fp16"), args.deltas
            source, tag = f"the {family['preset']} family (real weights, real artifacts)", family["preset"]
        else:
            base, finetune, store = synthetic_family(root, args.preset, num_deltas=4)
            source = f"synthetic {args.preset}-shaped base, random 2-bit 2:4 deltas"
            tag = f"{args.preset}-shaped, synthetic"
        if args.only != "decode":
            swap_rows, swap_note = bench_swap_in(base, finetune, store, args.repeats)
        if args.only != "swap":
            decode_rows, resident_rows = bench_decode(base, store, root, args.steps, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    command = command_line()
    notes = (f"Models: {source}. Torch runtime on CPU (torch path of add_delta_matmul), one thread; "
             "medians.")
    if args.only != "decode":
        swap_md = markdown_table(["load", "bytes on disk", "ms (median)",
                                  "speed-up vs full (same cache state)"], swap_rows)
        write_section(f"Runtime: cold swap-in vs full fine-tune load ({tag})", command, swap_md,
                      f"{notes} {swap_note} Load average {os.getloadavg()[0]:.1f} at the end (2 cores "
                      "shared). Target: cold swap-in ≥ 8x faster than the full load, host-tier hit ≥ 20x. "
                      f"{SWAP_APPROACHES}")
        print(swap_md, end="\n\n")
        if args.only == "swap":
            return
    decode_md = markdown_table(["16 sequences on", "decode step ms", "ratio vs base"], decode_rows)
    write_section(f"Runtime: mixed-delta decode step ({tag})", command, decode_md,
                  notes + " Context 32 tokens per sequence, fp32. Delta layers run the "
                          "deltazip::add_delta_matmul op (native CPU kernel; benchmarks/kernel.py compares "
                          "it with the torch path).")
    resident_md = markdown_table(["what", "bytes", "x smaller than full"], resident_rows)
    write_section(f"Runtime: resident bytes per delta ({tag})", command, resident_md, notes)
    for md in (decode_md, resident_md):
        print(md, end="\n\n")


if __name__ == "__main__":
    main()
