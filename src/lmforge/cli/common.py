"""Helpers every CLI module shares: a subcommand with examples in its --help, the flags several share."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable


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
