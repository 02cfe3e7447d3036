"""lmforge: build a language model from scratch and carry it through its whole life.

The pipeline, one sub-package per stage: tokenizer -> data -> model -> train ->
finetune -> align -> serve, with `recipes` wiring them for one job each and `cli` on
top. The names here are the public API; the ones that need torch are imported on
first use, so `lmforge tokenizer ...` starts fast.
"""

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "Config": "lmforge.config",
    "GPT": "lmforge.model",
    "Engine": "lmforge.engine",
    "SamplingParams": "lmforge.engine",
    "load": "lmforge.loading",
    "load_adapted": "lmforge.loading",
    "save_pretrained": "lmforge.weights",
    "LoRAConfig": "lmforge.finetune.lora",
    "apply_lora": "lmforge.finetune.lora",
    "merge_lora": "lmforge.finetune.lora",
    "adapters_disabled": "lmforge.finetune.lora",
    "save_adapter": "lmforge.finetune.adapter",
    "load_adapter": "lmforge.finetune.adapter",
    "quantize_nf4": "lmforge.finetune.nf4",
    "dequantize_nf4": "lmforge.finetune.nf4",
    "quantize_model": "lmforge.finetune.nf4",
}
__all__ = [  # noqa: F822 - the lazy names resolve through __getattr__
    "Config", "Engine", "GPT", "LmforgeError", "LoRAConfig", "SamplingParams", "Tokenizer", "__version__",
    "adapters_disabled", "apply_lora", "dequantize_nf4", "load", "load_adapted", "load_adapter", "merge_lora",
    "quantize_model", "quantize_nf4", "save_adapter", "save_pretrained",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
