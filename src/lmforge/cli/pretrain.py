"""`lmforge pretrain` and `lmforge quickstart` (the whole pipeline in one command)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from lmforge.cli.common import add_command, progress_enabled
from lmforge.errors import LmforgeError
from lmforge.train.config import TrainConfig, add_flags, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "pretrain",
        "train a model from scratch on a prepared data folder",
        _pretrain,
        examples="""
        lmforge pretrain --data runs/data --preset micro --out runs/micro --max-steps 2000
        lmforge pretrain --config run.toml --lr 6e-4            # flags override the file
        lmforge pretrain --config run.toml --resume             # newest intact checkpoint in --out
        torchrun --nproc_per_node=2 -m lmforge pretrain --config run.toml   # DDP (--strategy fsdp for FSDP)
        """,
        description="""
        Next-token pretraining: AdamW (no decay on norms, biases, embeddings), warmup then
        cosine decay, gradient clipping and accumulation, evaluation (loss, perplexity,
        sampled continuations), checkpoints that resume exactly. The run folder (--out)
        holds checkpoints/, metrics.jsonl, loss.png and run.json.
        """,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with the same keys as these flags; [model] overrides the preset")
    add_flags(p)

    q = add_command(
        sub,
        "quickstart",
        "the whole pipeline on the built-in corpus: tokenizer, data, a small model, samples",
        _quickstart,
        examples="""
        lmforge quickstart                      # about 8 minutes on 2 CPU cores
        lmforge quickstart --minutes 2 --out runs/try
        lmforge quickstart --input my_texts/ --vocab-size 2048
        """,
    )
    q.add_argument("--out", default="runs/quickstart", help="folder for everything it makes (default: runs/quickstart)")
    q.add_argument("--minutes", type=float, default=6.0, help="training time budget in minutes (default: 6)")
    q.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: 4096)")
    q.add_argument("--preset", default="micro", help="model preset, Llama family by default (default: micro)")
    q.add_argument("--input", nargs="+", metavar="PATH", help="your own text files or folders instead of the built-in corpus")
    q.add_argument("--overwrite", action="store_true", help="start over if --out already holds a quickstart")


def _pretrain(args: argparse.Namespace) -> int:
    from lmforge.train.pretrain import run

    cfg = config_from_args(args, args.config)
    result = run(cfg, say=lambda m: print(m, file=sys.stderr), progress=progress_enabled())
    _report(result, cfg.out)
    return 0


def _report(result: object, out: str) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    skipped = f", {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""
    print(f"{result.stopped} at step {result.step}{val}{skipped}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.metrics}")
    if result.plot:
        print(f"loss curve: {result.plot}")
    if result.stopped != "done":
        print(f"continue with: lmforge pretrain --config {Path(out) / 'run.json'} --resume  (or the same flags plus --resume)")


def _quickstart(args: argparse.Namespace) -> int:
    from lmforge.corpus import ReadStats, corpus_paths, iter_documents
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer.train import train_bpe
    from lmforge.train.pretrain import run

    out = Path(args.out)
    if (out / "model").exists() and not args.overwrite:
        raise LmforgeError(f"{out} already holds a quickstart run; pass --overwrite or choose another --out")
    started = time.monotonic()
    say = lambda message: print(message, flush=True)  # noqa: E731
    progress = progress_enabled()

    say("lmforge quickstart: build a small language model from scratch, in three steps.")
    if not args.input:
        say("The text is the built-in corpus (Python's own standard library), so the model learns to write Python.")
    say("")
    say(f"[1/3] Tokenizer: learn a byte-level BPE vocabulary of {args.vocab_size:,} ids from the built-in corpus")
    paths = corpus_paths(args.input, say=lambda m: say("      " + m))
    stats = ReadStats()
    tokenizer = train_bpe((c for doc in iter_documents(paths, stats) for c in doc), args.vocab_size, progress=progress)
    tokenizer.save(out / "tokenizer")
    sample = "The quick brown fox jumps over the lazy dog."
    say(f"      {stats.summary()}; '{sample}' -> {len(tokenizer.encode(sample))} tokens "
        f"({time.monotonic() - started:.0f} s)\n")

    say("[2/3] Data: turn the corpus into token ids on disk (train.bin, val.bin)")
    data = prepare(paths, tokenizer, out / "data", overwrite=True, progress=progress)
    say(f"      {data.num_tokens('train'):,} training and {data.num_tokens('val'):,} validation tokens in {out / 'data'} "
        f"({time.monotonic() - started:.0f} s)\n")

    say(f"[3/3] Pretraining: a {args.preset} model (Llama family: RMSNorm, SwiGLU, RoPE, grouped-query attention)")
    say(f"      learns to predict the next token for {args.minutes:g} minutes; the loss is cross-entropy in nats")
    say(f"      (lower is better; ln(vocabulary) = {math.log(tokenizer.vocab_size):.1f} is chance)")
    cfg = TrainConfig(
        data=str(out / "data"), out=str(out / "model"), preset=args.preset, context_length=256, batch_size=16,
        lr=2e-3, min_lr=2e-4, warmup_steps=30, eval_every=50, eval_batches=10, save_every=50, log_every=5,
        sample_prompts=["The ", "I had"] if args.input else ["def ", "class Parser(", "import "], sample_tokens=40,
        time_limit=args.minutes * 60,
    )
    cfg = dataclasses.replace(cfg, max_steps=_steps_in(cfg, args.minutes * 60))
    result = run(cfg, say=lambda m: say("      " + m), progress=progress)

    say(f"\nDone in {(time.monotonic() - started) / 60:.1f} minutes: {result.step} steps, validation loss {result.val_loss:.3f} "
        f"(perplexity {math.exp(result.val_loss):.1f}).")
    say("\nWhat the model writes now (temperature 0.8, top-k 50):")
    for text in result.samples:
        say("  > " + text.replace("\n", "\n    "))
    say(f"\nloss curve:  {result.plot}")
    say(f"checkpoint:  {result.checkpoint}")
    say(f"metrics:     {result.metrics}")
    say("\nNext, try:")
    say(f"  lmforge generate --model {out / 'model'} --prompt 'def fibonacci(n):' --max-new-tokens 100 --stream")
    say(f"  lmforge chat --model {out / 'model'}")
    say(f"  lmforge pretrain --config {out / 'model' / 'run.json'} --max-steps {result.step + 500} --resume   # train longer")
    return 0


def _steps_in(cfg: TrainConfig, seconds: float) -> int:
    """How many steps fit the budget, from timing a few on this machine (the cosine
    schedule needs its length up front; the time limit stops a slow run anyway)."""
    import torch

    from lmforge.data.tokens import TokenData
    from lmforge.model import GPT
    from lmforge.train.loss import next_token_loss
    from lmforge.train.optim import build_optimizer
    from lmforge.train.pretrain import model_config

    data = TokenData.open(cfg.data)
    model = GPT(model_config(cfg, data.vocab_size))
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    x = torch.randint(0, data.vocab_size, (cfg.batch_size, model.config.context_length))
    times = []
    for _ in range(4):
        t = time.perf_counter()
        next_token_loss(model, x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    per_step = min(times[1:]) * 1.08  # evaluation and sampling take a few percent more
    return max(10, int(seconds / per_step))
