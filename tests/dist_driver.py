"""Train a tiny GPT under torchrun and write rank 0's results, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 \\
        --master_port=PORT tests/dist_driver.py OUT_DIR --strategies ddp fsdp

Each rank takes its slice of a fixed global batch, so N processes must compute what
one process computes on the whole batch. For every strategy, rank 0 writes to OUT_DIR:

- `{strategy}_a{accum}.json` (per-step all-reduced losses and gradient norms) and
  `{strategy}_a{accum}.*.safetensors/json` (the final `full_state`), for accum 1 and 2;
- `{strategy}_resumed.*`: a fresh, differently initialised model that loaded the
  accum-1 checkpoint from disk on every rank, then took one more step.

The test module imports the same helpers to compute the single-process reference.
Checkpoints are safetensors + JSON only (nothing pickled).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.config import Config
from lmforge.model import GPT
from lmforge.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    full_state,
    init_distributed,
    load_full_state,
    no_sync,
    shutdown,
    wrap_model,
)
from lmforge.train.loss import next_token_loss
from lmforge.train.optim import build_optimizer

VOCAB, CONTEXT, GLOBAL_BATCH, STEPS = 256, 32, 8, 5
LR, WEIGHT_DECAY, BETAS, CLIP = 1e-3, 0.1, (0.9, 0.95), 1.0  # the trainer's defaults


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config.from_name("nano", vocab_size=VOCAB, context_length=CONTEXT))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of optimizer step `step`: fixed, whatever the process count."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, CONTEXT + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def grads_synced(wrapped: torch.nn.Module, info: DistInfo) -> bool:
    """Whether the gradients were averaged over ranks by the last backward (collective).

    DDP: the ranks saw different data, so their local gradients agree only if synced.
    FSDP2: a synced backward leaves sharded `.grad`s; an unsynced one keeps the
    unsharded sums inside FSDP and sets no `.grad` at all."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(wrapped, FSDPModule):
        return any(p.grad is not None for p in wrapped.parameters())
    total = torch.stack([p.grad.double().sum() for p in wrapped.parameters() if p.grad is not None]).sum()
    seen = [torch.zeros((), dtype=torch.float64) for _ in range(info.world_size)]
    torch.distributed.all_gather(seen, total)
    return all(torch.equal(seen[0], t) for t in seen)


def train_step(
    wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, info: DistInfo, accum: int, synced: list[bool] | None = None
) -> tuple[float, float]:
    """One optimizer step on this rank's share of the global batch, as the trainer does it:
    forward inside `no_sync`, backward right after the block, clip, step.
    Returns the all-reduced mean loss and the gradient norm; appends to `synced`
    whether each micro-step's backward averaged the gradients."""
    x, y = global_batch(step)
    per_rank = GLOBAL_BATCH // info.world_size
    x, y = x[info.rank * per_rank : (info.rank + 1) * per_rank], y[info.rank * per_rank : (info.rank + 1) * per_rank]
    micro = per_rank // accum
    total = torch.zeros(())
    for m in range(accum):
        xs, ys = x[m * micro : (m + 1) * micro], y[m * micro : (m + 1) * micro]
        with no_sync(wrapped, m < accum - 1):
            loss = next_token_loss(wrapped, xs, ys) / accum
        loss.backward()
        total += loss.detach()
        if synced is not None:
            synced.append(grads_synced(wrapped, info))
    grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), CLIP)
    if not torch.isfinite(grad_norm):  # as the trainer checks it (a DTensor under FSDP)
        raise AssertionError(f"non-finite gradient norm at step {step}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(all_reduce_mean(total, info)), float(grad_norm)


def setup(info: DistInfo, strategy: str, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    wrapped = wrap_model(make_model(seed).to(info.device), info, strategy)
    return wrapped, build_optimizer(wrapped, LR, WEIGHT_DECAY, BETAS)


# --- a checkpoint as safetensors + JSON -------------------------------------------------
def save_state(prefix: Path, model_state: dict[str, torch.Tensor], optim_state: dict) -> None:
    """`{prefix}.model.safetensors`, `{prefix}.optim.safetensors` (the moment tensors,
    named "param/key") and `{prefix}.optim.json` (everything else)."""
    save_file(model_state, f"{prefix}.model.safetensors")
    tensors, skeleton = {}, {}
    for name, entry in optim_state["state"].items():
        skeleton[name] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.contiguous()
                skeleton[name][key] = {"tensor": f"{name}/{key}"}
            else:
                skeleton[name][key] = value
    save_file(tensors, f"{prefix}.optim.safetensors")
    Path(f"{prefix}.optim.json").write_text(json.dumps({"state": skeleton, "param_groups": optim_state["param_groups"]}))


def load_state(prefix: Path) -> tuple[dict[str, torch.Tensor], dict]:
    model_state = load_file(f"{prefix}.model.safetensors")
    tensors = load_file(f"{prefix}.optim.safetensors")
    meta = json.loads(Path(f"{prefix}.optim.json").read_text())
    state = {
        name: {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()}
        for name, entry in meta["state"].items()
    }
    return model_state, {"state": state, "param_groups": meta["param_groups"]}


def run(out: Path, strategies: list[str]) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    if not info.enabled:
        raise SystemExit("dist_driver.py must run under torchrun with --nproc_per_node >= 2")
    assert init_distributed("cpu") == info, "init_distributed is idempotent"
    try:
        for strategy in strategies:
            for accum in (1, 2):
                wrapped, optimizer = setup(info, strategy)
                synced: list[bool] = []
                losses, norms = zip(*(train_step(wrapped, optimizer, s, info, accum, synced) for s in range(STEPS)))
                model_state, optim_state = full_state(wrapped, optimizer, info)  # every rank calls it
                name = f"{strategy}_a{accum}"
                if info.is_main:
                    save_state(out / name, model_state, optim_state)
                    (out / f"{name}.json").write_text(json.dumps({"losses": losses, "grad_norms": norms, "synced": synced}))
                else:
                    assert model_state == {} and optim_state == {}, "only rank 0 gets the full state"
                barrier(info)  # the files are complete before anyone reads them
            # resume: a differently initialised model takes the accum-1 checkpoint from disk
            wrapped, optimizer = setup(info, strategy, seed=123)
            load_full_state(wrapped, optimizer, *load_state(out / f"{strategy}_a1"), info)
            loss, norm = train_step(wrapped, optimizer, STEPS, info, 1)
            model_state, optim_state = full_state(wrapped, optimizer, info)
            if info.is_main:
                save_state(out / f"{strategy}_resumed", model_state, optim_state)
                (out / f"{strategy}_resumed.json").write_text(json.dumps({"losses": [loss], "grad_norms": [norm]}))
            barrier(info)
    finally:
        shutdown(info)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args.out, args.strategies)
    sys.exit(0)
