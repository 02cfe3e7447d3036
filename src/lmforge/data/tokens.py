"""The token format on disk: `train.bin` / `val.bin` + `meta.json`, and reading it back.

Training reads tokens at random offsets millions of times, so they are stored as one
flat array per split that `np.memmap` can open without reading it: `uint16` when every
id fits (vocab_size <= 65,536, GPT-2's 50,257 included), else `uint32`, little-endian.
`prepare.py` writes this format; everything downstream reads it through `TokenData`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

FORMAT = "lmforge.tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKEN_SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}

def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65,536 ids, else uint32."""
    for dtype in DTYPES.values():
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    raise LmforgeError(
        f"vocab_size {vocab_size:,} does not fit the largest token dtype (uint32, at most {2**32:,} ids); "
        "use a tokenizer with fewer ids"
    )


class TokenData:
    """A prepared data folder: its metadata, and each split as a read-only `np.memmap`.

    Opening checks everything that can be checked without reading the tokens: the
    metadata is ours and whole, each .bin has exactly the bytes meta.json promises, and
    (given a tokenizer) the ids were made by that same tokenizer.
    """

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.meta = meta

    @classmethod
    def open(cls, path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> TokenData:
        path = Path(path)
        data = cls(path, _read_meta(path))
        for split in TOKEN_SPLITS:
            data._check_size(split)
        if tokenizer is not None and tokenizer.fingerprint != data.tokenizer_fingerprint:
            t = data.meta["tokenizer"]
            raise LmforgeError(
                f"tokenizer {tokenizer.name!r} ({tokenizer.vocab_size:,} ids, fingerprint {tokenizer.fingerprint[:12]}) "
                f"is not the one {path} was prepared with ({t['name']!r}, {data.vocab_size:,} ids, fingerprint "
                f"{t['fingerprint'][:12]}); use the tokenizer copied into the data folder ({path / t['file']}) "
                "or re-run `lmforge data prepare` with this tokenizer"
            )
        return data

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.meta["dtype"]]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eot_id(self) -> int:
        return self.meta["eot_id"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    def num_tokens(self, split: str) -> int:
        return self._split_meta(split)["tokens"]

    def split(self, split: str) -> np.ndarray:
        """The split's tokens, memory-mapped read-only (an empty array for an empty split)."""
        n = self.num_tokens(split)
        if n == 0:  # mmap cannot map an empty file
            empty = np.empty(0, self.dtype)
            empty.flags.writeable = False
            return empty
        return np.memmap(self.path / self._split_meta(split)["file"], dtype=self.dtype, mode="r", shape=(n,))

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the data was prepared with: the copy inside the folder, checked to
        be that one (a swapped copy would train every checkpoint with the wrong tokenizer)."""
        file = self.path / self.meta["tokenizer"]["file"]
        tok = Tokenizer.load(file)
        if tok.fingerprint != self.tokenizer_fingerprint or tok.vocab_size != self.vocab_size:
            raise LmforgeError(
                f"{file} is not the tokenizer {self.path} was prepared with: it has {tok.vocab_size:,} ids and fingerprint "
                f"{tok.fingerprint[:12]}, {META_FILE} says {self.vocab_size:,} ids and fingerprint "
                f"{self.tokenizer_fingerprint[:12]}; re-run `lmforge data prepare` with the tokenizer you want"
            )
        return tok

    def bytes_per_token(self, split: str, tokenizer: Tokenizer, max_tokens: int = 1 << 21) -> float:
        """Text bytes per token of `split` (from its first `max_tokens` tokens; the
        <|endoftext|> between documents counts as a token of no text): the factor that
        turns a loss in nats per token into bits per byte, which compares models whose
        vocabularies differ. NaN for an empty split."""
        ids = self.split(split)[:max_tokens]
        if len(ids) == 0:
            return math.nan
        text = ids[ids != self.eot_id].tolist()
        return len(tokenizer.decode_bytes(text)) / len(ids)

    def check_ids(self, vocab_size: int) -> None:
        """Every token id below `vocab_size` (a model's embedding table), checked by reading
        each split once (memory speed): an id past the table would stop training deep in
        the embedding with an IndexError."""
        if self.vocab_size > vocab_size:
            raise LmforgeError(
                f"{self.path} was prepared with a vocabulary of {self.vocab_size:,} ids but the model has {vocab_size:,}; "
                "drop the vocab_size override (the model takes the data's vocabulary by default)"
            )
        chunk = 1 << 24
        for split in TOKEN_SPLITS:
            tokens = self.split(split)
            top = max((int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)), default=-1)
            if top >= vocab_size:
                raise LmforgeError(
                    f"{self.path / self._split_meta(split)['file']} holds id {top:,}, outside the vocabulary of {vocab_size:,} "
                    f"ids its {META_FILE} promises: the file was changed or made with another tokenizer; re-run "
                    "`lmforge data prepare`"
                )

    def _split_meta(self, split: str) -> dict:
        if split not in self.meta["splits"]:
            raise LmforgeError(f"{self.path} has no split {split!r} (it has {', '.join(self.meta['splits'])})")
        return self.meta["splits"][split]

    def _check_size(self, split: str) -> None:
        file = self.path / self._split_meta(split)["file"]
        if not file.is_file():
            raise LmforgeError(f"{file} is missing; re-run `lmforge data prepare`")
        expected = self.num_tokens(split) * self.dtype.itemsize
        actual = file.stat().st_size
        if actual != expected:
            raise LmforgeError(
                f"{file} has {actual:,} bytes but {META_FILE} says {self.num_tokens(split):,} {self.meta['dtype']} tokens "
                f"({expected:,} bytes): the file is truncated or was changed; re-run `lmforge data prepare`"
            )


def _read_meta(path: Path) -> dict:
    """meta.json, checked to be ours, whole and of a version we read."""
    if not path.is_dir():
        raise LmforgeError(f"no prepared data at {path} (not a folder); make it with `lmforge data prepare --out {path}`")
    file = path / META_FILE
    if not file.is_file():
        raise LmforgeError(f"{path} has no {META_FILE}: it is not a prepared data folder; make one with `lmforge data prepare`")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{file} is truncated or not JSON ({e}); re-run `lmforge data prepare`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LmforgeError(f"{file} is not lmforge token metadata (format {FORMAT!r}); was {path} made by `lmforge data prepare`?")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise LmforgeError(f"{file} has format version {meta.get('version')!r}; this lmforge reads up to {FORMAT_VERSION}: upgrade lmforge")
    try:
        ok = (
            meta["dtype"] in DTYPES
            and all(isinstance(meta[k], int) for k in ("vocab_size", "eot_id"))
            and all(isinstance(meta["tokenizer"][k], str) for k in ("name", "fingerprint", "file"))
            and all(isinstance(meta["splits"][s]["file"], str) and isinstance(meta["splits"][s]["tokens"], int) for s in TOKEN_SPLITS)
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise LmforgeError(f"{file} is damaged (a field is missing or of the wrong type); re-run `lmforge data prepare`")
    return meta
