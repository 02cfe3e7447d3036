"""Small helpers for the words of messages. Bottom layer: imports only the standard
library, so any module that prints can use them."""

from __future__ import annotations


def plural(n: int, word: str, words: str | None = None) -> str:
    """A count with its noun in the right number, digits grouped: "1 document",
    "0 documents", "1,024 documents". `words` is the plural when it is not `word` + "s"
    ("1 entry" / "2 entries")."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"
