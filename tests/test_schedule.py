"""The run's schedule fits the run: warm-up as a share of the steps (a longer configured
one is cut and said), a run sized by its time limit ends its cosine on time, a resume
that changes the schedule says so and a resume of a finished run changes nothing; what
a run prints without a terminal, bits per byte, and the loss plot's legend."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import pytest
from conftest import shared
from data_fixtures import small_tokenizer
from train_fixtures import tiny_cfg

from lmforge import LmforgeError
from lmforge.data.prepare import prepare
from lmforge.data.tokens import TokenData
from lmforge.recipes import pretrain
from lmforge.train import loop
from lmforge.train.checkpoint import read_checkpoint
from lmforge.train.distributed import init_distributed
from lmforge.train.loss import next_token_loss
from lmforge.train.metrics import _draw
from lmforge.train.optim import lr_at

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "verdict"
    prepare([shared("llms-from-scratch/the-verdict.txt")], small_tokenizer(), out, val_fraction=0.1)
    return out


def fit(cfg, said: list[str] | None = None, loss_fn=None, progress: bool = False):
    trainer = pretrain.build(cfg, init_distributed(), say=(said.append if said is not None else lambda m: None), progress=progress)
    if loss_fn is not None:
        trainer.loss_fn = loss_fn
    return trainer, trainer.fit()


def records(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_warmup_is_a_share_of_the_steps_unless_set():
    cfg = tiny_cfg(Path("d"), Path("o"), warmup_steps=0, warmup_fraction=0.1)
    assert cfg.warmup_for(200) == 20 and cfg.warmup_for(20) == 2 and cfg.warmup_for(3) == 0
    cfg.warmup_steps = 30
    assert cfg.warmup_for(200) == 30 and cfg.warmup_for(20) == 20  # never longer than the run
    cfg.warmup_fraction = 1.0
    with pytest.raises(LmforgeError, match="--warmup-fraction must be in"):
        cfg.validate()


def test_a_warmup_longer_than_the_run_is_cut_and_said(data_dir, tmp_path):
    said: list[str] = []
    cfg = tiny_cfg(data_dir, tmp_path / "run", max_steps=6, warmup_steps=100, save_every=0, eval_every=0)
    _, result = fit(cfg, said)
    assert result.step == 6
    assert any("--warmup-steps 100 is longer than the run's 6 steps" in m for m in said), said
    lrs = [r["lr"] for r in records(tmp_path / "run", "train")]
    assert lrs[-1] == pytest.approx(cfg.lr)  # the last step reaches the peak instead of 6% of it
    # the default warms up over 5% of the steps, says nothing, and reaches the peak early
    said.clear()
    _, result = fit(tiny_cfg(data_dir, tmp_path / "default", max_steps=20, warmup_steps=0, save_every=0, eval_every=0), said)
    assert not any("warm-up" in m for m in said)
    lrs = [r["lr"] for r in records(tmp_path / "default", "train")]
    assert max(lrs) == pytest.approx(cfg.lr) and lrs.index(max(lrs)) == 0  # 1 warm-up step, then the cosine


class _Clock:
    """A clock that advances one second per micro-batch of training: the pace is
    exactly known, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_run_sized_by_its_time_limit_ends_its_cosine_on_time(data_dir, tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=clock.monotonic))

    def loss(model, x, y):
        clock.now += 0.5  # grad_accum 2: one second per optimizer step
        return next_token_loss(model, x, y)

    # 40.5 s: 40 steps and the final evaluation's reserve (2 batches at a third of a micro-batch's 0.5 s)
    cfg = tiny_cfg(data_dir, tmp_path / "timed", max_steps=0, time_limit=40.5, eval_every=0, save_every=0)
    assert cfg.sized_by_time
    _, result = fit(cfg, loss_fn=loss)
    assert result.stopped == "done" and result.step == 40  # one second per step
    lrs = [r["lr"] for r in records(tmp_path / "timed", "train")]
    # the cosine of a 40-step run, warm-up 5% of it, to its floor at the end
    assert lrs == pytest.approx([lr_at(s, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=2, max_steps=40) for s in range(40)])
    state = read_checkpoint(result.checkpoint).trainer_state
    assert state["max_steps"] == 40
    run = json.loads((tmp_path / "timed" / "run.json").read_text())
    assert run["max_steps"] == 0 and run["time_limit"] == 40.5  # run.json repeats the run as asked: sized by time


def test_progress_lines_when_there_is_no_terminal(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "PROGRESS_EVERY", 0.0)
    said: list[str] = []
    fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=4, eval_every=0, save_every=0), said)
    lines = [m for m in said if re.match(r"step \d/4 \(\d+%\), loss \d", m)]
    assert len(lines) == 4 and lines[-1].startswith("step 4/4 (100%), loss ")
    assert "nan" not in "".join(lines)
    assert "tokens/s, about " in lines[-1] and " left, " in lines[-1]  # once the pace is measured
    said.clear()
    fit(tiny_cfg(data_dir, tmp_path / "bar", max_steps=4, eval_every=0, save_every=0), said, progress=True)
    assert not any("tokens/s" in m for m in said)  # a progress bar shows it instead


def test_resuming_a_finished_run_changes_nothing(data_dir, tmp_path):
    cfg = tiny_cfg(data_dir, tmp_path / "run")
    _, first = fit(cfg)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    said: list[str] = []
    _, again = fit(tiny_cfg(data_dir, tmp_path / "run", resume="latest"), said)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics  # no second evaluation record
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == checkpoints
    assert again.step == first.step and again.val_loss == first.val_loss and again.checkpoint == first.checkpoint
    assert any("the run is complete" in m and "larger --max-steps" in m for m in said), said


def test_resuming_with_another_schedule_says_so(data_dir, tmp_path):
    fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=4))
    said: list[str] = []
    _, result = fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=8, resume="latest"), said)
    assert result.step == 8
    notes = [m for m in said if m.startswith("note: the schedule differs")]
    assert len(notes) == 1 and "--max-steps 4 -> 8" in notes[0] and "at this step" in notes[0], said
    said.clear()
    fit(tiny_cfg(data_dir, tmp_path / "same", max_steps=8, keep_last=0))
    fit(tiny_cfg(data_dir, tmp_path / "same", max_steps=8, resume=str(tmp_path / "same" / "checkpoints" / "step-00000004")), said)
    assert not any("schedule differs" in m for m in said)


def test_validation_reports_bits_per_byte(data_dir, tmp_path):
    fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=4))
    data = TokenData.open(data_dir)
    tok = data.tokenizer()
    ids = [int(i) for i in data.split("val")]
    text_bytes = len(tok.decode_bytes([i for i in ids if i != data.eot_id]))
    for r in records(tmp_path / "run", "val"):
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2) * len(ids) / text_bytes)
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))


def test_the_loss_plot_names_each_line_plainly():
    fig = matplotlib.pyplot.figure()
    ax = fig.add_subplot()
    _draw(ax, [(i, 5.0 - i / 100) for i in range(1, 101)], [(50, 4.6), (100, 4.2)])
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["training loss (logged steps)", "training loss, running mean of 5 points", "validation loss"]
    ax.clear()
    _draw(ax, [(1, 5.0), (2, 4.9)], [])
    assert ax.get_legend_handles_labels()[1] == ["training loss"]  # nothing to smooth: one line, no "mean of 1"
    matplotlib.pyplot.close(fig)
