"""Tokenizers: byte-level BPE (train our own, or import GPT-2's; tiktoken's engine encodes),
llama2.c's sentencepiece-style tokenizer, and the chat templates that turn messages into text.

`tokenizer.py` is the BPE tokenizer and its file, `train.py` the trainer, `reference.py`
the plain-Python encoder the fast path is tested against, `gpt2.py` the GPT-2 import,
`llama2c.py` llama2.c's tokenizer, `templates.py` the chat formats.
"""

from lmforge.tokenizer.gpt2 import from_gpt2_files
from lmforge.tokenizer.patterns import GPT2_PATTERN, GPT4_PATTERN, PATTERNS, resolve_pattern
from lmforge.tokenizer.reference import reference_encode
from lmforge.tokenizer.tokenizer import ENDOFTEXT, TOKENIZER_FILE, DisallowedSpecialError, Tokenizer, read_tokenizer_json
from lmforge.tokenizer.train import train_bpe

__all__ = [
    "ENDOFTEXT",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "PATTERNS",
    "TOKENIZER_FILE",
    "DisallowedSpecialError",
    "Tokenizer",
    "from_gpt2_files",
    "read_tokenizer_json",
    "reference_encode",
    "resolve_pattern",
    "train_bpe",
]
