"""What the benchmarks share: the data folder, a timer, a table printer, and the
child-process memory measurements of bench_memory.py and bench_finetune_memory.py."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

SHARED = Path(os.environ.get("LMFORGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def best_of(contenders: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Fastest of `repeat` runs of each, in seconds, taking turns (ours, theirs, ours, ...)
    so that a burst of load on a shared machine hits every contender alike."""
    best = {name: float("inf") for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:,.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


# --- memory measurements, each in a fresh interpreter (bench_memory, bench_finetune_memory) --------
# glibc: every block >= 128 KiB is mmapped, and unmapped on free (its threshold no longer rises)
PINNED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(script: str, spec: dict[str, object], env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, object]:
    """Run `script --child SPEC` in a fresh interpreter, so that nothing one measurement
    allocated or cached is left for the next; the JSON object it prints last. The script
    answers `--child` through `args_or_child`."""
    text = json.dumps(spec)
    proc = subprocess.run(
        [sys.executable, script, "--child", text], capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})}
    )
    if proc.returncode:
        raise RuntimeError(f"measurement {text} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def args_or_child(parser: argparse.ArgumentParser, child: Callable[[str], None]) -> argparse.Namespace | None:
    """The parsed command line; or, started by `run_child` with `--child SPEC`, None once
    `child(SPEC)` has run the measurement and printed its JSON."""
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return None
    return args


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now), VmHWM (its high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_hwm() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def allocator_peaks(prof: object, mark: str | None = None) -> tuple[int, int]:
    """Peak bytes of CPU tensor memory in a `torch.profiler.profile(profile_memory=True)`
    run: the highest running sum of the allocator's events (bytes allocated, negative for
    a free), exact, unlike RSS. With `mark`, (the peak before the `record_function(mark)`
    range, the peak from its start on, counted from what is live then); else (0, the peak)."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    start = None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif mark is not None and node.tag == _EventType.TorchOp and node.name == mark:
            start = node.start_time_ns
        stack.extend(node.children)
    if mark is not None and start is None:
        raise RuntimeError(f"the profiler recorded no {mark} range")
    live = before = 0
    after = None
    for t, size in sorted(events):
        if after is None and (start is None or t >= start):
            after = live  # what is live when the range starts
        live += size
        if after is None:
            before = max(before, live)
        else:
            after = max(after, live)
    return before, after or 0
