"""Run the `lmforge` command in this process, as `python -m lmforge ARGS` would run it.

For tests that check only what a run shows and leaves (exit code, stdout, stderr, files): a
subprocess per run spent about 3 s importing Python and torch. `run_cli` calls
`lmforge.cli.main(argv)` and returns what a subprocess run gives, a `CompletedProcess` with
bytes (or str with `text=True`), read from pytest's `capsys` (`capsysbinary` where the command
writes bytes that are not UTF-8). As `sys.exit(main())` does: argparse's exits become the exit
code, and an exception that escapes is printed with its traceback on stderr, exit 1.

The working directory and environment are the test's to set, with `monkeypatch.chdir` and
`monkeypatch.setenv`. stdin is the given bytes (a pipe at end of file, not a terminal). What a
run may change in this process (torch's thread count, SIGINT/SIGTERM handlers, stdin) is put
back. Keep a subprocess where the process itself is what is tested: signals, real pipes and a
broken pipe, environment read at import, a real exit, torchrun, or a run that could eat the
machine's memory.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

FIFO_GRACE = 1.0  # seconds: a run still blocked opening a given FIFO then is released, and the test fails


def run_cli(capture, *argv: str | os.PathLike, stdin: bytes = b"", text: bool = False, check: bool = False,
            fifos: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """`lmforge ARGV` in this process; `capture` is the test's `capsys` or `capsysbinary`.
    With `check`, a non-zero exit fails the test (showing stderr). `fifos`: FIFOs the run must
    never open; one it blocks on is released after FIFO_GRACE s (so the run ends) and the test fails."""
    from lmforge.cli import main

    args = [os.fspath(a) for a in argv]
    capture.readouterr()  # what was printed before is not this run's
    blocked: list[Path] = []
    with _process_state_restored():
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        with _fifo_watchdog(fifos, blocked):
            try:
                code = main(args)
            except SystemExit as e:  # argparse: --help (0), a usage error (2)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - what the interpreter would print, and exit 1 with
                traceback.print_exc()
                code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    out, err = capture.readouterr()
    if text:
        out, err = (s.decode("utf-8", "replace") if isinstance(s, bytes) else s for s in (out, err))
    else:
        out, err = (s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s for s in (out, err))
    result = subprocess.CompletedProcess(["lmforge", *args], code, out, err)
    shown = err if isinstance(err, str) else err.decode("utf-8", "replace")
    assert not blocked, f"lmforge {' '.join(args)} blocked opening the FIFO {blocked[0]} (released by the test); stderr:\n{shown}"
    if check and code != 0:
        raise AssertionError(f"lmforge {' '.join(args)} failed ({code}):\n{shown}")
    return result


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """A process ends and forgets; in-process, what a command may set is put back for the next test."""
    import torch

    threads, stdin = torch.get_num_threads(), sys.stdin
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        sys.stdin = stdin
        torch.set_num_threads(threads)
        for s, handler in handlers.items():
            signal.signal(s, handler)


def release_fifo(fifo: Path, writers: bool = True) -> bool:
    """Open the FIFO's other end without blocking and close it again: a reader stuck in open()
    returns and sees end of file (with `writers`, a stuck writer too, which then sees a broken
    pipe). True if a reader was waiting."""
    released = False
    ends = (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK) if writers else (os.O_WRONLY | os.O_NONBLOCK,)
    for flags in ends:
        try:
            fd = os.open(fifo, flags)
        except OSError:  # ENXIO: no reader has it open
            continue
        released |= bool(flags & os.O_WRONLY)
        os.close(fd)
    return released


@contextlib.contextmanager
def _fifo_watchdog(fifos: Sequence[Path], blocked: list[Path]) -> Iterator[None]:
    """A read of a FIFO nobody writes blocks forever: after FIFO_GRACE s, open each FIFO's
    writing end without blocking and close it again, so a reader stuck in open() sees end of file."""
    if not fifos:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        if done.wait(FIFO_GRACE):
            return
        while not done.wait(0.1):
            for fifo in fifos:
                if release_fifo(fifo, writers=False) and fifo not in blocked:
                    blocked.append(fifo)

    thread = threading.Thread(target=watch, name="run-cli-fifo-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
