"""One dataclass for a training run, filled from a TOML file and then `--key value` flags.

Every field is a key of the TOML file and a flag of `lmforge pretrain` (`max_steps` ->
`--max-steps`, made by `lmforge.cli.flags`); the file's `[model]` table overrides fields of the model preset
(`n_layer = 4`). Flags win over the file, the file over the defaults, so a run is
reproducible from `run.json`, which the trainer writes beside its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.fields import dataclass_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainConfig:
    """What a pretraining run needs. Sizes count tokens per process unless said otherwise."""

    data: str = ""  # folder from `lmforge data prepare`
    out: str = "runs/pretrain"  # run folder: checkpoints/, metrics.jsonl, loss.png
    preset: str = "micro"  # model preset (`lmforge estimate --preset NAME` shows its size)
    model: dict[str, Any] = field(default_factory=dict)  # preset overrides, e.g. {"n_layer": 4}
    context_length: int = 0  # 0: the preset's
    batch_size: int = 8  # windows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # optimizer steps; 0: from max_tokens
    max_tokens: int = 0  # token budget (all processes) when max_steps is 0
    time_limit: float = 0.0  # seconds; stop early (with a checkpoint) when reached; 0: none
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # cosine floor
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not on norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0: off
    dtype: str = "auto"  # auto (bf16 autocast where the device has it, else fp32) | fp32 | bf16
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    seed: int = 1337
    eval_every: int = 100  # steps; 0: only at the end
    eval_batches: int = 20
    save_every: int = 100  # steps; 0: only at the end
    keep_last: int = 3  # checkpoints kept besides the best by validation loss
    log_every: int = 10
    sample_prompts: list[str] = field(default_factory=lambda: ["The ", "Once upon a time"])
    sample_tokens: int = 48
    max_bad_steps: int = 10  # consecutive non-finite steps before training stops
    resume: str = ""  # "latest" (newest intact checkpoint in out) or a checkpoint folder
    strategy: str = "ddp"  # under torchrun: ddp | fsdp
    device: str = ""  # "" picks cuda, then mps, then cpu

    def validate(self) -> None:
        if not self.data:
            raise LmforgeError("no training data: pass --data DIR (a folder made by `lmforge data prepare`)")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.max_tokens < 0 or (self.max_steps == 0 and self.max_tokens == 0 and self.time_limit <= 0):
            raise LmforgeError("say how long to train: --max-steps N, --max-tokens N or --time-limit SECONDS")
        if not 0 <= self.min_lr <= self.lr:
            raise LmforgeError(f"need 0 <= --min-lr <= --lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise LmforgeError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise LmforgeError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        for name in ("eval_every", "save_every", "eval_batches", "keep_last", "warmup_steps", "log_every"):
            if getattr(self, name) < 0:
                raise LmforgeError(f"--{name.replace('_', '-')} must not be negative")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        return dataclass_from_dict(cls, values, source)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The keys of a run file, checked later by `TrainConfig.from_dict`: TOML, or the
    `run.json` a run writes (so `--config OUT/run.json --resume` repeats a run)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"config file {path} does not exist") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise LmforgeError(f"{path} holds no settings: expected a JSON object")
        return values
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LmforgeError(f"{path} is not valid TOML: {e}") from None
