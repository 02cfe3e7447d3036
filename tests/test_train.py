"""The trainer: schedule, decay groups, config precedence, exact resume, Ctrl-C,
non-finite steps, damaged checkpoints, and the CLI end to end on a tiny model."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared
from data_fixtures import small_tokenizer
from train_fixtures import tiny_cfg

import lmforge
from lmforge import LmforgeError
from lmforge.cli.flags import add_flags, config_from_args
from lmforge.config import Config
from lmforge.data.prepare import prepare
from lmforge.model import GPT
from lmforge.recipes import pretrain
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import init_distributed
from lmforge.train.loop import step_seed
from lmforge.train.loss import next_token_loss
from lmforge.train.optim import lr_at, param_groups


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "verdict"
    prepare([shared("llms-from-scratch/the-verdict.txt")], small_tokenizer(), out, val_fraction=0.1)
    return out


def fit(cfg: TrainConfig, loss_fn=None, say=None):
    info = init_distributed()
    trainer = pretrain.build(cfg, info, say=say or (lambda m: None), progress=False)
    if loss_fn is not None:
        trainer.loss_fn = loss_fn
    return trainer, trainer.fit()


def weights(path) -> dict[str, torch.Tensor]:
    return lmforge.load(path).state_dict()


# --- pieces ---------------------------------------------------------------------------
def test_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("preset", ["gpt2", "nano"])
def test_weight_decay_only_on_linear_matrices(preset):
    model = GPT(Config.from_name(preset, n_layer=2, n_embd=64, n_head=4, vocab_size=100, context_length=16, **({"n_kv_head": 2} if preset == "nano" else {})))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith(".weight") and ".norm" not in n and "emb" not in n for n in decayed)
    assert "tok_emb.weight" in {names[id(p)] for p in no_decay["params"]}  # the tied head too
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert len(decayed) == len(list(model.named_linears()))  # every block Linear, nothing else
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_a_module_with_an_lr_scale_learns_at_that_multiple_of_the_schedule(data_dir, tmp_path):
    """PPO's value head: a module's `lr_scale` gives its parameters groups of their own,
    decayed as any others, which the trainer steps at lr x scale every step."""
    model = GPT(Config.from_name("nano", n_layer=1, n_embd=32, n_head=2, n_kv_head=1, vocab_size=50, context_length=8))
    model.lm_head.lr_scale = 10.0  # (tied: the head is the embedding table, whose one Parameter moves group)
    groups = param_groups(model, 0.1)
    scaled = [g for g in groups if g.get("lr_scale") == 10.0]
    assert scaled and {id(p) for g in scaled for p in g["params"]} == {id(model.lm_head.weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    trainer, _ = fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=3, warmup_steps=0, sample_tokens=0))
    trainer.model.norm_f.lr_scale = 4.0
    trainer.optimizer = torch.optim.AdamW(param_groups(trainer.model, 0.1), lr=1.0)
    trainer._train_step()
    lrs = {g.get("lr_scale", 1.0): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[4.0] == pytest.approx(4 * lrs[1.0]) and lrs[1.0] > 0


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('data = "d"\nlr = 0.01\nmax_steps = 5\n[model]\nn_layer = 3\n')
    parser = argparse.ArgumentParser()
    add_flags(parser)
    cfg = config_from_args(parser.parse_args(["--lr", "0.02", "--set", "n_embd=96", "--resume"]), str(file))
    assert (cfg.lr, cfg.max_steps, cfg.data, cfg.resume) == (0.02, 5, "d", "latest")
    assert cfg.model == {"n_layer": 3, "n_embd": 96}
    assert cfg.batch_size == TrainConfig().batch_size
    file.write_text('data = "d"\nlearning_rate = 0.1\n')
    with pytest.raises(LmforgeError, match="unknown key.*learning_rate"):
        config_from_args(parser.parse_args([]), str(file))
    with pytest.raises(LmforgeError, match="--max-steps"):
        TrainConfig(data="d").validate()
    # the run.json a run writes is a config file too: --config OUT/run.json --resume repeats the run
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(cfg.to_dict()))
    assert config_from_args(parser.parse_args([]), str(saved)) == cfg


# --- exact resume -----------------------------------------------------------------------
def test_resume_is_bit_exact_with_accumulation_and_dropout(data_dir, tmp_path):
    _, straight = fit(tiny_cfg(data_dir, tmp_path / "straight"))
    assert straight.step == 8 and straight.stopped == "done"

    class Interrupt:  # Ctrl-C arrives while step 5 runs (draw index 4)
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, model, x, y):
            if self.trainer.draws == 5 and not getattr(self, "sent", False):
                self.sent = True
                signal.raise_signal(signal.SIGINT)
            return self.inner(model, x, y)

    interrupt = Interrupt(next_token_loss)
    info = init_distributed()
    trainer = pretrain.build(tiny_cfg(data_dir, tmp_path / "broken"), info, say=lambda m: None, progress=False)
    interrupt.trainer = trainer
    trainer.loss_fn = interrupt
    first = trainer.fit()
    assert first.stopped == "interrupted" and first.step == 5
    assert first.checkpoint.name == "step-00000005"  # Ctrl-C wrote a checkpoint before exiting
    _, resumed = fit(tiny_cfg(data_dir, tmp_path / "broken", resume="latest"))
    assert resumed.step == 8
    a, b = weights(straight.checkpoint / "model"), weights(resumed.checkpoint / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics read as one run: one train record per step
    records = [json.loads(line) for line in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))


def test_resume_falls_back_past_a_damaged_checkpoint(data_dir, tmp_path):
    _, result = fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=6))
    newest = list_checkpoints(tmp_path / "run")[-1]
    weights_file = newest / "model" / "model.safetensors"
    raw = bytearray(weights_file.read_bytes())
    raw[-10] ^= 0xFF
    weights_file.write_bytes(bytes(raw))
    with pytest.raises(LmforgeError, match="model.safetensors"):
        fit(tiny_cfg(data_dir, tmp_path / "run", resume=str(newest)))
    with pytest.raises(LmforgeError, match="model.safetensors"):
        lmforge.load(newest)
    said = []
    _, resumed = fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=8, resume="latest"), say=said.append)
    assert any("damaged" in m and newest.name in m for m in said), said
    assert any("resumed from" in m and "step-00000004" in m for m in said), said
    assert resumed.step == 8


# --- non-finite steps -------------------------------------------------------------------
def test_a_non_finite_step_is_skipped_and_never_reaches_the_weights(data_dir, tmp_path):
    calls = {"n": 0}

    def sometimes_nan(model, x, y):
        calls["n"] += 1
        loss = next_token_loss(model, x, y)
        return loss * float("nan") if calls["n"] in (5, 6) else loss  # both micro-batches of the third attempt

    _, result = fit(tiny_cfg(data_dir, tmp_path / "run"), loss_fn=sometimes_nan)
    assert result.step == 8 and result.skipped_steps == 1
    assert all(torch.isfinite(w).all() for w in weights(result.checkpoint / "model").values())


def test_training_stops_after_too_many_bad_steps(data_dir, tmp_path):
    def always_nan(model, x, y):
        return next_token_loss(model, x, y) * float("inf")

    cfg = tiny_cfg(data_dir, tmp_path / "run", max_bad_steps=3)
    with pytest.raises(LmforgeError, match="3 steps in a row.*non-finite"):
        fit(cfg, loss_fn=always_nan)


# --- end to end ----------------------------------------------------------------------
def lmforge_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600)


def test_pretrain_cli_writes_a_run_folder_that_loads(data_dir, tmp_path):
    out = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "nano"\ncontext_length = 32\n[model]\nn_layer = 2\nn_embd = 64\nn_head = 4\nmlp_hidden = 128\n')
    r = lmforge_cli("pretrain", "--config", str(toml), "--data", str(data_dir), "--out", str(out), "--max-steps", "6",
                    "--batch-size", "4", "--eval-every", "3", "--save-every", "3", "--eval-batches", "2", "--log-every", "1",
                    "--sample-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "done at step 6" in r.stdout and "loss curve" in r.stdout
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [3, 6] and all(math.isclose(r["ppl"], math.exp(r["loss"])) for r in val)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000003", "step-00000006"]
    model = lmforge.load(out)
    assert model.config.n_layer == 2 and model.tokenizer is not None
    gen = lmforge_cli("generate", "--model", str(out), "--prompt", "I had", "--max-new-tokens", "5", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    bad = lmforge_cli("pretrain", "--data", str(tmp_path / "nothing"), "--max-steps", "2", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "nothing" in bad.stderr


def test_init_from_continues_a_model_on_new_data_and_refuses_another_tokenizer(data_dir, tmp_path):
    """--init-from starts from the model's own weights and shape (its step-1 loss is the
    model's loss on that batch, not a fresh model's) and needs data in its tokenizer."""
    first, _ = fit(tiny_cfg(data_dir, tmp_path / "first", max_steps=8, sample_tokens=0))
    model = lmforge.load(tmp_path / "first")
    cfg = tiny_cfg(data_dir, tmp_path / "more", max_steps=2, init_from=str(tmp_path / "first"), model={}, context_length=0,
                   sample_tokens=0, warmup_steps=0, grad_accum=1)
    trainer = pretrain.build(cfg, init_distributed(), say=lambda m: None, progress=False)
    assert trainer.model.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
    x, y = trainer.batch(0, 0)
    torch.manual_seed(step_seed(cfg.seed, 0, 0))  # the dropout the trainer's first step draws
    with torch.no_grad():
        expected = float(next_token_loss(model.train(), x, y))
    result = trainer.fit()
    first_loss = [r for r in map(json.loads, (tmp_path / "more" / "metrics.jsonl").read_text().splitlines())
                  if r["split"] == "train"][0]["loss"]
    assert first_loss == pytest.approx(expected, rel=1e-5) and result.step == 2
    assert lmforge.load(tmp_path / "more").config == model.config
    with pytest.raises(LmforgeError, match="drop --set and --context-length"):
        pretrain.build(tiny_cfg(data_dir, tmp_path / "x", init_from=str(tmp_path / "first")), init_distributed(),
                       say=lambda m: None, progress=False)
    other = tmp_path / "other-data"
    verdict = shared("llms-from-scratch/the-verdict.txt")
    prepare([verdict], train_bpe([verdict.read_text(encoding="utf-8")], 280, progress=False), other, val_fraction=0.1)
    with pytest.raises(LmforgeError, match="another tokenizer.*data prepare --tokenizer"):
        pretrain.build(tiny_cfg(other, tmp_path / "y", init_from=str(tmp_path / "first"), model={}, context_length=0),
                       init_distributed(), say=lambda m: None, progress=False)


# --- torchrun ------------------------------------------------------------------------
def train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume_exactly(data_dir, tmp_path, strategy):
    import shutil

    common = ["--data", str(data_dir), "--preset", "nano", "--context-length", "32", "--max-steps", "6", "--lr", "1e-3",
              "--warmup-steps", "2", "--eval-every", "3", "--save-every", "3", "--eval-batches", "2", "--log-every", "1",
              "--sample-tokens", "4", "--grad-accum", "2", "--seed", "3",
              "--set", "n_layer=2", "--set", "n_embd=64", "--set", "n_head=4", "--set", "mlp_hidden=128"]
    one = lmforge_cli("pretrain", *common, "--batch-size", "8", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge", "pretrain"]
    two = subprocess.run([*env_cmd, *common, "--batch-size", "4", "--strategy", strategy, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):  # the same windows, split across ranks: the same losses up to summation order
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4), (ra, rb)
    # resume under torchrun: drop the final checkpoint, continue from step 3, land on the same weights
    shutil.copytree(tmp_path / "two", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step-00000006")
    again = subprocess.run([*env_cmd, *common, "--batch-size", "4", "--strategy", strategy, "--out", str(tmp_path / "again"),
                            "--resume"], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step-00000003" in again.stderr
    w1, w2 = weights(tmp_path / "two"), weights(tmp_path / "again")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
def test_quickstart_runs_the_pipeline_and_says_what_to_do_next(tmp_path):
    out = tmp_path / "qs"
    r = lmforge_cli("quickstart", "--input", str(shared("llms-from-scratch/the-verdict.txt")), "--vocab-size", "300",
                    "--preset", "nano", "--minutes", "0.15", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "from your text" in r.stdout and "built-in corpus" not in r.stdout  # --input was given
    for expected in ("[1/3] Tokenizer", "[2/3] Data", "[3/3] Pretraining", "validation loss", "What the model writes",
                     "loss curve:", "checkpoint:", "lmforge generate --model", "lmforge chat --model"):
        assert expected in r.stdout, expected
    assert (out / "model" / "loss.png").is_file()
    model = lmforge.load(out / "model")
    assert model.tokenizer.vocab_size == 300
    again = lmforge_cli("quickstart", "--input", str(shared("llms-from-scratch/the-verdict.txt")), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
