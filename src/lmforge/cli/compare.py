"""`lmforge compare RUN...`: several runs' curves in one PNG and a table of what differs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.cli.common import add_command, check_out_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "compare", "overlay several runs' training and validation curves; table their differing settings and results",
        _run,
        examples="""
        lmforge compare runs/lora-r8 runs/lora-r32 runs/lora-all --out lora.png
        lmforge compare runs/base-small runs/base-medium --x tokens --out scaling.png
        lmforge compare runs/ppo runs/rloo --metric score --out rl.png
        """,
        description="""
        Reads each RUN folder's metrics.jsonl, run.json and (fine-tuning and alignment runs)
        metrics.json. Draws the training curve of --metric (a running mean when noisy) and its
        validation points, one colour a run, against the step or the tokens seen (--x tokens:
        the fair axis between runs with different batch or context sizes). Prints the settings
        that differ between the runs (run.json, the output folder aside), then each run's final
        step and tokens, last training value, best and last validation value, and the held-out
        figures of metrics.json after training.""",
    )
    p.add_argument("runs", nargs="+", metavar="DIR", help="run folders (each holding metrics.jsonl)")
    p.add_argument("--out", default="compare.png", metavar="PATH", help="the picture (default: compare.png)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="align the curves by step or by tokens seen (default: step)")
    p.add_argument("--metric", default="loss", help="the logged figure to draw (default: loss; e.g. ppl, bpb, score, kl)")


def _run(args: argparse.Namespace) -> int:
    from lmforge.train.compare import check_metric, format_table, plot_runs, read_runs, table

    out = _check_out(args.out)
    runs = read_runs(args.runs)
    for note in check_metric(runs, args.metric, args.x):
        print(f"note: {note}", file=sys.stderr)
    print(format_table(table(runs, args.metric)))
    plot_runs(runs, out, x=args.x, metric=args.metric)
    print(f"picture: {out}")
    return 0


def _check_out(path: str) -> Path:
    """--out, refused before reading anything if writing it would replace what is not a picture."""
    return check_out_file(path, "compare.png", _is_png, "a PNG")


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
