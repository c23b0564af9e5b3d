"""Calibration data: the one reader of calibration jsonl files and the two ways of cutting token windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deltazip.errors import DeltazipError


def read_calib_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """The "text" of each line of a calibration jsonl ({"text": ...} per line), the first `limit` if given."""
    path = Path(path)
    if not path.is_file():
        raise DeltazipError(f"calibration file not found: {path}")
    texts = []
    with open(path) as f:  # lines split at newlines only (a JSON string may hold U+2028)
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DeltazipError(f"{path}:{line_no}: expected a JSON object with a 'text' field") from None
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise DeltazipError(f"{path}: no calibration texts")
    return texts


def calibration_tokens(model_dir: Path, calib_path: Path, n_samples: int, seq_len: int) -> torch.Tensor:
    """n_samples windows [n, seq_len] of token ids from the tokenized calibration texts (joined by EOS).

    Windows start where a text starts (BOS first, as prompts do at inference), spread evenly over the
    texts; when there are fewer text starts than n_samples, evenly spaced windows fill the rest.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise DeltazipError(f"{model_dir}: cannot load its tokenizer for calibration ({e})") from None
    ids: list[int] = []
    text_starts: list[int] = []
    for text in read_calib_texts(calib_path):
        text_starts.append(len(ids))
        ids.extend(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if len(ids) < seq_len:
        raise DeltazipError(f"{calib_path}: only {len(ids)} tokens, fewer than --seq-len {seq_len}")
    stream = torch.tensor(ids, dtype=torch.long)
    fits = [s for s in text_starts if s + seq_len <= len(ids)]
    take = min(n_samples, len(fits))
    starts = [fits[i] for i in torch.linspace(0, len(fits) - 1, take).long().tolist()] if take else []
    starts += torch.linspace(0, len(ids) - seq_len, n_samples - take).long().tolist()
    return torch.stack([stream[s:s + seq_len] for s in starts])


def calib_ids(tokenizer, texts: list[str], n_samples: int, seq_len: int) -> torch.Tensor:
    """Consecutive windows [n, seq_len] for the baselines: texts tokenized (BOS first) and concatenated."""
    ids = [i for text in texts for i in tokenizer(text)["input_ids"]]
    n = min(n_samples, len(ids) // seq_len)
    if n == 0:
        raise DeltazipError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
