"""lmforge: build a language model from scratch and carry it through its whole life.

The pipeline, one sub-package per stage: tokenizer -> data -> model -> train ->
finetune -> align -> serve. The names here are the public API.
"""

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["LmforgeError", "Tokenizer", "__version__"]
