"""Inference: the `Engine` owns the KV cache and turns prompts into tokens.

`engine.py` holds the cache, the prefill/decode loop, stops and streaming; `sampling.py`
the rules that pick a token from logits; `cpu_decode.py` and `prefetch.py` the CPU
tuning that makes one-row decoding run at memory speed (weight layout, output-matrix
blocks, a second core reading ahead), none of which changes a token.
"""

from lmforge.engine.cpu_decode import relayout_for_decode
from lmforge.engine.engine import Completion, Engine, KVCache, end_of_text_ids, generate_uncached
from lmforge.engine.sampling import SamplingParams, sample

__all__ = [
    "Completion",
    "Engine",
    "KVCache",
    "SamplingParams",
    "end_of_text_ids",
    "generate_uncached",
    "relayout_for_decode",
    "sample",
]
