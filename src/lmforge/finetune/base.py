"""The model a fine-tuning run starts from, and which of its weights learn.

Shared by every recipe: load the base (any folder `lmforge.load` reads), give it a
classification head when the task has labels, then pick the trainable weights: all of
them, the last N blocks (with the final norm and the head), or LoRA adapters over a
frozen base, optionally held in 4 bits (QLoRA).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.lora import LoRAConfig, count_parameters
from lmforge.io import atomic_write_text
from lmforge.model import GPT
from lmforge.pretrained import load, resolve_model_path
from lmforge.train.distributed import DistInfo


@dataclass
class TrainableReport:
    trainable: int
    total: int
    how: str
    lora: LoRAConfig | None = None

    def __str__(self) -> str:
        return f"trainable: {self.trainable:,} of {self.total:,} parameters ({100 * self.trainable / max(self.total, 1):.2f}%), {self.how}"

    def to_dict(self) -> dict:
        """What metrics.json records."""
        return {"parameters": self.trainable, "total": self.total, "how": self.how}


def load_base(cfg: FinetuneConfig, labels: list[str] | None = None) -> GPT:
    """The base with its tokenizer; with `labels`, a fresh classification head for them
    (kept as it is when the base already classifies into exactly these labels)."""
    model = load(cfg.base)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise LmforgeError(f"{cfg.base} has no tokenizer beside its weights; fine-tuning needs one to read the data")
    config = model.config
    if labels is not None and config.labels != list(labels):
        config = config.replace(labels=list(labels))
    if cfg.from_scratch or config is not model.config:
        torch.manual_seed(cfg.seed)
        fresh = GPT(config)
        if not cfg.from_scratch:  # keep every pretrained weight; only the new head is random
            state = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
            missing, unexpected = fresh.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("score.") for k in missing):
                raise LmforgeError(f"could not carry the base's weights over: missing {missing}, unexpected {unexpected}")
        model = fresh
    model.tokenizer = tokenizer
    return model


def set_trainable(model: GPT, cfg: FinetuneConfig, say: Callable[[str], None] = print) -> TrainableReport:
    """Freeze what should not learn; with --lora-r, swap the targets for LoRA layers
    (after quantizing the base with --quantize nf4). The head that the task trains
    (a classifier's `score`) always learns."""
    heads = ["score"] if model.score is not None else []
    if cfg.quantize == "nf4":
        from lmforge.finetune.nf4 import quantize_model

        summary = quantize_model(model)
        say(f"base quantized to NF4: {summary}")
    if cfg.lora_r:
        from lmforge.finetune.lora import apply_lora

        lora = LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=tuple(cfg.lora_targets), rslora=cfg.rslora)
        apply_lora(model, lora, trainable=heads)
        how = f"LoRA r={lora.r} alpha={lora.alpha:g} on {','.join(lora.targets)}" + (" over an NF4 base" if cfg.quantize else "")
    else:
        blocks = cfg.trainable_blocks()
        if blocks is None:
            how = "every weight"
        else:
            if blocks > len(model.blocks):
                raise LmforgeError(f"--trainable last-{blocks}: the model has only {len(model.blocks)} blocks")
            model.requires_grad_(False)
            learn = [model.norm_f, *model.blocks[len(model.blocks) - blocks :]]
            if model.score is not None:
                learn.append(model.score)
            elif not model.config.tie_embeddings:
                learn.append(model.lm_head)  # a tied head is the embedding table, which stays frozen
            for module in learn:
                module.requires_grad_(True)
            how = f"the last {blocks} block(s), the final norm and the head" if blocks else "the final norm and the head"
    trainable, total = count_parameters(model)
    if not trainable:
        raise LmforgeError("nothing to train: every weight is frozen")
    return TrainableReport(trainable, total, how, lora if cfg.lora_r else None)


def checkpoint_hooks(model: GPT, cfg: FinetuneConfig, report: TrainableReport) -> dict:
    """Trainer arguments that make a LoRA run's checkpoints hold its adapter folder
    (the base stays where it is), loadable with `lmforge.load` like any model."""
    if report.lora is None:
        return {}
    from lmforge.finetune.lora import load_adapter, save_adapter

    base = resolve_model_path(cfg.base)  # a run folder's newest checkpoint now, not whatever it holds later
    return {
        "write_model": lambda folder: save_adapter(model, folder, base, report.lora, quantize=cfg.quantize or None),
        "read_model": lambda folder: load_adapter(model, folder),
    }


def steps_for(cfg: FinetuneConfig, steps_per_epoch: int) -> int:
    """Optimizer steps: --max-steps, else --epochs over the training split."""
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch / cfg.grad_accum))


def example_length(cfg: FinetuneConfig, model: GPT) -> int:
    """Tokens per example: --max-length, never more than the model's context."""
    return min(cfg.max_length or model.config.context_length, model.config.context_length)


def rank_rows(cfg: FinetuneConfig, info: DistInfo) -> slice:
    """This process's rows of a global training batch of batch_size x world_size."""
    return slice(info.rank * cfg.batch_size, (info.rank + 1) * cfg.batch_size)


def start_run(cfg: FinetuneConfig, info: DistInfo) -> None:
    """The run folder with its `run.json` (the whole config, to repeat or --resume the run)."""
    if info.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.out) / "run.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
