"""Helpers every CLI module shares: a subcommand with examples in its --help, the flags several share."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    func: Callable[[argparse.Namespace], int | None] | None,
    examples: str = "",
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add `name` with a one-line `help`, a longer description and an examples epilog."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=textwrap.dedent(description or help).strip(),
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  ") if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def add_group(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """A command with subcommands of its own (`lmforge tokenizer train`)."""
    parser = subparsers.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def add_corpus_flags(parser: argparse.ArgumentParser, *, workers: str, overwrite: str) -> None:
    """The flags of every command that reads a text corpus: --input, --text-field, --workers,
    --overwrite (the last two say what they mean for that command)."""
    parser.add_argument("--input", nargs="+", metavar="PATH", help="text files, folders or globs (default: the standard library's .py files)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs (default: text)")
    parser.add_argument("--workers", type=int, default=None, help=f"{workers} (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help=overwrite)


def progress_enabled() -> bool:
    import sys

    return sys.stderr.isatty()


def check_out_file(path: str, example: str, ours: Callable[[Path], bool], not_ours: str) -> Path:
    """--out, refused before any work if writing it would replace something the command did
    not write: empty, a folder, not a regular file, an existing file `ours` rejects (the
    message ends with `not_ours`), or a file in a folder that does not exist."""
    if not path:
        raise LmforgeError(f"--out is empty: name the file to write (e.g. {example})")
    out = Path(path)
    if out.is_dir():
        raise LmforgeError(f"--out {out} is a folder: name a file in it, e.g. {out / example}")
    if out.exists() or out.is_symlink():
        if not out.is_file():
            raise LmforgeError(f"--out {out} exists and is not a regular file; name a new file")
        if not ours(out):
            raise LmforgeError(f"--out {out} exists and is not {not_ours}; name a new file (it is left as it is)")
    if not out.parent.is_dir():
        raise LmforgeError(f"--out {out}: its folder {out.parent} does not exist")
    return out


WEIGHT_DTYPES = ("float32", "float16", "int8")


def add_weight_dtype_flag(parser: argparse.ArgumentParser) -> None:
    """`--dtype`: how generate, chat and serve store the weights (`lmforge.engine.quantize`)."""
    parser.add_argument(
        "--dtype", choices=WEIGHT_DTYPES, default="float32",
        help="how the weights are stored while generating: float32 (as trained), float16 (half the bytes) or int8 "
        "(a quarter, one scale per output channel); decoding on a CPU runs at the speed of reading them (default: float32)",
    )  # fmt: skip

