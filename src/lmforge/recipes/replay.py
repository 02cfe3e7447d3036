"""Replay: keeping what the base knew while it learns a task.

Fine-tuning and alignment on a narrow task make a small model forget what pretraining
taught it. `--replay DIR --replay-fraction F` mixes windows of the base's prepared
pretraining data (`lmforge data prepare`) into every training batch with their own
next-token loss, and measures the held-out pretraining loss before and after training,
so what replay keeps is a number in metrics.json (`--replay-fraction 0` measures only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmforge.data.tokens import TokenData
from lmforge.data.windows import RandomWindows
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.recipes.config import FinetuneConfig
from lmforge.train.distributed import DistInfo
from lmforge.train.loop import Batch, LossFn

REPLAY_EVAL_BATCHES = 8  # x REPLAY_EVAL_ROWS windows of the replay data's val split: the held-out pretraining loss
REPLAY_EVAL_ROWS = 8
REPLAY_SEED = 1_000_003  # the replay windows' own stream, apart from the task's shuffles


@dataclass
class Replay:
    """Windows of the base's pretraining data mixed into fine-tuning batches (`--replay
    DIR --replay-fraction F`): each step's loss is (1 - F) x the task's loss + F x the
    next-token loss of `rows` windows, sized so they hold about F of the step's tokens.
    Forgetting is the price of fine-tuning a small model on a narrow task; replaying a
    little of what it was pretrained on is the cheapest known remedy, and
    `pretraining_loss` measures how much it keeps."""

    data: TokenData
    fraction: float
    rows: int  # replay windows per micro-batch (0: measure only)
    train: RandomWindows | None
    val: RandomWindows

    def add(self, batch: Batch, step: int) -> Batch:
        """The task's batch with this step's replay windows beside it."""
        if self.train is None:
            return batch
        x, y = batch
        rx, ry = self.train.batch(step)
        return {"task": x, "replay_ids": rx, "replay_targets": ry}, y

    def loss(self, task_loss: LossFn) -> LossFn:
        """`task_loss` mixed with the replay windows' next-token loss (batches without them, the
        validation ones, get the task's loss alone)."""
        if self.train is None:
            return task_loss
        f = self.fraction

        def mixed(model: torch.nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
            if not (isinstance(x, dict) and "replay_ids" in x):
                return task_loss(model, x, y)
            return (1 - f) * task_loss(model, x["task"], y) + f * language_loss(model, x["replay_ids"], x["replay_targets"])

        return mixed

    @torch.no_grad()
    def pretraining_loss(self, model: GPT) -> float:
        """Mean next-token loss on fixed windows of the replay data's val split."""
        was_training = model.training
        model.eval()
        losses = [float(language_loss(model, x.to(model.device), y.to(model.device)))
                  for x, y in (self.val.batch(k) for k in range(REPLAY_EVAL_BATCHES))]
        model.train(was_training)
        return sum(losses) / len(losses)


def language_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The next-token loss of full windows (no ignored labels) through the language-model
    head, also of a model whose forward classifies (a classifier or reward model keeps its
    `lm_head`): the mean negative log-probability of the targets."""
    return -model(x, y, logprobs=True).mean()


def open_replay(cfg: FinetuneConfig, model: GPT, info: DistInfo, task_tokens: float) -> Replay | None:
    """The replay of --replay (None without it), its windows sized so they hold about
    --replay-fraction of a micro-batch's tokens (`task_tokens`: the task's, per micro-batch)."""
    if not cfg.replay:
        return None
    if info.enabled:
        raise LmforgeError("--replay trains on one process (two forward passes per step, which DDP and FSDP do not take): "
                           "run without torchrun, or without --replay")
    data = TokenData.open(cfg.replay, tokenizer=model.tokenizer)  # refuses data made with another tokenizer
    data.check_ids(model.config.vocab_size)
    ctx = model.config.context_length
    for split in ("train", "val"):
        if data.num_tokens(split) <= ctx:
            raise LmforgeError(f"--replay {cfg.replay}: its {split} split has {data.num_tokens(split):,} tokens, fewer than "
                               f"one window of the model's context ({ctx + 1}); prepare more text")
    f = cfg.replay_fraction
    rows = max(1, round(f / (1 - f) * task_tokens / ctx)) if f > 0 else 0
    train = RandomWindows(data.split("train"), ctx, rows, cfg.seed + REPLAY_SEED) if rows else None
    val = RandomWindows(data.split("val"), ctx, REPLAY_EVAL_ROWS, REPLAY_SEED)
    return Replay(data, f, rows, train, val)
