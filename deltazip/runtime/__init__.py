"""The torch runtime: Llama executor, delta layers, delta pool, continuous-batching engine, detokenizer."""

from deltazip.errors import RequestError
from deltazip.runtime.engine import Engine
from deltazip.runtime.model import load_llama
from deltazip.runtime.pool import DeltaPool
from deltazip.runtime.request import RequestHandle
from deltazip.runtime.sampling import GenerationRequest, GenerationResult, SamplingParams

__all__ = ["DeltaPool", "Engine", "GenerationRequest", "GenerationResult", "RequestError", "RequestHandle",
           "SamplingParams", "load_llama"]
