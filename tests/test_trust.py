"""Issue 11, "trust nothing that can be checked": settings of the wrong type or out of
range, an evaluation over zero batches, resuming a checkpoint of another model or
tokenizer, a full disk while saving, a plot that cannot be drawn, SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import safetensors
import torch
import train_fixtures
from conftest import shared
from data_fixtures import small_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

import lmforge.train.checkpoint as checkpoint_module
import lmforge.train.metrics as metrics_module
from lmforge import LmforgeError
from lmforge.cli import main as cli_main
from lmforge.cli.flags import add_flags, config_from_args
from lmforge.config import Config
from lmforge.data.prepare import prepare
from lmforge.fields import dataclass_from_dict
from lmforge.model import GPT
from lmforge.recipes import pretrain
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import CHECKPOINTS, list_checkpoints, read_checkpoint, save_checkpoint, verify_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import init_distributed
from lmforge.train.loss import next_token_loss
from lmforge.train.metrics import MetricsLog, read_metrics
from lmforge.weights import state_dict_for_saving


# --- 1. types -------------------------------------------------------------------------
@dataclass
class Typed:
    count: int = 0
    rate: float = 0.5
    flag: bool = False
    name: str = ""
    names: list[str] = field(default_factory=list)
    table: dict[str, float] | None = None
    size: int | None = None
    mode: Literal["a", "b"] = "a"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"count": "four"}, r'x.toml: count must be an integer, got "four" \(a string\)'),
        ({"count": True}, r"count must be an integer, got true \(a boolean\)"),
        ({"count": 1.5}, r"count must be an integer, got 1.5 \(a number\)"),
        ({"rate": "fast"}, r'rate must be a number, got "fast" \(a string\)'),
        ({"rate": False}, r"rate must be a number, got false"),
        ({"flag": 1}, r"flag must be true or false, got 1 \(an integer\)"),
        ({"name": 3}, r"name must be a string, got 3"),
        ({"names": "hi"}, r'names must be a list of strings, got "hi"'),
        ({"names": ["a", 2]}, r'names must be a list of strings, got \["a", 2\] \(a list\)'),
        ({"table": {"f": "x"}}, r"table must be a table of names to numbers or null"),
        ({"table": [1]}, r"table must be a table of names to numbers or null, got \[1\] \(a list\)"),
        ({"size": "3"}, r'size must be an integer or null, got "3"'),
        ({"mode": "c"}, r'mode must be one of "a", "b", got "c"'),
        ({"count": None}, r"count must be an integer, got null$"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_key_value_type_and_source(values, message):
    with pytest.raises(LmforgeError, match=message):
        dataclass_from_dict(Typed, values, "x.toml")


def test_values_that_fit_are_taken_as_given():
    got = dataclass_from_dict(Typed, {"count": 3, "rate": 1, "flag": True, "names": ["a"], "table": {"f": 2}, "size": None,
                                      "mode": "b"}, "x")
    assert got == Typed(count=3, rate=1, flag=True, names=["a"], table={"f": 2}, size=None, mode="b")
    assert dataclass_from_dict(Typed, {"size": 4, "table": None}, "x").size == 4


def test_config_json_with_a_wrong_type_names_the_file(tmp_path):
    d = Config.from_name("nano").to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**d, "n_layer": "four"}))
    with pytest.raises(LmforgeError, match=r'config\.json: n_layer must be an integer, got "four" \(a string\)') as e:
        Config.load(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({**d, "n_layer": 0}))
    with pytest.raises(LmforgeError, match=r"config\.json: n_layer must be a positive integer, got 0"):
        Config.load(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(LmforgeError, match="truncated or not JSON"):
        Config.load(tmp_path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p)
    return p


def test_set_and_toml_values_of_the_wrong_type_are_refused_where_they_were_given(tmp_path):
    with pytest.raises(LmforgeError, match=r'--set n_layer=abc: n_layer must be an integer, got "abc" \(a string\)'):
        config_from_args(parser().parse_args(["--set", "n_layer=abc"]))
    with pytest.raises(LmforgeError, match=r"--set n_layers=4: unknown model field\(s\) n_layers"):
        config_from_args(parser().parse_args(["--set", "n_layers=4"]))
    toml = tmp_path / "run.toml"
    for text, message in [('max_steps = "x"', r'max_steps must be an integer, got "x"'),
                          ('lr = "fast"', r'lr must be a number, got "fast"'),
                          ("sample_prompts = \"hi\"", r"sample_prompts must be a list of strings"),
                          ('[model]\nn_layer = "four"', r'run\.toml \[model\]: n_layer must be an integer, got "four"')]:
        toml.write_text(text + "\n")
        with pytest.raises(LmforgeError, match=message) as e:
            config_from_args(parser().parse_args([]), str(toml))
        assert str(toml) in str(e.value)
    toml.write_text('data = "d"\nlr = 1\nmax_steps = 3\n')  # an int where a float is expected is a number
    cfg = config_from_args(parser().parse_args([]), str(toml))
    assert cfg.lr == 1
    cfg.validate()


def test_run_json_of_the_wrong_type_is_refused(tmp_path):
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({**TrainConfig(data="d").to_dict(), "batch_size": "8"}))
    with pytest.raises(LmforgeError, match=r'run\.json: batch_size must be an integer, got "8"'):
        config_from_args(parser().parse_args([]), str(saved))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"beta1": 2.0}, r"--beta1 must be in \[0, 1\)"),
        ({"beta2": 1.0}, r"--beta2 must be in \[0, 1\)"),
        ({"beta1": -0.1}, r"--beta1 must be in \[0, 1\)"),
        ({"lr": 0.0}, r"--lr must be a positive number"),
        ({"lr": math.nan}, r"--lr must be a positive number"),
        ({"lr": math.inf}, r"--lr must be a positive number"),
        ({"min_lr": -1e-4}, r"need 0 <= --min-lr <= --lr"),
        ({"weight_decay": -0.1}, r"--weight-decay must be a number >= 0"),
        ({"grad_clip": -1.0}, r"--grad-clip must be a number >= 0"),
        ({"batch_size": 0}, r"--batch-size must be at least 1, got 0"),
        ({"grad_accum": 0}, r"--grad-accum must be at least 1"),
        ({"max_bad_steps": 0}, r"--max-bad-steps must be at least 1"),
        ({"eval_batches": -1}, r"--eval-batches must not be negative, got -1"),
        ({"keep_last": -1}, r"--keep-last must not be negative"),
        ({"context_length": -5}, r"--context-length must not be negative"),
        ({"sample_tokens": -1}, r"--sample-tokens must not be negative"),
        ({"time_limit": math.nan}, r"--time-limit must be a number of seconds"),
        ({"seed": -1}, r"--seed must be an integer in \[0, 2\*\*63\)"),
        ({"model": {"n_layer": 0}}, r"--preset nano with \[model\] / --set \{'n_layer': 0\}: n_layer must be a positive integer"),
        ({"model": {"n_embd": 98}}, r"n_embd=98 is not divisible by n_head=4"),
        ({"preset": "huge"}, r"--preset huge: unknown preset 'huge'"),
        ({"model": {"n_layer": "x"}}, r"\[model\] / --set .*: n_layer must be an integer"),
    ],
)
def test_settings_out_of_range_are_refused_with_the_flag_and_the_fix(changes, message):
    cfg = TrainConfig(**{"data": "d", "max_steps": 3, "preset": "nano", **changes})
    with pytest.raises(LmforgeError, match=message):
        cfg.validate()


def test_beta1_2_on_the_command_line_is_one_error_line(capsys, tmp_path):
    code = cli_main(["pretrain", "--data", str(tmp_path), "--max-steps", "2", "--beta1", "2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lmforge: error: --beta1 must be in [0, 1)") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_layer": 0}, r"n_layer must be a positive integer, got 0"),
        ({"n_embd": -1}, r"n_embd must be a positive integer, got -1"),
        ({"n_head": 0}, r"n_head must be a positive integer, got 0"),
        ({"vocab_size": -3}, r"vocab_size must be a positive integer"),
        ({"context_length": 0}, r"context_length must be a positive integer"),
        ({"n_kv_head": -1}, r"n_kv_head must be a positive integer \(or 0: derived"),
        ({"n_kv_head": 8}, r"n_kv_head=8 is more than n_head=4"),
        ({"head_dim": -2}, r"head_dim must be a positive integer \(or 0"),
        ({"mlp_hidden": -1}, r"mlp_hidden must be a positive integer \(or 0"),
        ({"norm_eps": 0.0}, r"norm_eps must be a positive number"),
        ({"rope_theta": -1.0}, r"rope_theta must be a positive number"),
        ({"init_std": math.nan}, r"init_std must be a number >= 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_config_sizes_must_be_positive(overrides, message):
    with pytest.raises(LmforgeError, match=message):
        Config.from_name("nano", **overrides)


@settings(deadline=None, max_examples=200)
@given(sizes=st.fixed_dictionaries({k: st.integers(-3, 70) for k in
                                    ("n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "mlp_hidden", "vocab_size")}),
       big=st.sampled_from([None, "n_embd", "n_head"]))
def test_any_sizes_build_a_config_or_give_an_lmforge_error(sizes, big):
    if big:
        sizes[big] = 10**10 + 19  # a divisor list in the message must not take forever
    try:
        c = Config.from_name("nano", **sizes)
    except LmforgeError:
        return
    assert min(c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.head_dim, c.mlp_hidden) > 0
    assert c.n_head % c.n_kv_head == 0


# --- tiny runs -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "verdict"
    prepare([shared("llms-from-scratch/the-verdict.txt")], small_tokenizer(), out, val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def other_data_dir(tmp_path_factory) -> Path:
    """The same text, made with another tokenizer of the same size: the same model shape."""
    text = shared("llms-from-scratch/the-verdict.txt").read_text(encoding="utf-8")
    tok = train_bpe([text[: len(text) // 3]], vocab_size=300, workers=1, progress=False)
    assert tok.vocab_size == small_tokenizer().vocab_size and tok.fingerprint != small_tokenizer().fingerprint
    out = tmp_path_factory.mktemp("data") / "other"
    prepare([shared("llms-from-scratch/the-verdict.txt")], tok, out, val_fraction=0.1)
    return out


def tiny_cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    """Shorter than the trainer tests' run: one layer, no accumulation, 4 steps."""
    small = dict(grad_accum=1, max_steps=4, warmup_steps=1, eval_every=2, sample_tokens=2,
                 model={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "mlp_hidden": 64})
    return train_fixtures.tiny_cfg(data_dir, out, **(small | kw))


def trainer(cfg: TrainConfig, say=None):
    return pretrain.build(cfg, init_distributed(), say=say or (lambda m: None), progress=False)


def fit(cfg: TrainConfig, say=None):
    return trainer(cfg, say).fit()


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under the run's checkpoints/, hidden ones included, with its bytes."""
    root = run / CHECKPOINTS
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- 2. an evaluation over zero batches -------------------------------------------------
def test_zero_eval_batches_give_no_validation_loss_and_no_best_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    result = fit(tiny_cfg(data_dir, out, max_steps=6, eval_every=2, eval_batches=0, keep_last=1))
    assert result.val_loss is None
    records = read_metrics(out / "metrics.jsonl")
    assert not [r for r in records if r["split"] in ("val", "sample")]
    # no checkpoint was scored, so none is kept as "best": only the newest one stays
    assert [p.name for p in list_checkpoints(out)] == ["step-00000006"]
    assert read_checkpoint(list_checkpoints(out)[-1]).val_loss is None


def test_evaluate_over_an_empty_set_is_none_never_zero(data_dir, tmp_path):
    t = trainer(tiny_cfg(data_dir, tmp_path / "run"))
    t.eval_batches = lambda: iter(())
    assert t.evaluate() is None and t.last_val is None
    assert t.wrapped.training  # back in training mode


# --- 3. resume checks what it resumes -----------------------------------------------------
@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4) to resume from; tests copy it."""
    out = tmp_path_factory.mktemp("runs") / "first"
    fit(tiny_cfg(data_dir, out))
    return out


def copy_run(first_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(first_run, out, ignore=shutil.ignore_patterns(".lock"))
    return out


MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "mlp_hidden": 64}


@pytest.mark.parametrize(
    "changes, said",
    [
        ({"context_length": 16}, ["--context-length 32 -> 16", "context_length 32 -> 16"]),
        ({"model": {**MODEL, "n_layer": 2}}, ['[model] / --set {"n_layer": 1,', '"n_layer": 2,', "n_layer 1 -> 2"]),
        ({"model": {**MODEL, "dropout": 0.1}}, ["dropout 0.0 -> 0.1"]),
        ({"preset": "micro", "model": {**MODEL, "n_kv_head": 2, "n_head": 2}}, ['--preset "nano" -> "micro"']),
    ],
)
def test_resuming_with_other_model_settings_is_refused_naming_them(data_dir, first_run, tmp_path, changes, said):
    out = copy_run(first_run, tmp_path)
    before = snapshot(out)
    with pytest.raises(LmforgeError, match=r"--resume: .*step-00000004 was trained with other model settings") as e:
        fit(tiny_cfg(data_dir, out, max_steps=6, resume="latest", **changes))
    message = str(e.value)
    for text in said:
        assert text in message, message
    assert "Resume with the settings it was trained with" in message and "another --out" in message
    assert snapshot(out) == before  # nothing was written into the checkpoints


def test_resuming_with_other_training_settings_is_fine(data_dir, first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    said = []
    result = fit(tiny_cfg(data_dir, out, max_steps=6, lr=1e-3, eval_every=3, log_every=2, sample_tokens=3, resume="latest"),
                 say=said.append)
    assert result.step == 6 and any("resumed from" in m and "step-00000004" in m for m in said)


def test_the_tokenizer_is_recorded_and_resuming_on_other_data_is_refused(data_dir, other_data_dir, first_run, tmp_path):
    ckpt = read_checkpoint(list_checkpoints(first_run)[-1])
    assert ckpt.trainer_state["tokenizer"]["fingerprint"] == small_tokenizer().fingerprint
    assert ckpt.trainer_state["tokenizer"]["fingerprint"] == json.loads((data_dir / "meta.json").read_text())["tokenizer"]["fingerprint"]
    out = copy_run(first_run, tmp_path)
    before = snapshot(out)
    with pytest.raises(LmforgeError, match=r"was trained with tokenizer .*\(fingerprint [0-9a-f]{12}\), this data was made "
                                           r"with tokenizer .*\(fingerprint [0-9a-f]{12}\)") as e:
        fit(tiny_cfg(other_data_dir, out, max_steps=6, resume="latest"))
    assert small_tokenizer().fingerprint[:12] in str(e.value)
    assert snapshot(out) == before


def test_resume_from_a_path_without_checkpoints_names_that_path(data_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    with pytest.raises(LmforgeError) as e:
        fit(tiny_cfg(data_dir, out, resume=str(elsewhere)))
    message = str(e.value)
    assert f"no checkpoint in {elsewhere / CHECKPOINTS}" in message and str(out) not in message, message
    with pytest.raises(LmforgeError, match=re.escape(f"--resume: no checkpoint in {out / CHECKPOINTS}; start without --resume")):
        fit(tiny_cfg(data_dir, out, resume="latest"))


# --- 4. a full disk -------------------------------------------------------------------------
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(Config.from_name("nano", n_layer=1, vocab_size=300, context_length=32, n_embd=32, n_head=2, n_kv_head=1,
                                mlp_hidden=64))


def save(run: Path, step: int, model: GPT, **kw) -> Path:
    return save_checkpoint(run, step, config=model.config, model_state=state_dict_for_saving(model), **kw)


def no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_no_space(*a, **k):
    raise safetensors.SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')


@pytest.mark.parametrize("which", ["model weights", "optimizer (2nd safetensors file)", "trainer.json", "safetensors error"])
def test_a_full_disk_while_saving_is_one_clear_error_and_loses_nothing(tmp_path, monkeypatch, which):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    kept = [save(run, s, model, optimizer_state=opt.state_dict(), keep_last=0) for s in (1, 2)]
    before = snapshot(run)
    real_save_file = checkpoint_module.save_file

    def failing_save_file(tensors, filename, *a, **k):
        if which == "model weights" or (which.startswith("optimizer") and Path(filename).name == "optimizer.safetensors"):
            no_space()
        if which == "safetensors error":
            safetensors_no_space()
        return real_save_file(tensors, filename, *a, **k)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save_file)
    if which == "trainer.json":
        real_write_text = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: no_space() if self.name == "trainer.json"
                            else real_write_text(self, *a, **k))
    for step in (3, 2):  # a new step, and a step that exists (replaced whole or not at all)
        with pytest.raises(LmforgeError) as e:
            save(run, step, model, optimizer_state=opt.state_dict(), keep_last=1)
        message = str(e.value)
        assert f"could not save checkpoint step-{step:08d} in {run / CHECKPOINTS}: No space left on device" in message
        assert "free space on that disk" in message and "--resume" in message
        assert snapshot(run) == before  # no temp folder, no half checkpoint, the old ones as they were
    monkeypatch.undo()
    for p in kept:
        verify_checkpoint(p)
    assert list_checkpoints(run) == kept


def test_another_os_error_while_saving_is_named_too(tmp_path, monkeypatch):
    model = tiny_model()
    run = tmp_path / "run"
    save(run, 1, model)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/x/model.safetensors")

    monkeypatch.setattr(checkpoint_module, "save_file", denied)
    with pytest.raises(LmforgeError, match=r"could not save checkpoint step-00000002 in .*: Permission denied "
                                           r"\(writing /x/model.safetensors\)\. .*fix the cause"):
        save(run, 2, model)


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str):
    """A real small file system (root only); skips the test where it cannot be mounted."""
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_really_full_disk_while_saving(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).float().mean().backward()
    opt.step()  # the moments exist: a checkpoint is about 3x the weights
    with tiny_tmpfs(tmp_path / "disk", "384k") as disk:
        run = disk / "run"
        first = save(run, 1, model, optimizer_state=opt.state_dict(), rng=None)
        before = snapshot(run)
        with pytest.raises(LmforgeError, match=r"could not save checkpoint step-00000002 .*No space left on device"):
            save(run, 2, model, optimizer_state=opt.state_dict())
        assert snapshot(run) == before
        verify_checkpoint(first)
        assert list_checkpoints(run) == [first]


def test_a_full_disk_during_training_stops_with_the_cause_and_resumes_after(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save_file = checkpoint_module.save_file

    def fails_from_the_second_checkpoint(tensors, filename, *a, **k):
        if "step-00000004" in str(filename):  # inside the temp folder `.step-00000004.tmp-*`
            no_space()
        return real_save_file(tensors, filename, *a, **k)

    monkeypatch.setattr(checkpoint_module, "save_file", fails_from_the_second_checkpoint)
    with pytest.raises(LmforgeError, match="could not save checkpoint step-00000004.*No space left on device"):
        fit(tiny_cfg(data_dir, out, max_steps=6))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"]
    assert not [p for p in (out / CHECKPOINTS).iterdir() if p.name.startswith(".")]
    result = fit(tiny_cfg(data_dir, out, max_steps=6, resume="latest"))
    assert result.step == 6 and result.stopped == "done"


# --- the loss plot never stops a run --------------------------------------------------------
def test_a_plot_that_cannot_be_drawn_warns_once_and_the_run_goes_on(data_dir, tmp_path, monkeypatch, capsys):
    def disk_full(records, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(metrics_module, "plot_losses", disk_full)
    out = tmp_path / "run"
    result = fit(tiny_cfg(data_dir, out))
    assert result.stopped == "done" and result.step == 4 and result.plot is None
    err = capsys.readouterr().err
    assert err.count("warning: could not draw") == 1 and "No space left on device" in err
    assert list_checkpoints(out)[-1].name == "step-00000004"


def test_a_real_plot_failure_is_caught_too(tmp_path, capsys):
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "split": "train", "loss": 2.0})
    (tmp_path / "loss.png").mkdir()  # the picture cannot replace a folder: an OSError from the real writer
    assert log.plot() is None and log.plot() is None
    assert capsys.readouterr().err.count("warning: could not draw") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".loss.png")]  # no temp file left


def test_metrics_that_cannot_be_written_are_one_clear_error(tmp_path):
    log = MetricsLog(tmp_path)
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(LmforgeError, match=r"could not append to .*metrics\.jsonl"):
        log.write({"step": 1, "split": "train", "loss": 2.0})


# --- SIGTERM is told from Ctrl-C ------------------------------------------------------------
@pytest.mark.parametrize("sig, stopped", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_says_which(data_dir, tmp_path, sig, stopped):
    t = trainer(tiny_cfg(data_dir, tmp_path / "run", max_steps=6, save_every=0, eval_every=0))

    def loss_fn(model, x, y):
        if t.draws == 3:
            signal.raise_signal(sig)
        return next_token_loss(model, x, y)

    t.loss_fn = loss_fn
    result = t.fit()
    assert result.stopped == stopped and result.step == 3
    assert result.checkpoint.name == "step-00000003"
    assert not [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"]  # it only saved


def test_config_files_that_are_not_files_or_not_text_are_refused(tmp_path):
    with pytest.raises(LmforgeError, match="--config was given an empty path"):
        config_from_args(parser().parse_args([]), "")
    with pytest.raises(LmforgeError, match=r"--config .* is not a file"):
        config_from_args(parser().parse_args([]), str(tmp_path))
    if hasattr(os, "mkfifo"):  # reading a FIFO would block forever: refused without opening it
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(LmforgeError, match=r"--config .*fifo is not a file"):
            config_from_args(parser().parse_args([]), str(tmp_path / "fifo"))
        with pytest.raises(LmforgeError, match=r"fifo is not a regular file"):
            Config.load(tmp_path / "fifo")
    bad = tmp_path / "run.toml"
    bad.write_bytes(b"lr = \xff\n")
    with pytest.raises(LmforgeError, match="is not UTF-8 text"):
        config_from_args(parser().parse_args([]), str(bad))
    bad.write_text("model = 3\n")
    with pytest.raises(LmforgeError, match=r"run\.toml: model must be a table of names to values, got 3"):
        config_from_args(parser().parse_args(["--set", "n_layer=2"]), str(bad))
    with pytest.raises(LmforgeError, match="no model config given"):
        Config.load("")
    with pytest.raises(LmforgeError, match="no config.json at"):
        Config.load(tmp_path)
