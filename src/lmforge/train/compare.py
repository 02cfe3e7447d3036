"""Several runs side by side: their curves in one picture, their differing settings and
final figures in one table.

It lives with the trainer because it reads what a run folder holds, as the trainer and the
recipes write it: `metrics.jsonl` (read with `metrics.read_metrics`, which skips a torn last
line), `run.json` (the whole config) and, from a fine-tuning or alignment recipe,
`metrics.json` (its held-out figures). The eval package cannot import the trainer (they are
siblings in one layer), and nothing here evaluates a model.

Curves are aligned by step or by tokens seen: runs with different batch sizes or context
lengths take different steps for the same data, so tokens are the fair axis between them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import atomic_file
from lmforge.train.checkpoint import RUN_CONFIG
from lmforge.train.metrics import METRICS, read_metrics

RESULTS = "metrics.json"  # a recipe's final figures (fine-tuning, alignment)
NOT_SETTINGS = ("out", "resume", "overwrite")  # a run's name and how it was started, not how it trains
HELD_OUT_SPLITS = ("val", "test")
COUNTS = ("pairs", "tokens", "responses", "examples", "evaluated")  # sizes of what was measured, not measures
MISSING = "-"


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict[str, Any]]
    settings: dict[str, Any] | None  # run.json flattened ("model.n_layer"); None when the folder has none
    results: dict[str, float]  # metrics.json's held-out figures after training, by name

    def points(self, split: str, metric: str, x: str) -> list[tuple[float, float]]:
        return [(r[x], r[metric]) for r in self.records
                if r.get("split") == split and _number(r.get(metric)) and _number(r.get(x))]


def read_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """A run folder's metrics, settings and results; a folder that is no run is named."""
    folder = Path(path)
    if not folder.is_dir():
        what = "a file" if folder.is_file() else "not a folder" if folder.exists() else "missing"
        raise LmforgeError(f"run {str(folder)!r} is {what}: give run folders (each holding {METRICS})")
    metrics = folder / METRICS
    if not metrics.is_file():
        rounds = sorted(p.name for p in folder.glob("round-*") if (p / METRICS).is_file())
        hint = f"; its rounds have one: {', '.join(str(folder / r) for r in rounds)}" if rounds else ""
        raise LmforgeError(f"run {folder} has no {METRICS}: not a training run{hint}")
    records = read_metrics(metrics)
    if not records:
        raise LmforgeError(f"run {folder}: {metrics} holds no records (the run logged nothing yet)")
    return Run(name or folder.name, folder, records, _settings(folder / RUN_CONFIG), _results(folder / RESULTS))


def read_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Runs named by their folder, or by the path given when two folders share a name."""
    names = [Path(p).name or str(p) for p in paths]
    if len(set(map(os.path.realpath, map(str, paths)))) < len(paths):
        raise LmforgeError("the same run is given twice: name each run folder once")
    return [read_run(p, n if names.count(n) == 1 else str(p)) for p, n in zip(paths, names)]


def _settings(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not JSON ({e}); it is the run's config") from None
    if not isinstance(config, dict):
        raise LmforgeError(f"{path} is not a JSON object; it is the run's config")
    return {k: v for k, v in _flatten(config).items() if k not in NOT_SETTINGS}


def _results(path: Path) -> dict[str, float]:
    """Held-out figures after training: the val and test splits' and the recipe's held-out
    measures (PPO's score, DPO's KL to the reference, ...)."""
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}  # a picture and a table can be made without it; the curves are in metrics.jsonl
    if not isinstance(metrics, dict):
        return {}
    out: dict[str, float] = {}
    splits = metrics.get("splits") if isinstance(metrics.get("splits"), dict) else {}
    for split in HELD_OUT_SPLITS:
        after = splits.get(split, {}).get("after") if isinstance(splits.get(split), dict) else None
        out.update({f"{split} {k}": v for k, v in (after or {}).items() if k not in COUNTS and _number(v)})
    held = metrics.get("held_out") if isinstance(metrics.get("held_out"), dict) else {}
    after = held.get("after") if isinstance(held.get("after"), dict) else {}
    out.update({f"held-out {k}": v for k, v in after.items() if k not in COUNTS and _number(v)})
    return out


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- what differs, what came out ----------------------------------------------------------------------


def differing_settings(runs: Sequence[Run]) -> list[str]:
    """Settings whose values are not the same in every run that has a run.json (a setting one
    recipe has and another lacks differs too), in run.json's order."""
    known = [r.settings for r in runs if r.settings is not None]
    keys = list(dict.fromkeys(k for s in known for k in s))
    return [k for k in keys if len({_comparable(s.get(k, MISSING)) for s in known}) > 1]


def _comparable(value: Any) -> Any:
    """2 and 2.0 (a TOML integer, a flag's float) are the same setting."""
    return float(value) if _number(value) else json.dumps(value, sort_keys=True)


def final_metrics(run: Run, metric: str) -> dict[str, float]:
    """The last step and tokens, the last logged training value of `metric`, its best and
    last validation value."""
    out: dict[str, float] = {}
    for key in ("step", "tokens"):
        values = [r[key] for r in run.records if _number(r.get(key))]
        if values:
            out[f"final {key}"] = max(values)
    train = [v for _, v in run.points("train", metric, "step")]
    val = [v for _, v in run.points("val", metric, "step")]
    if train:
        out[f"final train {metric}"] = train[-1]
    if val:
        out[f"best val {metric}"] = min(val) if _lower_is_better(metric) else max(val)
        out[f"final val {metric}"] = val[-1]
    return out


def _lower_is_better(metric: str) -> bool:
    return not any(word in metric for word in ("accuracy", "score", "reward", "acc"))


def table(runs: Sequence[Run], metric: str) -> list[list[str]]:
    """Rows of [name, value per run] in three sections: the settings that differ, the curves'
    last figures (metrics.jsonl) and the held-out results after training (metrics.json)."""
    width = len(runs) + 1
    finals = [final_metrics(r, metric) for r in runs]
    results = [r.results for r in runs]
    sections = [
        ("settings that differ (run.json)", [[f"  {k}", *(_show(r.settings.get(k, MISSING)) if r.settings is not None else "(no run.json)"
                                                   for r in runs)] for k in differing_settings(runs)]),
        ("curves (metrics.jsonl)", _rows(finals)),
        ("after training (metrics.json)", _rows(results)),
    ]
    out = [["", *(r.name for r in runs)]]
    for title, rows in sections:
        if rows:
            out += [[""] * width, [title, *[""] * (width - 1)], *rows]
    return out


def _rows(figures: list[dict[str, float]]) -> list[list[str]]:
    keys = list(dict.fromkeys(k for f in figures for k in f))
    return [[f"  {k}", *(_show(f[k]) if k in f else MISSING for f in figures)] for k in keys]


def _show(value: Any, limit: int = 36) -> str:
    """A setting or figure in a table cell; a long one (a path) keeps its end."""
    text = _text(value)
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def _text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, list) and all(isinstance(v, str) and v and "," not in v and v.strip() == v for v in value):
        return ",".join(value) or "[]"
    if isinstance(value, str):
        return value or "''"
    return json.dumps(value, ensure_ascii=False)


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    return "\n".join(lines)


# --- the picture --------------------------------------------------------------------------------------


def check_metric(runs: Sequence[Run], metric: str, x: str) -> list[str]:
    """Notes on runs that cannot be drawn; an error when none can."""
    if not metric:
        raise LmforgeError("--metric is empty: name a logged figure, e.g. loss")
    drawable = [r for r in runs if r.points("train", metric, x) or r.points("val", metric, x)]
    if not drawable:
        logged = sorted({k for r in runs for rec in r.records for k, v in rec.items() if _number(v)} - {"step", "tokens"})
        has_x = any(r.points("train", metric, "step") or r.points("val", metric, "step") for r in runs)
        if has_x and x != "step":
            raise LmforgeError(f"no run logs {x!r} beside {metric!r}: use --x step")
        raise LmforgeError(f"no run logs {metric!r}; their metrics.jsonl hold {', '.join(logged) or 'nothing numeric'} (--metric)")
    return [f"run {r.name} logs no {metric!r} by {x}: not drawn" for r in runs if r not in drawable]


def plot_runs(runs: Sequence[Run], path: str | os.PathLike, x: str = "step", metric: str = "loss") -> None:
    """Training (left) and validation (right) curves of `metric` against `x`, one colour a run;
    noisy training curves (more than 20 points) drawn faintly with their running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_val = any(r.points("val", metric, x) for r in runs)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(12 if has_val else 7, 4.2), dpi=110, squeeze=False, sharex=True, sharey=True)
    try:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, run in enumerate(runs):
            colour = colours[k % len(colours)]
            train = run.points("train", metric, x)
            if train:
                xs, ys = zip(*train)
                window = max(1, len(ys) // 20)
                if window > 1:
                    axes[0, 0].plot(xs, ys, color=colour, alpha=0.25, linewidth=1)
                    ys = [sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1]) for i in range(len(ys))]
                axes[0, 0].plot(xs, ys, color=colour, linewidth=2, label=run.name)
            val = run.points("val", metric, x)
            if has_val and val:
                axes[0, 1].plot(*zip(*val), "o-", color=colour, linewidth=2, markersize=4, label=run.name)
        smooth = " (running mean)" if any(len(r.points("train", metric, x)) > 40 for r in runs) else ""
        titles = [f"training {metric}{smooth}", f"validation {metric}"]
        for ax, title in zip(axes.flat, titles):
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("tokens seen" if x == "tokens" else x)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        axes[0, 0].set_ylabel(metric)
        fig.tight_layout()
        with atomic_file(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
