"""A character-level tokenizer built with `tokenizers` (no hub), wrapped as a PreTrainedTokenizerFast."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3
# Newline + printable ASCII (95) + specials = 100 tokens; padded with reserved tokens to a multiple of 128.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = 128
# Chat: the family is trained on "<task> <input>=" → answer + EOS, so a user turn is its content as is and an
# assistant turn is its content + EOS; system turns are dropped (the model has no notion of them).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: a BPE model with no merges, `<s>` prepended, decoded by plain joining."""
    assert set(string.printable) - set("\t\r\x0b\x0c") <= set(ALPHABET)
    symbols = [*SPECIAL_TOKENS, *ALPHABET]
    symbols += [f"<reserved_{i}>" for i in range(VOCAB_SIZE - len(symbols))]
    vocab = {symbol: token_id for token_id, symbol in enumerate(symbols)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=256,
        chat_template=CHAT_TEMPLATE)
