"""A small real tokenizer for the test models (their vocabulary is `tests.models.VOCAB`)."""

from __future__ import annotations

from pathlib import Path

from tests.models import VOCAB

WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def save_tokenizer(directory: Path, *, chat_template: bool = True) -> Path:
    """A word-level fast tokenizer over `tests.models.VOCAB` ids (``<pad>`` 0, ``<s>`` 1,
    ``</s>`` 2), saved with ``save_pretrained`` into ``directory``; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    if chat_template:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(directory)
    return Path(directory)
