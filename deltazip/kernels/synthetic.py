"""Random packed deltas for kernel tests and benchmarks (exact mode: every product exact in fp16/fp32)."""

from __future__ import annotations

import torch

from deltazip.packed import PackedLinear


def random_packed(out_features: int, in_features: int, bits: int, group_size: int, sparse24: bool = True,
                  generator: torch.Generator | None = None, exact: bool = False,
                  symmetric: bool = False) -> PackedLinear:
    """A random PackedLinear; exact=True uses integer zeros and power-of-two scales; symmetric=True the
    writer's grid (every zero 2^(bits-1), as real artifacts have)."""
    n, k = out_features, in_features
    gen = generator or torch.Generator().manual_seed(0)
    n_codes = k // 2 if sparse24 else k
    codes = torch.randint(0, 2**bits, (n, n_codes), generator=gen)
    positions = None
    if sparse24:  # two distinct ascending positions out of every group of 4
        ranks = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)
        positions = ranks[..., :2].sort(-1).values.reshape(n, k // 2)
    num_groups = k // group_size
    if exact:
        scales = 2.0 ** torch.randint(-4, 0, (n, num_groups), generator=gen).float()
        zeros = torch.randint(0, 2**bits, (n, num_groups), generator=gen).float()
    else:
        scales = torch.rand(n, num_groups, generator=gen) * 0.02 + 0.001
        zeros = torch.rand(n, num_groups, generator=gen) * (2**bits - 1)
    if symmetric:
        zeros = torch.full((n, num_groups), 2.0 ** (bits - 1))
    return PackedLinear.from_codes(codes, scales, zeros, bits, group_size, positions=positions, in_features=k)
