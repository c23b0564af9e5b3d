"""Synthetic text tasks: the six fine-tune tasks, the base pretraining mixture, and held-out eval sets.

Every example is a (prompt, answer) pair of plain strings; a model sees `<s>` + prompt + answer + `</s>`.
The six tasks use the prompt format "<task> <input>=". The base mixture never shows that format: it holds
pseudo-word text, other string games, and the six skills in a different phrasing ("abc backwards is cba"),
like a pretrained model that has a skill latent but does not follow the instruction format. A fine-tune
then only has to map the format onto the skill, so its delta stays small; the base scores low on the six
prompts. Inputs of held-out eval prompts are excluded from every training stream, in either phrasing.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

# Bump when any generator or prompt format changes: it is part of the family's content hash.
TASKS_VERSION = 2

TASKS: tuple[str, ...] = ("reverse", "sort", "upper", "caesar", "add", "copy")
CAESAR_SHIFT = 3
MIN_CHARS, MAX_CHARS = 3, 6
ADD_MAX = 99  # add: first operand in [0, ADD_MAX], second a single digit

Example = tuple[str, str]  # (prompt, answer)
Generator = Callable[[random.Random], Example]

_LOWER = string.ascii_lowercase
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _letters(rng: random.Random, alphabet: str = _LOWER) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(MIN_CHARS, MAX_CHARS)))


def _shift(text: str, shift: int) -> str:
    return "".join(_LOWER[(_LOWER.index(c) + shift) % 26] for c in text)


def _prompt(task: str, task_input: str) -> str:
    return f"{task} {task_input}="


def _reverse(rng: random.Random) -> Example:
    x = _letters(rng)
    return _prompt("reverse", x), x[::-1]


def _sort(rng: random.Random) -> Example:
    x = _letters(rng)
    return _prompt("sort", x), "".join(sorted(x))


def _upper(rng: random.Random) -> Example:
    x = _letters(rng)
    return _prompt("upper", x), x.upper()


def _caesar(rng: random.Random) -> Example:
    x = _letters(rng)
    return _prompt("caesar", x), _shift(x, CAESAR_SHIFT)


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, ADD_MAX), rng.randint(0, 9)
    return _prompt("add", f"{a}+{b}"), str(a + b)


def _copy(rng: random.Random) -> Example:
    x = _letters(rng)
    return _prompt("copy", x), x


TASK_GENERATORS: dict[str, Generator] = {
    "reverse": _reverse, "sort": _sort, "upper": _upper, "caesar": _caesar, "add": _add, "copy": _copy,
}


# --- base pretraining mixture: text, other string games, the six skills in another phrasing ---------

def _text(rng: random.Random) -> Example:
    """Pseudo-word sentences (capitalised, punctuated); the whole line is the 'answer' (no prompt)."""
    n_words = rng.randint(2, 5)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 2))) for _ in range(n_words)]
    words = [w.capitalize() if i == 0 or rng.random() < 0.15 else w for i, w in enumerate(words)]
    return "", " ".join(words) + rng.choice(".!?")


def _count(rng: random.Random) -> Example:
    start = rng.randint(0, 90)
    stop = start + rng.randint(2, 6)
    return _prompt("count", f"{start} {stop}"), " ".join(str(i) for i in range(start, stop + 1))


def _lower(rng: random.Random) -> Example:  # the inverse of upper
    x = _letters(rng, string.ascii_uppercase)
    return _prompt("lower", x), x.lower()


def _twice(rng: random.Random) -> Example:  # copy, twice
    x = _letters(rng)
    return _prompt("twice", x), x + x


# base-phrasing name -> (task, prompt suffix after the input); "+" reads " plus " in this phrasing
REPHRASED: dict[str, tuple[str, str]] = {
    "backwards": ("reverse", " backwards is "),
    "in_order": ("sort", " in order is "),
    "shouted": ("upper", " shouted is "),
    "moved": ("caesar", " moved three is "),
    "plus": ("add", " makes "),
    "again": ("copy", " again is "),
}


def _rephrased(task: str, suffix: str) -> Generator:
    """The skill of `task` in the base's phrasing: "<input><suffix>" + answer."""
    def generate(rng: random.Random) -> Example:
        prompt, answer = TASK_GENERATORS[task](rng)
        return prompt[len(task) + 1:-1].replace("+", " plus ") + suffix, answer
    return generate


def task_prompt_of(prompt: str) -> str:
    """The six-task prompt with the same input as a base-phrasing prompt (else `prompt` itself)."""
    for task, suffix in REPHRASED.values():
        if prompt.endswith(suffix):
            return _prompt(task, prompt[:-len(suffix)].replace(" plus ", "+"))
    return prompt


PRETRAIN_GENERATORS: dict[str, Generator] = {
    "text": _text, "count": _count, "lower": _lower, "twice": _twice,
    **{name: _rephrased(task, suffix) for name, (task, suffix) in REPHRASED.items()},
}
# sampling weight per generator (default 1): most of the budget goes to the six skills
PRETRAIN_WEIGHTS: dict[str, float] = {**{name: 2.0 for name in REPHRASED}, "in_order": 3.0, "plus": 4.0}


def task_seed(seed: int, *parts: str) -> int:
    """A stable integer seed for (family seed, purpose...) that does not depend on PYTHONHASHSEED."""
    value = seed
    for part in parts:
        for ch in part:
            value = (value * 1_000_003 + ord(ch)) % (1 << 61)
    return value


def make_eval_set(task: str, seed: int, n: int) -> list[Example]:
    """`n` distinct held-out examples of `task` (distinct prompts)."""
    rng = random.Random(task_seed(seed, "eval", task))
    generator = TASK_GENERATORS[task]
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        prompt, answer = generator(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return out


def sample_examples(generators: dict[str, Generator], rng: random.Random, n: int,
                    held_out: set[str]) -> list[Example]:
    """`n` examples drawn over `generators` (PRETRAIN_WEIGHTS, default 1), skipping held-out inputs."""
    names = sorted(generators)
    weights = [PRETRAIN_WEIGHTS.get(name, 1.0) for name in names]
    out: list[Example] = []
    while len(out) < n:
        prompt, answer = generators[rng.choices(names, weights)[0]](rng)
        if prompt and task_prompt_of(prompt) in held_out:
            continue
        out.append((prompt, answer))
    return out
