"""The BPE merge rule and the lone-surrogate split: shared by the fast encoder and its oracle.

The rule is tiktoken's: within each pre-tokenized piece, repeatedly merge the adjacent
pair whose concatenation has the lowest rank (leftmost on a tie) until no adjacent
pair is a token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

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
