"""The pretraining recipe: a prepared data folder + a model preset -> a trained run folder.

It only wires library parts: token files (`lmforge.data`), the model (`lmforge.model`),
processes (`train.distributed`) and the loop (`train.loop`). Under torchrun each rank
reads its own slice of every global batch (`RandomWindows`), so N processes with batch
B see exactly the windows one process with batch N x B sees.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator

import torch

from lmforge.config import Config
from lmforge.data.tokens import TokenData
from lmforge.data.windows import RandomWindows
from lmforge.device import available_memory
from lmforge.errors import LmforgeError
from lmforge.estimate import check_training_fits
from lmforge.loading import load
from lmforge.model import GPT
from lmforge.recipes.common import check_run_folder, own_run_folder, start_run
from lmforge.text import plural
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import DistInfo, init_distributed, shutdown
from lmforge.train.loop import Batch, Trainer, TrainResult
from lmforge.train.loss import next_token_loss
from lmforge.train.optim import build_optimizer

EVAL_SEED_OFFSET = 1_000_003  # validation windows are drawn from their own seed, fixed for the run


def model_config(cfg: TrainConfig, vocab_size: int) -> Config:
    """The preset, fitted to the data's vocabulary, with the run's overrides."""
    overrides = {"vocab_size": vocab_size, **cfg.model}
    if cfg.context_length:
        overrides["context_length"] = cfg.context_length
    return Config.from_name(cfg.preset, **overrides)


def continued(cfg: TrainConfig, tokenizer: object) -> GPT:
    """The model --init-from names, to pretrain further on this data: its shape is kept (no
    preset, no overrides), and the data must have been prepared with its tokenizer."""
    if cfg.model or cfg.context_length:
        raise LmforgeError("--init-from continues a model as it is: drop --set and --context-length (its shape is kept)")
    model = load(cfg.init_from)
    if model.score is not None:
        raise LmforgeError(f"--init-from {cfg.init_from} is a classifier; continue pretraining a language model")
    ours, theirs = getattr(model.tokenizer, "fingerprint", None), getattr(tokenizer, "fingerprint", None)
    if ours is None or ours != theirs:
        raise LmforgeError(f"--init-from {cfg.init_from} reads text with another tokenizer than {cfg.data} was prepared with; "
                           f"prepare the data with its tokenizer: lmforge data prepare --tokenizer {cfg.init_from} ...")
    return model


def budget_steps(cfg: TrainConfig, context_length: int, world_size: int) -> int:
    """Optimizer steps: --max-steps, else the token budget over tokens per step (a run
    sized by its time limit alone starts from `steps_within` instead)."""
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * context_length * world_size
    return max(1, math.ceil(cfg.max_tokens / per_step))


def steps_within(model: GPT, cfg: TrainConfig, device: torch.device, seconds: float) -> int:
    """A first estimate of the optimizer steps of `cfg` that fit in `seconds`, from timing
    a few on a copy of `model` (the trainer re-estimates from its own pace as it goes)."""
    model = copy.deepcopy(model).to(device)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.optimizer)  # the run's step, timed
    x = torch.randint(0, model.config.vocab_size, (cfg.batch_size, model.config.context_length), device=device)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(cfg.grad_accum):
            next_token_loss(model, x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return max(1, int(seconds / min(times[1:])))


def windows(data: TokenData, split: str, context_length: int, cfg: TrainConfig, seed: int, info: DistInfo) -> RandomWindows:
    tokens = data.split(split)
    if len(tokens) <= context_length:
        raise LmforgeError(
            f"the {split} split of {data.path} has {len(tokens):,} tokens, fewer than one window of "
            f"{context_length + 1}; prepare more text, a larger --val-fraction, or use a shorter --context-length"
        )
    return RandomWindows(tokens, context_length, cfg.batch_size, seed, info.rank, info.world_size)


def build(cfg: TrainConfig, info: DistInfo, say: Callable[[str], None] = print, progress: bool = True) -> Trainer:
    """Everything a run needs, ready to `fit()`."""
    cfg.validate()
    say = info.main_only(say)
    data = TokenData.open(cfg.data)
    tokenizer = data.tokenizer()
    asked, by_time = cfg, cfg.sized_by_time
    model = continued(cfg, tokenizer) if cfg.init_from else None
    config = model.config if model is not None else model_config(cfg, data.vocab_size)
    data.check_ids(config.vocab_size)
    # before a fresh model is built: one too large for this machine fails now, with the numbers
    check_training_fits(config, cfg.batch_size, config.context_length, cfg.gradient_checkpointing, available_memory(info.device),
                        cfg.optimizer, cfg.optimizer_states == "paged")
    if model is None:
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = GPT(config)
    ctx = config.context_length
    steps = steps_within(model, cfg, info.device, cfg.time_limit) if by_time else budget_steps(cfg, ctx, info.world_size)
    cfg = dataclasses.replace(cfg, max_steps=steps)
    train = windows(data, "train", ctx, cfg, cfg.seed, info)
    val = windows(data, "val", ctx, cfg, cfg.seed + EVAL_SEED_OFFSET, info)

    def batch(draw: int, micro: int) -> Batch:
        return train.batch(draw * cfg.grad_accum + micro)

    def eval_batches() -> Iterator[Batch]:
        return (val.batch(i) for i in range(cfg.eval_batches))

    say(
        f"model: {cfg.init_from + ' (continued)' if cfg.init_from else cfg.preset}, {model.num_params() / 1e6:.2f}M parameters ({plural(config.n_layer, 'layer')}, width {config.n_embd}, "
        f"context {ctx}, vocabulary {config.vocab_size:,}); data: {data.num_tokens('train'):,} train / "
        f"{data.num_tokens('val'):,} val tokens"
    )
    tokens_per_step = cfg.batch_size * cfg.grad_accum * ctx * info.world_size
    bytes_per_token = data.bytes_per_token("val", tokenizer)

    def val_metrics(loss: float) -> dict[str, float]:
        return {"ppl": math.exp(min(loss, 50.0)), "bpb": loss / math.log(2) * (1 / bytes_per_token)}

    length = f"about {cfg.max_steps:,} steps (re-estimated as it goes, to end in {_minutes(cfg.time_limit)})" if by_time else (
        f"{cfg.max_steps:,} steps")
    say(
        f"training: {length} x {tokens_per_step:,} tokens ({cfg.batch_size} x {ctx} x {cfg.grad_accum} accum"
        f"{f' x {info.world_size} processes' if info.world_size > 1 else ''}) on {info.device}"
    )
    trainer = Trainer(model, cfg, batch=batch, eval_batches=eval_batches, info=info, tokenizer=tokenizer, say=say, progress=progress,
                      val_metrics=val_metrics, fit_to_time=by_time)
    start_run(asked, info, say)  # after the trainer has checked what --resume resumes: a refused run writes nothing
    return trainer


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.3g} minutes" if seconds >= 60 else f"{seconds:.3g} s"


def run(cfg: TrainConfig, say: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Pretrain as configured, on one process or under torchrun, owning the run folder
    (rank 0 locks it) from before the data is read until the run ends."""
    cfg.validate()  # a mistyped run creates no folder
    info = init_distributed(cfg.device or None)
    try:
        with own_run_folder(cfg, info):
            check_run_folder(cfg, info)
            return build(cfg, info, say, progress).fit()
    finally:
        shutdown(info)
