"""Request types and next-token sampling (greedy, temperature, top-k, top-p) with a per-request generator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltazip.errors import RequestError

# Temperatures a request may ask for besides 0 (greedy). Below the minimum, logits / temperature overflow
# float32 (1e-40 turns every logit into ±inf and softmax into NaN); above the maximum sampling is uniform
# noise. Values outside are refused at validation, never clamped silently.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**64 - 1  # torch generators take unsigned 64-bit seeds


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise RequestError naming the first bad field."""
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise RequestError(f"max_tokens must be an integer >= 0, not {self.max_tokens!r}")
        if not isinstance(self.temperature, int | float) or isinstance(self.temperature, bool) or not (
                self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise RequestError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                               f"{MAX_TEMPERATURE:g}], not {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0, not {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise RequestError(f"seed must be an integer in [0, 2^64) or None, not {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be a list of non-empty strings, not {self.stop!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationRequest:
    prompt: str
    delta: str | None = None  # None: the base model
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded when asked (reproducible), else from fresh entropy."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from logits [V] of one sequence."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
