"""Training-memory estimate vs the measured peak of a real step, with and without checkpointing.

For each config, one fp32 training step (forward, cross-entropy, backward, AdamW step,
zero_grad) is run twice -- the first allocates AdamW's moments, the second is the steady
state -- each measurement in a fresh subprocess, so that nothing one run allocated or
cached is left for the next. Two measurements:

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

The estimate is `lmforge.estimate.training_memory(...).peak` (steady-state step).

    python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import print_table

from lmforge.config import Config
from lmforge.estimate import training_memory

MIB = 2**20

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
def _train_steps(config: Config, batch: int, context: int, checkpointing: bool, steps: int = 2) -> None:
    import torch
    import torch.nn.functional as F

    from lmforge.model import GPT

    torch.manual_seed(0)
    model = GPT(config).train()
    model.gradient_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.randint(config.vocab_size, (batch, context))
    y = torch.randint(config.vocab_size, (batch, context))
    for _ in range(steps):
        loss = F.cross_entropy(model(x).view(-1, config.vocab_size), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_hwm() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure_rss(config: Config, batch: int, context: int, checkpointing: bool) -> dict[str, object]:
    import gc

    _train_steps(config.replace(n_layer=1, vocab_size=256, context_length=16), 1, 16, checkpointing, steps=1)  # warm-up
    gc.collect()
    baseline = _status_kib("VmRSS")
    reset = _reset_hwm()
    _train_steps(config, batch, context, checkpointing)
    return {"rss_peak": (_status_kib("VmHWM") - baseline) * 1024, "hwm_reset": reset}


def _measure_tensors(config: Config, batch: int, context: int, checkpointing: bool) -> dict[str, object]:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _train_steps(config, batch, context, checkpointing)
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # negative for a free
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return {"tensor_peak": peak}


def _child(spec: str) -> None:
    s = json.loads(spec)
    config = Config.from_name(s["preset"], **s["overrides"])
    measure = _measure_rss if s["method"] == "rss" else _measure_tensors
    print(json.dumps(measure(config, s["batch"], s["context"], s["checkpointing"])))


PINNED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: every block >= 128 KiB is mmapped, and unmapped on free


def measure(preset: str, overrides: dict, batch: int, context: int, checkpointing: bool, method: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """One measurement in a fresh interpreter (`method` "tensors" or "rss")."""
    spec = json.dumps({"preset": preset, "overrides": overrides, "batch": batch, "context": context, "checkpointing": checkpointing, "method": method})
    proc = subprocess.run(
        [sys.executable, __file__, "--child", spec], capture_output=True, text=True, timeout=1800, check=False, env={**os.environ, **(env or {})}
    )
    if proc.returncode:
        raise RuntimeError(f"measurement {spec} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the parent: the table ----------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches and contexts")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return

    rows, notes = [], set()
    for label, preset, overrides, batch, context in QUICK_CASES if args.quick else CASES:
        config = Config.from_name(preset, **overrides)
        est = training_memory(config, batch, context)
        for ckpt in (False, True):
            estimate = est.peak_checkpointed if ckpt else est.peak
            tensors = measure(preset, overrides, batch, context, ckpt, "tensors")["tensor_peak"]
            rss = measure(preset, overrides, batch, context, ckpt, "rss")
            pinned = measure(preset, overrides, batch, context, ckpt, "rss", env=PINNED_MMAP)
            if not (rss["hwm_reset"] and pinned["hwm_reset"]):
                notes.add("VmHWM could not be reset: the RSS peak includes the warm-up's")
            acts = est.activations_checkpointed if ckpt else est.activations
            rows.append(
                [
                    label,
                    "yes" if ckpt else "no",
                    est.weights / MIB,
                    acts / MIB,
                    estimate / MIB,
                    tensors / MIB,
                    rss["rss_peak"] / MIB,
                    pinned["rss_peak"] / MIB,
                    f"{estimate / tensors:.4f}",
                    f"{estimate / rss['rss_peak']:.3f}",
                    f"{estimate / pinned['rss_peak']:.3f}",
                ]
            )
    print("# Peak memory of an fp32 AdamW training step (CPU), MiB\n")
    print_table(
        [
            "config, batch x context",
            "checkpointing",
            "weights",
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
    for note in sorted(notes):
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
