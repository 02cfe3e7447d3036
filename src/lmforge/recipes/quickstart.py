"""The quickstart recipe: the whole pipeline in one call, text -> tokenizer -> token files -> a trained model.

It wires the tokenizer trainer, the data preparation and the pretraining recipe, and
sizes the run to a time budget: the cosine schedule needs its length up front, so a
few training steps are timed on this machine first (the time limit still stops a run
that turns out slower).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.corpus import ReadStats, corpus_paths, iter_documents
from lmforge.data.prepare import prepare
from lmforge.data.tokens import TokenData
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.recipes.pretrain import model_config
from lmforge.recipes.pretrain import run as pretrain
from lmforge.tokenizer.train import train_bpe
from lmforge.train.config import TrainConfig
from lmforge.train.loop import TrainResult
from lmforge.train.loss import next_token_loss
from lmforge.train.optim import build_optimizer

SAMPLE = "The quick brown fox jumps over the lazy dog."


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"  # folder for everything it makes
    minutes: float = 6.0  # training time budget
    vocab_size: int = 4096  # BPE vocabulary size
    preset: str = "micro"  # model preset, Llama family by default
    inputs: Sequence[str] = ()  # text files or folders; empty: the built-in corpus
    text_field: str = "text"  # the text's field in .jsonl inputs
    workers: int | None = None  # processes / threads for the tokenizer and the data; None: all cores
    overwrite: bool = False  # start over if `out` already holds a quickstart


def run(cfg: QuickstartConfig, say: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Tokenizer, data and pretraining into `cfg.out`, narrated through `say`."""
    out = Path(cfg.out)
    if (out / "model").exists() and not cfg.overwrite:
        raise LmforgeError(f"{out} already holds a quickstart run; pass --overwrite or choose another --out")
    started = time.monotonic()
    source = "your text" if cfg.inputs else "the built-in corpus"
    say("lmforge quickstart: build a small language model from scratch, in three steps.")
    if not cfg.inputs:
        say("The text is the built-in corpus (Python's own standard library), so the model learns to write Python.")
    say("")
    say(f"[1/3] Tokenizer: learn a byte-level BPE vocabulary of {cfg.vocab_size:,} ids from {source}")
    paths = corpus_paths(list(cfg.inputs) or None, say=lambda m: say("      " + m))
    stats = ReadStats()
    tokenizer = train_bpe((c for doc in iter_documents(paths, stats, cfg.text_field) for c in doc), cfg.vocab_size,
                          workers=cfg.workers, progress=progress)
    tokenizer.save(out / "tokenizer")
    say(f"      {stats.summary()}; '{SAMPLE}' -> {len(tokenizer.encode(SAMPLE))} tokens "
        f"({time.monotonic() - started:.0f} s)\n")

    say("[2/3] Data: turn the corpus into token ids on disk (train.bin, val.bin)")
    data = prepare(paths, tokenizer, out / "data", text_field=cfg.text_field, overwrite=True, num_threads=cfg.workers,
                   progress=progress)
    say(f"      {data.num_tokens('train'):,} training and {data.num_tokens('val'):,} validation tokens in {out / 'data'} "
        f"({time.monotonic() - started:.0f} s)\n")

    say(f"[3/3] Pretraining: a {cfg.preset} model (Llama family: RMSNorm, SwiGLU, RoPE, grouped-query attention)")
    say(f"      learns to predict the next token for {cfg.minutes:g} minutes; the loss is cross-entropy in nats")
    say(f"      (lower is better; ln(vocabulary) = {math.log(tokenizer.vocab_size):.1f} is chance)")
    train = TrainConfig(
        data=str(out / "data"), out=str(out / "model"), preset=cfg.preset, context_length=256, batch_size=16,
        lr=2e-3, min_lr=2e-4, warmup_steps=30, eval_every=50, eval_batches=10, save_every=50, log_every=5,
        sample_prompts=["The ", "I had"] if cfg.inputs else ["def ", "class Parser(", "import "], sample_tokens=40,
        time_limit=cfg.minutes * 60,
    )
    train = dataclasses.replace(train, max_steps=steps_within(train, cfg.minutes * 60))
    return pretrain(train, say=lambda m: say("      " + m), progress=progress)


def steps_within(cfg: TrainConfig, seconds: float) -> int:
    """How many optimizer steps of `cfg` fit in `seconds` on this machine, from timing a few."""
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
