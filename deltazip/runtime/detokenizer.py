"""Incremental detokenization of one completion: constant work per token, stop strings, UTF-8 hold-back.

As in vLLM, each new token decodes only a short window of ids: `prefix_offset` marks where the window
starts (a few tokens of context, so merges and leading spaces decode as in the full text) and
`read_offset` where the text already returned ends. The text after `read_offset` is *pending* while it
ends in "\ufffd" (an incomplete UTF-8 sequence that the next token may complete); it becomes final, and
the offsets advance, once it does not. Final text is streamed except its last `max(len(stop)) - 1`
characters, which may still begin a stop string; a stop string is never streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]  # token ids -> text (special tokens skipped)
REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


def detokenize_incrementally(decode: Decode, token_ids: Sequence[int], prefix_offset: int,
                             read_offset: int) -> tuple[str, int, int]:
    """Text of `token_ids` after `read_offset`, and the next (prefix_offset, read_offset).

    The offsets advance only when that text is final (non-empty, not ending in "\ufffd"); otherwise
    they are returned unchanged and the text is pending.
    """
    prefix_text = decode(token_ids[prefix_offset:read_offset])
    new_text = decode(token_ids[prefix_offset:])
    if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
        return new_text[len(prefix_text):], prefix_offset, read_offset
    return new_text[len(prefix_text):], read_offset, len(token_ids)


class IncrementalDetokenizer:
    """The text of one completion, token by token; `text` equals decoding all tokens at once.

    Exact where decoding concatenates per-token bytes or characters (byte-level BPE, the family's tokenizer).
    """

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = tuple(stop)
        self._hold_chars = max((len(s) for s in self.stop), default=1) - 1  # may still begin a stop string
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._final_chars = 0  # length of the final text (before the pending text)
        self._emitted: list[str] = []  # pieces returned by take_output/flush
        self._emitted_chars = 0
        self._unemitted = ""  # final text after the emitted pieces
        self._pending = ""  # text after the final text; ends in "\ufffd" (or is empty)
        self.stop_index: int | None = None  # set when a stop string was found: the text ends there

    @property
    def text(self) -> str:
        """Everything decoded so far, cut before the first stop string."""
        return "".join(self._emitted) + self._tail()

    def append(self, token_id: int) -> bool:
        """Decode one more token; True when the text now holds a stop string (no more tokens then)."""
        if self.stop_index is not None:
            raise RuntimeError("the text already ended at a stop string")
        self.token_ids.append(token_id)
        # a stop string that ends in the final text seen before would have been found then
        search_from = max(self._final_chars - self._hold_chars, self._emitted_chars)
        piece, self._prefix_offset, read_offset = detokenize_incrementally(
            self._decode, self.token_ids, self._prefix_offset, self._read_offset)
        if read_offset != self._read_offset:  # final: ends in a complete character
            self._unemitted += piece
            self._final_chars += len(piece)
            self._pending = ""
            self._read_offset = read_offset
        else:
            self._pending = piece
        if self.stop:
            tail = self._unemitted + self._pending
            start = search_from - self._emitted_chars
            found = [i for i in (tail.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.stop_index = self._emitted_chars + min(found)
        return self.stop_index is not None

    def take_output(self) -> str:
        """Final text not returned before, except what could still begin a stop string.

        Call it after every append: the text it leaves is what each append searches for stop strings.
        """
        if self.stop_index is not None:
            return ""
        safe_chars = len(self._unemitted) - self._hold_chars
        if safe_chars <= 0:
            return ""
        return self._take(safe_chars)

    def flush(self) -> str:
        """The rest of the text (pending text included, cut at a stop string); the last call."""
        self._unemitted = self._tail()
        self._pending = ""
        return self._take(len(self._unemitted))

    def _tail(self) -> str:
        tail = self._unemitted + self._pending
        if self.stop_index is not None:
            tail = tail[:self.stop_index - self._emitted_chars]
        return tail

    def _take(self, num_chars: int) -> str:
        piece, self._unemitted = self._unemitted[:num_chars], self._unemitted[num_chars:]
        if piece:
            self._emitted.append(piece)
            self._emitted_chars += len(piece)
        return piece
