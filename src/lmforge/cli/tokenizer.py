"""`lmforge tokenizer ...`: train, import GPT-2, encode, decode, stats."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmforge.cli.common import add_command, add_corpus_flags, add_group, progress_enabled
from lmforge.corpus import ReadStats, corpus_paths, iter_documents, resolve_inputs
from lmforge.errors import LmforgeError
from lmforge.text import plural
from lmforge.tokenizer import ENDOFTEXT, PATTERNS, TOKENIZER_FILE, Tokenizer, from_gpt2_files, train_bpe
from lmforge.tokenizer.tokenizer import tokenizer_file


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "tokenizer", "byte-level BPE: train, import GPT-2's, encode, decode, stats")

    p = add_command(
        group,
        "train",
        "train a byte-level BPE tokenizer on text files",
        _train,
        examples="""
        lmforge tokenizer train --out runs/tok                       # on the embedded default corpus
        lmforge tokenizer train --input data/tinyshakespeare.txt --vocab-size 4096 --out runs/tok
        lmforge tokenizer train --input 'books/**/*.txt' --pattern gpt4 --special '<|im_start|>' --out runs/tok
        """,
        description="""
        Train byte-level BPE with the incremental algorithm. Inputs are files, folders
        (recursively: .txt .md .rst .py .jsonl) or globs; with no --input, the .py sources
        of this Python's standard library (the embedded default corpus) are used.
        The vocabulary is 256 byte tokens + merges + special tokens (<|endoftext|> always).
        Ties between equally frequent pairs go to the pair whose bytes sort first.
        """,
    )
    add_corpus_flags(p, workers="processes for pre-tokenizing", overwrite="replace an existing tokenizer in --out")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N", help="total ids incl. 256 bytes and specials (default: 8192)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json into")
    p.add_argument("--special", action="append", default=[], metavar="TOKEN", help=f"extra special token (repeatable); {ENDOFTEXT} is always added")
    p.add_argument("--pattern", default="gpt2", help=f"pre-tokenizer: {', '.join(PATTERNS)} or a regex that takes every character, e.g. ending in |\\s+|. (default: gpt2)")

    p = add_command(
        group,
        "from-gpt2",
        "import OpenAI's GPT-2 encoder.json + vocab.bpe",
        _from_gpt2,
        examples="lmforge tokenizer from-gpt2 --encoder-json data/gpt2-vocab/encoder.json --vocab-bpe data/gpt2-vocab/vocab.bpe --out runs/gpt2-tok",
    )
    p.add_argument("--encoder-json", required=True, metavar="F")
    p.add_argument("--vocab-bpe", required=True, metavar="F")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in --out")

    p = add_command(
        group,
        "encode",
        "encode UTF-8 text from stdin; print the ids as one JSON array",
        _encode,
        examples="""
        echo -n 'Hello, world' | lmforge tokenizer encode --tokenizer runs/tok
        printf 'a<|endoftext|>b' | lmforge tokenizer encode --tokenizer runs/tok --allow-special
        """,
        description="""
        Encode stdin (UTF-8) and print the ids as one JSON array. Special-token strings
        in the text are encoded as plain text unless --allow-special is given.
        """,
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("--allow-special", action="store_true", help="encode special-token strings as their special ids")

    p = add_command(
        group,
        "decode",
        "decode a JSON array of ids from stdin; write the text",
        _decode,
        examples="echo '[15496, 11, 995]' | lmforge tokenizer decode --tokenizer runs/gpt2-tok",
        description="""
        Decode a JSON array of ids read from stdin. Ids that split a UTF-8 character give
        U+FFFD replacement characters; --bytes writes the raw bytes instead.
        """,
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("--bytes", action="store_true", help="write the raw bytes, not text with replacements")

    p = add_command(
        group,
        "stats",
        "bytes per token of a tokenizer on files",
        _stats,
        examples="lmforge tokenizer stats --tokenizer runs/tok data/tinyshakespeare.txt",
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("files", nargs="+", metavar="FILE")


def _output_file(out: str, overwrite: bool) -> Path:
    """The file `Tokenizer.save(out)` writes, refused before any work if it cannot or must not be written."""
    if not out.strip():
        raise LmforgeError(f"--out {out!r} is empty; name the folder to write {TOKENIZER_FILE} into (or a path ending in .json)")
    file = tokenizer_file(out)
    folder = file.parent
    for p in (folder, *folder.parents):  # the nearest existing ancestor must be a folder we can write in
        if p.exists():
            if not p.is_dir():
                raise LmforgeError(
                    f"--out {out}: {p} is a file, not a folder; --out names a folder to write {TOKENIZER_FILE} into "
                    "(or a path ending in .json): choose another --out"
                )
            if not os.access(p, os.W_OK | os.X_OK):
                raise LmforgeError(f"--out {out}: cannot write into {p} (permission denied); choose another --out")
            break
    if file.is_dir():
        raise LmforgeError(f"--out {out}: {file} is a folder; choose another --out")
    if (file.exists() or file.is_symlink()) and not overwrite:
        raise LmforgeError(f"{file} already exists; choose another --out or pass --overwrite")
    return file


def _refuse_empty_paths(paths: list[str] | None, what: str) -> None:
    """'' would read the current folder: refuse it (a shell variable that came out empty, most likely)."""
    if any(not p.strip() for p in paths or ()):
        raise LmforgeError(f"{what} has an empty path; give text files, folders or globs (an empty shell variable?)")


def _save(tok: Tokenizer, out: str) -> Path:
    try:
        return tok.save(out)
    except OSError as e:
        raise LmforgeError(f"could not write {tokenizer_file(out)} ({e.strerror or e}); choose another --out") from None


def _train(args: argparse.Namespace) -> int:
    _output_file(args.out, args.overwrite)
    _refuse_empty_paths(args.input, "--input")
    paths = corpus_paths(args.input, say=lambda message: print(message, file=sys.stderr))
    stats = ReadStats()
    chunks = (c for doc in iter_documents(paths, stats, args.text_field) for c in doc)
    tok = train_bpe(
        chunks,
        args.vocab_size,
        special_tokens=[ENDOFTEXT, *args.special],
        pattern=args.pattern,
        workers=args.workers,
        progress=progress_enabled(),
    )
    file = _save(tok, args.out)
    print(f"read {stats.summary()}", file=sys.stderr)
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus ran out of pairs to merge; vocabulary is {tok.vocab_size}, not {args.vocab_size}", file=sys.stderr)
    print(f"wrote {file}: {tok.vocab_size:,} ids ({plural(len(tok.merges), 'merge')}, specials {tok.special_tokens})")
    return 0


def _from_gpt2(args: argparse.Namespace) -> int:
    _output_file(args.out, args.overwrite)
    tok = from_gpt2_files(args.encoder_json, args.vocab_bpe)
    file = _save(tok, args.out)
    print(f"wrote {file}: {tok.vocab_size:,} ids")
    return 0


def _read_stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"stdin is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def _encode(args: argparse.Namespace) -> int:
    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(_read_stdin_text(), allowed_special="all" if args.allow_special else ())
    sys.stdout.write(json.dumps(ids) + "\n")
    return 0


def _decode(args: argparse.Namespace) -> int:
    tok = Tokenizer.load(args.tokenizer)
    try:
        ids = json.loads(_read_stdin_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"stdin is not a JSON array of ids ({e})") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise LmforgeError("stdin must be one JSON array of integer ids, e.g. [15496, 11, 995]")
    data = tok.decode_bytes(ids) if args.bytes else tok.decode(ids).encode("utf-8", "surrogatepass")
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _stats(args: argparse.Namespace) -> int:
    _refuse_empty_paths(args.files, "FILE")
    tok = Tokenizer.load(args.tokenizer)
    total_bytes = total_tokens = 0
    paths = resolve_inputs(args.files)
    width = max([len("total"), *(len(str(p)) for p in paths)])  # whole paths: a cut one may name another file
    print(f"{'file':<{width}} {'bytes':>12} {'tokens':>12} {'bytes/token':>12}")
    for path in paths:
        stats = ReadStats()
        n_tokens = sum(len(tok.encode(c)) for doc in iter_documents([path], stats) for c in doc)
        total_bytes += stats.bytes
        total_tokens += n_tokens
        print(f"{path!s:<{width}} {stats.bytes:>12,} {n_tokens:>12,} {stats.bytes / max(n_tokens, 1):>12.3f}")
    print(f"{'total':<{width}} {total_bytes:>12,} {total_tokens:>12,} {total_bytes / max(total_tokens, 1):>12.3f}")
    return 0
