"""The `lmforge` command. Parsing and printing only: every action is a library call.

Each stage of the pipeline has its own module here that adds its subcommands with
`register(subparsers)`; errors a user can fix (`LmforgeError`) print one line and
exit 2, and so do the machine's own (a full disk, a read-only folder, no memory:
`OSError`, `MemoryError`; LMFORGE_TRACEBACK=1 shows their traceback). Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from lmforge import __version__
from lmforge.cli import align, compare, convert, data, estimate, finetune, generate, lora, pretrain, serve, tokenizer
from lmforge.cli import eval as evaluate  # `eval` is a builtin
from lmforge.errors import LmforgeError

STAGES = (tokenizer, data, estimate, pretrain, finetune, lora, align, generate, convert, evaluate, compare, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Build a language model from scratch: tokenizer -> data -> model -> train -> finetune -> align -> serve.",
        epilog="Run `lmforge COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGES:
        stage.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _note  # a user reads notes, not source lines
    try:
        return args.func(args) or 0
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmforge tokenizer encode ... | head`
        return 0
    except (OSError, MemoryError) as e:  # the machine, not the code: a full disk, a read-only folder, no memory
        if os.environ.get("LMFORGE_TRACEBACK"):
            raise
        print(f"lmforge: error: {_describe(e)} (set LMFORGE_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


def _note(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None,
          line: str | None = None) -> None:
    """A library's warning as one line of the command's output (no source file and line)."""
    print(f"note: {message}", file=sys.stderr)


def _describe(e: BaseException) -> str:
    """One line for an error the machine raised, naming the file when there is one."""
    if isinstance(e, MemoryError):
        return "out of memory; choose a smaller model, batch or context"
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {where}" if where else what


if __name__ == "__main__":
    sys.exit(main())
