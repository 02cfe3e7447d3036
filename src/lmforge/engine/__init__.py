"""Inference: the `Engine` owns the KV cache and turns prompts into tokens.

`engine.py` holds the cache, the prefill/decode loop, stops and streaming; `sampling.py`
the rules that pick a token from logits; `cpu_decode.py` the CPU tuning that makes
one-row decoding run at memory speed (oneDNN-packed, fused weights), which changes no token.
"""

from lmforge.engine.cache import KVCache
from lmforge.engine.engine import Completion, Engine, end_of_text_ids, generate_uncached
from lmforge.engine.sampling import SamplingParams, sample

__all__ = [
    "Completion",
    "Engine",
    "KVCache",
    "SamplingParams",
    "end_of_text_ids",
    "generate_uncached",
    "sample",
]
