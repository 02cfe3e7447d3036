"""Optimizer memory: 32-bit vs 8-bit AdamW moments, in memory or paged, and a 1.5B model
fully fine-tuned on this 24 GiB machine.

Part 1 (`--only gpt2`): gpt2 (124M) trained with every weight learning, batch 4 x 256,
fp32, the trainer's step (`model(x, y)`: the blockwise loss; clipping; the optimizer of
`build_optimizer`), once per optimizer setting, each in a fresh process so that its peak
RSS is its own: torch's fused AdamW, `--optimizer adamw8bit`, and both with paged moments.
Reported per setting: the optimizer's state bytes, peak RSS, anonymous and file-backed
RSS after the last step (paged moments are file-backed: the kernel may write them out and
drop them under pressure, anonymous memory it cannot), the median step and optimizer-step
times over --steps steps after one warm-up step.

Part 2 (`--only xl`): a GPT-2-XL-shaped model (1.5B parameters, random weights), batch
1 x --xl-context tokens. First `lmforge pretrain` with 32-bit AdamW, which must refuse
before allocating anything, with the estimate's numbers (not be killed by the kernel);
then the same run with `--optimizer adamw8bit --gradient-checkpointing`, which must fit
and train --xl-steps steps with its loss going down (one fixed batch, learned by heart):
peak RSS beside the estimate.

Part 2b (`--only pressure`, Linux with the cgroup-v1 memory controller, as root): the
gpt2 settings again, each in a memory cgroup limited to --limit-mib (below fp32 AdamW's
need): with no swap, anonymous memory over the limit is killed, while paged moments are
file pages the kernel writes back and drops, so the paged runs go on, at the cost of the
disk traffic measured here as their step time.

Part 3 (`--only speed`): the optimizer step alone on 33.6M parameters (two 4096 x 4096
matrices, fixed gradients), ours against bitsandbytes' `AdamW8bit` CPU kernel and torch's
fused fp32 AdamW, on one thread and on two; the weights of ours and bitsandbytes' are
checked equal first.

    python benchmarks/bench_optimizer_memory.py                 # all parts (part 2 takes several minutes)
    python benchmarks/bench_optimizer_memory.py --only gpt2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED, print_table

SETTINGS = {  # name -> (optimizer, paged)
    "AdamW fp32 (fused)": ("adamw", False),
    "AdamW 8-bit": ("adamw8bit", False),
    "AdamW fp32, paged": ("adamw", True),
    "AdamW 8-bit, paged": ("adamw8bit", True),
}
MIB = 2**20
GIB = 2**30


def status() -> dict[str, int]:
    """This process's memory counters from /proc (bytes)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def one(preset: str, optimizer: str, paged: bool, batch: int, context: int, steps: int, checkpointing: bool, folder: str) -> dict:
    """Train `steps` + 1 steps in this process and report its memory and times."""
    import torch

    from lmforge.config import Config
    from lmforge.model import GPT
    from lmforge.train.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(Config.from_name(preset))
    model.gradient_checkpointing = checkpointing
    model.train()
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), optimizer, Path(folder) / "states" if paged else None)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (batch, context + 1), generator=g)
    step_times, opt_times, losses = [], [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        losses.append(float(loss))
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    mem = status()
    if getattr(opt, "store", None) is not None:
        opt.store.close()
    med = sorted(step_times[1:])[len(step_times[1:]) // 2]
    med_opt = sorted(opt_times[1:])[len(opt_times[1:]) // 2]
    return {"params": model.num_params(), "state": state, "peak": mem["VmHWM"], "anon": mem["RssAnon"], "file": mem["RssFile"],
            "step": med, "opt_step": med_opt, "losses": losses}


def in_subprocess(*args: object, cgroup: Path | None = None) -> dict:
    """Run `one(*args)` in a fresh process (in `cgroup`, if given); None values when it was killed."""
    cmd = [sys.executable, __file__, "--one", json.dumps([str(a) if isinstance(a, Path) else a for a in args])]
    if cgroup is not None:  # join the cgroup before Python starts allocating
        cmd = ["sh", "-c", f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"', "sh", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        if cgroup is not None and out.returncode in (-9, 137):
            return {"killed": True}
        raise SystemExit(f"the measured run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_pressure(args: argparse.Namespace, tmp: Path) -> None:
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").exists():
        raise SystemExit("--only pressure needs the cgroup-v1 memory controller at /sys/fs/cgroup/memory (and root)")
    group = root / f"lmforge-bench-{time.time_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(args.limit_mib * MIB))
        rows = []
        for name, (optimizer, paged) in SETTINGS.items():
            (group / "memory.max_usage_in_bytes").write_text("0")
            r = in_subprocess("gpt2", optimizer, paged, 4, 256, args.steps, False, tmp / name.replace(" ", "_"), cgroup=group)
            if r.get("killed"):
                rows.append([name, "killed (out of memory)", "", ""])
                continue
            rows.append([name, "trained", f"{r['step']:.2f}", f"{r['opt_step']:.2f}"])
        print(f"gpt2, batch 4 x 256, in a memory cgroup of {args.limit_mib:,} MiB (no swap):")
        print_table(["optimizer", "outcome", "step s", "optimizer step s"], rows)
    finally:
        group.rmdir()


def part_gpt2(args: argparse.Namespace, tmp: Path) -> None:
    rows = []
    for name, (optimizer, paged) in SETTINGS.items():
        r = in_subprocess("gpt2", optimizer, paged, 4, 256, args.steps, False, tmp / name.replace(" ", "_"))
        rows.append([name, f"{r['state'] / MIB:,.0f}", f"{r['peak'] / MIB:,.0f}", f"{r['anon'] / MIB:,.0f}", f"{r['file'] / MIB:,.0f}",
                     f"{r['step']:.2f}", f"{r['opt_step']:.2f}"])
        print(f"{name}: losses {', '.join(f'{x:.3f}' for x in r['losses'])}", file=sys.stderr)
    print(f"gpt2 (124M), batch 4 x 256, fp32, {args.steps} steps after one warm-up:")
    print_table(["optimizer", "state MiB", "peak RSS MiB", "anon RSS MiB", "file RSS MiB", "step s", "optimizer step s"], rows)


def part_xl(args: argparse.Namespace, tmp: Path) -> None:
    lmforge = str(Path(sys.executable).parent / "lmforge")
    data = tmp / "data"
    subprocess.run([lmforge, "tokenizer", "from-gpt2", "--encoder-json", str(SHARED / "gpt2" / "encoder.json"), "--vocab-bpe",
                    str(SHARED / "gpt2" / "vocab.bpe"), "--out", str(tmp / "tok")], check=True, capture_output=True)
    subprocess.run([lmforge, "data", "prepare", "--input", str(SHARED / "tinyshakespeare.txt"), "--tokenizer", str(tmp / "tok"),
                    "--out", str(data)], check=True, capture_output=True)
    common = ["pretrain", "--data", str(data), "--preset", "gpt2-xl", "--context-length", str(args.xl_context), "--batch-size", "1",
              "--max-steps", "1", "--eval-every", "0", "--device", "cpu"]
    t = time.perf_counter()
    refused = subprocess.run([lmforge, *common, "--out", str(tmp / "xl32")], capture_output=True, text=True, check=False)
    print(f"32-bit AdamW: exit {refused.returncode} after {time.perf_counter() - t:.1f} s: {refused.stderr.strip()}")
    r = in_subprocess("gpt2-xl", "adamw8bit", False, 1, args.xl_context, args.xl_steps, True, tmp / "xl8")
    print(f"8-bit AdamW + checkpointing: {r['params'] / 1e9:.2f}B parameters, state {r['state'] / GIB:.2f} GiB, peak RSS "
          f"{r['peak'] / GIB:.2f} GiB, step {r['step']:.1f} s (optimizer {r['opt_step']:.1f} s); losses "
          f"{', '.join(f'{x:.3f}' for x in r['losses'])}")


def part_speed(args: argparse.Namespace) -> None:
    import bitsandbytes as bnb
    import torch

    from lmforge.train.adamw8bit import AdamW8bit

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        base = [torch.randn(4096, 4096) for _ in range(2)]
        grads = [torch.randn(4096, 4096) * 0.01 for _ in range(2)]
        n = sum(t.numel() for t in base)
        times, weights = {}, {}
        for name, make in [("lmforge AdamW8bit", lambda ps: AdamW8bit(ps, lr=1e-4)), ("bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)),
                           ("torch AdamW fp32 (fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True))]:
            ps = [torch.nn.Parameter(t.clone()) for t in base]
            for p, g in zip(ps, grads):
                p.grad = g
            opt = make(ps)
            opt.step()  # the states' first allocation
            best = math.inf
            for _ in range(args.steps):
                t = time.perf_counter()
                opt.step()
                best = min(best, time.perf_counter() - t)
            times[name], weights[name] = best, ps
        if not all(torch.equal(a, b) for a, b in zip(weights["lmforge AdamW8bit"], weights["bitsandbytes AdamW8bit"])):
            raise SystemExit("ours and bitsandbytes' weights differ")
        ours = times["lmforge AdamW8bit"]
        for name, t in times.items():
            rows.append([str(threads), name, f"{t:.3f}", f"{n / t / 1e6:,.0f}", f"{t / ours:.2f}x"])
    print(f"optimizer step, 33.6M parameters, best of {args.steps} (same weights from ours and bitsandbytes: checked):")
    print_table(["threads", "optimizer", "step s", "M parameters/s", "time vs ours"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["gpt2", "xl", "pressure", "speed"])
    p.add_argument("--limit-mib", type=int, default=2048, help="the memory cgroup's limit for --only pressure")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--xl-steps", type=int, default=3)
    p.add_argument("--xl-context", type=int, default=256)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        preset, optimizer, paged, batch, context, steps, checkpointing, folder = json.loads(args.one)
        print(json.dumps(one(preset, optimizer, paged in (True, "True"), int(batch), int(context), int(steps),
                             checkpointing in (True, "True"), folder)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-optim-") as tmp:
        if args.only in (None, "gpt2"):
            part_gpt2(args, Path(tmp))
        if args.only in (None, "xl"):
            part_xl(args, Path(tmp))
        if args.only == "pressure":  # not in the default run: it needs root and cgroups
            part_pressure(args, Path(tmp))
        if args.only in (None, "speed"):
            part_speed(args)


if __name__ == "__main__":
    main()
