"""Which precision an any-precision variant is installed at (deltazip.toml `[runtime]` precision_* keys).

An any-precision artifact (`deltazip compress --any-precision`) can be read at any of its stored precisions;
every other artifact has exactly one. The policy picks per variant when it is loaded from disk:

* ``max`` — the widest stored precision (the default; the same as before any-precision existed);
* ``fixed`` — `precision_bits` where the variant stores it, else its widest;
* ``pressure`` — the narrowest stored precision while the host tier is at least `precision_pressure` full
  (a fraction of host_cache_bytes), else the widest;
* ``popularity`` — the widest for the `precision_hot` most requested variants, the narrowest for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("max", "fixed", "pressure", "popularity")


@dataclass(frozen=True)
class PrecisionPolicy:
    policy: str = "max"
    bits: int = 0
    pressure: float = 0.75
    hot: int = 4

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"precision_policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")

    def choose(self, name: str, stored: list[int], host_fill: float, requests: dict[str, int]) -> int | None:
        """The precision to install `name` at, given its stored precisions; None = as stored (one only)."""
        if len(stored) <= 1:
            return None
        low, high = min(stored), max(stored)
        if self.policy == "fixed":
            return self.bits if self.bits in stored else high
        if self.policy == "pressure":
            return low if host_fill >= self.pressure else high
        if self.policy == "popularity":
            ranked = sorted(requests, key=lambda n: (-requests[n], n))
            return high if name in ranked[:self.hot] else low
        return high
