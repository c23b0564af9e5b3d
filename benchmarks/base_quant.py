"""Quantized base + deltas: task accuracy of fake-quantized base GEMM + x·Δᵀ vs the unquantized base, and
the TensorRT-LLM checkpoint bytes each base quantization saves.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/base_quant.py [--tasks reverse,sort,upper] [--n-eval 100]

The base is quantized with NVIDIA Model Optimizer (the same `mtq.quantize` call as `deltazip convert base
--base-quant`), calibrated on the family's calib.jsonl. Each fine-tune's compressed delta (default settings,
2-bit 2:4) is added on top of the quantized base GEMM through a forward hook (y = Q(W)x + Δx), which is what
the DeltaGemm plugin does beside a quantized base GEMM; embedding and norm deltas are added to the weights.
Checkpoint bytes come from exporting each base with modelopt's exporter (tp 1, fp16 for what stays dense).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._results import command_line, markdown_table, write_section  # noqa: E402

QUANTS = ("none", "w8a16", "w4a16_awq", "fp8")


def artifact_for(family, task: str, store: Path) -> Path:
    """The default-setting artifact of `task` (the test cache's, compressed here when missing)."""
    from deltazip.compress import compress_model
    from deltazip.config import CompressConfig

    path = store / f"{task}.dz"
    if not (path / "manifest.json").is_file():
        store.mkdir(parents=True, exist_ok=True)
        compress_model(family.base_dir, family.finetune_dirs[task], path, CompressConfig(), name=task,
                       calib=family.calib_path)
    return path


def with_delta(base_model, delta) -> object:
    """A copy of the (possibly fake-quantized) base with the delta applied beside each linear's GEMM."""
    import torch

    from deltazip.format import decompress

    model = copy.deepcopy(base_model)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    dense = decompress(delta)
    with torch.no_grad():
        for name, packed in delta.linears.items():
            module = modules[name]
            if isinstance(module, torch.nn.Embedding):
                module.weight += packed.dequantize()
                continue
            weight_delta = packed.dequantize()
            add_delta = lambda _m, inputs, out, d=weight_delta: out + torch.nn.functional.linear(
                inputs[0], d.to(out.dtype))
            module.register_forward_hook(add_delta)
        for name in delta.exact:
            params[name] += dense[name].to(params[name].dtype)
    return model


def answer_logits(model, tokenizer, examples: list[dict]) -> list:
    """Teacher-forced log-probabilities at each answer token position, per example."""
    import torch

    out = []
    with torch.no_grad():
        for example in examples:
            prompt_len = len(tokenizer(example["prompt"]).input_ids)
            ids = tokenizer(example["prompt"] + example["answer"], return_tensors="pt").input_ids
            logits = model(ids).logits[0, prompt_len - 1: -1].float()
            out.append((torch.log_softmax(logits, -1), ids[0, prompt_len:]))
    return out


def token_metrics(logps: list, reference: list | None) -> tuple[float, float]:
    """(answer-token accuracy, mean KL(reference || this) per answer token; 0 without a reference)."""
    hits = total = 0
    kl = 0.0
    for i, (logp, target) in enumerate(logps):
        hits += int((logp.argmax(-1) == target).sum())
        total += len(target)
        if reference is not None:
            ref = reference[i][0]
            kl += float((ref.exp() * (ref - logp)).sum())
    return hits / max(total, 1), kl / max(total, 1)


def checkpoint_bytes(model, tp: int = 1) -> tuple[int, int]:
    """(total bytes, bytes of transformer-layer tensors) of the exported TensorRT-LLM checkpoint."""
    from safetensors import safe_open

    from deltazip.converters.base import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(model, Path(tmp) / "ckpt", tp, dtype="float16")
        total = layers = 0
        with safe_open(str(Path(tmp) / "ckpt" / "rank0.safetensors"), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = f.get_tensor(name)
                size = tensor.numel() * tensor.element_size()
                total += size
                layers += size if name.startswith("transformer.layers.") else 0
    return total, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, default=REPO / ".deltazip" / "test-cache" / "family-tiny-s0")
    parser.add_argument("--store", type=Path, default=None,
                        help="artifact store (default: the test cache's store for this family)")
    parser.add_argument("--tasks", default="reverse,sort,upper")
    parser.add_argument("--quants", default=",".join(QUANTS))
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--n-calib", type=int, default=64)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from deltazip.compress.calibration import read_calib_texts
    from deltazip.converters.base import load_base_model, quantize_base
    from deltazip.family import create_family, exact_match, load_eval_set
    from deltazip.format import load_delta

    torch.manual_seed(0)
    family = create_family(args.family, preset="tiny", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(family.base_dir))
    tasks = [t for t in args.tasks.split(",") if t]
    store = args.store or family.root.parent / f"deltas-tiny-s0-{family.content_hash[:12]}"
    deltas = {t: load_delta(artifact_for(family, t, store)) for t in tasks}
    evals = {t: load_eval_set(family.eval_path(t))[: args.n_eval] for t in tasks}
    texts = read_calib_texts(family.calib_path, args.n_calib)

    from transformers import AutoModelForCausalLM

    rows, reference, none_row = [], {}, None
    finetune = {t: answer_logits(AutoModelForCausalLM.from_pretrained(str(family.finetune_dirs[t])).eval(),
                                 tokenizer, evals[t]) for t in tasks}
    ft_token_acc = sum(token_metrics(finetune[t], None)[0] for t in tasks) / len(tasks)
    for quant in [q for q in args.quants.split(",") if q]:
        started = time.perf_counter()
        base = load_base_model(family.base_dir)
        if quant != "none":
            base = quantize_base(base, tokenizer, quant, texts)
        total, layers = checkpoint_bytes(base)
        exact, token_acc, kl = [], [], []
        for t in tasks:
            model = with_delta(base, deltas[t])
            exact.append(exact_match(model, tokenizer, evals[t]))
            logps = answer_logits(model, tokenizer, evals[t])
            if quant == "none":
                reference[t] = logps
            acc, divergence = token_metrics(logps, reference.get(t))
            token_acc.append(acc)
            kl.append(divergence)
        mean = lambda values: sum(values) / len(values)
        none_row = none_row or (layers, mean(exact), mean(token_acc))
        rows.append([quant, f"{total / 2**20:.3f}", f"{layers / 2**20:.3f}", f"{none_row[0] / layers:.2f}x",
                     f"{mean(exact):.3f}", f"{mean(token_acc):.3f}", f"{mean(token_acc) - none_row[2]:+.3f}",
                     f"{mean(kl):.2e}", f"{time.perf_counter() - started:.1f}"])
        print(" | ".join(rows[-1]), flush=True)

    columns = ["base quant", "checkpoint MiB", "layer weights MiB", "layer bytes saved", "exact match",
               "answer-token acc", "vs none", "KL vs none (nats/token)", "seconds"]
    notes = (
        f"Family tiny (seed 0); deltas: default compression (2-bit 2:4) of {', '.join(tasks)} (means over "
        f"tasks); {args.n_eval} eval examples per task; calibration: {len(texts)} lines of calib.jsonl. "
        "Quality is measured with the delta added beside the fake-quantized base GEMM (modelopt fake "
        "quantization on CPU): exact match of greedy answers, teacher-forced answer-token accuracy, and the "
        "KL divergence of answer-token distributions from the unquantized base + the same delta. Reference: "
        "the "
        f"uncompressed fine-tunes themselves reach answer-token accuracy {ft_token_acc:.3f}. 'layer weights' "
        "counts the decoder layers' tensors in rank0.safetensors (weights + scaling factors); embedding and "
        "lm_head stay fp16 in every mode (modelopt excludes lm_head). The delta path does not change with "
        "the base quantization."
    )
    write_section("Quantized base + deltas (TensorRT-LLM base-quant)", command_line(),
                  markdown_table(columns, rows), notes)


if __name__ == "__main__":
    main()
