"""`lmforge data ...`: prepare token files, show their metadata, download public data sets."""

from __future__ import annotations

import argparse
import json
import sys
import time

from lmforge.cli.common import add_command, add_corpus_flags, add_group, progress_enabled
from lmforge.corpus import corpus_paths
from lmforge.data import prepare
from lmforge.data.download import DATASETS, MIRROR_ENV, download
from lmforge.data.tokens import TOKEN_SPLITS, TokenData
from lmforge.errors import LmforgeError
from lmforge.text import plural
from lmforge.tokenizer import Tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "data", "token files for training: prepare, info, download")

    p = add_command(
        group,
        "prepare",
        "tokenize text into train.bin / val.bin + meta.json",
        _prepare,
        examples="""
        lmforge data prepare --tokenizer runs/tok --out runs/data                 # on the embedded default corpus
        lmforge data prepare --input data/tinyshakespeare.txt --tokenizer runs/gpt2-tok --out runs/shakespeare
        lmforge data prepare --input 'books/**/*.txt' --tokenizer runs/tok --out runs/books --val-fraction 0.05
        lmforge data prepare --input chats.jsonl --text-field content --tokenizer runs/tok --out runs/chats
        """,
        description="""
        Tokenize text and write flat token files for training: train.bin and val.bin
        (uint16 ids when the vocabulary has at most 65,536 ids, else uint32), meta.json,
        and a copy of the tokenizer. Documents are joined by <|endoftext|>: a text file
        is one document, each line of a .jsonl file is one (its --text-field).
        Inputs are files, folders (recursively: .txt .md .rst .py .jsonl) or globs; with
        no --input, the .py sources of this Python's standard library are used.
        Document i goes to val when floor((i+1)*F) > floor(i*F): floor(n*F) documents,
        evenly spread. With too few documents for that (one file), the last F of the
        tokens become val. Bytes that are not UTF-8 are replaced by U+FFFD and counted.
        --out is written whole or not at all; an existing one is replaced only with
        --overwrite and only when it is a data folder (or empty), never one that holds
        an input.
        """,
    )
    add_corpus_flags(p, workers="encoding threads", overwrite="replace an existing --out folder that `data prepare` made (never other files)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder (or its tokenizer.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the token files into")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="share of documents for validation (default: 0.1)")

    p = add_command(
        group,
        "info",
        "show what a prepared data folder holds",
        _info,
        examples="""
        lmforge data info runs/shakespeare
        lmforge data info runs/shakespeare --json | jq .splits
        """,
        description="Check a prepared data folder (metadata, file sizes) and print its metadata.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print meta.json as it is")

    p = add_command(
        group,
        "download",
        "fetch a standard public data set, verified by sha256",
        _download,
        examples=f"""
        lmforge data download --list
        lmforge data download tinyshakespeare --out data/                  # -> data/tinyshakespeare.txt
        lmforge data download gutenberg nltk-gutenberg --out data/         # -> data/gutenberg/*.txt, data/nltk-gutenberg/*.txt
        lmforge data download gpt2-vocab --out data/ && lmforge tokenizer from-gpt2 --encoder-json data/gpt2-vocab/encoder.json --vocab-bpe data/gpt2-vocab/vocab.bpe --out runs/gpt2
        lmforge data download the-verdict --out data/ --mirror ../shared/data    # or {MIRROR_ENV}=URL|DIR
        """,
        description="""
        Download data sets from URLs pinned to a commit, checking each file's sha256 as
        it streams in: a mismatch is refused and nothing is saved. Files already present
        with the right hash are not fetched again. A data set of one file is saved as
        OUT/<file name>, one of several files as OUT/<set name>/<file name> (--list
        shows each). --mirror (a URL or a local folder) fetches MIRROR/<path> instead,
        with the mirror paths shown by --list.
        """,
    )
    p.add_argument("names", nargs="*", metavar="NAME", help=f"one or more of: {', '.join(DATASETS)}")
    p.add_argument("--out", metavar="DIR", help="folder to save the files into")
    p.add_argument("--list", action="store_true", help="list the data sets and exit")
    p.add_argument("--mirror", metavar="URL", help=f"fetch from this mirror URL or folder (default: ${MIRROR_ENV}, else the original URLs)")
    p.add_argument("--overwrite", action="store_true", help="replace a file that exists with a different hash")


def _prepare(args: argparse.Namespace) -> int:
    inputs = corpus_paths(args.input, say=lambda message: print(message, file=sys.stderr))
    tokenizer = Tokenizer.load(args.tokenizer)
    start = time.perf_counter()
    data = prepare(
        inputs,
        tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        overwrite=args.overwrite,
        num_threads=args.workers,
        progress=progress_enabled(),
    )
    seconds = time.perf_counter() - start
    meta, sources = data.meta, data.meta["sources"]
    print(f"read {plural(sources['documents'], 'document')} from {plural(sources['files'], 'file')}, {sources['bytes'] / 1e6:,.1f} MB",
          file=sys.stderr)
    if sources["replaced_bytes"]:
        print(
            f"note: {sources['replaced_bytes']:,} undecodable bytes (not UTF-8) replaced by U+FFFD in "
            f"{plural(sources['files_with_replacements'], 'file')}, e.g. {sources['replacement_examples'][0]}",
            file=sys.stderr,
        )
    if meta["val_split"] == "tail-of-tokens":
        print(f"note: too few documents for a {args.val_fraction} share of them; val is the last {args.val_fraction} of the tokens", file=sys.stderr)
    elif meta["val_split"] == "none" and args.val_fraction > 0:
        print("note: the corpus is too small for any validation tokens; val.bin is empty", file=sys.stderr)
    text_tokens = sum(data.num_tokens(s) for s in TOKEN_SPLITS) - sources["documents"]
    for split in TOKEN_SPLITS:
        m = meta["splits"][split]
        print(f"{split:<6}{m['tokens']:>14,} tokens {m['documents']:>10,} documents  {data.path / m['file']}")
    print(
        f"{sources['bytes'] / max(text_tokens, 1):.2f} bytes/token, {meta['dtype']}, {seconds:.1f} s "
        f"({sources['bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s); wrote {data.path}"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    data = TokenData.open(args.dir)
    meta = data.meta
    if args.json:
        print(json.dumps(meta, indent=1, ensure_ascii=False))
        return 0
    sources, tok = meta["sources"], meta["tokenizer"]
    print(f"folder      {data.path}")
    print(f"format      {meta['format']} v{meta['version']} (lmforge {meta.get('lmforge_version', '?')})")
    print(f"tokenizer   {tok['name']} ({data.path / tok['file']}), {data.vocab_size:,} ids, fingerprint {tok['fingerprint'][:16]}")
    print(f"tokens      {meta['dtype']}, <|endoftext|> = {data.eot_id} after each document")
    for split in TOKEN_SPLITS:
        m = meta["splits"][split]
        print(f"{split:<12}{m['tokens']:,} tokens, {m['documents']:,} documents ({m['file']})")
    print(f"val split   {meta['val_split']} (fraction {meta['val_fraction']})")
    print(
        f"sources     {plural(sources['files'], 'file')}, {plural(sources['documents'], 'document')}, {sources['bytes']:,} bytes, "
        f"{sources['replaced_bytes']:,} undecodable bytes replaced"
    )
    return 0


def _download(args: argparse.Namespace) -> int:
    if args.list:
        for source in DATASETS.values():
            print(f"{source.name:<34}{source.size / 1e6:>7.2f} MB  {source.description}")
            print(f"{'':<43}license: {source.license}")
            for f in source.files:
                print(f"{'':<43}OUT/{source.saved_as(f)}  (mirror: {f.path}, sha256 {f.sha256[:16]})")
        return 0
    if not args.names:
        raise LmforgeError("name a data set to download (see `lmforge data download --list`)")
    if not args.out:
        raise LmforgeError("say where to save the files with --out DIR")
    for name in args.names:
        for path, fetched in download(name, args.out, mirror=args.mirror, overwrite=args.overwrite, progress=progress_enabled()):
            print(f"{'downloaded' if fetched else 'up to date'}  {path}")
    return 0
