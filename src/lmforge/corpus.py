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
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError

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


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (recursively, text suffixes only) and globs into a sorted, de-duplicated list."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
                found.extend(
                    Path(dirpath) / f
                    for f in sorted(filenames)
                    if not f.startswith(".") and Path(f).suffix.lower() in TEXT_SUFFIXES
                )
        elif _GLOB_CHARS & set(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
            if not matches:
                raise LmforgeError(f"input glob {item!r} matches no files")
            found.extend(matches)
        else:
            raise LmforgeError(f"input {str(item)!r} does not exist (give a file, a folder or a glob)")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise LmforgeError(f"no text files found in {', '.join(map(str, inputs))} (taken: {', '.join(sorted(TEXT_SUFFIXES))})")
    return unique


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
        text = f"{self.documents:,} documents from {self.files:,} files, {self.bytes / 1e6:,.1f} MB"
        if self.replaced_bytes:
            text += (
                f"; {self.replaced_bytes:,} undecodable bytes replaced by U+FFFD in "
                f"{len(self.files_with_replacements)} file(s) (not UTF-8), e.g. {self.files_with_replacements[0]}"
            )
        return text


def safe_cut(text: str) -> int:
    """The last index where `text` may be cut without changing how it pre-tokenizes, or 0.

    A cut is safe just after a letter that is followed by a line break: in both the GPT-2
    and GPT-4 patterns a letter run (or contraction) always ends there, and the line
    break starts a new piece whose match does not depend on what came before.
    """
    i = text.rfind("\n")
    while i > 0:
        j = i - 1 if text[i - 1] == "\r" else i  # the line break starts at j
        if j > 0 and text[j - 1].isalpha():
            return j
        i = text.rfind("\n", 0, i)
    return 0


def read_chunks(path: Path, stats: ReadStats, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Decode a file as UTF-8 in pieces cut at `safe_cut` points; undecodable bytes become U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    pending = ""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            stats.bytes += len(block)
            text = decoder.decode(block, final=not block)
            if not text.isascii():
                text, n = _ESCAPED_BYTE.subn("\ufffd", text)
                if n:
                    if not stats.replaced_bytes or stats.files_with_replacements[-1] != str(path):
                        stats.files_with_replacements.append(str(path))
                    stats.replaced_bytes += n
            pending += text
            if not block:
                break
            cut = safe_cut(pending)
            if cut:
                yield pending[:cut]
                pending = pending[cut:]
    if pending:
        yield pending


def _read_jsonl(path: Path, text_field: str, stats: ReadStats) -> Iterator[list[str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
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
