"""train.distributed: one process without torchrun, and two real processes under it.

The two-process tests launch tests/dist_driver.py with torchrun (gloo on CPU) once
for both strategies and compare rank 0's results with this process training the same
tiny GPT on the whole global batch: N processes must compute what one computes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dist_driver as dd
import pytest
import torch

from lmforge.device import pick_device
from lmforge.errors import LmforgeError
from lmforge.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    full_state,
    init_distributed,
    load_full_state,
    no_sync,
    shutdown,
    unwrap,
    wrap_model,
)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
# Two processes sum the gradients in another order than one, so they differ in the last
# bits; AdamW's normalized step (m / sqrt(v)) turns that into up to a fraction of one
# learning-rate step (lr 1e-3) for weights whose gradient is near zero. 1.3e-5 was seen
# for DDP on a loaded machine; a real bug (a missed all-reduce, a wrong shard) moves
# weights by whole steps.
WEIGHT_TOL = {"ddp": 5e-5, "fsdp": 1e-4}


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def single() -> DistInfo:
    return DistInfo(0, 1, 0, torch.device("cpu"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- one process ----------------------------------------------------------------------
def test_no_torchrun_env_is_one_process_without_a_group(no_torchrun: None, monkeypatch: pytest.MonkeyPatch) -> None:
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"))
    assert init_distributed() == DistInfo(0, 1, 0, pick_device("auto"))  # None means auto
    assert info.is_main and not info.enabled
    assert not torch.distributed.is_initialized()
    assert init_distributed("cpu") == info  # idempotent
    barrier(info)
    shutdown(info)  # no-ops
    # WORLD_SIZE=1 (torchrun --nproc_per_node=1) needs no group either
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "1" if name == "WORLD_SIZE" else "0")
    assert init_distributed("cpu") == info and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(LmforgeError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed("cpu")


def test_single_process_helpers_are_identities() -> None:
    info = single()
    model = dd.make_model()
    for strategy in ("ddp", "fsdp"):
        assert wrap_model(model, info, strategy) is model
    assert unwrap(model) is model
    with pytest.raises(LmforgeError, match="unknown distributed strategy 'zero3'"):
        wrap_model(model, info, "zero3")
    v = torch.tensor(2.5, requires_grad=True)
    assert all_reduce_mean(v, info).item() == 2.5 and not all_reduce_mean(v, info).requires_grad
    with no_sync(model, True):  # nothing to skip
        pass


def test_unwrap_sees_through_compile_wrapper() -> None:
    model = dd.make_model()

    class Compiled(torch.nn.Module):  # the attribute torch.compile's OptimizedModule uses
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    assert unwrap(Compiled(model)) is model


def test_full_state_round_trip_single_process() -> None:
    """A state saved after one step, loaded into a differently initialised model and a
    fresh optimizer, gives the identical next step."""
    info = single()
    model, optimizer = dd.setup(info, "ddp")
    dd.train_step(model, optimizer, 0, info, accum=1)
    model_state, optim_state = full_state(model, optimizer, info)

    assert "lm_head.weight" not in model_state  # tied: it is the embedding
    assert set(model_state) == {k for k in model.state_dict() if k != "lm_head.weight"}
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in model_state.values())
    # the optimizer state is keyed by parameter name, as under torchrun
    assert set(optim_state["state"]) <= set(model_state)
    assert set(optim_state["state"]["tok_emb.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert [n for g in optim_state["param_groups"] for n in g["params"]] == list(optim_state["state"])
    # copies: training on must not change a state waiting to be written
    saved = {k: v.clone() for k, v in model_state.items()}
    step_before = optim_state["state"]["tok_emb.weight"]["step"].item()

    other, other_opt = dd.setup(info, "ddp", seed=123)
    load_full_state(other, other_opt, model_state, optim_state, info)
    assert other.lm_head.weight is other.tok_emb.weight  # still tied
    assert max_diff(other.state_dict(), model.state_dict()) == 0.0

    a = dd.train_step(model, optimizer, 1, info, accum=1)
    b = dd.train_step(other, other_opt, 1, info, accum=1)
    assert a == b
    assert max_diff(other.state_dict(), model.state_dict()) == 0.0
    assert max_diff(saved, model_state) == 0.0
    assert optim_state["state"]["tok_emb.weight"]["step"].item() == step_before
    assert "lm_head.weight" not in model_state  # the caller's dict was not modified


def test_load_full_state_rejects_a_checkpoint_that_does_not_fit() -> None:
    """set_state_dict with full dicts would keep a missing key's current value silently."""
    info = single()
    model, optimizer = dd.setup(info, "ddp")
    dd.train_step(model, optimizer, 0, info, accum=1)
    model_state, optim_state = full_state(model, optimizer, info)
    target = dd.setup(info, "ddp", seed=5)
    missing = {k: v for k, v in model_state.items() if k != "blocks.0.attn.q.weight"}
    with pytest.raises(LmforgeError, match=r"missing 1 tensor\(s\): blocks.0.attn.q.weight"):
        load_full_state(*target, missing, optim_state, info)
    with pytest.raises(LmforgeError, match=r"1 unexpected tensor\(s\): extra"):
        load_full_state(*target, {**model_state, "extra": torch.zeros(1)}, optim_state, info)
    with pytest.raises(LmforgeError, match=r"wrong shape: tok_emb.weight is \(3, 128\)"):
        load_full_state(*target, {**model_state, "tok_emb.weight": torch.zeros(3, 128)}, optim_state, info)
    groups = [{**g, "params": g["params"][1:]} for g in optim_state["param_groups"]]
    with pytest.raises(LmforgeError, match="parameter groups"):
        load_full_state(*target, model_state, {**optim_state, "param_groups": groups}, info)
    load_full_state(*target, model_state, optim_state, info)  # and the intact one fits


# --- two processes under torchrun -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the driver once on 2 processes for both strategies; the folder of rank 0's results."""
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    driver = Path(__file__).with_name("dist_driver.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(driver), str(out), "--strategies", "ddp", "fsdp"]
    start = time.monotonic()
    # its own session, so a hang can be ended with the workers (killing torchrun alone
    # would leave them waiting on each other)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun did not finish in 120 s:\n{stdout[-4000:]}\n{stderr[-6000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}) after {time.monotonic() - start:.0f}s:\n{stdout[-4000:]}\n{stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, the whole global batch, STEPS + 1 steps: losses, norms, and the
    state after STEPS steps (what the checkpoints hold) and after STEPS + 1."""
    info = single()
    model, optimizer = dd.setup(info, "ddp")
    losses, norms = [], []
    for step in range(dd.STEPS + 1):
        if step == dd.STEPS:
            at_checkpoint = full_state(model, optimizer, info)
        loss, norm = dd.train_step(model, optimizer, step, info, accum=1)
        losses.append(loss)
        norms.append(norm)
    return {"losses": losses, "grad_norms": norms, "at_checkpoint": at_checkpoint, "final": full_state(model, optimizer, info)}


def close(a: list[float], b: list[float], rel: float) -> bool:
    return all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_match_one(two_ranks: Path, reference: dict, strategy: str, accum: int) -> None:
    """Each rank takes half of each global batch (accum 2: in two micro-batches, with
    no_sync on the first): the all-reduced losses, gradient norms and final weights
    are those of one process on the whole batch."""
    got = json.loads((two_ranks / f"{strategy}_a{accum}.json").read_text())
    # no_sync really skipped the all-reduce / reduce-scatter on all but the last micro-step
    assert got["synced"] == [micro == accum - 1 for _ in range(dd.STEPS) for micro in range(accum)]
    ref_losses, ref_norms = reference["losses"][: dd.STEPS], reference["grad_norms"][: dd.STEPS]
    assert close(got["losses"], ref_losses, 1e-5), (got["losses"], ref_losses)
    assert close(got["grad_norms"], ref_norms, 1e-4), (got["grad_norms"], ref_norms)
    model_state, optim_state = dd.load_state(two_ranks / f"{strategy}_a{accum}")
    ref_model, ref_optim = reference["at_checkpoint"]
    assert set(model_state) == set(ref_model)  # plain GPT names, no "module.", no tied head
    assert max_diff(model_state, ref_model) <= WEIGHT_TOL[strategy]
    # the optimizer state has the single-process layout: same names, groups and moments
    assert set(optim_state["state"]) == set(ref_optim["state"])
    assert [g["params"] for g in optim_state["param_groups"]] == [g["params"] for g in ref_optim["param_groups"]]
    for name, entry in ref_optim["state"].items():
        assert entry["step"].item() == optim_state["state"][name]["step"].item() == dd.STEPS
        assert torch.allclose(optim_state["state"][name]["exp_avg"], entry["exp_avg"], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_under_torchrun_continues_the_run(two_ranks: Path, reference: dict, strategy: str) -> None:
    """A fresh model on both ranks, loaded from the 2-process checkpoint on disk, takes
    the next step exactly as the uninterrupted single process does."""
    got = json.loads((two_ranks / f"{strategy}_resumed.json").read_text())
    assert close(got["losses"], reference["losses"][dd.STEPS:], 1e-5)
    model_state, _ = dd.load_state(two_ranks / f"{strategy}_resumed")
    assert max_diff(model_state, reference["final"][0]) <= WEIGHT_TOL[strategy]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_from_two_processes_resumes_on_one(two_ranks: Path, reference: dict, strategy: str) -> None:
    info = single()
    model, optimizer = dd.setup(info, "ddp", seed=7)
    load_full_state(model, optimizer, *dd.load_state(two_ranks / f"{strategy}_a1"), info)
    loss, _ = dd.train_step(model, optimizer, dd.STEPS, info, accum=1)
    assert close([loss], reference["losses"][dd.STEPS:], 1e-5)
    assert max_diff(full_state(model, optimizer, info)[0], reference["final"][0]) <= WEIGHT_TOL[strategy]
