"""nanoGPT's CPU Shakespeare recipe through our trainer, then our best Llama-family config
in the same wall-clock time.

The data is `tinyshakespeare.txt` at character level: a byte-level BPE with no merges
(256 bytes + <|endoftext|>; the text is ASCII, so one token is one character), the last
10% of the tokens held out for validation, as nanoGPT's `prepare.py` does. Losses are in
nats per character either way.

1. `gpt2 recipe`: nanoGPT's `train_shakespeare_char` CPU line (4 layers, 4 heads, width
   128, context 64, batch 12, 2000 iterations, lr 1e-3 with 100 warmup steps and cosine
   decay to 1e-4, AdamW beta2 0.99, weight decay 0.1, clipping at 1, dropout 0, no
   biases) as a GPT-2-family config of `lmforge.train` (`--compile` for torch.compile).
2. `llama best`: the Llama-family config we found best (RMSNorm, SwiGLU, RoPE, grouped
   queries), its steps fitted to the wall time row 1 took, with that time as a hard stop.
3. `transformers`: a live reference on the same machine and load, `GPT2LMHeadModel`
   with row 1's shape (it always has biases) in the plain loop nanoGPT's `train.py` runs
   (random windows, the same schedule, AdamW, clipping), so ms/iteration has a
   same-moment yardstick beside the figures nanoGPT measured here (58.8 ms/iteration,
   2 min 10 s, val loss 1.886).

Validation loss is the mean over the same 200 seeded batches of validation windows, taken
once at the end (wall time includes it; ms/iteration does not).

    python benchmarks/bench_shakespeare.py [--compile] [--no-reference] [--steps 2000]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from _common import SHARED, print_table

from lmforge.data.prepare import prepare
from lmforge.data.tokens import TokenData
from lmforge.data.windows import RandomWindows
from lmforge.recipes import pretrain
from lmforge.tokenizer.train import train_bpe
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import init_distributed
from lmforge.train.optim import lr_at

NANOGPT = {"ms_per_iter": 58.8, "wall_s": 130.0, "val_loss": 1.886}  # nanoGPT itself, measured on this machine
EVAL_BATCHES = 200

GPT2_RECIPE = dict(
    preset="gpt2", model={"n_layer": 4, "n_head": 4, "n_embd": 128, "bias": False, "dropout": 0.0},
    context_length=64, batch_size=12, max_steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100,
    weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
)
# Found by a sweep through this trainer (see the README): the same width and depth as the
# GPT-2 recipe, twice its context at half its batch (the same tokens per step), a hotter lr.
LLAMA_BEST = dict(
    preset="nano", model={"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 128, "mlp_hidden": 384, "dropout": 0.0},
    context_length=128, batch_size=6, lr=2e-3, min_lr=1e-4, warmup_steps=100,
    weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
)


def char_data(text_path: Path, out: Path) -> TokenData:
    text = text_path.read_text(encoding="utf-8")
    if not text.isascii():
        raise SystemExit(f"{text_path} is not ASCII: bytes would not be characters")
    tokenizer = train_bpe([text], 257, progress=False, name="bytes")  # no merges: one byte per token
    return prepare(text_path, tokenizer, out, val_fraction=0.1, overwrite=True)


def run_ours(name: str, recipe: dict, data: Path, out: Path, *, compile: bool, time_limit: float = 0.0) -> dict:
    """Train one config with `lmforge.train`; evaluate once at the end."""
    cfg = TrainConfig(data=str(data), out=str(out), eval_every=0, eval_batches=EVAL_BATCHES, save_every=0, keep_last=1,
                      log_every=50, sample_prompts=[], seed=1337, compile=compile, time_limit=time_limit, **recipe)
    start = time.perf_counter()
    trainer = pretrain.build(cfg, init_distributed("cpu"), say=lambda _: None, progress=False)
    eval_batches, trainer.eval_batches = trainer.eval_batches, None  # fit() trains only; we evaluate after
    fit_start = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - fit_start
    trainer.eval_batches = eval_batches
    val = trainer.evaluate()
    wall = time.perf_counter() - start
    return {"name": name, "steps": result.step, "ms_per_iter": 1000 * fit_s / max(result.step, 1), "wall_s": wall,
            "val_loss": val, "params": trainer.model.num_params(), "stopped": result.stopped}


def fitted_steps(recipe: dict, data: Path, out: Path, budget_s: float, compile: bool) -> int:
    """Steps of `recipe` that fit `budget_s`, from timing 60 of them (the cosine must finish
    inside the budget; the time limit only guards against a slower moment)."""
    probe = run_ours("probe", {**recipe, "max_steps": 60}, data, out, compile=compile)
    per_step = probe["ms_per_iter"] / 1000
    overhead = probe["wall_s"] - 60 * per_step  # build + eval + checkpoint
    return max(100, int((budget_s - overhead) / per_step * 0.95))


def run_reference(data: TokenData, steps: int) -> dict:
    """`transformers` GPT-2 with the recipe's shape in nanoGPT's plain training loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    r = GPT2_RECIPE
    torch.manual_seed(1337)
    start = time.perf_counter()
    config = GPT2Config(vocab_size=data.vocab_size, n_positions=r["context_length"], n_embd=128, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=data.eot_id, eos_token_id=data.eot_id)
    model = GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=r["lr"], betas=(r["beta1"], r["beta2"]))
    train = RandomWindows(data.split("train"), r["context_length"], r["batch_size"], seed=1)
    val = RandomWindows(data.split("val"), r["context_length"], r["batch_size"], seed=2)
    fit_start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=r["lr"], min_lr=r["min_lr"], warmup_steps=r["warmup_steps"], max_steps=steps)
        x, y = train.batch(step)
        loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    fit_s = time.perf_counter() - fit_start
    model.eval()
    with torch.no_grad():
        val_loss = sum(float(model(input_ids=x, labels=y, shift_labels=y).loss) for x, y in (val.batch(i) for i in range(EVAL_BATCHES)))
    return {"name": "transformers GPT2LMHeadModel, nanoGPT loop", "steps": steps, "ms_per_iter": 1000 * fit_s / steps,
            "wall_s": time.perf_counter() - start, "val_loss": val_loss / EVAL_BATCHES,
            "params": sum(p.numel() for p in model.parameters()), "stopped": "done"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=SHARED / "tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=GPT2_RECIPE["max_steps"], help="iterations of the GPT-2 recipe")
    parser.add_argument("--compile", action="store_true", help="torch.compile our models")
    parser.add_argument("--no-reference", action="store_true", help="skip the transformers row")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="bench_shakespeare_") as tmp:
        tmp_path = Path(tmp)
        data = char_data(args.text, tmp_path / "data")
        print(f"# tinyshakespeare at character level: {data.num_tokens('train'):,} train / {data.num_tokens('val'):,} val "
              f"characters; {torch.get_num_threads()} threads; compile={args.compile}\n")
        rows = []
        gpt2 = run_ours("lmforge gpt2 recipe", {**GPT2_RECIPE, "max_steps": args.steps}, data.path, tmp_path / "gpt2", compile=args.compile)
        rows.append(gpt2)
        budget = gpt2["wall_s"]
        steps = fitted_steps(LLAMA_BEST, data.path, tmp_path / "probe", budget, args.compile)
        rows.append(run_ours("lmforge llama best", {**LLAMA_BEST, "max_steps": steps}, data.path, tmp_path / "llama",
                             compile=args.compile, time_limit=budget))
        if not args.no_reference:
            rows.append(run_reference(data, args.steps))
    table = [[r["name"], f"{r['params'] / 1e6:.2f}M", r["steps"], r["ms_per_iter"], f"{r['wall_s']:.0f} s", f"{r['val_loss']:.4f}",
              f"{NANOGPT['ms_per_iter'] / r['ms_per_iter']:.2f}x"] for r in rows]
    table.append(["nanoGPT (measured here, issue 4)", "0.80M", 2000, NANOGPT["ms_per_iter"], f"{NANOGPT['wall_s']:.0f} s",
                  f"{NANOGPT['val_loss']:.4f}", "1.00x"])
    print_table(["run", "params", "iterations", "ms/iter", "wall", "val loss", "speed vs nanoGPT"], table)
    for r in rows:
        if r["stopped"] != "done":
            print(f"note: {r['name']} stopped early ({r['stopped']}) at step {r['steps']}")
    print(f"\nllama best ran in the GPT-2 recipe's wall time ({budget:.0f} s); target: gpt2 recipe <= 1.89 at <= "
          f"{NANOGPT['ms_per_iter']} ms/iter, llama best <= {NANOGPT['val_loss'] - 0.05:.3f}")
    if math.isnan(rows[0]["val_loss"]):
        raise SystemExit("the GPT-2 recipe diverged")


if __name__ == "__main__":
    main()
