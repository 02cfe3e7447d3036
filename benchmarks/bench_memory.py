"""Training-memory estimate vs the measured peak of a real step, with and without checkpointing,
with fp32 or 8-bit AdamW moments.

For each config and optimizer, one fp32 training step as the trainer takes it
(`next_token_loss`, i.e. `model(x, y)`: the head and the cross-entropy fused, a block of
rows at a time; backward; `build_optimizer`'s AdamW: torch's fused one for `adamw`,
`AdamW8bit` for `adamw8bit`; zero_grad(set_to_none=True)) is run twice -- the first
allocates the moments, the second is the steady state -- each measurement in a fresh
subprocess, so that nothing one run allocated or cached is left for the next. Two
measurements:

- tensor peak: the CPU allocator reports every allocation and free to the PyTorch
  profiler (`profile_memory=True`); the running sum of those events from model
  construction to the end of the second step, at its maximum, is the exact peak of
  tensor memory (kernel workspaces included), with no allocator or page-cache noise;
- RSS peak: the process's resident high-water mark (VmHWM, reset through
  /proc/self/clear_refs) minus its resident size just before the model is built, after
  imports and a warm-up step on a tiny model (so kernels, thread pools and the libraries'
  one-time buffers are in the baseline). This is what the OS sees: it adds malloc's
  retained free memory and fragmentation to the tensor bytes. glibc raises its mmap
  threshold (up to 32 MiB) each time it frees an mmapped block, so later tensors of a
  few MiB come from the heap and stay resident after they are freed; the last column
  runs again with MALLOC_MMAP_THRESHOLD_=131072, which pins the threshold, to show how
  much of the gap that is.

The estimate is `lmforge.estimate.training_plan(...).peak` (steady-state step); the
target is within 5% of the tensor peak for either optimizer.

    python benchmarks/bench_memory.py [--quick] [--optimizer adamw adamw8bit]
"""

from __future__ import annotations

import argparse
import json

from _common import PINNED_MMAP, allocator_peaks, args_or_child, print_table, reset_hwm, run_child, status_kib

from lmforge.config import Config
from lmforge.estimate import OPTIMIZERS, Setup, training_plan

MIB = 2**20
TARGET = 0.05  # the estimate within 5% of the tensor peak

# (label, preset, overrides, batch, context)
CASES = [
    ("small (GPT-2 vocab) 8x256", "small", {}, 8, 256),
    ("micro 8x512", "micro", {}, 8, 512),
]
QUICK_CASES = [
    ("small (GPT-2 vocab) 2x128", "small", {}, 2, 128),
    ("micro 2x256", "micro", {}, 2, 256),
]


# --- the child: one measurement in a fresh process --------------------------------------------
def _train_steps(config: Config, batch: int, context: int, checkpointing: bool, optimizer: str, steps: int = 2) -> None:
    import torch

    from lmforge.model import GPT
    from lmforge.train.loss import next_token_loss
    from lmforge.train.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(config).train()
    model.gradient_checkpointing = checkpointing
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), kind=optimizer)
    x = torch.randint(config.vocab_size, (batch, context))
    y = torch.randint(config.vocab_size, (batch, context))
    for _ in range(steps):
        loss = next_token_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss


def _measure_rss(config: Config, batch: int, context: int, checkpointing: bool, optimizer: str) -> dict[str, object]:
    import gc

    warm_up = config.replace(n_layer=1, vocab_size=256, context_length=16)
    _train_steps(warm_up, 1, 16, checkpointing, optimizer, steps=1)
    gc.collect()
    baseline = status_kib("VmRSS")
    reset = reset_hwm()
    _train_steps(config, batch, context, checkpointing, optimizer)
    return {"rss_peak": (status_kib("VmHWM") - baseline) * 1024, "hwm_reset": reset}


def _measure_tensors(config: Config, batch: int, context: int, checkpointing: bool, optimizer: str) -> dict[str, object]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _train_steps(config, batch, context, checkpointing, optimizer)
    return {"tensor_peak": allocator_peaks(prof)[1]}


def _child(spec: str) -> None:
    s = json.loads(spec)
    config = Config.from_name(s["preset"], **s["overrides"])
    measure = _measure_rss if s["method"] == "rss" else _measure_tensors
    print(json.dumps(measure(config, s["batch"], s["context"], s["checkpointing"], s["optimizer"])))


def measure(preset: str, overrides: dict, batch: int, context: int, checkpointing: bool, optimizer: str, method: str,
            env: dict[str, str] | None = None) -> dict[str, object]:
    """One measurement in a fresh interpreter (`method` "tensors" or "rss")."""
    spec = {"preset": preset, "overrides": overrides, "batch": batch, "context": context, "checkpointing": checkpointing,
            "optimizer": optimizer, "method": method}
    return run_child(__file__, spec, env)


# --- the parent: the table ----------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches and contexts")
    parser.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                        help="the optimizers to measure (default: both)")
    args = args_or_child(parser, _child)
    if args is None:
        return

    rows, notes, missed = [], set(), []
    for label, preset, overrides, batch, context in QUICK_CASES if args.quick else CASES:
        config = Config.from_name(preset, **overrides)
        for optimizer in args.optimizer:
            for ckpt in (False, True):
                plan = training_plan(config, batch, context, Setup(optimizer=optimizer, checkpointing=ckpt))
                tensors = measure(preset, overrides, batch, context, ckpt, optimizer, "tensors")["tensor_peak"]
                rss = measure(preset, overrides, batch, context, ckpt, optimizer, "rss")
                pinned = measure(preset, overrides, batch, context, ckpt, optimizer, "rss", env=PINNED_MMAP)
                if not (rss["hwm_reset"] and pinned["hwm_reset"]):
                    notes.add("VmHWM could not be reset: the RSS peak includes the warm-up's")
                if abs(plan.peak / tensors - 1) > TARGET:
                    missed.append(f"{label}, {optimizer}, checkpointing {'on' if ckpt else 'off'}")
                rows.append(
                    [
                        label,
                        optimizer,
                        "yes" if ckpt else "no",
                        plan.weights / MIB,
                        plan.moments / MIB,
                        plan.activations / MIB,
                        plan.peak / MIB,
                        tensors / MIB,
                        rss["rss_peak"] / MIB,
                        pinned["rss_peak"] / MIB,
                        f"{plan.peak / tensors:.4f}",
                        f"{plan.peak / rss['rss_peak']:.3f}",
                        f"{plan.peak / pinned['rss_peak']:.3f}",
                    ]
                )
    print("# Peak memory of an fp32 training step (CPU), MiB: fused AdamW or AdamW8bit\n")
    print_table(
        [
            "config, batch x context",
            "optimizer",
            "checkpointing",
            "weights",
            "moments",
            "activations (est)",
            "peak est",
            "tensor peak",
            "RSS peak",
            "RSS, pinned mmap",
            "est / tensor",
            "est / RSS",
            "est / RSS pinned",
        ],
        rows,
    )
    within = "every row" if not missed else "not for " + "; ".join(missed)
    print(f"\nestimate within {TARGET:.0%} of the tensor peak: {within}")
    for note in sorted(notes):
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
