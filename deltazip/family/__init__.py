"""The embedded tiny model family: a Llama base and one full fine-tune per synthetic task, in HF format."""

from deltazip.family.create import FAMILY_VERSION, Family, create_family, load_family
from deltazip.family.evaluate import exact_match, greedy_generate, load_eval_set
from deltazip.family.tasks import TASKS

__all__ = ["FAMILY_VERSION", "TASKS", "Family", "create_family", "exact_match", "greedy_generate",
           "load_eval_set", "load_family"]
