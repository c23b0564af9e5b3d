"""DeltaSlots: a fixed number of packed deltas of one linear layer, stacked for the delta GEMM."""

from __future__ import annotations

import torch

from deltazip.packed import PackedLayout, PackedLinear, pack_codes, unpack_codes


class DeltaSlots:
    """Stacked packed deltas [S, ...] of one linear layer (PackedLinear's layout, one slot per delta).

    A slot holds one delta with the slot's bit width; a delta with fewer bits is widened on `set`
    (same codes, zeros and scales in a wider field: exact). Empty slots hold zeros (Δ = 0).
    """

    def __init__(self, num_slots: int, out_features: int, in_features: int, bits: int, group_size: int,
                 sparse24: bool, device: torch.device | str = "cpu") -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, not {num_slots}")
        self.layout = PackedLayout(out_features, in_features, bits, group_size, sparse24)
        self.num_slots, self.out_features, self.in_features = num_slots, out_features, in_features
        self.bits, self.group_size, self.sparse24 = bits, group_size, sparse24
        self.device = torch.device(device)
        dtypes = {"qweight": torch.int32, "meta": torch.int32, "scales": torch.float16,
                  "zeros": torch.float16}
        stacked = {name: torch.zeros(num_slots, *shape, dtype=dtypes[name], device=self.device)
                   for name, shape in self.layout.shapes().items()}
        self.qweight = stacked["qweight"]  # [S, N, W] codes, LSB first
        self.meta = stacked.get("meta")  # [S, N, K/32] 2-bit positions (2:4 only)
        self.scales = stacked["scales"]  # [S, N, G]
        self.zeros = stacked["zeros"]  # [S, N, G]
        self._occupied = [False] * num_slots

    @classmethod
    def view(cls, qweight: torch.Tensor, meta: torch.Tensor | None, scales: torch.Tensor, zeros: torch.Tensor,
             bits: int, group_size: int) -> DeltaSlots:
        """Stacked tensors someone else owns as DeltaSlots (no copy); shapes and dtypes checked."""
        if qweight.dim() != 3:
            raise ValueError(f"qweight must be [S, N, W], got shape {tuple(qweight.shape)}")
        if scales.dim() != 3 or scales.shape[2] == 0:
            raise ValueError(f"scales must be [S, N, G] with G >= 1, got shape {tuple(scales.shape)}")
        num_slots, n = qweight.shape[:2]
        k = scales.shape[2] * group_size
        layout = PackedLayout(n, k, bits, group_size, meta is not None)
        layout.check({"qweight": qweight, "meta": meta, "scales": scales, "zeros": zeros}, (num_slots,))
        slots = cls.__new__(cls)
        slots.layout = layout
        slots.num_slots, slots.out_features, slots.in_features = num_slots, n, k
        slots.bits, slots.group_size, slots.sparse24 = bits, group_size, meta is not None
        slots.device = qweight.device
        slots.qweight, slots.meta, slots.scales, slots.zeros = qweight, meta, scales, zeros
        slots._occupied = [True] * num_slots
        return slots

    @property
    def n_codes(self) -> int:
        """Codes stored per row: K/2 for 2:4, else K."""
        return self.layout.n_codes

    @property
    def nbytes(self) -> int:
        """Resident bytes of all slots (occupied or not)."""
        tensors = [self.qweight, self.scales, self.zeros] + ([self.meta] if self.meta is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def occupied(self, slot: int) -> bool:
        """Whether `slot` holds a delta."""
        self._check_slot(slot)
        return self._occupied[slot]

    def set(self, slot: int, packed: PackedLinear, copies: list | None = None) -> None:
        """Copy `packed` into `slot`, widening its codes to the slot's bit width; validate first.

        Every slot tensor is overwritten whole (no zeroing first). `copies`: append the (slot tensor, source)
        pairs there instead of copying now (the caller copies a whole delta in one torch._foreach_copy_)."""
        self._check_slot(slot)
        self._check_compatible(packed)
        qweight = packed.qweight
        if packed.bits != self.bits:
            qweight = pack_codes(unpack_codes(qweight, packed.bits, packed.n_codes), self.bits)
        scales, zeros = packed.scales, packed.zeros
        if packed.group_size != self.group_size:  # coarser groups: repeat each (s, z) over the finer groups
            repeat = packed.group_size // self.group_size
            scales, zeros = scales.repeat_interleave(repeat, 1), zeros.repeat_interleave(repeat, 1)
        views = self._views(slot)
        pairs = [(views[0], qweight), (views[1], scales), (views[2], zeros)]
        if self.meta is not None:
            pairs.append((views[3], packed.meta))
        if copies is None:
            for dst, src in pairs:
                dst.copy_(src)
        else:
            copies += pairs
        self._occupied[slot] = True

    def _views(self, slot: int) -> tuple:
        """(qweight, scales, zeros, meta) of one slot, made once (indexing a tensor costs microseconds)."""
        cache = self.__dict__.setdefault("_slot_views", {})
        views = cache.get(slot)
        if views is None:
            views = cache[slot] = (self.qweight[slot], self.scales[slot], self.zeros[slot],
                                   None if self.meta is None else self.meta[slot])
        return views

    def clear(self, slot: int) -> None:
        """Empty `slot` (its delta becomes zero)."""
        self._check_slot(slot)
        for t in (self.qweight, self.meta, self.scales, self.zeros):
            if t is not None:
                t[slot].zero_()
        self._occupied[slot] = False

    def packed(self, slot: int) -> PackedLinear:
        """The slot's content as a PackedLinear (views, at the slot's bit width)."""
        self._check_slot(slot)
        return PackedLinear(self.out_features, self.in_features, self.bits, self.group_size, self.sparse24,
                            self.qweight[slot], None if self.meta is None else self.meta[slot],
                            self.scales[slot], self.zeros[slot])

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")

    def _check_compatible(self, packed: PackedLinear) -> None:
        shape, want = (packed.out_features, packed.in_features), (self.out_features, self.in_features)
        if shape != want:
            raise ValueError(f"delta shape [N, K] = {list(shape)} does not match the slots' {list(want)}")
        if packed.sparse24 != self.sparse24:
            kind = {True: "2:4", False: "dense"}
            raise ValueError(f"a {kind[packed.sparse24]} delta cannot go into {kind[self.sparse24]} slots")
        if packed.bits > self.bits:
            raise ValueError(f"a {packed.bits}-bit delta does not fit {self.bits}-bit slots (only widening)")
        if packed.group_size % self.group_size:
            raise ValueError(f"delta group_size {packed.group_size} is not a multiple of the slots' "
                             f"group_size {self.group_size}")
