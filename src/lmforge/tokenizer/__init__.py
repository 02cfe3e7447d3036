"""Byte-level BPE: train our own, or import GPT-2's; encode with tiktoken's engine."""

from lmforge.tokenizer.gpt2 import from_gpt2_files
from lmforge.tokenizer.patterns import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    PATTERNS,
    resolve_pattern,
)
from lmforge.tokenizer.reference import reference_encode
from lmforge.tokenizer.tokenizer import ENDOFTEXT, DisallowedSpecialError, Tokenizer
from lmforge.tokenizer.train import train_bpe

__all__ = [
    "ENDOFTEXT",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "PATTERNS",
    "DisallowedSpecialError",
    "Tokenizer",
    "from_gpt2_files",
    "reference_encode",
    "resolve_pattern",
    "train_bpe",
]
