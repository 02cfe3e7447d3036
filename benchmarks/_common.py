"""What every benchmark shares: the data folder, a timer, and a table printer."""

from __future__ import annotations

import os
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
