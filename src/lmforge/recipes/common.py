"""What every recipe shares: the run folder and its `run.json`, rank-0 reporting, and for
fine-tuning the model a run starts from and which of its weights learn.

A run folder belongs to one run: rank 0 locks it for the whole run (`own_run_folder`),
and a folder that already holds something is refused unless --resume continues the run
in it or --overwrite replaces it (only a run folder, never one that holds the run's inputs).

Fine-tuning recipes load the base (any folder `lmforge.load` reads), give it a
classification head when the task has labels, then pick the trainable weights: all of
them, the last N blocks (with the final norm and the head), or LoRA adapters over a
frozen base, optionally held in 4 bits (QLoRA), which is then built in 4 bits as it is read.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.config import Config
from lmforge.data.batches import EXAMPLE_SPLITS, EpochBatches
from lmforge.errors import LmforgeError
from lmforge.finetune.adapter import is_adapter_dir, load_adapter, save_adapter
from lmforge.finetune.lora import LoRAConfig, apply_lora, count_parameters, lora_layers, merge_lora
from lmforge.finetune.nf4 import quantize_model, quantized_summary
from lmforge.io import LOCK_FILE, atomic_write_text, lock_folder, remove_dir
from lmforge.loading import load, load_config, load_quantized, resolve_model_path
from lmforge.model import GPT, on_meta
from lmforge.recipes.config import FinetuneConfig
from lmforge.recipes.replay import open_replay
from lmforge.text import plural
from lmforge.train.checkpoint import RUN_CONFIG, is_run_folder
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import DistInfo, init_distributed, shutdown
from lmforge.train.loop import Batch, LossFn, Trainer, TrainResult, ValMetrics, num_tokens
from lmforge.train.loss import next_token_loss
from lmforge.weights import carry_trunk, with_labels


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
    (kept as it is when the base already classifies into exactly these labels).

    With --quantize nf4 the base is built in 4 bits while it is read (`load_quantized`),
    so the dense base is never whole in memory; the model is, bit for bit, the one the
    dense path below gives once `set_trainable` quantizes it (a fresh head too, and the
    RNG is left where that path leaves it). Two bases still take the dense path: a LoRA
    adapter (its adapters are folded into its dense base first) and --from-scratch
    (random weights: no file to read them from).
    """
    source = resolve_model_path(cfg.base)
    if cfg.quantize == "nf4" and not cfg.from_scratch and not is_adapter_dir(source):
        return _quantized_base(cfg, source, labels)
    model = load(source)
    if lora_layers(model):  # an adapter run: what is fine-tuned is the adapted model, its adapters folded in
        merge_lora(model)
    tokenizer = _tokenizer_of(model, cfg)
    config = model.config
    if labels is not None and config.labels != list(labels):
        config = config.replace(labels=list(labels))
    if cfg.from_scratch or config is not model.config:
        torch.manual_seed(cfg.seed)
        fresh = GPT(config)
        if not cfg.from_scratch:  # keep every pretrained weight; only the new head is random
            carry_trunk(model, fresh)
        model = fresh
    model.tokenizer = tokenizer
    return model


def _tokenizer_of(model: GPT, cfg: FinetuneConfig) -> object:
    if model.tokenizer is None:
        raise LmforgeError(f"{cfg.base} has no tokenizer beside its weights; fine-tuning needs one to read the data")
    return model.tokenizer


def _quantized_base(cfg: FinetuneConfig, source: Path, labels: list[str] | None) -> GPT:
    """`load_base`'s model for a QLoRA run, its blocks in NF4 from the start.

    A new classification head follows the dense path exactly: there a fresh GPT(config)
    is built after seeding (fp32, train mode) and the base's weights copied in, so here
    every weight is cast to the default dtype before it is quantized, and the head is
    drawn as that GPT would draw it (`_drawn_head`).
    """
    relabel = labels is not None and load_config(source).labels != list(labels)
    model = load_quantized(source, dtype=torch.get_default_dtype() if relabel else None)
    tokenizer = _tokenizer_of(model, cfg)
    if relabel:
        torch.manual_seed(cfg.seed)
        head = _drawn_head(model.config.replace(labels=list(labels)))
        model = with_labels(model, labels).train()
        with torch.no_grad():
            model.score.weight.copy_(head)
    model.tokenizer = tokenizer
    return model


def _drawn_head(config: Config) -> torch.Tensor:
    """The classification head `GPT(config)` would draw from the RNG as it stands, leaving the
    RNG where building that model would, without the model: one dense weight at a time.

    GPT(config) draws, in module order: each module's own init as it is constructed
    (`reset_parameters`), then `_init_weights` over the Linear and Embedding layers (the
    head last), then the residual projections again. Each is replayed on a scratch copy
    of its module (on the CPU, as the seeded dense path builds it) and dropped but the
    head. tests/test_nf4_load.py holds this to GPT(config): the head and the RNG after.
    """
    with on_meta():
        blueprint = GPT(config)  # draws nothing: meta tensors take no random numbers
    head = None
    for module in blueprint.modules():
        if hasattr(module, "reset_parameters") and not list(module.children()):  # nn.Linear, nn.Embedding, nn.LayerNorm
            copy.deepcopy(module).to_empty(device="cpu").reset_parameters()
    for module in blueprint.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            drawn = copy.deepcopy(module).to_empty(device="cpu")
            blueprint._init_weights(drawn)
            if module is blueprint.score:
                head = drawn.weight.detach()
    for name, p in blueprint.named_parameters():
        if name.endswith(("attn.o.weight", "mlp.proj.weight", "mlp.down.weight")):
            nn.init.normal_(torch.empty_like(p, device="cpu"), mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))
    return head


def set_trainable(model: GPT, cfg: FinetuneConfig, say: Callable[[str], None] = print) -> TrainableReport:
    """Freeze what should not learn; with --lora-r, swap the targets for LoRA layers
    (after quantizing the base with --quantize nf4). The head that the task trains
    (a classifier's `score`) always learns."""
    heads = ["score"] if model.score is not None else []
    if cfg.quantize == "nf4":
        quantize_model(model)  # nothing left to do for a base `load_base` built in 4 bits
        say(f"base quantized to NF4: {quantized_summary(model)}")
    lora = cfg.lora()
    if lora is not None:
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
            how = f"the last {plural(blocks, 'block')}, the final norm and the head" if blocks else "the final norm and the head"
    trainable, total = count_parameters(model)
    if not trainable:
        raise LmforgeError("nothing to train: every weight is frozen")
    return TrainableReport(trainable, total, how, lora)


def checkpoint_hooks(model: GPT, cfg: FinetuneConfig, report: TrainableReport) -> dict:
    """Trainer arguments that make a LoRA run's checkpoints hold its adapter folder
    (the base stays where it is), loadable with `lmforge.load` like any model."""
    if report.lora is None:
        return {}
    base = resolve_model_path(cfg.base)  # a run folder's newest checkpoint now, not whatever it holds later
    return {
        "write_model": lambda folder: save_adapter(model, folder, base, report.lora, quantize=cfg.quantize or None),
        "read_model": lambda folder: load_adapter(model, folder),
    }


def epoch_steps(cfg: FinetuneConfig, steps_per_epoch: int) -> int:
    """Optimizer steps: --max-steps, else --epochs over the training split."""
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch / cfg.grad_accum))


def example_length(cfg: FinetuneConfig, model: GPT) -> int:
    """Tokens per example: --max-length, never more than the model's context."""
    return min(cfg.max_length or model.config.context_length, model.config.context_length)


def rank_rows(cfg: FinetuneConfig, info: DistInfo) -> slice:
    """This process's rows of a global training batch of batch_size x world_size."""
    return slice(info.rank * cfg.batch_size, (info.rank + 1) * cfg.batch_size)


@contextlib.contextmanager
def distributed_run(cfg: TrainConfig, say: Callable[[str], None]) -> Iterator[tuple[DistInfo, Callable[[str], None]]]:
    """The run's processes (one, or torchrun's) and its reporter, silent off rank 0;
    the process group is shut down however the run ends."""
    cfg.validate()
    info = init_distributed(cfg.device or None)
    try:
        with own_run_folder(cfg, info):
            check_run_folder(cfg, info)  # before the data and the base are read: a refused run costs nothing
            yield info, info.main_only(say)
    finally:
        shutdown(info)


def eval_rows(n: int, limit: int) -> list[int]:
    """Which of a split's `n` examples the before/after measures read: every one when
    `limit` is 0 or covers the split, else `limit` of them spread evenly over it (the
    same ones before and after, whatever the seed). A measure over every example of a
    big training split takes longer than a short run's training itself."""
    if limit <= 0 or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


def describe_sample(counts: dict[str, tuple[int, int]], limit: int, unit: str = "example") -> str:
    """"200 of 935 train examples, 55 val examples, 110 test examples" from {split: (measured,
    of)}, with how to change it when a split is cut."""
    parts = [plural(n, f"{s} {unit}") if k == n else f"{k:,} of {plural(n, f'{s} {unit}')}"
             for s, (k, n) in counts.items()]
    if any(k < n for k, n in counts.values()):
        parts[-1] += f" (at most {limit:,} per split: --eval-examples N changes it, 0 measures every example)"
    return ", ".join(parts)


@dataclass
class SplitsRun:
    """A fine-tuning run measured on every split before and after training."""

    cfg: FinetuneConfig  # as run: max_steps derived from --epochs
    result: TrainResult
    before: dict[str, dict] | None  # None when resumed (the "before" was measured by the first run)
    after: dict[str, dict]
    evaluated: dict[str, int]  # examples of each split the before/after measures read (--eval-examples)
    held_out: dict[str, dict] = dataclasses.field(default_factory=dict)  # "before"/"after": the recipe's own
    # held-out figures (`held_out` hook) and, with --replay, the pretraining loss


def train_on_splits(
    model: GPT,
    cfg: FinetuneConfig,
    report: TrainableReport,
    info: DistInfo,
    data: dict[str, EpochBatches],
    *,
    measure: Callable[[GPT, Iterable[Batch]], dict],
    measures: str,
    summary: Callable[[dict[str, dict]], str],
    eval_batch: int,
    say: Callable[[str], None],
    progress: bool,
    inputs: Callable[[Any], Batch] = lambda b: b,
    loss_fn: LossFn = next_token_loss,
    before_fit: Callable[[], None] | None = None,
    val_metrics: ValMetrics | None = None,
    held_out: Callable[[str], dict] | None = None,
    unit: str = "example",
) -> SplitsRun:
    """What every fine-tuning recipe does around the one `Trainer`: steps from --epochs,
    `measure` on each split of `data` (in batches of `eval_batch` rows) before (unless
    resuming) and after, this rank's rows
    of each global training batch (`inputs` turns a batch into the loss's (x, y)), the run
    folder and `run.json`, and adapter-only checkpoints for a LoRA run.

    The before/after measures read at most --eval-examples of each split (`eval_rows`),
    saying so first (`measures` names what is measured, e.g. "the response loss"), with a
    progress bar per split when `progress`. `val_metrics` is what the trainer's
    validation loss also means (a perplexity), None when it means nothing more.
    `held_out(when)` ("before", "after") measures what a recipe measures beyond the
    splits' loss (responses, KL, rewards); with --replay the pretraining loss joins it."""
    cfg = dataclasses.replace(cfg, max_steps=epoch_steps(cfg, data["train"].steps_per_epoch))
    model.to(info.device)
    rows = {s: eval_rows(len(data[s]), cfg.eval_examples) for s in EXAMPLE_SPLITS}
    sample = describe_sample({s: (len(rows[s]), len(data[s])) for s in EXAMPLE_SPLITS}, cfg.eval_examples, unit)

    mine = rank_rows(cfg, info)
    probe = [num_tokens(_rows(inputs(data["train"].batch(k)), mine)[0]) for k in range(min(8, data["train"].steps_per_epoch))]
    replay = open_replay(cfg, model, info, sum(probe) / len(probe))
    if replay is not None and replay.rows:
        say(f"replay: {plural(replay.rows, 'window')} of {replay.val.context_length} tokens from {cfg.replay} per micro-batch, "
            f"{100 * replay.fraction:g}% of the loss")
    held: dict[str, dict] = {}

    def measure_all(when: str) -> dict[str, dict]:
        say(f"{when} training: measuring {measures} on {sample}")
        out = {}
        for s in EXAMPLE_SPLITS:
            batches = tqdm(data[s].iter_eval(eval_batch, rows[s]), total=math.ceil(len(rows[s]) / eval_batch),
                           desc=f"{when}: {s}", unit="batch", leave=False, disable=not (progress and info.is_main))
            out[s] = measure(model, map(inputs, batches))
        held[when] = held_out(when) if held_out is not None else {}
        if replay is not None:
            held[when]["pretraining_loss"] = replay.pretraining_loss(model)
        return out

    before = None if cfg.resume else measure_all("before")
    if before:
        say("before: " + summary(before))

    def batch(draw: int, micro: int) -> Batch:
        step = draw * cfg.grad_accum + micro
        b = _rows(inputs(data["train"].batch(step)), mine)
        return replay.add(b, step) if replay is not None else b

    def eval_batches() -> Iterable[Batch]:
        return map(inputs, itertools.islice(data["val"].iter_eval(eval_batch), cfg.eval_batches or None))

    loss_fn = replay.loss(loss_fn) if replay is not None else loss_fn
    trainer = Trainer(model, cfg, batch=batch, eval_batches=eval_batches, info=info, tokenizer=model.tokenizer, loss_fn=loss_fn,
                      say=say, progress=progress, val_metrics=val_metrics, **checkpoint_hooks(model, cfg, report))
    start_run(cfg, info, say)
    if before_fit is not None and info.is_main:
        before_fit()
    result = trainer.fit()
    after = measure_all("after")
    say("after:  " + summary(after))
    return SplitsRun(cfg, result, before, after, {s: len(rows[s]) for s in EXAMPLE_SPLITS}, held)


def _rows(batch: Any, rows: slice) -> Any:
    """`rows` of every tensor in a batch (a tensor, or tuples and dicts of them)."""
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    if isinstance(batch, dict):
        return {k: _rows(v, rows) for k, v in batch.items()}
    return tuple(_rows(v, rows) for v in batch)


def write_metrics(cfg: TrainConfig, info: DistInfo, metrics: dict) -> Path:
    """`metrics.json` in the run folder (rank 0 writes it)."""
    path = Path(cfg.out) / "metrics.json"
    if info.is_main:
        atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return path


def start_run(cfg: TrainConfig, info: DistInfo, say: Callable[[str], None] = print) -> None:
    """The run folder with its `run.json` (the whole config, to repeat or --resume the run):
    checked first (`check_run_folder`); with --overwrite, the run that was there is removed,
    saying what goes. Rank 0 writes; the others do nothing."""
    if not info.is_main:
        return
    out = Path(cfg.out)
    old = check_run_folder(cfg, info)
    if old:
        say(f"--overwrite: removing the run in {out}: {_names(old)}")
        for path in old:
            remove_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    # --overwrite is a one-off: `--config OUT/run.json --resume` must continue this run, not remove it
    atomic_write_text(out / RUN_CONFIG, json.dumps(dataclasses.replace(cfg, overwrite=False).to_dict(), indent=2) + "\n")


RUN_FOLDER_IN_USE = "wait for it to finish (or stop it) before writing there, or choose another --out"


@contextlib.contextmanager
def own_run_folder(cfg: TrainConfig, info: DistInfo) -> Iterator[None]:
    """Rank 0 locks the run folder (`cfg.out`, made if missing) for the block: a second
    writer is refused with this one's pid. Other ranks do not write and take no lock.
    A run refused before it wrote anything leaves no folder behind (`lock_folder`)."""
    if not info.is_main:
        yield
        return
    with lock_folder(cfg.out, what="run folder", fix=RUN_FOLDER_IN_USE):
        yield


def folder_entries(path: str | Path) -> list[Path]:
    """What a folder holds besides its lock file; [] when it is missing."""
    try:
        return sorted(p for p in Path(path).iterdir() if p.name != LOCK_FILE)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise LmforgeError(f"--out {path} is a file, not a folder; choose another --out") from None


def inside(folder: str | Path, path: str | Path) -> bool:
    """Whether `path` is `folder` or lies under it (links resolved)."""
    folder, path = Path(folder).resolve(), Path(path).resolve()
    return path == folder or folder in path.parents


def run_inputs(cfg: TrainConfig) -> dict[str, str]:
    """The paths a run reads, by flag: --data, a fine-tuning run's --base, a --resume folder,
    and the alignment recipes' --replay, --reward and --prompts."""
    inputs = {"--data": cfg.data, "--base": getattr(cfg, "base", ""), "--resume": "" if cfg.resume == "latest" else cfg.resume,
              "--replay": getattr(cfg, "replay", ""), "--reward": getattr(cfg, "reward", ""), "--prompts": getattr(cfg, "prompts", "")}
    return {flag: path for flag, path in inputs.items() if path}


def check_run_folder(cfg: TrainConfig, info: DistInfo) -> list[Path]:
    """Refuse a run into `cfg.out` that would mix with or lose what is there; on rank 0,
    before anything is written. An empty or missing folder is free; --resume continues the
    run in a run folder; --overwrite replaces a run folder, unless the run reads from it.
    Returns what --overwrite will remove ([] for nothing)."""
    if not info.is_main:
        return []
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise LmforgeError(f"--resume continues the run in {out} and --overwrite replaces it: pass one of them")
    entries = folder_entries(out)
    if not entries:
        return []
    if not is_run_folder(out):
        raise LmforgeError(f"--out {out} is not empty and holds no run (no run.json or checkpoints/; it holds {_names(entries)}); "
                           "a run folder holds one run only: choose another --out")
    if cfg.resume:
        return []
    if not cfg.overwrite:
        raise LmforgeError(f"--out {out} already holds a run ({_names(entries)}): pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --out")
    for flag, path in run_inputs(cfg).items():
        if inside(out, path):
            raise LmforgeError(f"--overwrite would remove {flag} {path}, which this run reads from {out}: choose another --out")
    return entries


def _names(paths: list[Path], limit: int = 8) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
