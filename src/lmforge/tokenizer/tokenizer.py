"""The byte-level BPE tokenizer: encode, decode, save and load.

A tokenizer is fully described by four things: the order of the 256 single-byte
tokens, the list of merges (each a new token made of two earlier ones, its id being
256 + its position), the special tokens, and the pre-tokenizer pattern. From these we
build tiktoken's engine for speed; `reference.py` holds the plain-Python oracle.

Special-token strings inside ordinary text are, by default, encoded as plain text:
a corpus that quotes "<|endoftext|>" must not be able to inject a document boundary.
Pass `allowed_special` to encode them as specials, or `disallowed_special` to have
them refused, exactly as tiktoken does.

Nothing in a tokenizer is taken on trust, whether it was trained, imported or loaded:
merges must build on existing tokens and make distinct ones; special tokens must be
non-empty strings whose ids continue the vocabulary (the BPE tokens have ids 0..n-1, so
k specials take n..n+k-1); the pattern must cut every text into non-empty pieces that
join back to it (`patterns.check_pattern`); a tokenizer.json must be a regular file of
JSON with every field of the right type. Each error names the file and the fix.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import stat
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal

import tiktoken

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text
from lmforge.tokenizer.bpe import bpe_merge, split_surrogates
from lmforge.tokenizer.bytes_unicode import bytes_to_printable, printable_to_bytes
from lmforge.tokenizer.patterns import (
    COMPLETE_PATTERNS,
    GPT2_PATTERN,
    check_pattern,
    empty_piece_error,
    tiktoken_compile_error,
)

FORMAT = "lmforge.tokenizer"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
ENDOFTEXT = "<|endoftext|>"
SpecialSet = Literal["all"] | Collection[str]


def _replace_keeping_surrogates(exc: UnicodeError) -> tuple[str, int]:
    """Decode error handler: U+FFFD for broken UTF-8, but restore lone surrogates.

    A lone surrogate was encoded as its 3-byte "surrogatepass" form (ED A0..BF 80..BF);
    giving it back makes decode(encode(s)) == s for every Python string.
    """
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    b = exc.object[exc.start : exc.start + 3]
    if len(b) == 3 and b[0] == 0xED and 0xA0 <= b[1] <= 0xBF and 0x80 <= b[2] <= 0xBF:
        return b.decode("utf-8", "surrogatepass"), exc.start + 3
    return "\ufffd", exc.end


codecs.register_error("lmforge.replace", _replace_keeping_surrogates)


class Tokenizer:
    """Byte-level BPE over tiktoken's engine. Build with `train_bpe`, `from_gpt2_files` or `load`."""

    def __init__(
        self,
        merges: Sequence[tuple[int, int]],
        special_tokens: Mapping[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        byte_order: Sequence[int] = range(256),
        name: str = "lmforge-bpe",
        chat_template: str | None = None,
    ) -> None:
        # the name of the chat format the model was tuned on ("alpaca", "chat"; see
        # lmforge.data.instruct): it travels in tokenizer.json, as Hugging Face keeps a
        # model's chat template in its tokenizer config, and does not change the ids
        self.chat_template = chat_template
        byte_order = list(byte_order)
        if not all(_is_int(b) for b in byte_order) or sorted(byte_order) != list(range(256)):
            raise LmforgeError("byte_order must list each of the 256 byte values exactly once")
        tokens = [bytes([b]) for b in byte_order]
        for k, merge in enumerate(merges):
            new_id = 256 + k
            try:
                a, b = merge
                ok = type(a) is int and type(b) is int and 0 <= a < new_id and 0 <= b < new_id  # no bools, no floats
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise LmforgeError(f"merge {k} {merge!r} is not a pair of ids of tokens that exist before it (ids 0..{new_id - 1})")
            tokens.append(tokens[a] + tokens[b])
        ranks = {t: i for i, t in enumerate(tokens)}
        if len(ranks) != len(tokens):
            dup = next(t for i, t in enumerate(tokens) if ranks[t] != i)
            raise LmforgeError(f"two merges produce the same token {bytes_to_printable(dup)!r}; the merge list is corrupt")
        special_tokens = dict(special_tokens or {})
        check_special_strings(special_tokens)
        check_special_ids(special_tokens, len(tokens))
        if not isinstance(pattern, str):
            raise LmforgeError(f"the pre-tokenizer pattern must be a regex string, not {pattern!r}")
        self.name = name
        self.pattern = pattern
        self.byte_order = byte_order
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.special_tokens = special_tokens
        self.ranks: dict[bytes, int] = ranks
        self._tokens = tokens
        try:
            self._encoding = tiktoken.Encoding(
                name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
            )
        except ValueError as e:  # tiktoken's regex engine refused the pattern
            check_pattern(pattern)  # Python's regex module's message if it refuses it too
            raise tiktoken_compile_error(pattern, e) from None
        if pattern not in COMPLETE_PATTERNS:  # the built-in ones take any character by construction
            check_pattern(pattern, self._encoding)

    # --- facts -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the size of an embedding table for this tokenizer."""
        return max([len(self._tokens) - 1, *self.special_tokens.values()]) + 1

    @property
    def eot_id(self) -> int | None:
        """The id of `<|endoftext|>`, which separates documents, or None if there is none."""
        return self.special_tokens.get(ENDOFTEXT)

    def token_bytes(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token_id)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of what decides the ids (not the name): equal fingerprints, equal encodings."""
        d = self.to_dict()
        del d["name"]
        d.pop("chat_template", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, merges={len(self.merges)}, specials={list(self.special_tokens)})"

    # --- encode / decode ---------------------------------------------------------
    def special_sets(self, allowed_special: SpecialSet, disallowed_special: SpecialSet) -> tuple[set[str], set[str]]:
        """Resolve "all" the way tiktoken does; unknown names are an error."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        unknown = (allowed | disallowed) - set(self.special_tokens)
        if unknown:
            raise LmforgeError(f"unknown special token(s) {sorted(unknown)}; this tokenizer has {sorted(self.special_tokens)}")
        return allowed, disallowed

    def check_disallowed(self, text: str, disallowed: Collection[str]) -> None:
        if disallowed and (m := _special_regex(frozenset(disallowed)).search(text)):
            raise DisallowedSpecialError(
                f"the text contains the special token {m.group()!r} at character {m.start()}; "
                "allow it (allowed_special / --allow-special) to encode it as a special token, "
                "or do not disallow it to encode it as plain text"
            )

    def encode(
        self, text: str, *, allowed_special: SpecialSet = (), disallowed_special: SpecialSet = ()
    ) -> list[int]:
        """Token ids for `text`; special-token strings are plain text unless allowed (see module doc)."""
        allowed, disallowed = self.special_sets(allowed_special, disallowed_special)
        self.check_disallowed(text, disallowed)
        if _is_valid_unicode(text):
            return self._encode_valid(text, allowed)
        ids: list[int] = []
        for segment, is_surrogate in split_surrogates(text):
            if is_surrogate:
                ids += bpe_merge(segment.encode("utf-8", "surrogatepass"), self.ranks)
            else:
                ids += self._encode_valid(segment, allowed)
        return ids

    def _encode_valid(self, text: str, allowed: set[str]) -> list[int]:
        """tiktoken on text without lone surrogates; its ordinary path skips the special-token scan."""
        try:
            if allowed:
                ids = self._encoding.encode(text, allowed_special=allowed, disallowed_special=())
            else:
                ids = self._encoding.encode_ordinary(text)
        except BaseException as e:  # tiktoken panics on an empty piece, which check_pattern makes unlikely
            if (error := empty_piece_error(e, self.pattern, text)) is not None:
                raise error from None
            raise
        return ids

    def encode_batch(
        self,
        texts: Iterable[str],
        *,
        allowed_special: SpecialSet = (),
        disallowed_special: SpecialSet = (),
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """Encode many texts on several threads (tiktoken releases the GIL)."""
        with ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
            return list(
                pool.map(
                    lambda t: self.encode(t, allowed_special=allowed_special, disallowed_special=disallowed_special),
                    texts,
                )
            )

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of a sequence of ids (which may end mid-character)."""
        ids = list(ids)
        try:
            return self._encoding.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            bad = next((i for i in ids if not isinstance(i, int) or not self._is_id(i)), None)
            raise LmforgeError(f"token id {bad!r} is not in this tokenizer's vocabulary (0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text for `ids`.

        With errors="replace" (the default) bytes that do not form valid UTF-8 (an id
        sequence that splits a character) become U+FFFD, as in Python's "replace", except
        the 3-byte form of a lone surrogate, which decodes back to that surrogate so that
        decode(encode(s)) == s for every str. Use `decode_bytes` for the raw bytes, or
        errors="strict" to be told.
        """
        handler = "lmforge.replace" if errors == "replace" else errors
        return self.decode_bytes(ids).decode("utf-8", errors=handler)

    def _is_id(self, i: int) -> bool:
        return 0 <= i < len(self._tokens) or i in self.special_tokens.values()

    # --- save / load -------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "byte_order": self.byte_order,
            "merges": [[bytes_to_printable(self._tokens[a]), bytes_to_printable(self._tokens[b])] for a, b in self.merges],
            "special_tokens": self.special_tokens,
            **({"chat_template": self.chat_template} if self.chat_template else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "tokenizer") -> Tokenizer:
        """A tokenizer from the contents of a tokenizer.json; every field is checked (`source` names it in errors)."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            hint = ""
            if isinstance(d, Mapping) and "model" in d and "pre_tokenizer" in d:
                hint = " (it looks like a Hugging Face tokenizer.json)"
            elif isinstance(d, Mapping) and d and all(isinstance(v, int) for v in list(d.values())[:100]):
                hint = " (it looks like GPT-2's encoder.json: import it with `lmforge tokenizer from-gpt2`)"
            elif not isinstance(d, Mapping):
                hint = f" (it holds a JSON {type(d).__name__}, not an object)"
            raise LmforgeError(f"{source} is not an lmforge tokenizer file{hint}")
        version = d.get("version", FORMAT_VERSION)
        if not _is_int(version):
            raise LmforgeError(f"{source} is damaged: its version is {version!r}, not an integer; re-create it")
        if version > FORMAT_VERSION:
            raise LmforgeError(f"{source} was written by a newer lmforge (format version {version}); upgrade lmforge")
        try:
            merges, specials, byte_order = _fields(d)
        except LmforgeError as e:
            raise LmforgeError(f"{source} is damaged: {e}; re-create it") from None
        try:
            return cls(merges, specials, d["pattern"], byte_order, d.get("name", "lmforge-bpe"), d.get("chat_template"))
        except LmforgeError as e:
            raise LmforgeError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` into the folder `path` (or to `path` itself if it ends in .json)."""
        atomic_write_text(tokenizer_file(path), json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")
        return tokenizer_file(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a folder holding `tokenizer.json` or from the file itself."""
        file, d = read_tokenizer_json(path)
        return cls.from_dict(d, source=str(file))


def _fields(d: Mapping) -> tuple[list[tuple[int, int]], dict[str, int], list[int]]:
    """merges (as ids), special tokens and byte order from a tokenizer.json's fields, their types checked."""
    missing = [k for k in ("byte_order", "merges", "special_tokens", "pattern") if k not in d]
    if missing:
        raise LmforgeError(f"it lacks {', '.join(map(repr, missing))}")
    byte_order, merges, specials = d["byte_order"], d["merges"], d["special_tokens"]
    if not isinstance(byte_order, list) or not all(_is_int(b) for b in byte_order):
        raise LmforgeError("byte_order must be a list of the 256 byte values")
    if not isinstance(specials, Mapping) or not all(isinstance(k, str) for k in specials):
        raise LmforgeError("special_tokens must be an object of token string -> id")
    for k, v in specials.items():
        if not _is_int(v):
            raise LmforgeError(f"special token {k!r} has id {v!r}, which is not an integer")
    if not isinstance(merges, list):
        raise LmforgeError("merges must be a list of [left, right] token pairs")
    if sorted(byte_order) != list(range(256)):
        raise LmforgeError("byte_order must list each of the 256 byte values exactly once")
    for name in ("name", "chat_template"):
        if d.get(name) is not None and not isinstance(d[name], str):
            raise LmforgeError(f"{name} is {d[name]!r}, not a string")
    token_id = {bytes([b]): i for i, b in enumerate(byte_order)}
    pairs = []
    for k, merge in enumerate(merges):
        if not (type(merge) is list and len(merge) == 2 and type(merge[0]) is str and type(merge[1]) is str):
            raise LmforgeError(f"merge {k} is {merge!r}, not a pair of token strings")
        try:
            left, right = printable_to_bytes(merge[0]), printable_to_bytes(merge[1])
        except KeyError as e:
            raise LmforgeError(f"merge {k} {merge!r} has {e.args[0]!r}, which is not in GPT-2's byte alphabet") from None
        a, b = token_id.get(left), token_id.get(right)
        if a is None or b is None:
            raise LmforgeError(f"merge {k} {merge!r} uses the token {merge[a is not None]!r}, which no earlier merge makes")
        pairs.append((a, b))
        token_id.setdefault(left + right, 256 + k)
    return pairs, dict(specials), byte_order


def check_special_strings(specials: Iterable[object]) -> None:
    """Each special token must be a non-empty string that UTF-8 can hold (tiktoken matches it in text)."""
    for s in specials:
        if not isinstance(s, str):
            raise LmforgeError(f"special token {s!r} is not a string")
        if not s:
            raise LmforgeError(
                "a special token is the empty string, which would match between every two characters and hang "
                "encoding; remove it (an empty --special, or \"\" in special_tokens)"
            )
        if not _is_valid_unicode(s):
            raise LmforgeError(f"special token {s!r} contains a lone surrogate, which tiktoken cannot match; remove it")


def check_special_ids(specials: Mapping[str, object], n_tokens: int) -> None:
    """Special ids must continue the vocabulary: the BPE tokens have ids 0..n_tokens-1, so the k
    specials take n_tokens..n_tokens+k-1, each once (tiktoken's engine and our embedding
    tables need ids that fit; an id of 1e9 would make a vocabulary of a billion)."""
    k = len(specials)
    last = n_tokens + k - 1
    allowed = f"the {k} special tokens must have ids {n_tokens}..{last}, each once" if k > 1 else f"the special token must have id {n_tokens}"
    rule = f"special token ids must continue the vocabulary: the {n_tokens} BPE tokens have ids 0..{n_tokens - 1}, so {allowed}"
    seen: dict[int, str] = {}
    for s, i in specials.items():
        if not _is_int(i):
            raise LmforgeError(f"special token {s!r} has id {i!r}, which is not an integer; {rule}")
        if not n_tokens <= i <= last:
            taken = " (the id of a BPE token)" if 0 <= i < n_tokens else ""
            raise LmforgeError(f"special token {s!r} has id {i}{taken}; {rule}")
        if i in seen:
            raise LmforgeError(f"special tokens {seen[i]!r} and {s!r} both have id {i}; {rule}")
        seen[i] = s


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The file `save` writes for `path`: the path itself if it ends in .json, else `path/tokenizer.json`."""
    path = Path(path)
    return path if path.suffix == ".json" else path / TOKENIZER_FILE


def read_tokenizer_json(path: str | os.PathLike) -> tuple[Path, Any]:
    """(file, its JSON) for a folder holding tokenizer.json or the file itself: an LmforgeError naming
    the file if it is missing, not a regular file (a FIFO would block), unreadable, not UTF-8 or not JSON."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() and path.name != TOKENIZER_FILE else path
    missing = (
        f"no tokenizer at {path} (expected a folder with {TOKENIZER_FILE} or a .json file); "
        "make one with `lmforge tokenizer train` or `lmforge tokenizer from-gpt2`"
    )
    return file, json_file(file, "a tokenizer file", missing)


def json_file(file: Path, what: str, missing: str | None = None) -> Any:
    """The JSON in `file`, a regular UTF-8 file (see `text_file`)."""
    text = text_file(file, what, missing)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so are too-long integers
        raise LmforgeError(f"{file} is truncated or not JSON ({e}); re-create it") from None


def text_file(file: Path, what: str, missing: str | None = None) -> str:
    """The text of `file`, which should be `what` ("GPT-2's vocab.bpe"): an LmforgeError, not a
    traceback or a hang, if it is missing (`missing` says so), a folder, a FIFO or a device,
    unreadable or not UTF-8."""
    try:
        mode = file.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise LmforgeError(missing or f"{file} does not exist; give the path of {what}") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {file}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket or a device"
        raise LmforgeError(f"{file} is not a regular file but {kind}, so it is not read; give the path of {what}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}), so it is not {what}") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {file}: {e.strerror or e}") from None


class DisallowedSpecialError(LmforgeError, ValueError):
    """A disallowed special-token string was found in the text (tiktoken raises ValueError too)."""


def _is_valid_unicode(text: str) -> bool:
    """No lone surrogates? (Encoding to UTF-8 is the fastest check CPython offers: ~5x a regex search.)"""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@lru_cache(maxsize=16)
def _special_regex(specials: frozenset[str]) -> re.Pattern:
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
