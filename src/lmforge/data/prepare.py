"""A corpus -> the token files of `tokens.py` (`train.bin`, `val.bin`, `meta.json`).

Documents are joined by `<|endoftext|>`: the eot id follows every document, so a file
reads doc1 EOT doc2 EOT ... and a model learns where one text ends.

The corpus is streamed: text arrives in ~1 MiB chunks from `lmforge.corpus`, is encoded
on a few threads (tiktoken releases the GIL) and written through a fixed-size buffer,
so memory stays flat whatever the corpus size. The output folder appears whole or not
at all (`atomic_output_dir`): an error or Ctrl-C leaves nothing behind.

Train/val split, by documents and deterministic: document i (0-based, input order) goes
to val when floor((i+1)*f) > floor(i*f), which puts exactly floor(n*f) documents in val,
evenly spread, without knowing n in advance. `f` is taken as the decimal it was written
as (0.29 means 29/100, not the nearest binary float), so the count is exact. A corpus
with too few documents for that (a single file such as tinyshakespeare) gets the last
f of its tokens as val instead (`"val_split": "tail-of-tokens"` in meta.json: the last
train document then runs on into val.bin, and `documents` counts only whole documents
assigned by the rule, 0 for val).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmforge import __version__
from lmforge.corpus import ReadStats, file_kind, iter_documents, resolve_inputs
from lmforge.data.tokens import FORMAT, FORMAT_VERSION, META_FILE, TOKEN_SPLITS, TokenData, token_dtype
from lmforge.errors import LmforgeError
from lmforge.io import atomic_output_dir, atomic_write_text
from lmforge.text import plural
from lmforge.tokenizer import ENDOFTEXT, Tokenizer
from lmforge.tokenizer.tokenizer import TOKENIZER_FILE

_TASK_CHARS = 1 << 20  # text per encoding task: one file chunk, or many short JSONL documents
_BUFFER_TOKENS = 1 << 21  # tokens held per split between writes (4 MB as uint16)
_EXAMPLES = 5  # files with undecodable bytes named in meta.json


def _exact(val_fraction: float) -> Fraction:
    """The fraction as the decimal it was written as (0.29 -> 29/100), checked to be in [0, 1)."""
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    return Fraction(str(val_fraction))


def val_rule(val_fraction: float) -> Callable[[int], bool]:
    """`is_val(i)`: does document i go to val? floor((i+1)*f) > floor(i*f), with f exact."""
    f = _exact(val_fraction)
    p, q = f.numerator, f.denominator
    return lambda i: (i + 1) * p // q > i * p // q


class _TokenFile:
    """One split's token file, written through a fixed numpy buffer so memory stays flat."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = dtype
        self.tokens = 0
        self.documents = 0
        self._file = open(path, "wb")
        self._buffer = np.empty(_BUFFER_TOKENS, dtype)
        self._used = 0

    def write(self, ids: Sequence[int]) -> None:
        n = len(ids)
        if self._used + n > len(self._buffer):
            self.flush()
        if n > len(self._buffer):
            np.asarray(ids, dtype=self.dtype).tofile(self._file)
        else:
            self._buffer[self._used : self._used + n] = ids
            self._used += n
        self.tokens += n

    def flush(self) -> None:
        self._buffer[: self._used].tofile(self._file)
        self._used = 0

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def _encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(t) for t in texts]


class _Encoder:
    """Encode texts on a thread pool while the caller keeps reading; write results in order.

    Texts are grouped into tasks of ~1 MiB (a file chunk alone, or many short documents
    together, so the per-task overhead stays small); at most 2 tasks per thread are in
    flight, which bounds memory and keeps every thread busy while the next chunk is read.
    """

    def __init__(self, tokenizer: Tokenizer, eot_id: int, num_threads: int, on_written: Callable[[], None]) -> None:
        self._tokenizer = tokenizer
        self._eot = [eot_id]
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="lmforge-encode")
        self._max_in_flight = 2 * num_threads
        self._in_flight: deque[tuple[Future, list[tuple[_TokenFile, bool]]]] = deque()
        self._texts: list[str] = []
        self._targets: list[tuple[_TokenFile, bool]] = []
        self._chars = 0
        self._on_written = on_written

    def add(self, text: str, target: _TokenFile, ends_document: bool) -> None:
        self._texts.append(text)
        self._targets.append((target, ends_document))
        self._chars += len(text)
        if self._chars >= _TASK_CHARS:
            self._submit()

    def finish(self) -> None:
        self._submit()
        while self._in_flight:
            self._write_oldest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> None:
        if self._texts:
            self._in_flight.append((self._pool.submit(_encode_texts, self._tokenizer, self._texts), self._targets))
            self._texts, self._targets, self._chars = [], [], 0
        while len(self._in_flight) > self._max_in_flight:
            self._write_oldest()

    def _write_oldest(self) -> None:
        future, targets = self._in_flight.popleft()
        for ids, (target, ends_document) in zip(future.result(), targets):
            target.write(ids)
            if ends_document:
                target.write(self._eot)
        self._on_written()


def _with_last(chunks: Iterable[str]) -> Iterable[tuple[str, bool]]:
    """Each chunk with whether it is the document's last (the eot id goes after it)."""
    it = iter(chunks)
    prev = next(it)
    for chunk in it:
        yield prev, False
        prev = chunk
    yield prev, True


def _move_tail(train: _TokenFile, val: _TokenFile, count: int) -> None:
    """Move the last `count` tokens of train.bin to val.bin: a block copy, then truncate."""
    keep = (train.tokens - count) * train.dtype.itemsize
    with open(train.path, "rb") as src, open(val.path, "wb") as dst:
        src.seek(keep)
        shutil.copyfileobj(src, dst, 1 << 24)
    os.truncate(train.path, keep)
    train.tokens -= count
    val.tokens += count


def _check_tokenizer(tokenizer: Tokenizer) -> int:
    if tokenizer.eot_id is None:
        raise LmforgeError(
            f"tokenizer {tokenizer.name!r} has no {ENDOFTEXT} special token, which prepare puts between documents; "
            "train one with `lmforge tokenizer train` (it always adds it) or import GPT-2's with `lmforge tokenizer from-gpt2`"
        )
    token_dtype(tokenizer.vocab_size)
    return tokenizer.eot_id


def _is_data_folder(path: Path) -> bool:
    """Is `path` a folder `prepare` made: its meta.json is a JSON object of our format?"""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_folder(out: str | os.PathLike, inputs: Sequence[Path]) -> None:
    """Refuse an --out that prepare must not replace, before anything is read or written.

    The folder is replaced whole, so it may be neither the current folder (or one
    above it) nor a folder that is or holds an input; and `overwrite` replaces only a
    data folder that `prepare` made (its meta.json says so) or an empty folder, never
    a folder of other files. A missing `out` is always fine.
    """
    out = Path(out)
    if not out.name or out.name in (".", ".."):  # ".", "..", "/", "dir/..": a folder with no name of its own
        raise LmforgeError(
            f"--out {str(out)!r} names no folder of its own; prepare replaces its --out folder whole, "
            "so give a new folder's name, e.g. --out data/tokens"
        )
    if not os.path.lexists(out):
        return
    real = os.path.realpath(out)
    lexical = os.path.join(os.path.realpath(out.parent), out.name)  # what is replaced: a symlink itself, not its target
    if _inside(os.getcwd(), real) or _inside(os.getcwd(), lexical):
        raise LmforgeError(
            f"--out {out} is the current folder or holds it; prepare replaces its --out folder whole, "
            "so name a folder outside the current one (or run from another folder)"
        )
    for path in inputs:
        where = os.path.realpath(path)
        if _inside(where, real) or _inside(where, lexical) or _inside(os.path.abspath(path), lexical):
            what = "is an input" if os.path.realpath(path) == real else f"holds the input {path}"
            raise LmforgeError(
                f"--out {out} {what}; prepare would replace the corpus it reads, so write the token files "
                f"to a folder outside the inputs, e.g. --out {out.parent / (out.name + '-tokens')}"
            )
    if _replaceable(out):
        return  # without `overwrite`, atomic_output_dir says it exists and how to replace it
    kind = file_kind(out) or "a file"
    what = f"is {kind}" if kind != "a folder" else f"is a folder that is not a data folder (it has no {META_FILE} of format {FORMAT!r})"
    raise LmforgeError(
        f"--out {out} already exists and {what}; prepare replaces its --out folder whole, and --overwrite replaces only "
        "a folder `lmforge data prepare` made (or an empty one), so choose a new --out folder"
    )


def _replaceable(out: Path) -> bool:
    """A data folder prepare made, or an empty folder: nothing else is lost by replacing it."""
    if not out.is_dir():
        return False
    try:
        return _is_data_folder(out) or not any(out.iterdir())
    except OSError:
        return False


def prepare(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    out: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    text_field: str = "text",
    overwrite: bool = False,
    num_threads: int | None = None,
    progress: bool = False,
) -> TokenData:
    """Tokenize the documents in `inputs` (files, folders, globs: `resolve_inputs`) into the folder `out`.

    Writes train.bin, val.bin, meta.json and a copy of the tokenizer (tokenizer.json),
    so the folder is self-contained. Returns the folder opened as `TokenData`.
    An existing `out` is refused unless `overwrite` is given and it is a data folder
    (`check_output_folder`); a folder that is or holds an input is always refused.
    """
    if num_threads is not None and not (isinstance(num_threads, int) and num_threads >= 1):
        raise LmforgeError(f"--workers (num_threads) must be a positive number of threads, got {num_threads!r}")
    eot_id = _check_tokenizer(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    is_val = val_rule(val_fraction)
    paths = resolve_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
    check_output_folder(out, paths)
    stats = ReadStats()
    bar = tqdm(total=sum(p.stat().st_size for p in paths), desc="prepare", unit="B", unit_scale=True, disable=not progress, leave=False)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        files = {split: _TokenFile(tmp / f"{split}.bin", dtype) for split in TOKEN_SPLITS}
        encoder = _Encoder(tokenizer, eot_id, num_threads or os.cpu_count() or 1, lambda: bar.update(stats.bytes - bar.n))
        try:
            for i, document in enumerate(iter_documents(paths, stats, text_field)):
                target = files["val" if is_val(i) else "train"]
                target.documents += 1
                for text, last in _with_last(document):
                    encoder.add(text, target, last)
            encoder.finish()
        finally:
            encoder.close()
            bar.close()
            for f in files.values():
                f.close()
        if stats.documents == 0:
            where = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
            raise LmforgeError(f"the input has no text ({plural(stats.files, 'file')}, all empty: {where}); give files that contain text")
        train, val = files["train"], files["val"]
        val_split = "documents" if val.documents else "none"
        if val_fraction > 0 and not val.documents:
            count = int(train.tokens * _exact(val_fraction))  # floor
            if count:
                _move_tail(train, val, count)
                val_split = "tail-of-tokens"
        tokenizer.save(tmp)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": eot_id,
            "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint, "file": TOKENIZER_FILE},
            "splits": {s: {"file": f.path.name, "tokens": f.tokens, "documents": f.documents} for s, f in files.items()},
            "val_fraction": val_fraction,
            "val_split": val_split,
            "sources": {
                "files": stats.files,
                "documents": stats.documents,
                "empty_documents": stats.empty_documents,
                "bytes": stats.bytes,
                "replaced_bytes": stats.replaced_bytes,
                "files_with_replacements": len(stats.files_with_replacements),
                "replacement_examples": stats.files_with_replacements[:_EXAMPLES],
                "text_field": text_field,
            },
            "lmforge_version": __version__,
        }
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return TokenData.open(out, tokenizer)
