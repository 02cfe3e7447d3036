"""lmforge: build a language model from scratch and carry it through its whole life.

The pipeline, one sub-package per stage: tokenizer -> data -> model -> train ->
finetune -> align -> serve. The names here are the public API; the ones that need
torch are imported on first use, so `lmforge tokenizer ...` starts fast.
"""

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["GPT", "Config", "Engine", "LmforgeError", "SamplingParams", "Tokenizer", "__version__", "load"]

_LAZY = {
    "Config": "lmforge.config",
    "GPT": "lmforge.model",
    "Engine": "lmforge.engine",
    "SamplingParams": "lmforge.sampling",
    "load": "lmforge.pretrained",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
