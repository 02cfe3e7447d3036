"""Training checkpoints: exact round trips without pickle, retention, damage detection,
falling back past a damaged checkpoint, and crashes mid-write that lose nothing."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from fs_faults import break_dir_renames

import lmforge
import lmforge.io
from lmforge import LmforgeError
from lmforge.config import Config
from lmforge.model import GPT
from lmforge.train.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    capture_rng,
    find_resumable,
    list_checkpoints,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)
from lmforge.weights import WEIGHTS, state_dict_for_saving


def tiny_config() -> Config:
    return Config.from_name("nano", n_layer=2, vocab_size=1000, context_length=64)


@pytest.fixture
def trained():
    """A tiny model after two real AdamW steps: (model, optimizer, batch)."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randint(0, 1000, (2, 16))
    for _ in range(2):
        step(model, optimizer, x)
    return model, optimizer, x


def step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def save(run, step_: int, model: GPT, **kw):
    return save_checkpoint(run, step_, config=model.config, model_state=state_dict_for_saving(model), **kw)


def assert_identical(a, b, where="") -> None:
    """Same structure, same Python types, tensors bit-exact with the same dtype and shape."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bits(a), _bits(b)), where
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b], where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def draws() -> tuple:
    return random.random(), random.getrandbits(64), np.random.rand(4).tolist(), np.random.randn(3).tolist(), torch.rand(5), torch.randn(3)


# --- round trips -----------------------------------------------------------------------
def test_round_trip_is_exact_and_resumes_training_identically(trained, tmp_path, monkeypatch):
    model, optimizer, x = trained
    opt_state = optimizer.state_dict()
    assert isinstance(next(iter(opt_state["state"])), int)
    trainer_state = {"step": 2, "draws": 3, "lr": 1e-3, "config": {"preset": "nano", "betas": [0.9, 0.95]}, "note": None}
    np.random.randn(1)  # a cached Gaussian in NumPy's state
    rng = capture_rng()
    expected = draws()
    path = save(tmp_path / "run", 2, model, optimizer_state=opt_state, trainer_state=trainer_state, rng=rng, val_loss=3.5)
    assert path == tmp_path / "run" / CHECKPOINTS / "step-00000002"

    # reading runs no pickle at all
    def no_pickle(*a, **k):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    ckpt = read_checkpoint(path)
    monkeypatch.undo()

    assert (ckpt.path, ckpt.step, ckpt.val_loss) == (path, 2, 3.5)
    assert ckpt.config == model.config
    assert "lm_head.weight" not in ckpt.model_state  # tied head left out, as saved
    assert_identical(dict(sorted(state_dict_for_saving(model).items())), dict(sorted(ckpt.model_state.items())), "model")
    assert_identical(opt_state, ckpt.optimizer_state, "optimizer")
    assert ckpt.optimizer_state["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple stays a tuple
    assert ckpt.trainer_state == trainer_state

    # RNG: after restoring, the next draws repeat those made right after the capture
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    restore_rng(ckpt.rng)
    again = draws()
    assert again[:4] == expected[:4]
    assert torch.equal(again[4], expected[4]) and torch.equal(again[5], expected[5])

    # a fresh model + optimizer loaded from the checkpoint takes the very same next step
    clone = GPT(model.config)
    clone.load_state_dict(ckpt.model_state, strict=False)
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(ckpt.optimizer_state)
    step(model, optimizer, x)
    step(clone, opt2, x)
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), name

    # the manifest lists every other file with its size and sha256
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["val_loss"] == 3.5 and manifest["created"]
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert {"model/model.safetensors", "model/config.json", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer.json"} <= set(on_disk)
    assert all(e["size"] == (path / f).stat().st_size and len(e["sha256"]) == 64 for f, e in manifest["files"].items())


def test_optimizer_state_with_fqn_keys_and_odd_values_round_trips(trained, tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, optimizer, _ = trained
    fqn = get_optimizer_state_dict(model, optimizer)
    assert isinstance(next(iter(fqn["state"])), str)
    odd = {
        "state": {
            **fqn["state"],
            "a/b": {"step": torch.tensor(7, dtype=torch.int64), "m": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t()},
            "flags": {"n": 3, "x": 3.0, "neg0": -0.0, "nan": float("nan"), "inf": float("-inf"), "b": True, "none": None,
                      "empty": torch.zeros(0, 4), "half": torch.tensor(1.5, dtype=torch.float16), "mask": torch.tensor([True, False])},
        },
        "param_groups": [*fqn["param_groups"], {"params": ["a/b"], "betas": (0.9, 0.95), "lr": 0.1, "nested": [1, [2.0, None]],
                                                "by_int": {0: "zero", 1: (1, 2)}, "__tensor__": "not a tag"}],
    }
    path = save(tmp_path / "run", 1, model, optimizer_state=odd)
    back = read_checkpoint(path).optimizer_state
    assert_identical(odd, back, "optimizer")
    assert back["state"]["flags"]["n"] == 3 and type(back["state"]["flags"]["x"]) is float
    assert math.copysign(1.0, back["state"]["flags"]["neg0"]) == -1.0


def test_rng_round_trip_through_the_files(tmp_path):
    model = GPT(tiny_config())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save(tmp_path / "run", 1, model, rng=capture_rng())
    expected = draws()
    draws()  # move every generator on
    restore_rng(read_checkpoint(path).rng)
    again = draws()
    assert again[:4] == expected[:4] and torch.equal(again[4], expected[4]) and torch.equal(again[5], expected[5])
    assert read_checkpoint(save(tmp_path / "run", 2, model)).rng is None  # rng is optional


def test_lmforge_load_of_a_run_folder_or_a_checkpoint(trained, small_tok, tmp_path):
    model, optimizer, x = trained
    model.eval()
    run = tmp_path / "run"
    save(run, 1, GPT(tiny_config()), tokenizer=small_tok)  # an older checkpoint with other weights
    newest = save(run, 2, model, optimizer_state=optimizer.state_dict(), tokenizer=small_tok, val_loss=1.0)
    with torch.no_grad():
        want = model(x)
        for source in (run, newest, newest / "model", run / CHECKPOINTS):
            loaded = lmforge.load(source)
            assert torch.equal(loaded(x), want), source
            assert loaded.tokenizer is not None and loaded.tokenizer.encode("To be") == small_tok.encode("To be")
    with pytest.raises(LmforgeError, match="no intact checkpoint"):
        (tmp_path / "empty" / CHECKPOINTS).mkdir(parents=True)
        lmforge.load(tmp_path / "empty")


def test_model_state_is_checked_and_a_tied_head_dropped(trained, tmp_path):
    model, _, _ = trained
    full = model.state_dict()
    assert "lm_head.weight" in full
    path = save_checkpoint(tmp_path / "run", 1, config=model.config, model_state=full)
    assert "lm_head.weight" not in read_checkpoint(path).model_state
    bad = {k: v for k, v in full.items() if not k.startswith("blocks.1.")}
    with pytest.raises(LmforgeError, match="missing"):
        save_checkpoint(tmp_path / "run", 2, config=model.config, model_state=bad)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000001"]


# --- retention -------------------------------------------------------------------------
def test_retention_keeps_the_last_k_and_the_best(tmp_path):
    model = GPT(tiny_config())
    run = tmp_path / "run"
    for s, val in [(1, 0.5), (2, 0.9), (3, None), (4, 0.8), (5, 0.7)]:
        save(run, s, model, val_loss=val, keep_last=2)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000004", "step-00000005"]
    save(run, 6, model, val_loss=0.4, keep_last=2)  # a new best: the old best goes
    assert [p.name for p in list_checkpoints(run)] == ["step-00000005", "step-00000006"]
    for s in range(7, 10):
        save(run, s, model, keep_last=0)  # 0 keeps everything
    assert len(list_checkpoints(run)) == 5
    assert not [p for p in (run / CHECKPOINTS).iterdir() if p.name.startswith(".")]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    model = GPT(tiny_config())
    run = tmp_path / "run"
    save(run, 3, model, trainer_state={"v": 1}, val_loss=2.0)
    path = save(run, 3, model, trainer_state={"v": 2})
    assert list_checkpoints(run) == [path]
    ckpt = read_checkpoint(path)
    assert ckpt.trainer_state == {"v": 2} and ckpt.val_loss is None
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["step-00000003"]


# --- damage ----------------------------------------------------------------------------
def _truncate(path):
    f = path / "model" / WEIGHTS
    f.write_bytes(f.read_bytes()[:-100])


def _flip(path):
    f = path / "optimizer.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))


def _missing(path):
    (path / "trainer.json").unlink()


def _no_manifest(path):
    (path / "manifest.json").unlink()


def _bad_manifest(path):
    f = path / "manifest.json"
    f.write_bytes(f.read_bytes()[:40])


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, r"model/model\.safetensors is truncated"),
        (_flip, r"optimizer\.safetensors does not match its sha256"),
        (_missing, r"trainer\.json is missing"),
        (_no_manifest, r"manifest\.json is missing"),
        (_bad_manifest, r"manifest\.json is truncated or not JSON"),
    ],
)
def test_damage_is_detected_with_a_clear_message(trained, tmp_path, damage, message):
    model, optimizer, _ = trained
    run = tmp_path / "run"
    older = save(run, 1, model, optimizer_state=optimizer.state_dict())
    path = save(run, 2, model, optimizer_state=optimizer.state_dict(), rng=capture_rng())
    verify_checkpoint(path)
    damage(path)
    for check in (verify_checkpoint, read_checkpoint):
        with pytest.raises(CheckpointError, match=message) as err:
            check(path)
        assert isinstance(err.value, LmforgeError)
        assert str(path) in str(err.value) and f"--resume {older}" in str(err.value)
    with pytest.raises(CheckpointError, match=message):
        lmforge.load(path)
    # the oldest one has no older checkpoint to suggest
    _no_manifest(older)
    with pytest.raises(CheckpointError, match="no older checkpoint"):
        verify_checkpoint(older)


def test_find_resumable_falls_back_past_damaged_checkpoints(trained, tmp_path, capsys):
    model, _, _ = trained
    run = tmp_path / "run"
    c1, c2, c3 = (save(run, s, model, keep_last=0) for s in (1, 2, 3))
    assert find_resumable(run, say=pytest.fail) == c3
    _flip_weights(c3)
    said: list[str] = []
    assert find_resumable(run, say=said.append) == c2
    assert len(said) == 1 and "damaged" in said[0] and c3.name in said[0] and f"falling back to {c2}" in said[0]
    assert find_resumable(c2, say=pytest.fail) == c2  # a checkpoint folder by name
    with pytest.raises(CheckpointError, match="model.safetensors"):
        find_resumable(c3)  # asked for by name: an error, no fallback
    lmforge.load(run)  # loads step 2, saying why on stderr
    assert c3.name in capsys.readouterr().err
    _no_manifest(c2), _no_manifest(c1)
    said.clear()
    assert find_resumable(run, say=said.append) is None
    assert len(said) == 3 and "no older checkpoint is left" in said[-1]
    (tmp_path / "fresh").mkdir()
    assert find_resumable(tmp_path / "fresh", say=pytest.fail) is None  # a run folder without checkpoints yet
    with pytest.raises(LmforgeError, match="does not exist"):
        find_resumable(tmp_path / "nowhere")


def _flip_weights(path):
    f = path / "model" / WEIGHTS
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))


# --- crashes ---------------------------------------------------------------------------
def test_a_crash_mid_write_loses_nothing(tmp_path, monkeypatch):
    model = GPT(tiny_config())
    run = tmp_path / "run"
    before = [save(run, s, model, val_loss=1.0 / s) for s in (1, 2)]
    real_replace = os.replace

    def crash_on_final_rename(src, dst):
        if os.path.isdir(src):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_final_rename)
    with pytest.raises(LmforgeError, match="simulated crash"):
        save(run, 3, model, keep_last=1)
    monkeypatch.undo()
    assert list_checkpoints(run) == before
    for p in before:
        verify_checkpoint(p)
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["step-00000001", "step-00000002"]  # temp folder removed

    # a hard kill (no cleanup) leaves a hidden temp folder: never listed, removed by the next save
    half = run / CHECKPOINTS / ".step-00000003.tmp-killed"
    shutil.copytree(before[1], half)
    (half / "manifest.json").unlink()
    assert list_checkpoints(run) == before
    assert find_resumable(run, say=pytest.fail) == before[1]
    save(run, 3, model, keep_last=0)
    assert not half.exists() and [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002", "step-00000003"]


def test_a_crash_while_replacing_a_step_without_atomic_swap_is_repaired(tmp_path, monkeypatch):
    """Where folders cannot be swapped in one step, the old one is moved aside first; a
    crash right then leaves it hidden, and the next save puts it back."""
    model = GPT(tiny_config())
    run = tmp_path / "run"
    old = save(run, 1, model, trainer_state={"v": "old"})
    real_replace = os.replace
    break_dir_renames(monkeypatch, from_call=2, crash=True)
    with pytest.raises(LmforgeError, match="simulated crash"):
        save(run, 1, model, trainer_state={"v": "new"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert list_checkpoints(run) == []  # moved aside, hidden: nothing half-made is listed
    save(run, 2, model)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    assert read_checkpoint(old).trainer_state == {"v": "old"}
    # and without the crash, the fallback replaces the step
    save(run, 1, model, trainer_state={"v": "new"})
    assert read_checkpoint(old).trainer_state == {"v": "new"}
    assert not [p for p in (run / CHECKPOINTS).iterdir() if p.name.startswith(".")]


def test_leftovers_named_by_earlier_versions_are_repaired(tmp_path):
    """A run folder whose saves were interrupted under the earlier checkpoint code (its own
    swap, `mkdtemp` temp names) is repaired by the next save like any other."""
    model = GPT(tiny_config())
    run = tmp_path / "run"
    one, two = (save(run, s, model, trainer_state={"v": s}, keep_last=0) for s in (1, 2))
    ckdir = run / CHECKPOINTS
    os.replace(one, ckdir / ".step-00000001.old-4242-0badf00d")  # killed mid-replace: the new one never landed
    shutil.copytree(two, ckdir / ".step-00000002.old-4242-deadbeef")  # killed after the new one landed
    shutil.copytree(two, ckdir / ".step-00000003.tmp-k3j_x9a1")  # killed mid-write
    shutil.copytree(two, ckdir / ".step-00000002.del-4242-0000abcd")  # killed mid-delete
    assert list_checkpoints(run) == [two]
    save(run, 4, model, keep_last=0)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002", "step-00000004"]
    assert read_checkpoint(one).trainer_state == {"v": 1}
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".")]
