"""A small pure-Python BPE encoder: the oracle the fast (tiktoken) path is tested against.

It applies tiktoken's merge rule (`bpe.py`) piece by piece in Python: slow, short and
obviously right. Production encoding uses the rule directly only for the rare
lone-surrogate pieces tiktoken cannot take.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Literal

import regex

from lmforge.tokenizer.bpe import bpe_merge, split_surrogates

if TYPE_CHECKING:
    from lmforge.tokenizer.tokenizer import Tokenizer


def reference_encode(
    tok: Tokenizer,
    text: str,
    *,
    allowed_special: Literal["all"] | Collection[str] = (),
    disallowed_special: Literal["all"] | Collection[str] = (),
) -> list[int]:
    """Encode like `Tokenizer.encode`, in plain Python."""
    allowed, disallowed = tok.special_sets(allowed_special, disallowed_special)
    tok.check_disallowed(text, disallowed)
    pattern = regex.compile(tok.pattern)
    special_re = regex.compile("|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))) if allowed else None
    ids: list[int] = []
    for segment, is_surrogate in split_surrogates(text):
        if is_surrogate:
            ids += bpe_merge(segment.encode("utf-8", "surrogatepass"), tok.ranks)
            continue
        pos = 0
        while True:
            m = special_re.search(segment, pos) if special_re else None
            end = m.start() if m else len(segment)
            for piece in pattern.findall(segment, pos, end):
                ids += bpe_merge(piece.encode("utf-8"), tok.ranks)
            if m is None:
                break
            ids.append(tok.special_tokens[m.group()])
            pos = m.end()
    return ids
