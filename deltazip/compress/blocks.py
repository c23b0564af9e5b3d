"""One decoder block at a time: build it from the HF config, load its weights, run it, capture inputs."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from deltazip.compress.stream import ROWS, StreamedLinear, is_large
from deltazip.errors import DeltazipError
from deltazip.hf import ModelWeights, read_config

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


class BlockRunner:
    """Builds decoder layers of a Llama-style HF architecture from its config, without the whole model."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import CONFIG_MAPPING

        self.model_config = read_config(model_dir)
        model_type = self.model_config.model_type
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
            self.config = CONFIG_MAPPING[model_type].from_dict(dict(self.model_config.raw))  # no remote code
        except (ImportError, KeyError):
            raise DeltazipError(f"{model_dir}: unsupported model_type {model_type!r}") from None
        self.config._attn_implementation = "sdpa"  # causal by default when no mask is given
        classes = {name: getattr(module, name) for name in dir(module)}
        layer_cls = [c for n, c in classes.items() if n.endswith("DecoderLayer")]
        rotary_cls = [c for n, c in classes.items() if n.endswith("RotaryEmbedding") and "Vision" not in n]
        norm_cls = [c for n, c in classes.items() if n.endswith("RMSNorm")]
        if not (layer_cls and rotary_cls and norm_cls):
            raise DeltazipError(f"{model_dir}: model_type {model_type!r} is not a Llama-style decoder")
        self.layer_cls, self.norm_cls = layer_cls[0], norm_cls[0]
        self.rotary = rotary_cls[0](config=self.config)
        self.num_layers = self.model_config.num_layers

    def layer(self, index: int, weights: ModelWeights) -> nn.Module:
        """Decoder layer `index` (float32, eval mode) computing with `weights`' tensors.

        Its linears are `StreamedLinear`s: each reads its weight from `weights` (and makes it fp32) when
        it runs, so the block never sits in memory in fp32; norms and biases are loaded.
        """
        with torch.device("meta"):
            layer = self.layer_cls(self.config, index).float().eval()
        prefix = f"model.layers.{index}."
        for name in linear_names(layer):
            parent, _, child = name.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            param = f"{prefix}{name}.weight"
            setattr(owner, child, StreamedLinear(owner.get_submodule(child),
                                                 lambda param=param: weights.get(param).float()))
        if any(True for _ in layer.buffers()):
            raise DeltazipError(f"{self.layer_cls.__name__} has buffers: not supported")
        layer.to_empty(device="cpu")
        state = {k[len(prefix):]: weights.get(k).float() for k in weights.names()
                 if k.startswith(prefix) and k[len(prefix):] in layer.state_dict()}
        layer.load_state_dict(state, strict=True)
        return layer

    def final_norm(self, weight: torch.Tensor) -> nn.Module:
        cfg = self.model_config
        norm = self.norm_cls(cfg.hidden_size, eps=cfg.rms_norm_eps).float().eval()
        norm.weight.data.copy_(weight.float())
        return norm

    def position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        return self.rotary.to(hidden.device)(hidden, positions)

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Apply `layer` to hidden [n, seq, H] in chunks of `batch` sequences."""
        outs = []
        for start in range(0, hidden.shape[0], batch):
            chunk = hidden[start:start + batch]
            outs.append(layer(chunk, position_embeddings=self.position_embeddings(chunk)))
        return torch.cat(outs)


def linear_names(layer: nn.Module) -> list[str]:
    return [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def sequential_groups(runner: BlockRunner, layer: nn.Module, hidden: torch.Tensor) -> list[list[str]]:
    """Linears grouped by shared input, in call order (Llama: [q,k,v], [o], [gate,up], [down]).

    The hooks keep every input alive until the grouping is done: an input freed during the forward pass
    can have its memory reused by a later one (o_proj's input by post_attention_layernorm's output, in
    about 1 probe of 8), and equal addresses would then put o_proj into [gate, up]'s group — a different
    sequential order, so a different artifact from run to run.
    """
    calls: list[tuple[str, int, torch.Tensor]] = []
    handles = [layer.get_submodule(n).register_forward_hook(
        lambda m, inp, out, n=n: calls.append((n, inp[0].data_ptr(), inp[0]))) for n in linear_names(layer)]
    try:
        runner.run(layer, hidden[:1])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_ptr = None
    for name, ptr, _ in calls:
        if groups and ptr == last_ptr and name not in groups[-1]:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_ptr = ptr
    return groups


@torch.no_grad()
def input_hessians(runner: BlockRunner, layer: nn.Module, hidden: torch.Tensor, names: list[str],
                   weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """H = 2/n · Σ x xᵀ (fp32, [K, K]) over all n calibration tokens entering each named linear; with
    `weights` [windows, seq] (one per token of `hidden`), H = 2/Σw · Σ w x xᵀ."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    offsets = dict.fromkeys(names, 0)  # runner.run feeds the windows in order, in chunks

    def hook(module, inp, out, name):
        x = inp[0].float()
        if weights is not None:
            w = weights[offsets[name]:offsets[name] + x.shape[0]].to(x.device)
            offsets[name] += x.shape[0]
            x = x * w.sqrt().unsqueeze(-1)
        count = float(w.sum()) if weights is not None else x.numel() // x.shape[-1]
        x = x.reshape(-1, x.shape[-1])
        if name not in sums:
            sums[name] = x.T @ x
        elif not is_large((x.shape[1], x.shape[1])):
            sums[name] += x.T @ x
        else:  # K × K is large (down_proj: 0.45 GiB at K = 11008): add its product by row chunks
            for r in range(0, x.shape[1], ROWS):
                sums[name][r:r + ROWS] += x[:, r:r + ROWS].T @ x
        counts[name] = counts.get(name, 0) + count

    handles = [layer.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: hook(m, i, o, n)) for n in names]
    try:
        runner.run(layer, hidden)
    finally:
        for h in handles:
            h.remove()
    return {n: sums.pop(n).mul_(2.0 / counts[n]) for n in names}


def hessian_of(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """H = 2/n · Σ x xᵀ for inputs x [..., K] (2/Σw · Σ w x xᵀ with per-token `weights` [...])."""
    if weights is not None:
        w = weights.to(x.device).float()
        flat = (x.float() * w.sqrt().unsqueeze(-1)).reshape(-1, x.shape[-1])
        return 2.0 / float(w.sum()) * flat.T @ flat
    flat = x.reshape(-1, x.shape[-1]).float()
    return 2.0 / flat.shape[0] * flat.T @ flat
