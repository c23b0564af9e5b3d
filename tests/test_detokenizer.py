"""Incremental detokenizer: the full decode at every token; partial UTF-8 and stop strings held back."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from deltazip.family.tokenizer import build_tokenizer
from deltazip.runtime.detokenizer import IncrementalDetokenizer, detokenize_incrementally

# multi-byte UTF-8 (2-, 3- and 4-byte characters) so that single tokens split characters
CORPUS = ["héllo wörld, ça va? naïve café", "日本語のテキストと中文字符，混合在一起。",
          "emoji 🙂🚀👩‍💻 and ✓ ✗ €100", "Ελληνικά и русский текст",
          "mixed 漢字 and ascii 123 🙂 again 日本"] * 20


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, which the ByteLevel pre-tokenizer uses for its alphabet."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on CORPUS: merges join bytes, and lone bytes split characters."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def char_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def _decoder(tokenizer, calls: list[int] | None = None):
    def decode(ids) -> str:
        if calls is not None:
            calls.append(len(ids))
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    return decode


def _byte_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text` (the byte-level alphabet's single-byte tokens)."""
    table = _bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(table[b]) for b in text.encode()]


def _streams(tokenizer, rng: random.Random, count: int, length: int):
    """Uniformly random ids (lone bytes, merges, special tokens) and real text, in pieces and as bytes."""
    vocab = len(tokenizer)
    for _ in range(count):
        yield [rng.randrange(vocab) for _ in range(length)]
    for text in CORPUS[:5]:
        yield tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.convert_tokens_to_ids("Ā") != tokenizer.unk_token_id:  # byte-level: one token per byte
            yield _byte_ids(tokenizer, text)


def _run(decode, ids: list[int], stop=()) -> tuple[IncrementalDetokenizer, list[str], int]:
    """Feed `ids`; returns the detokenizer, the pieces streamed (flush included) and tokens consumed."""
    detok = IncrementalDetokenizer(decode, stop)
    pieces, consumed = [], 0
    for token in ids:
        consumed += 1
        if detok.append(token):
            break
        pieces.append(detok.take_output())
    pieces.append(detok.flush())
    return detok, pieces, consumed


@pytest.mark.parametrize("name", ["char_tokenizer", "byte_bpe"])
def test_text_equals_full_decode_at_every_token(request, name):
    tokenizer = request.getfixturevalue(name)
    decode = _decoder(tokenizer)
    rng = random.Random(0)
    saw_partial_utf8 = False
    for ids in _streams(tokenizer, rng, count=30, length=60):
        detok = IncrementalDetokenizer(decode)
        streamed = ""
        for k, token in enumerate(ids, 1):
            detok.append(token)
            assert detok.text == decode(ids[:k]), (ids[:k], detok.text)
            piece = detok.take_output()
            saw_partial_utf8 |= detok.text.endswith("\ufffd")
            streamed += piece
            assert decode(ids[:k]).startswith(streamed)  # streamed text is never taken back
        assert streamed + detok.flush() == decode(ids) == detok.text
    assert saw_partial_utf8 == (name == "byte_bpe")


def test_split_characters_are_held_until_complete(byte_bpe):
    decode = _decoder(byte_bpe)
    text = "a🙂b日c"  # 4-byte and 3-byte characters, one token per byte
    detok = IncrementalDetokenizer(decode)
    pieces = []
    for token in _byte_ids(byte_bpe, text):
        detok.append(token)
        pieces.append(detok.take_output())
    assert pieces == ["a", "", "", "", "🙂", "b", "", "", "日", "c"]
    assert "".join(pieces) + detok.flush() == text


def _reference_stop(decode, ids: list[int], stop: list[str]) -> tuple[str, int]:
    """Full decode after every token; the first text holding a stop string ends there."""
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        found = [i for i in (text.find(s) for s in stop) if i >= 0]
        if found:
            return text[:min(found)], k
    return decode(ids), len(ids)


@pytest.mark.parametrize("name", ["char_tokenizer", "byte_bpe"])
def test_stop_strings_match_full_decode_and_are_never_streamed(request, name):
    tokenizer = request.getfixturevalue(name)
    decode = _decoder(tokenizer)
    rng = random.Random(1)
    stopped = 0
    for ids in _streams(tokenizer, rng, count=30, length=60):
        full = decode(ids)
        if len(full) < 4:
            continue
        stop = []
        for _ in range(rng.randint(1, 3)):  # substrings of the text (they span tokens), and one absent
            start = rng.randrange(len(full) - 1)
            stop.append(full[start:start + rng.randint(1, 4)].replace("\ufffd", "x") or "x")
        stop.append("never there \u0000")
        want_text, want_tokens = _reference_stop(decode, ids, stop)
        detok, pieces, consumed = _run(decode, ids, stop)
        assert (detok.text, consumed) == (want_text, want_tokens), stop
        assert "".join(pieces) == want_text
        streamed_before_end = "".join(pieces[:-1])
        assert not any(s in streamed_before_end for s in stop)
        stopped += detok.stop_index is not None
    assert stopped > 10


def test_stop_string_across_tokens_and_a_split_character(byte_bpe):
    decode = _decoder(byte_bpe)
    ids = _byte_ids(byte_bpe, "xyzb€tail")  # "b€" is 'b' + three byte tokens
    detok, pieces, consumed = _run(decode, ids, stop=["b€"])
    assert detok.text == "xyz" and "".join(pieces) == "xyz"
    assert consumed == 7  # the token completing "€" ends it
    char = build_tokenizer()
    ids = char("hello world", add_special_tokens=False)["input_ids"]
    detok, pieces, consumed = _run(_decoder(char), ids, stop=["lo w"])
    assert detok.text == "hel" and consumed == 7 and all("lo w" not in p for p in pieces)


@pytest.mark.parametrize("name", ["char_tokenizer", "byte_bpe"])
def test_work_per_token_does_not_grow_with_length(request, name):
    """Two decode calls per token on a window of bounded size: linear in the completion's length."""
    tokenizer = request.getfixturevalue(name)
    calls: list[int] = []
    decode = _decoder(tokenizer, calls)
    rng = random.Random(2)
    corpus = CORPUS if name == "byte_bpe" else ["the quick brown fox jumps over the lazy dog", "0123 + 456 ="]
    ids = tokenizer(" ".join(rng.choices(corpus, k=50)), add_special_tokens=False)["input_ids"]
    ids = (ids * (4000 // len(ids) + 1))[:4000]
    detok = IncrementalDetokenizer(decode, stop=["never there \u0000"])
    for token in ids:
        detok.append(token)
        detok.take_output()
    assert len(calls) == 2 * len(ids)
    assert max(calls) <= 8  # ids per decode call: a couple of tokens, never the whole completion
    assert detok.text == decode(ids)


def test_offsets_advance_only_on_complete_text(byte_bpe):
    decode = _decoder(byte_bpe)
    ids = _byte_ids(byte_bpe, "a€")
    text, prefix_offset, read_offset = detokenize_incrementally(decode, ids[:2], 0, 0)
    assert (prefix_offset, read_offset) == (0, 0) and text.endswith("\ufffd")  # "a" + partial "€": pending
    text, prefix_offset, read_offset = detokenize_incrementally(decode, ids, 0, 0)
    assert (text, prefix_offset, read_offset) == ("a€", 0, 4)
