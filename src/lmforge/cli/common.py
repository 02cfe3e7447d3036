"""Helpers every CLI module shares: a subcommand with examples in its --help."""

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


def progress_enabled() -> bool:
    import sys

    return sys.stderr.isatty()
