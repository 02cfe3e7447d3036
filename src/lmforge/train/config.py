"""One dataclass for a training run, filled from a TOML file and then `--key value` flags.

Every field is a key of the TOML file and a flag of `lmforge pretrain` (`max_steps` ->
`--max-steps`, made by `lmforge.cli.flags`); the file's `[model]` table overrides fields of the model preset
(`n_layer = 4`). Flags win over the file, the file over the defaults, so a run is
reproducible from `run.json`, which the trainer writes beside its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.fields import check_fields, dataclass_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class TrainConfig:
    """What a pretraining run needs. Sizes count tokens per process unless said otherwise."""

    data: str = ""  # folder from `lmforge data prepare`
    out: str = "runs/pretrain"  # run folder: checkpoints/, metrics.jsonl, loss.png
    preset: str = "micro"  # model preset (`lmforge estimate --preset NAME` shows its size)
    init_from: str = ""  # continue pretraining this model (its shape, weights and tokenizer) instead of a fresh preset
    model: dict[str, Any] = field(default_factory=dict)  # preset overrides, e.g. {"n_layer": 4}
    context_length: int = 0  # 0: the preset's
    batch_size: int = 8  # windows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # optimizer steps; 0: from max_tokens, or from time_limit alone
    max_tokens: int = 0  # token budget (all processes) when max_steps is 0
    time_limit: float = 0.0  # seconds; with max_steps/max_tokens: stop early (with a checkpoint); alone: the run's length
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # cosine floor
    warmup_steps: int = 0  # linear warm-up steps; 0: --warmup-fraction of the run's steps
    warmup_fraction: float = 0.05  # warm-up as a share of the run's steps, when --warmup-steps is 0
    weight_decay: float = 0.1  # AdamW weight decay (not on norms, biases and embeddings)
    beta1: float = 0.9  # AdamW's momentum (first-moment) decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0: off
    optimizer: str = "adamw"  # adamw (fp32 moments, torch's fused kernel) | adamw8bit (8-bit blockwise moments: a quarter of the memory)
    optimizer_states: str = "memory"  # memory | paged (the moments in memory-mapped files in the run folder, which the OS pages out)
    dtype: str = "auto"  # auto (bf16 autocast where the device has it, else fp32) | fp32 | bf16
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower steps
    compile: bool = False  # torch.compile the model
    seed: int = 1337  # random seed: the weights a run creates, the batch order, dropout
    eval_every: int = 100  # steps; 0: only at the end
    eval_batches: int = 20  # validation batches per evaluation
    save_every: int = 100  # steps; 0: only at the end
    keep_last: int = 3  # checkpoints kept besides the best by validation loss; 0: all
    log_every: int = 10  # steps between training-loss records in metrics.jsonl
    sample_prompts: list[str] = field(default_factory=lambda: ["The ", "Once upon a time"])  # continued at each evaluation
    sample_tokens: int = 48  # tokens generated per sample prompt
    max_bad_steps: int = 10  # consecutive non-finite steps before training stops
    resume: str = ""  # "latest" (newest intact checkpoint in out) or a checkpoint folder
    overwrite: bool = False  # replace an existing run folder in --out (it is removed first)
    strategy: str = "ddp"  # under torchrun: ddp | fsdp
    device: str = ""  # "" picks cuda, then mps, then cpu

    # The settings that decide the model a run trains: a checkpoint resumes only under the
    # same ones (the trainer compares them). A recipe's subclass adds its own.
    model_settings: ClassVar[tuple[str, ...]] = ("preset", "model", "context_length", "init_from")

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the flag (= the TOML key) and what it takes."""
        if not self.data:
            raise LmforgeError("no training data: pass --data DIR (a folder made by `lmforge data prepare`)")
        for name in ("batch_size", "grad_accum", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("context_length", "max_steps", "max_tokens", "warmup_steps", "eval_every", "eval_batches",
                     "save_every", "keep_last", "log_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise LmforgeError(f"{_flag(name)} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.warmup_fraction < 1:  # NaN fails too
            raise LmforgeError(f"--warmup-fraction must be in [0, 1) (a share of the run's steps, e.g. 0.05), got {self.warmup_fraction}")
        if not 0 <= self.time_limit <= math.inf:  # NaN fails too
            raise LmforgeError(f"--time-limit must be a number of seconds >= 0 (0: none), got {self.time_limit}")
        if self.max_steps == 0 and self.max_tokens == 0 and self.time_limit <= 0:
            raise LmforgeError("say how long to train: --max-steps N, --max-tokens N or --time-limit SECONDS")
        if not 0 < self.lr < math.inf:
            raise LmforgeError(f"--lr must be a positive number (e.g. 1e-3 for pretraining, 5e-5 for fine-tuning), got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise LmforgeError(f"need 0 <= --min-lr <= --lr, got min_lr={self.min_lr}, lr={self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise LmforgeError(f"{_flag(name)} must be in [0, 1) (AdamW's decay rate; typically 0.9 and 0.95), "
                                   f"got {getattr(self, name)}")
        if not 0 <= self.weight_decay < math.inf:
            raise LmforgeError(f"--weight-decay must be a number >= 0 (typically 0.1; 0: none), got {self.weight_decay}")
        if not 0 <= self.grad_clip <= math.inf:
            raise LmforgeError(f"--grad-clip must be a number >= 0 (the max gradient norm, typically 1.0; 0: off), got {self.grad_clip}")
        if not 0 <= self.seed < 2**63:
            raise LmforgeError(f"--seed must be an integer in [0, 2**63), got {self.seed}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise LmforgeError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise LmforgeError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer_states not in ("memory", "paged"):
            raise LmforgeError(f"--optimizer-states must be memory or paged, got {self.optimizer_states!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise LmforgeError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if not self.out:
            raise LmforgeError("--out must name a folder for the run")
        check_fields(Config, self.model, "[model] / --set (the preset's overrides)", key="model field")
        self.check_model()

    @property
    def sized_by_time(self) -> bool:
        """Whether the time limit alone sets the run's length: the trainer then re-estimates
        the step count from the measured speed as it goes, so the cosine ends on time."""
        return self.max_steps == 0 and self.max_tokens == 0 and self.time_limit > 0

    def warmup_for(self, max_steps: int) -> int:
        """Warm-up steps for a run of `max_steps`: `warmup_steps` when set (never more
        than the run: a warm-up the run never finishes leaves the learning rate below
        --lr throughout), else `warmup_fraction` of the steps."""
        if self.warmup_steps:
            return min(self.warmup_steps, max_steps)
        return round(self.warmup_fraction * max_steps)

    def check_model(self) -> Config:
        """The preset with the run's overrides builds (its vocabulary is the data's later):
        a wrong combination is refused naming the settings it came from."""
        overrides = {**self.model, **({"context_length": self.context_length} if self.context_length else {})}
        try:
            return Config.from_name(self.preset, **overrides)
        except LmforgeError as e:
            where = f"--preset {self.preset}" + (f" with [model] / --set {self.model}" if self.model else "")
            if self.context_length:
                where += f" and --context-length {self.context_length}"
            raise LmforgeError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """The run's settings from a TOML / JSON file's keys (`source` names it in errors):
        unknown keys and values of the wrong type are refused, the `[model]` table's too."""
        cfg = dataclass_from_dict(cls, values, source)
        check_fields(Config, cfg.model, f"{source} [model]", key="model field")
        return cfg


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The keys of a run file, checked later by `TrainConfig.from_dict`: TOML, or the
    `run.json` a run writes (so `--config OUT/run.json --resume` repeats a run)."""
    if str(path) == "":
        raise LmforgeError("--config was given an empty path: name a TOML file (or a run's run.json)")
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, or a FIFO that would block
        raise LmforgeError(f"--config {path} is not a file: name a TOML file (or a run's run.json)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"config file {path} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise LmforgeError(f"cannot read config file {path}: {e.strerror or e}") from None
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
