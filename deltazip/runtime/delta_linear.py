"""Delta layers as module swaps: each row of a batch adds the delta of its slot (or none) to the base output.

Every layer keeps the base weight once and per-slot deltas beside it, behind one contract (as vLLM's lora
layers): ``set_delta(slot, packed=None, dense=None, bias=None)`` and ``clear(slot)``. Packed deltas stay
packed (DeltaSlots); only exact (lossless) deltas such as norms and biases are dense. A layer never keeps a
view of the host-tier artifact (its tensors share one block, deltazip.format.hostmem): it copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltazip.errors import DeltazipError
from deltazip.kernels import DeltaSlots, add_delta_matmul
from deltazip.packed import PackedLinear
from deltazip.runtime.model import BatchMapping, Llama, RMSNorm


class DeltaLinear(nn.Module):
    """y = x·Wᵀ (+ b), one GEMM for the whole batch, then x·Δ_sᵀ (+ Δb_s) for the rows of each slot s."""

    def __init__(self, base: nn.Linear, num_slots: int, mapping: BatchMapping, kernel: str = "auto") -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.out_features, self.in_features = base.out_features, base.in_features
        self.num_slots, self.mapping, self.kernel = num_slots, mapping, kernel
        self.packed_stores: list[DeltaSlots] = []  # one per packed format; a slot lives in at most one
        self.store_of_slot = [-1] * num_slots
        self.dense_by_slot: dict[int, torch.Tensor] = {}  # exact weight deltas [N, K] (bits=16 artifacts)
        self.bias_delta_by_slot: dict[int, torch.Tensor] = {}  # [N]

    def set_delta(self, slot: int, packed: PackedLinear | None = None, dense: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, copies: list | None = None) -> None:
        """Put one delta into `slot` (replacing what it held). `copies`: see DeltaSlots.set."""
        store = self._store_for(packed) if packed is not None else -1
        if self.store_of_slot[slot] != store:  # the store it goes to overwrites the slot whole: no zeroing
            self.clear(slot)
        self.dense_by_slot.pop(slot, None)
        self.bias_delta_by_slot.pop(slot, None)
        if packed is not None:
            self.store_of_slot[slot] = store
            self.packed_stores[store].set(slot, packed, copies)  # copy_ moves it to the slots' device
        if dense is not None:
            self.dense_by_slot[slot] = dense.to(self.weight.device, self.weight.dtype, copy=True)
        if bias is not None:
            self.bias_delta_by_slot[slot] = bias.to(self.weight.device, self.weight.dtype, copy=True)

    def clear(self, slot: int) -> None:
        store = self.store_of_slot[slot]
        if store >= 0:
            self.packed_stores[store].clear(slot)
            self.store_of_slot[slot] = -1
        self.dense_by_slot.pop(slot, None)
        self.bias_delta_by_slot.pop(slot, None)

    def _store_for(self, packed: PackedLinear) -> int:
        """A store that can hold `packed` (same sparsity, no fewer bits, finer groups), else a new one."""
        for i, store in enumerate(self.packed_stores):
            if (store.sparse24 == packed.sparse24 and packed.bits <= store.bits
                    and packed.group_size % store.group_size == 0):
                return i
        self.packed_stores.append(DeltaSlots(self.num_slots, self.out_features, self.in_features, packed.bits,
                                             packed.group_size, packed.sparse24, self.weight.device))
        return len(self.packed_stores) - 1

    @property
    def delta_nbytes(self) -> int:
        """Bytes held for deltas (all slots of every store, plus exact deltas)."""
        dense = [*self.dense_by_slot.values(), *self.bias_delta_by_slot.values()]
        return sum(s.nbytes for s in self.packed_stores) + sum(t.numel() * t.element_size() for t in dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        row_slot = self.mapping.row_slot
        if row_slot is None:
            return out
        if len(self.packed_stores) == 1:  # the common case: every slot in one store, no remapping
            add_delta_matmul(out, x, self.packed_stores[0], row_slot, self.kernel)
        elif self.packed_stores:
            store_of_slot = torch.tensor([*self.store_of_slot, -1], device=row_slot.device)
            row_store = store_of_slot[row_slot.long()]  # -1 indexes the trailing "none" entry
            for i, store in enumerate(self.packed_stores):
                add_delta_matmul(out, x, store, torch.where(row_store == i, row_slot, -1).int(), self.kernel)
        for slot, delta in self.dense_by_slot.items():
            rows = (row_slot == slot).nonzero().squeeze(1)
            if len(rows):
                out.index_add_(0, rows, x.index_select(0, rows) @ delta.t())
        for slot, delta in self.bias_delta_by_slot.items():
            out[row_slot == slot] += delta
        return out


def packed_rows(packed: PackedLinear, rows: torch.Tensor) -> PackedLinear:
    """The rows `rows` [R] of a packed [N, K] delta, still packed ([R, K])."""
    meta = None if packed.meta is None else packed.meta[rows]
    return PackedLinear(len(rows), packed.in_features, packed.bits, packed.group_size, packed.sparse24,
                        packed.qweight[rows], meta, packed.scales[rows], packed.zeros[rows])


class DeltaEmbedding(nn.Module):
    """Embedding lookup plus, per row, the slot's delta row: gathered from the packed [V, H] delta and
    dequantized (only the looked-up rows are ever expanded)."""

    def __init__(self, base: nn.Embedding, num_slots: int, mapping: BatchMapping) -> None:
        super().__init__()
        self.weight = base.weight
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.num_slots, self.mapping = num_slots, mapping
        self.packed_by_slot: dict[int, PackedLinear] = {}
        self.dense_by_slot: dict[int, torch.Tensor] = {}

    def set_delta(self, slot: int, packed: PackedLinear | None = None, dense: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, copies: list | None = None) -> None:
        self.clear(slot)
        if packed is not None:
            # its own copy: a host-tier artifact is one memory block, kept whole while any view of it lives
            tensors = {k: v.to(self.weight.device, copy=True) for k, v in packed.tensors().items()}
            self.packed_by_slot[slot] = PackedLinear(packed.out_features, packed.in_features, packed.bits,
                                                     packed.group_size, packed.sparse24, tensors["qweight"],
                                                     tensors.get("meta"), tensors["scales"], tensors["zeros"])
        if dense is not None:
            self.dense_by_slot[slot] = dense.to(self.weight.device, self.weight.dtype, copy=True)

    def clear(self, slot: int) -> None:
        self.packed_by_slot.pop(slot, None)
        self.dense_by_slot.pop(slot, None)

    @property
    def delta_nbytes(self) -> int:
        return (sum(p.nbytes for p in self.packed_by_slot.values())
                + sum(t.numel() * t.element_size() for t in self.dense_by_slot.values()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = F.embedding(tokens, self.weight)
        row_slot = self.mapping.row_slot
        if row_slot is None:
            return out
        for slot, packed in self.packed_by_slot.items():
            rows = (row_slot == slot).nonzero().squeeze(1)
            if len(rows):
                delta_rows = packed_rows(packed, tokens[rows]).dequantize(torch.float32)
                out.index_copy_(0, rows, (out[rows].float() + delta_rows).to(out.dtype))
        for slot, delta in self.dense_by_slot.items():
            rows = (row_slot == slot).nonzero().squeeze(1)
            if len(rows):
                out.index_add_(0, rows, delta[tokens[rows]])
        return out


class DeltaRMSNorm(nn.Module):
    """RMSNorm whose weight is base + the row's exact norm delta (a [slots + 1, H] table; row -1 is zero)."""

    def __init__(self, base: RMSNorm, num_slots: int, mapping: BatchMapping) -> None:
        super().__init__()
        self.weight, self.eps, self.normalize = base.weight, base.eps, base.normalize
        self.mapping = mapping
        self.weight_delta_by_slot = torch.zeros(num_slots + 1, base.weight.shape[0], dtype=base.weight.dtype,
                                                device=base.weight.device)
        self.has_delta = [False] * num_slots

    def set_delta(self, slot: int, packed: PackedLinear | None = None, dense: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, copies: list | None = None) -> None:
        if packed is not None or bias is not None:
            raise DeltazipError("a norm delta must be stored exactly (no packed or bias part)")
        if dense is None:
            self.clear(slot)
            return
        if copies is None:
            self.weight_delta_by_slot[slot].copy_(dense)
        else:
            copies.append((self.weight_delta_by_slot[slot], dense))
        self.has_delta[slot] = True

    def clear(self, slot: int) -> None:
        self.weight_delta_by_slot[slot].zero_()
        self.has_delta[slot] = False

    @property
    def delta_nbytes(self) -> int:
        return self.weight_delta_by_slot.numel() * self.weight_delta_by_slot.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row_slot = self.mapping.row_slot
        if row_slot is None or not any(self.has_delta):
            return self.weight * self.normalize(x)
        return (self.weight + self.weight_delta_by_slot[row_slot.long()]) * self.normalize(x)


DeltaModule = DeltaLinear | DeltaEmbedding | DeltaRMSNorm


def enable_deltas(model: Llama, num_slots: int, kernel: str = "auto") -> dict[str, DeltaModule]:
    """Swap every linear, the embedding and the norms for their delta versions; returns them by HF name."""
    swapped: dict[str, DeltaModule] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            new = DeltaLinear(module, num_slots, model.mapping, kernel)
        elif isinstance(module, nn.Embedding):
            new = DeltaEmbedding(module, num_slots, model.mapping)
        elif isinstance(module, RMSNorm):
            new = DeltaRMSNorm(module, num_slots, model.mapping)
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
        swapped[name] = new
    model.delta_modules = swapped
    return swapped


def _expected_shape(module: DeltaModule, param: str) -> tuple[int, ...] | None:
    if param == "weight":
        return tuple(module.weight.shape)
    if param == "bias" and isinstance(module, DeltaLinear) and module.bias is not None:
        return tuple(module.bias.shape)
    return None


def plan_delta(model: Llama, linears: dict[str, PackedLinear],
               exact: dict[str, torch.Tensor]) -> dict[str, dict[str, object]]:
    """Check a delta against the model and group its parts by module: {name: {packed, dense, bias}}.

    Raises DeltazipError naming the first unknown module or wrong shape; nothing is copied here.
    """
    modules: dict[str, DeltaModule] = model.delta_modules
    parts: dict[str, dict[str, object]] = {}
    for name, packed in linears.items():
        module = modules.get(name)
        if module is None or isinstance(module, DeltaRMSNorm):
            raise DeltazipError(f"delta has a packed layer '{name}' that the base model does not have")
        shape = (packed.out_features, packed.in_features)
        if shape != tuple(module.weight.shape):
            raise DeltazipError(f"delta layer '{name}' has shape {list(shape)}, the base has "
                                f"{list(module.weight.shape)}")
        parts.setdefault(name, {})["packed"] = packed
    for key, tensor in exact.items():
        name, _, param = key.rpartition(".")
        module = modules.get(name)
        want = None if module is None else _expected_shape(module, param)
        if want is None:
            raise DeltazipError(f"delta has a parameter '{key}' that the base model does not have")
        if tuple(tensor.shape) != want:
            raise DeltazipError(f"delta parameter '{key}' has shape {list(tensor.shape)}, "
                                f"the base has {list(want)}")
        parts.setdefault(name, {})["dense" if param == "weight" else "bias"] = tensor
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if tied and "lm_head" not in parts and "model.embed_tokens" in parts:
        parts["lm_head"] = {k: v for k, v in parts["model.embed_tokens"].items() if k != "bias"}
    return parts


def set_model_delta(model: Llama, slot: int, linears: dict[str, PackedLinear],
                    exact: dict[str, torch.Tensor]) -> None:
    """Validate, then copy a delta into `slot` of every module; on any failure the slot is left empty.

    One copy per tensor, on CPU all in one torch._foreach_copy_ (a host-tier hit is memory-bound, not
    Python-bound): the host tier holds the slot layout already (deltazip.format.decode), and slots are
    overwritten whole (no zeroing first)."""
    parts = plan_delta(model, linears, exact)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for name, module in model.delta_modules.items():
            part = parts.get(name)
            if part:
                module.set_delta(slot, **part, copies=copies)
            else:
                module.clear(slot)
        if copies and all(t.device.type == "cpu" for t in copies[0]):  # host tier and slots both on CPU
            torch._foreach_copy_([dst for dst, _ in copies], [src for _, src in copies])
        else:  # slots on an accelerator: each copy_ moves its host tensor over
            for dst, src in copies:
                dst.copy_(src)
    except Exception:
        clear_model_delta(model, slot)
        raise


def clear_model_delta(model: Llama, slot: int) -> None:
    for module in model.delta_modules.values():
        module.clear(slot)


def resident_delta_bytes(model: Llama) -> int:
    """Bytes the model holds for deltas, all slots together."""
    return sum(m.delta_nbytes for m in model.delta_modules.values())
