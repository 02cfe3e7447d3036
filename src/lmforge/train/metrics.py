"""What a run records: metrics.jsonl (the source of truth), TensorBoard events when
TensorBoard is installed, and loss.png drawn from the JSONL.

Only the main process writes. A resumed run appends to the same JSONL; records from
steps after the resume point (written before an interruption) are dropped first, so
the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import atomic_file

METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class MetricsLog:
    def __init__(self, out: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(out) / METRICS
        self.plot_path = Path(out) / LOSS_PLOT
        self.enabled = enabled
        self._tb = None
        self._plot_warned = False
        if not enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                with atomic_file(self.path) as f:
                    f.write("".join(json.dumps(r) + "\n" for r in kept).encode())
        except OSError as e:
            raise LmforgeError(f"could not write {self.path}: {e.strerror or e}; free space on that disk "
                               "(or give another --out), then continue with --resume") from e
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out) / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk: the checkpoints would fail next; stop with the cause
            raise LmforgeError(f"could not append to {self.path}: {e.strerror or e}; free space on that disk "
                               "(or give another --out), then continue with --resume") from e
        if self._tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{key}", value, record.get("step", 0))
            self._tb.flush()

    def plot(self) -> Path | None:
        """Redraw loss.png: train loss (and a running mean) and validation loss by step.

        A picture never stops a run: if it cannot be drawn or written (a full disk, a
        broken matplotlib), the first failure is reported on stderr, the run goes on,
        and this returns None (loss.png, if there is one, is the last one drawn)."""
        if not self.enabled:
            return None
        try:
            plot_losses(read_metrics(self.path), self.plot_path)
        except Exception as e:  # noqa: BLE001 - drawing is a convenience; metrics.jsonl holds the numbers
            if not self._plot_warned:
                self._plot_warned = True
                print(f"warning: could not draw {self.plot_path} ({type(e).__name__}: {e}); training goes on, "
                      f"the numbers are in {self.path}", file=sys.stderr, flush=True)
            return None
        return self.plot_path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and math.isfinite(r.get("loss", math.nan))]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    try:
        _draw(ax, train, val)
        fig.tight_layout()
        with atomic_file(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def _draw(ax: Any, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> None:
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 20)
        if window == 1:  # too few points to smooth: one line
            ax.plot(steps, losses, color="tab:blue", linewidth=2, label="training loss")
        else:
            ax.plot(steps, losses, color="tab:blue", alpha=0.5, linewidth=1, label="training loss (logged steps)")
            smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"training loss, running mean of {window} points")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_panels(records: list[dict[str, Any]], path: Path, panels: list[tuple[str, list[str]]], x: str = "step") -> None:
    """One small chart per (title, keys) of `panels`, each key's values in the training
    records against `x`: the figures a run logs beside its loss (PPO's score, KL, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train" and x in r]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=110, squeeze=False)
    try:
        for ax, (title, keys) in zip(axes.flat, panels):
            for key in keys:
                points = [(r[x], r[key]) for r in train if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
                if points:
                    ax.plot(*zip(*points), linewidth=1.5, label=key)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(x)
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
        with atomic_file(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
