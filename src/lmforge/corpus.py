"""Where text comes from: files, folders, globs, JSONL, or the embedded default corpus.

Both the tokenizer trainer and `lmforge data prepare` read text through here, so the
two see exactly the same documents. Text is streamed: a file is decoded in ~1 MiB
chunks cut only where no pre-tokenizer piece can span the cut (see `safe_cut`), so
encoding chunk by chunk gives the same ids as encoding the whole file at once.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
import stat
import sysconfig
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lmforge.errors import LmforgeError
from lmforge.text import plural

# Suffixes taken when a folder is given; a file named explicitly is always taken.
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".rst", ".py", ".jsonl"})
CHUNK_BYTES = 1 << 20
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_GLOB_CHARS = frozenset("*?[")


def default_corpus_root() -> Path:
    """The running Python's standard library: present wherever lmforge runs, no download."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The `.py` sources of the standard library (installed packages excluded), in a fixed order."""
    root = default_corpus_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def corpus_paths(inputs: Sequence[str | os.PathLike] | None, say: Callable[[str], object] = print) -> list[Path]:
    """`resolve_inputs(inputs)`, or the embedded default corpus (announced through `say`) when none are given."""
    if inputs:
        return resolve_inputs(inputs)
    files = default_corpus_files()
    say(f"no --input given: using the embedded default corpus, the {len(files):,} .py files of {default_corpus_root()}")
    return files


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def file_kind(path: str | os.PathLike) -> str | None:
    """What `path` is when it is not a regular file ("a FIFO (named pipe)", "a character
    device", "a folder", "a broken symbolic link to ...", "missing"); None for a regular
    file. Only `stat`s the path: a FIFO or a device is never opened, so this never blocks."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)})"
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str | os.PathLike, what: str = "input") -> None:
    """Refuse anything but a regular file (a FIFO would block reading, /dev/zero never ends)."""
    kind = file_kind(path)
    if kind == "missing":
        raise LmforgeError(f"{what} {str(path)!r} does not exist")
    if kind is not None:
        raise LmforgeError(f"{what} {str(path)!r} is not a regular file: it is {kind}; give a text file")


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (recursively, text suffixes only) and globs into a sorted, de-duplicated list.

    Every path returned is a regular file: a FIFO, a device or a socket named directly,
    matched by a glob or met in a folder under a text suffix is refused (reading one
    would block or never end), and so is a broken symbolic link.
    """
    found: list[Path] = []
    for item in inputs:
        if not str(item).strip():  # Path("") is the current folder: never what an empty --input meant
            raise LmforgeError("an --input is empty; name a text file, a folder or a glob")
        p = Path(item)
        kind = file_kind(p)
        if kind is None:
            found.append(p)
        elif kind == "a folder":
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
                for f in sorted(filenames):
                    if not f.startswith(".") and Path(f).suffix.lower() in TEXT_SUFFIXES:
                        path = Path(dirpath) / f
                        _check_found(path, f"in the input folder {str(item)!r}")
                        found.append(path)
        elif kind == "missing" and _GLOB_CHARS & set(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            files = []
            for m in matches:
                if not m.is_dir():
                    _check_found(m, f"matched by the input glob {str(item)!r}")
                    files.append(m)
            if not files:
                raise LmforgeError(f"input glob {item!r} matches no files")
            found.extend(files)
        elif kind == "missing":
            raise LmforgeError(f"input {str(item)!r} does not exist (give a file, a folder or a glob)")
        else:
            raise LmforgeError(f"input {str(item)!r} is not a regular file: it is {kind}; give a text file, a folder or a glob")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise LmforgeError(f"no text files found in {', '.join(map(str, inputs))} (taken: {', '.join(sorted(TEXT_SUFFIXES))})")
    return unique


def _check_found(path: Path, where: str) -> None:
    kind = file_kind(path)
    if kind is not None:
        raise LmforgeError(f"{path} ({where}) is not a regular file: it is {kind}; remove it or give the files you want")


@dataclass
class ReadStats:
    """What reading the corpus met: reported to the user, stored in dataset metadata."""

    files: int = 0
    documents: int = 0
    empty_documents: int = 0
    bytes: int = 0
    replaced_bytes: int = 0
    files_with_replacements: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{plural(self.documents, 'document')} from {plural(self.files, 'file')}, {self.bytes / 1e6:,.1f} MB"
        if self.replaced_bytes:
            text += (
                f"; {plural(self.replaced_bytes, 'undecodable byte')} replaced by U+FFFD in "
                f"{plural(len(self.files_with_replacements), 'file')} (not UTF-8), e.g. {self.files_with_replacements[0]}"
            )
        return text


def _class(c: str) -> str:
    """"L" for a letter, "N" for a number, "" for anything else (the classes the patterns split on)."""
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else ""


def safe_cut(text: str, start: int = 0) -> int:
    """The last index after `start` where `text` may be cut without changing its pieces, or 0.

    A cut is safe right after the end of a run of letters or of digits: in both the GPT-2
    and GPT-4 patterns such a run always ends a piece, and the piece that follows is
    matched from its first character with no look-behind, so it matches the same
    whether or not the text before it is there. (A custom pattern must respect this.)
    """
    for i in range(len(text) - 1, max(start, 0), -1):
        before = _class(text[i - 1])
        if before and _class(text[i]) != before:
            return i
    return 0


def _decode_counting(data: bytes, decoder: codecs.IncrementalDecoder, stats: ReadStats, path: Path, final: bool) -> str:
    """UTF-8 with every undecodable byte replaced by U+FFFD and counted (one per byte)."""
    text = decoder.decode(data, final=final)
    if not text.isascii():
        text, n = _ESCAPED_BYTE.subn("\ufffd", text)
        if n:
            if not stats.files_with_replacements or stats.files_with_replacements[-1] != str(path):
                stats.files_with_replacements.append(str(path))
            stats.replaced_bytes += n
    return text


def read_chunks(path: Path, stats: ReadStats, chunk_bytes: int | None = None) -> Iterator[str]:
    """Decode a file as UTF-8 in pieces cut at `safe_cut` points; undecodable bytes become U+FFFD.

    Text with no letters or digits at all has no safe cut and is read whole.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    pending = ""
    with _open_regular(path) as f:
        while True:
            block = f.read(chunk_bytes)
            stats.bytes += len(block)
            text = _decode_counting(block, decoder, stats, path, final=not block)
            searched = len(pending)
            pending += text
            if not block:
                break
            cut = safe_cut(pending, searched - 1)
            if cut:
                yield pending[:cut]
                pending = pending[cut:]
    if pending:
        yield pending


def _open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; anything else (a FIFO, /dev/zero, a folder) or an
    unreadable file is a clear error, checked before opening so a FIFO cannot block."""
    check_regular_file(path)
    try:
        return open(path, "rb")
    except OSError as e:
        raise LmforgeError(f"cannot read input {str(path)!r}: {e.strerror}") from None


def _read_jsonl(path: Path, text_field: str, stats: ReadStats) -> Iterator[list[str]]:
    with _open_regular(path) as f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes += len(raw)
            line = _decode_counting(raw, codecs.getincrementaldecoder("utf-8")(errors="surrogateescape"), stats, path, final=True)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{lineno}: not valid JSON ({e.msg}); JSONL needs one JSON object per line") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise LmforgeError(
                    f"{path}:{lineno}: no field {text_field!r} (found: {keys}); name the text field with --text-field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise LmforgeError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield [text]


def iter_documents(paths: Iterable[Path], stats: ReadStats, text_field: str = "text") -> Iterator[Iterable[str]]:
    """Yield each document as an iterable of text chunks (consume one before asking for the next).

    A plain text file is one document; each line of a `.jsonl` file is one document.
    Empty documents are counted and skipped.
    """
    for path in paths:
        stats.files += 1
        if path.suffix.lower() == ".jsonl":
            docs: Iterator[Iterable[str]] = _read_jsonl(path, text_field, stats)
        else:
            docs = iter([read_chunks(path, stats)])
        for chunks in docs:
            it = iter(chunks)
            first = next((c for c in it if c), None)
            if first is None:
                stats.empty_documents += 1
                continue
            stats.documents += 1
            yield _prepend(first, it)


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
