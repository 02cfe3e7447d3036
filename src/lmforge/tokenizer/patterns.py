"""Pre-tokenizer patterns: the text is cut into pieces by one of these before BPE.

BPE never merges across a piece boundary, so the pattern decides what a token can
be (e.g. GPT-2 keeps a leading space with the word: " world").
"""

from __future__ import annotations

from lmforge.errors import LmforgeError

# GPT-2's pattern in tiktoken's faster, equivalent form (possessive quantifiers, `\s++$`).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4 (cl100k): case-insensitive contractions, digits in groups of at most three,
# punctuation keeps its trailing newlines.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}


def resolve_pattern(name_or_regex: str) -> str:
    """Accept a named pattern (`gpt2`, `gpt4`) or a regex given verbatim."""
    if name_or_regex in PATTERNS:
        return PATTERNS[name_or_regex]
    import regex

    try:
        regex.compile(name_or_regex)
    except regex.error as e:
        raise LmforgeError(f"pattern {name_or_regex!r} is neither {' nor '.join(PATTERNS)} nor a valid regex: {e}") from None
    return name_or_regex
