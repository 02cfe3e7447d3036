"""The data stage: a corpus -> token files, and the datasets that feed training.

- `prepare` writes train.bin / val.bin / meta.json (+ the tokenizer) from text, streamed;
  `TokenData.open` (tokens.py) reads them back as read-only memmaps, checking the tokenizer.
- `TokenWindows` (a torch Dataset of sliding windows, shardable, seeded order per epoch)
  and `RandomWindows` (stateless random batches by step) turn tokens into (x, y) pairs.
- `download` fetches the standard public data sets, verified by sha256.

The windows live in `windows.py`, which imports torch (~2 s); they are loaded on first
use so that `lmforge data ...` commands start without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmforge.data.download import DATASETS, DataSource, RemoteFile, download, download_file
from lmforge.data.prepare import prepare, val_rule
from lmforge.data.tokens import TokenData, token_dtype

if TYPE_CHECKING:
    from lmforge.data.windows import RandomWindows, TokenWindows

__all__ = [
    "DATASETS",
    "DataSource",
    "RandomWindows",
    "RemoteFile",
    "TokenData",
    "TokenWindows",
    "download",
    "download_file",
    "prepare",
    "token_dtype",
    "val_rule",
]


def __getattr__(name: str) -> object:
    if name in ("RandomWindows", "TokenWindows"):
        from lmforge.data import windows

        return getattr(windows, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
