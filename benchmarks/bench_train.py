"""Training speed, ours vs `transformers` `GPT2LMHeadModel` with the same weights, in one run.

One timed step is what a trainer does: zero_grad, forward and loss, backward, AdamW
step; fp32 (this CPU has no bf16 instructions). Ours computes the loss with
`lmforge.train.loss.next_token_loss`, what the trainer calls (the head and the
cross-entropy fused, a block of rows at a time); `transformers` the way its users do,
`model(input_ids, labels=...)`, with `shift_labels` so that both score the same B*T
next-token predictions. A third contender is the ablation: our model with the loss a
plain training loop writes, F.cross_entropy over the full fp32 logits. All get the same
batch and the same optimizer, `torch.optim.AdamW(lr=3e-4, weight_decay=0.1)`, fused
(the default; `--optimizer foreach` for the multi-tensor kernels). Steps alternate
(ours, theirs, the ablation, ours, ...); tokens/s is the best step's, the median's
beside it. The first step's losses must agree within 1e-4: the same model, the same
work. Each shape runs in a fresh process. A second table times the AdamW step alone
on our gradients, foreach vs fused.

Shapes (GPT-2 family, learned positions, tied head):
  gpt2       12 layers, 12 heads, width 768, vocab 50257; batch 4, context 256
  small      6 layers, 6 heads, width 384, vocab 50257; batch 8, context 256
  small-8k   the same with an 8192-token vocabulary

Achieved FLOP/s = tokens/s * (6 N + 12 L T C) per token: N the parameters that take
part in matmuls (the blocks' and the head's, which is the tied embedding; not the
position table), L layers, T context, C width (the second term is attention's QK^T
and AV, forward and backward). MFU divides it by this machine's fp32 matmul peak,
measured here as the best of ten 2048x2048x2048 matmuls on all threads.

    python benchmarks/bench_train.py [--presets gpt2 small small-8k] [--steps 5] [--optimizer fused]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import best_of, print_table

from lmforge.config import Config
from lmforge.interop.hf import config_to_hf, state_dict_to_hf
from lmforge.model import GPT
from lmforge.train.loss import next_token_loss
from lmforge.weights import state_dict_for_saving

SHAPES = {
    "gpt2": dict(preset="gpt2", batch=4, context=256, vocab=50257),
    "small": dict(preset="small", batch=8, context=256, vocab=50257),
    "small-8k": dict(preset="small", batch=8, context=256, vocab=8192),
}


def twin_models(preset: str, context: int, vocab: int) -> tuple[GPT, torch.nn.Module]:
    """Our model and a `transformers` model holding the very same weights, both in train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    ours = GPT(Config.from_name(preset, context_length=context, vocab_size=vocab)).train()
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_to_hf(ours.config)), attn_implementation="sdpa").train()
    hf.loss_type = "ForCausalLM"  # what it falls back to anyway, less a warning that the class name is not a loss name
    hf.load_state_dict(state_dict_to_hf(state_dict_for_saving(ours), ours.config), strict=False)
    hf.tie_weights()
    return ours, hf


def matmul_peak_gflops(repeat: int = 10) -> float:
    """fp32 matmul throughput on all threads: best of `repeat` 2048^3 products."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def flops_per_token(config: Config) -> int:
    """6 N + 12 L T C (see the module docstring)."""
    with torch.device("meta"):
        model = GPT(config)
    n = model.num_params(non_embedding=True) + model.lm_head.weight.numel()  # blocks + head (the tied table)
    return 6 * n + 12 * config.n_layer * config.context_length * config.n_embd


def run_shape(name: str, steps: int, kind: str) -> dict:
    """Time one shape's contenders, alternating; the steps' seconds and the first step's losses."""
    shape = SHAPES[name]
    ours, hf = twin_models(shape["preset"], shape["context"], shape["vocab"])
    plain = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, shape["vocab"], (shape["batch"], shape["context"] + 1), generator=g)
    x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    contenders = {
        "lmforge": (ours, lambda: next_token_loss(ours, x, y)),
        "transformers": (hf, lambda: hf(input_ids=x, labels=y, shift_labels=y).loss),
        # the ablation: our model, loss over the full fp32 logits as a plain training loop writes it
        "plain": (plain, lambda: F.cross_entropy(plain(x).flatten(0, 1), y.flatten())),
    }
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.1, **{kind: True}) for k, (m, _) in contenders.items()}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    first: dict[str, float] = {}
    for step in range(steps + 1):  # step 0 warms up (and allocates AdamW's moments)
        for k, (_, loss_fn) in contenders.items():
            t = time.perf_counter()
            optimizers[k].zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            optimizers[k].step()
            if step:
                times[k].append(time.perf_counter() - t)
            else:
                first[k] = float(loss)
    # the optimizer step alone, on our model's gradients: the multi-tensor kernels vs the fused one
    adamw = {}
    for flag in ("foreach", "fused"):
        opt = torch.optim.AdamW(ours.parameters(), lr=3e-4, weight_decay=0.1, **{flag: True})
        opt.step()
        adamw[flag] = best_of({flag: opt.step}, 3)[flag]
    return {"times": times, "first_loss": first, "adamw": adamw, "tokens": x.numel(), "flops_per_token": flops_per_token(ours.config)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each contender, after one warm-up step")
    parser.add_argument("--optimizer", choices=["fused", "foreach"], default="fused")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one shape, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_shape(args.one, args.steps, args.optimizer)))
        return
    start = time.perf_counter()
    peak = matmul_peak_gflops()
    print(f"# Training step, fp32, {torch.get_num_threads()} threads, AdamW {args.optimizer}; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s (best 2048^3 matmul)\n")
    rows, adam_rows, losses = [], [], []
    labels = {"lmforge": "lmforge", "transformers": "transformers", "plain": "lmforge model, full logits + F.cross_entropy"}
    for name in args.presets:
        # each shape in a fresh process: the allocator state one shape leaves behind
        # (glibc's raised mmap threshold, a grown heap) changes the next one's page faults
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--optimizer", args.optimizer]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        shape, first = SHAPES[name], r["first_loss"]
        if abs(first["lmforge"] - first["transformers"]) > 1e-4 or abs(first["lmforge"] - first["plain"]) > 1e-4:
            raise SystemExit(f"{name}: the first step's losses differ ({first}); the comparison would not be fair")
        losses.append(f"{name} " + " / ".join(f"{first[k]:.6f}" for k in labels))
        best = {k: min(v) for k, v in r["times"].items()}
        for k, label in labels.items():
            rate = r["tokens"] / best[k]
            achieved = rate * r["flops_per_token"] / 1e9
            rows.append([
                f"{name} (B={shape['batch']}, T={shape['context']}, V={shape['vocab']}): {label}",
                rate,
                r["tokens"] / statistics.median(r["times"][k]),
                achieved,
                f"{100 * achieved / peak:.0f}%",
                best[k] / best["lmforge"] if k != "lmforge" else "",
            ])
        adam_rows.append([name, 1000 * r["adamw"]["foreach"], 1000 * r["adamw"]["fused"], r["adamw"]["foreach"] / r["adamw"]["fused"]])
    print_table(["shape: model", "tokens/s (best)", "tokens/s (median)", "GFLOP/s", "MFU", "lmforge speed / this"], rows)
    print()
    print_table(["AdamW step alone (lmforge's gradients)", "foreach=True (ms)", "fused=True (ms)", "fused speedup"], adam_rows)
    print(f"\nfirst step's loss (lmforge / transformers / full logits): {'; '.join(losses)}")
    print(f"FLOPs per token = 6 N + 12 L T C; MFU against {peak:.1f} GFLOP/s; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
