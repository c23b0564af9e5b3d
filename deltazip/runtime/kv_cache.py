"""Per-sequence KV caches and the token budget they are allocated under."""

from __future__ import annotations

import threading

import torch


class KVCache:
    """One sequence's keys and values for every layer, each [layers, kv_heads, capacity_tokens, head_dim]."""

    def __init__(self, num_layers: int, num_kv_heads: int, capacity_tokens: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, num_kv_heads, capacity_tokens, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity_tokens = capacity_tokens
        self.length = 0  # tokens written so far (the position of the next token)

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [kv_heads, n, head_dim] of positions start..start+n-1 of one layer."""
        end = start + keys.shape[1]
        if end > self.capacity_tokens:
            raise ValueError(f"KV cache holds {self.capacity_tokens} tokens, position {end - 1} does not fit")
        self.keys[layer, :, start:end] = keys
        self.values[layer, :, start:end] = values

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class KVBudget:
    """Counts KV-cache tokens reserved by running sequences against a fixed total (thread-safe)."""

    def __init__(self, total_tokens: int) -> None:
        self.total_tokens = total_tokens
        self.reserved_tokens = 0
        self._lock = threading.Lock()

    def can_ever_fit(self, tokens: int) -> bool:
        return tokens <= self.total_tokens

    def try_reserve(self, tokens: int) -> bool:
        """Reserve `tokens` if they fit now; False means wait for running sequences to finish."""
        with self._lock:
            if self.reserved_tokens + tokens > self.total_tokens:
                return False
            self.reserved_tokens += tokens
            return True

    def release(self, tokens: int) -> None:
        with self._lock:
            self.reserved_tokens -= tokens
