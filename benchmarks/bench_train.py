"""Training speed, ours vs `transformers` `GPT2LMHeadModel` with the same weights, in one run.

One timed step is what a trainer does: zero_grad, forward and loss, backward, AdamW
step; fp32 (this CPU has no bf16 instructions). Ours computes the loss with
`lmforge.train.loss.next_token_loss` (what the trainer calls); `transformers` the way
its users do, `model(input_ids, labels=...)` (with `shift_labels`, so that both score
the same B*T next-token predictions). Both get the same batch and the same optimizer,
`torch.optim.AdamW(lr=3e-4, weight_decay=0.1)`, fused (the default; `--optimizer
foreach` for the multi-tensor one). Steps alternate, ours then theirs; tokens/s is the
best step's (the median's is beside it). Before timing, the two losses on the first
batch must agree within 1e-4: the same model, so the same work.

Shapes (GPT-2 family, learned positions, tied head):
  gpt2       12 layers, 12 heads, width 768, vocab 50257; batch 4, context 256
  small      6 layers, 6 heads, width 384, vocab 50257; batch 8, context 256
  small-8k   the same with an 8192-token vocabulary

Achieved FLOP/s = tokens/s * (6 N + 12 L T C) per token: N the parameters that take
part in matmuls (the blocks' and the head's, which is the tied embedding; not the
position table), L layers, T context, C width (the second term is attention's QK^T
and AV, forward and backward). MFU divides it by this machine's fp32 matmul peak,
measured here as the best of 2048x2048x2048 matmuls on all threads.

    python benchmarks/bench_train.py [--presets gpt2 small small-8k] [--steps 5] [--optimizer fused]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import print_table

from lmforge.config import Config
from lmforge.interop.hf import config_to_hf, state_dict_to_hf
from lmforge.model import GPT
from lmforge.pretrained import state_dict_for_saving
from lmforge.train.loss import next_token_loss

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


def optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, **{kind: True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each model, after one warm-up step")
    parser.add_argument("--optimizer", choices=["fused", "foreach"], default="fused")
    args = parser.parse_args()
    start = time.perf_counter()
    peak = matmul_peak_gflops()
    print(f"# Training step, fp32, {torch.get_num_threads()} threads, AdamW {args.optimizer}; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s (best 2048^3 matmul)\n")
    rows, same_losses = [], []
    for name in args.presets:
        shape = SHAPES[name]
        ours, hf = twin_models(shape["preset"], shape["context"], shape["vocab"])
        g = torch.Generator().manual_seed(1)
        window = torch.randint(0, shape["vocab"], (shape["batch"], shape["context"] + 1), generator=g)
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()

        def ours_loss() -> torch.Tensor:
            return next_token_loss(ours, x, y)

        def hf_loss() -> torch.Tensor:
            return hf(input_ids=x, labels=y, shift_labels=y).loss

        with torch.no_grad():
            lo, lh = float(ours_loss()), float(hf_loss())
        same_losses.append(f"{name}: lmforge {lo:.6f}, transformers {lh:.6f}")
        if abs(lo - lh) > 1e-4:
            raise SystemExit(f"{name}: the losses differ at step 0 ({lo} vs {lh}); the comparison would not be fair")

        contenders = {"lmforge": (ours, ours_loss), "transformers": (hf, hf_loss)}
        optimizers = {k: optimizer(model, args.optimizer) for k, (model, _) in contenders.items()}
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for step in range(args.steps + 1):  # step 0 warms up (and allocates AdamW's moments)
            for k, (_, loss_fn) in contenders.items():
                t = time.perf_counter()
                optimizers[k].zero_grad(set_to_none=True)
                loss_fn().backward()
                optimizers[k].step()
                if step:
                    times[k].append(time.perf_counter() - t)
        tokens, fpt = x.numel(), flops_per_token(ours.config)
        best = {k: min(v) for k, v in times.items()}
        for k in contenders:
            rate = tokens / best[k]
            rows.append([
                f"{name} (B={shape['batch']}, T={shape['context']}, V={shape['vocab']}): {k}",
                rate,
                tokens / statistics.median(times[k]),
                rate * fpt / 1e9,
                f"{100 * rate * fpt / 1e9 / peak:.0f}%",
                best["transformers"] / best["lmforge"] if k == "lmforge" else "",
            ])
        del ours, hf, optimizers
    print_table(["shape: model", "tokens/s (best)", "tokens/s (median)", "GFLOP/s", "MFU", "lmforge / transformers"], rows)
    print("\nstep-0 loss, same weights and batch: " + "; ".join(same_losses))
    print(f"FLOPs per token = 6 N + 12 L T C; peak {peak:.1f} GFLOP/s; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
