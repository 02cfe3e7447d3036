"""Pre-tokenizer patterns: the text is cut into pieces by one of these before BPE.

BPE never merges across a piece boundary, so the pattern decides what a token can
be (e.g. GPT-2 keeps a leading space with the word: " world").

A pattern must cut *all* of the text into pieces: tiktoken silently drops what no
alternative matches (`[a-z]+` turns "Hello, World 123" into "elloorld"), and panics
on an empty piece (`x*`). `check_pattern` refuses both, trying the pattern in Python's
`regex` (which training uses) and in tiktoken's own engine (which encodes) on a probe
text of every kind of character, and Python's on every character too. (Checking each
encoded text kept all its bytes would cost about 9% of encoding speed; `Tokenizer` only
turns tiktoken's panic into an error, which costs nothing.)
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from functools import lru_cache

import regex
import tiktoken

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
# Each built-in pattern ends in alternatives that together take any one character (a letter,
# a number, whitespace, or anything else), so it covers every text by construction.
COMPLETE_PATTERNS = frozenset(PATTERNS.values())
CATCH_ALL_HINT = r"end the pattern with a catch-all alternative such as `|\s+|.` or use a built-in one (gpt2, gpt4)"

# What a pattern is tried on: each part alone (so every kind of character also starts and
# ends a text) and all of them joined. Lone surrogates are left out: they never reach the
# pattern (the tokenizer cuts them out first and encodes them as bytes).
PROBE_PARTS: tuple[str, ...] = (
    "Hello, World 123", "I'm you'll we've they're he'd it's DON'T", "snake_case camelCase kebab-case x=1+2*3",
    "   ", "\t\t", "\n", "\n\n\n", "\r\n", " \n ", "a  b", "end   ", "  start", "\x0b\x0c\x1c\x1d\x1e\x1f\x85",
    "\u00a0\u2002\u2003\u2009\u202f\u3000\u2028\u2029", "\u200b\u200c\u200d\u2060\ufeff\u00ad",
    "0123456789", "3.14159 -42 1,000,000 1e-9", "\u0663\u0664\u0665 \u0967\u0968 \uff11\uff12 \u00b2\u00b3 \u2160\u2161 \u00bd",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "\u00ab\u00bb \u201c\u201d \u2018\u2019 \u2014\u2013 \u2026 \u00bf\u00a1 \u3001\u3002 \uff01",
    "\u20ac\u00a3\u00a5 \u00a9\u00ae\u2122 \u2211\u221e\u2260 \u2192\u21d2 \u00b0\u00b1\u00d7\u00f7",
    "caf\u00e9 na\u00efve Stra\u00dfe \u0152uvre \u00c5ngstr\u00f6m \u0141\u00f3d\u017a",
    "e\u0301 a\u0308 n\u0303 \u0300\u0301",  # combining marks, one standing alone
    "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u041f\u0440\u0438\u0432\u0435\u0442",  # Greek, Cyrillic
    "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u200f",  # Arabic, Hebrew, a direction mark
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0915\u094d\u0937 \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",  # Devanagari, Thai
    "\u4e2d\u6587\u5b57 \u3053\u3093\u306b\u3061\u306f \u30ab\u30bf\u30ab\u30ca",  # Chinese, Japanese
    "\ub300\ud55c\ubbfc\uad6d\uc740 \ubbfc\uc8fc\uacf5\ud654\uad6d\uc774\ub2e4. \u1100\u1161\u11a8",  # Korean, jamo
    "\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1f0\U0001f1f7 \u2764\ufe0f \U0001f642",  # emoji
    "\U0001d518\U0001d52b\U0001d526 \U00010348 \U00020000 \ue000 \U000f0000 \ufffd \uffff",  # astral, private use
    "<|endoftext|> <s> [INST]",
    "".join(map(chr, range(128))),  # all of ASCII, control characters included
)
PROBE_TEXTS: tuple[str, ...] = ("", *PROBE_PARTS, " ".join(PROBE_PARTS), "".join(PROBE_PARTS))


@lru_cache(maxsize=1)
def every_character() -> str:
    """Every code point of the BMP but the surrogates, and every 7th above it (all planes, all
    blocks): 213k characters, each of every category and script, for Python's regex module."""
    return "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x10000))) + "".join(map(chr, range(0x10000, 0x110000, 7)))


def resolve_pattern(name_or_regex: str) -> str:
    """Accept a named pattern (`gpt2`, `gpt4`) or a regex given verbatim, checked by `check_pattern`."""
    if isinstance(name_or_regex, str) and name_or_regex in PATTERNS:
        return PATTERNS[name_or_regex]
    check_pattern(name_or_regex)
    return name_or_regex


def check_pattern(pattern: str, engine: tiktoken.Encoding | None = None) -> None:
    """Refuse a pattern that does not compile, can match the empty string, or skips characters.

    Tried in Python's `regex` (which training uses) on PROBE_TEXTS and every_character(), and
    in `engine`, a tiktoken Encoding built on the pattern (which encodes; one with the 256
    bytes alone if not given) on PROBE_TEXTS. The messages say what is wrong and how to fix
    it. A pattern is checked once per process, in 10 to 100 ms.
    """
    if not isinstance(pattern, str) or not pattern:
        raise LmforgeError(f"the pre-tokenizer pattern must be a non-empty regex string, not {pattern!r}; use gpt2, gpt4 or a regex")
    if pattern in _CHECKED:
        return
    compiled = _compile(pattern)
    gap = None  # the first text with characters no match takes; an empty match is reported before it
    for text in (*PROBE_TEXTS, every_character()):
        pos, skipped = 0, []
        for m in compiled.finditer(text):
            if m.start() == m.end():
                raise _empty_match(pattern, text, m.start())
            if m.start() > pos:
                skipped.append(text[pos : m.start()])
            pos = m.end()
        if pos < len(text):
            skipped.append(text[pos:])
        if skipped and gap is None:
            gap = _not_covered(pattern, "".join(skipped), text)
    if gap is not None:
        raise gap
    if engine is None:
        try:
            engine = tiktoken.Encoding("lmforge-pattern-check", pat_str=pattern, mergeable_ranks=_BYTE_RANKS, special_tokens={})
        except ValueError as e:
            raise tiktoken_compile_error(pattern, e) from None
    for text in PROBE_TEXTS:  # the engine that encodes (fancy-regex) must agree (every_character() would take 0.1 s)
        if engine.decode_bytes(engine_encode(pattern, text, engine.encode_ordinary)) != text.encode("utf-8"):
            raise LmforgeError(
                f"pattern {pattern!r} drops characters of {_clip(text, 0)!r} in tiktoken's regex engine (though not in "
                f"Python's regex module, which reads it differently); {CATCH_ALL_HINT}"
            )
    _CHECKED.add(pattern)


def engine_encode(pattern: str, text: str, encode: Callable[[str], list[int]]) -> list[int]:
    """`encode(text)` on a tiktoken engine, with its panic on an empty piece made an LmforgeError."""
    try:
        return encode(text)
    except BaseException as e:
        error = empty_piece_error(e, pattern, text)
        if error is None:
            raise
        raise error from None


def empty_piece_error(e: BaseException, pattern: str, text: str) -> LmforgeError | None:
    """The LmforgeError for tiktoken's panic on an empty piece (pyo3's PanicException, a BaseException), else None."""
    return _empty_match(pattern, text, None) if type(e).__name__ == "PanicException" else None


def tiktoken_compile_error(pattern: str, e: Exception) -> LmforgeError:
    return LmforgeError(f"pattern {pattern!r} does not compile in tiktoken's regex engine ({e}); rewrite it or use gpt2 or gpt4")


def describe_characters(chars: str, limit: int = 8) -> str:
    """The distinct characters of `chars`, each with its code point and name: 'H' (U+0048 LATIN CAPITAL LETTER H)."""
    distinct = list(dict.fromkeys(chars))
    out = [f"{c!r} (U+{ord(c):04X} {unicodedata.name(c, '') or 'category ' + unicodedata.category(c)})" for c in distinct[:limit]]
    return ", ".join(out) + (f" and {len(distinct) - limit} more" if len(distinct) > limit else "")


@lru_cache(maxsize=32)
def _compile(pattern: str) -> regex.Pattern:
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise LmforgeError(f"pattern {pattern!r} is neither {' nor '.join(PATTERNS)} nor a valid regex: {e}") from None


def _empty_match(pattern: str, text: str, at: int | None) -> LmforgeError:
    where = f" (at character {at} of {_clip(text, at)!r})" if at is not None else ""
    return LmforgeError(
        f"pattern {pattern!r} can match the empty string{where}, on which tiktoken fails; make every alternative take "
        "at least one character (`+` instead of `*`, no lookaround or anchor alone), or use gpt2 or gpt4"
    )


def _not_covered(pattern: str, skipped: str, text: str) -> LmforgeError:
    return LmforgeError(
        f"pattern {pattern!r} does not cover every character: it skips {describe_characters(skipped)} "
        f"(e.g. in {_clip(text, text.find(skipped[0]))!r}), which tiktoken would silently drop from the text; {CATCH_ALL_HINT}"
    )


def _clip(text: str, at: int, width: int = 24) -> str:
    start = max(0, at - width // 2)
    return text[start : start + width]


_BYTE_RANKS = {bytes([b]): b for b in range(256)}
_CHECKED: set[str] = set()  # patterns that passed check_pattern
