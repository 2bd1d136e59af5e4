"""A student's own tokenizer, trained here: a byte-level BPE (GPT-2 style) on the run's training text.

Cross-tokenizer distillation (`potstill.tasks.cross_tokenizer`) lets a student use a smaller vocabulary than its
teacher; `student.tokenizer: "bpe:<size>"` trains one with the `tokenizers` library on data.train's text at
the start of the run and keeps it in the run folder. Special tokens: `<s>` (BOS), `</s>` (EOS), `<pad>`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from potstill.errors import UserError

BPE_PREFIX = "bpe:"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def bpe_vocab_size(spec: str, field: str = "student.tokenizer") -> int:
    """The vocabulary size of a `bpe:<size>` spec."""
    size = spec[len(BPE_PREFIX):]
    if not size.isdigit() or int(size) < MIN_VOCAB:
        raise UserError(f"field {field}: {spec!r}: expected bpe:<vocabulary size>, a whole number >= {MIN_VOCAB} "
                        f"(the 256 byte tokens and the special tokens), e.g. bpe:4096")
    return int(size)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, folder: Path) -> Any:
    """Train a byte-level BPE of `vocab_size` tokens on `texts` and save it (as a transformers fast tokenizer)
    in `folder`, written to a temporary folder first and renamed; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
