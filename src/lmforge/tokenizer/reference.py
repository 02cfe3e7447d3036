"""A small pure-Python BPE encoder: the oracle the fast (tiktoken) path is tested against.

The rule is tiktoken's: within each pre-tokenized piece, repeatedly merge the adjacent
pair whose concatenation has the lowest rank (leftmost on a tie) until no adjacent
pair is a token. Slow, short and obviously right; never used in production paths
except for the rare lone-surrogate pieces tiktoken cannot take.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Literal

import regex

if TYPE_CHECKING:
    from lmforge.tokenizer.tokenizer import Tokenizer

_SURROGATE_RUN = re.compile("[\ud800-\udfff]+")


def bpe_merge(piece: bytes, ranks: Mapping[bytes, int]) -> list[int]:
    """Token ids for one pre-tokenized piece."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def split_surrogates(text: str) -> list[tuple[str, bool]]:
    """Cut `text` into (segment, is_lone_surrogates) runs.

    Lone surrogates are valid in a Python str but not in UTF-8; they are encoded as
    their 3-byte "surrogatepass" form, one BPE piece per run, so that every Python
    string round-trips exactly.
    """
    out, pos = [], 0
    for m in _SURROGATE_RUN.finditer(text):
        if m.start() > pos:
            out.append((text[pos : m.start()], False))
        out.append((m.group(), True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


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
