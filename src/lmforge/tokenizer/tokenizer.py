"""The byte-level BPE tokenizer: encode, decode, save and load.

A tokenizer is fully described by four things: the order of the 256 single-byte
tokens, the list of merges (each a new token made of two earlier ones, its id being
256 + its position), the special tokens, and the pre-tokenizer pattern. From these we
build tiktoken's engine for speed; `reference.py` holds the plain-Python oracle.

Special-token strings inside ordinary text are, by default, encoded as plain text:
a corpus that quotes "<|endoftext|>" must not be able to inject a document boundary.
Pass `allowed_special` to encode them as specials, or `disallowed_special` to have
them refused, exactly as tiktoken does.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

import tiktoken

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text
from lmforge.tokenizer.bpe import bpe_merge, split_surrogates
from lmforge.tokenizer.bytes_unicode import bytes_to_printable, printable_to_bytes
from lmforge.tokenizer.patterns import GPT2_PATTERN

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
        if sorted(byte_order) != list(range(256)):
            raise LmforgeError("byte_order must list each of the 256 byte values exactly once")
        tokens = [bytes([b]) for b in byte_order]
        for k, (a, b) in enumerate(merges):
            new_id = 256 + k
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise LmforgeError(f"merge {k} ({a}, {b}) refers to a token that does not exist yet")
            tokens.append(tokens[a] + tokens[b])
        ranks = {t: i for i, t in enumerate(tokens)}
        if len(ranks) != len(tokens):
            dup = next(t for i, t in enumerate(tokens) if ranks[t] != i)
            raise LmforgeError(f"two merges produce the same token {bytes_to_printable(dup)!r}; the merge list is corrupt")
        special_tokens = dict(special_tokens or {})
        taken = set(range(len(tokens)))
        for s, i in special_tokens.items():
            if i in taken:
                raise LmforgeError(f"special token {s!r} has id {i}, which is already taken")
            taken.add(i)
        self.name = name
        self.pattern = pattern
        self.byte_order = byte_order
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.special_tokens = special_tokens
        self.ranks: dict[bytes, int] = ranks
        self._tokens = tokens
        self._encoding = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
        )

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
        if allowed:
            return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())
        return self._encoding.encode_ordinary(text)

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
    def from_dict(cls, d: Mapping, source: str = "tokenizer") -> Tokenizer:
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            hint = ""
            if isinstance(d, Mapping) and "model" in d and "pre_tokenizer" in d:
                hint = " (it looks like a Hugging Face tokenizer.json)"
            elif isinstance(d, Mapping) and d and all(isinstance(v, int) for v in list(d.values())[:100]):
                hint = " (it looks like GPT-2's encoder.json: import it with `lmforge tokenizer from-gpt2`)"
            raise LmforgeError(f"{source} is not an lmforge tokenizer file{hint}")
        if d.get("version", 0) > FORMAT_VERSION:
            raise LmforgeError(f"{source} was written by a newer lmforge (format version {d['version']}); upgrade lmforge")
        try:
            byte_order = [int(b) for b in d["byte_order"]]
            token_id = {bytes([b]): i for i, b in enumerate(byte_order)}
            merges = []
            for k, (left, right) in enumerate(d["merges"]):
                lb, rb = printable_to_bytes(left), printable_to_bytes(right)
                merges.append((token_id[lb], token_id[rb]))
                token_id.setdefault(lb + rb, 256 + k)
            return cls(merges, {str(k): int(v) for k, v in d["special_tokens"].items()}, d["pattern"], byte_order,
                       d.get("name", "lmforge-bpe"), d.get("chat_template"))
        except (KeyError, ValueError, TypeError) as e:
            raise LmforgeError(f"{source} is damaged: {type(e).__name__} {e}; re-create it") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` into the folder `path` (or to `path` itself if it ends in .json)."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        atomic_write_text(file, json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a folder holding `tokenizer.json` or from the file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise LmforgeError(
                f"no tokenizer at {path} (expected a folder with {TOKENIZER_FILE} or a .json file); "
                "make one with `lmforge tokenizer train` or `lmforge tokenizer from-gpt2`"
            )
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmforgeError(f"{file} is truncated or not JSON ({e}); re-create it") from None
        return cls.from_dict(d, source=str(file))


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
