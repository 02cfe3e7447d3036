"""The one training loop: accumulation, clipping, evaluation, checkpoints, resume.

Recipes (pretraining here, fine-tuning and alignment later) give it a model, a loss
function and a `batch(step, micro)` function; everything else lives here once.

Exact resume rests on three choices: a batch is a function of (draw, micro-step),
where the data cursor `draw` counts every attempted step (a skipped non-finite step
moves on to fresh batches); the learning rate is a function of the step; and the
random state dropout draws from is reseeded from (seed, rank, draw) at every step. A
checkpoint then needs only the weights, the AdamW moments and the two counters, and a
run resumed at step k computes bit for bit what the uninterrupted run computed (on
CPU, same thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from lmforge.config import Config
from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.train.checkpoint import (
    CHECKPOINTS,
    capture_rng,
    find_resumable,
    list_checkpoints,
    read_checkpoint,
    read_checkpoint_state,
    restore_rng,
    save_checkpoint,
)
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import DistInfo, all_reduce_mean, barrier, full_state, load_full_state, no_sync, unwrap, wrap_model
from lmforge.train.loss import next_token_loss
from lmforge.train.metrics import LOSS_PLOT, METRICS, MetricsLog, read_metrics
from lmforge.train.optim import build_optimizer, lr_at

PAGED_STATES = "optimizer-states"  # --optimizer-states paged: the moments' memory-mapped scratch files (removed at the end)

# (inputs, targets): inputs are the ids (B, T) or a dict of tensors with "input_ids"
# (e.g. with an "attention_mask"); the loss function knows what its batches hold
Batch = tuple[Any, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor]
# what a validation loss also means for a recipe, by name (e.g. {"ppl": ..., "bpb": ...})
ValMetrics = Callable[[float], dict[str, float]]


class Stateful(Protocol):
    """What a recipe keeps across steps beyond the weights (PPO's adaptive KL coefficient,
    its running reward statistics): saved as JSON in every checkpoint, restored on resume."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

METRIC_NAMES = {"ppl": "perplexity", "bpb": "bits per byte"}
PROGRESS_EVERY = 30.0  # seconds between progress lines when there is no progress bar (logs, CI, nohup)


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last one written
    val_loss: float | None
    stopped: str  # "done", "time limit", "interrupted" (Ctrl-C, SIGINT), "terminated" (SIGTERM)
    skipped_steps: int
    metrics: Path
    plot: Path | None
    samples: list[str] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)  # what the last validation loss also means (`ValMetrics`)


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device computes in bf16 natively; fp32 elsewhere.

    `auto` chooses bf16 only on CUDA GPUs that support it: CPUs without bf16
    instructions run bf16 matmuls 10-150x slower than fp32, so a CPU stays in fp32
    unless asked (`dtype = "bf16"`).
    """
    if dtype == "fp32" or (dtype == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return None
    return torch.bfloat16


def to_device(obj: Any, device: torch.device) -> Any:
    """A batch's tensors on `device`: a tensor, or tuples, lists and dicts of them."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def num_tokens(x: Any) -> int:
    """Tokens in a batch's input: the ids tensor, or in a dict its "input_ids", the
    "task" batch inside it and the "replay_ids" beside that (`recipes.common.Replay`)."""
    if isinstance(x, dict):
        return sum(num_tokens(v) for k, v in x.items() if k in ("input_ids", "task", "replay_ids"))
    return int(x.numel())


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class _StopOnSignal:
    """Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary and write a
    checkpoint; a second Ctrl-C interrupts at once. `reason` says which one asked:
    "interrupted" (SIGINT) or "terminated" (SIGTERM)."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = "interrupted"
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.reason = "terminated" if signum == signal.SIGTERM else "interrupted"

    def __enter__(self) -> _StopOnSignal:
        with contextlib.suppress(ValueError):  # not the main thread: no handler, no graceful stop
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs `cfg.max_steps` optimizer steps of `loss_fn` over `batch(draw, micro)`."""

    def __init__(
        self,
        model: GPT,
        cfg: TrainConfig,
        *,
        batch: Callable[[int, int], Batch],
        eval_batches: Callable[[], Iterable[Batch]] | None,
        info: DistInfo,
        tokenizer: object | None = None,
        loss_fn: LossFn = next_token_loss,
        say: Callable[[str], None] = print,
        progress: bool = True,
        write_model: Callable[[Path], object] | None = None,
        read_model: Callable[[Path], object] | None = None,
        val_metrics: ValMetrics | None = None,
        fit_to_time: bool = False,
        extra_state: Stateful | None = None,
        log_extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """`write_model(folder)` / `read_model(folder)` replace the full weights in each
        checkpoint's model folder: a run that trains adapters over a frozen base saves
        and restores only those (`lmforge.finetune`). `val_metrics(loss)` names what a
        validation loss also means (perplexity, bits per byte), logged and printed beside it.

        `fit_to_time`: `cfg.max_steps` is only a first estimate and `cfg.time_limit` the
        run's length; the step count is re-estimated from the measured pace as the run
        goes (`_fit_to_time`), so the cosine ends on time however loaded the machine is.
        Such a run's schedule depends on its speed, so it is not bit-reproducible; a
        resumed one finishes the steps its checkpoint planned.

        `extra_state` is the recipe's own state, checkpointed and restored with the
        trainer's; `log_extra()` adds the recipe's figures to each training record of
        metrics.jsonl."""
        cfg.validate()
        if (write_model is None) != (read_model is None):
            raise LmforgeError("give the trainer both write_model and read_model, or neither")
        if write_model is not None and info.enabled and cfg.strategy == "fsdp":
            raise LmforgeError("adapter runs (LoRA, QLoRA) train on one process or under DDP: use --strategy ddp")
        self.write_model, self.read_model = write_model, read_model
        if cfg.max_steps <= 0:
            raise LmforgeError("the trainer needs cfg.max_steps; the recipe derives it from --max-tokens")
        self.cfg, self.info, self.tokenizer = cfg, info, tokenizer
        self.batch, self.eval_batches, self.loss_fn, self.val_metrics = batch, eval_batches, loss_fn, val_metrics
        self.max_steps, self.fit_to_time = cfg.max_steps, fit_to_time
        self.extra_state, self.log_extra = extra_state, log_extra
        self._warmup_warned = False
        self.say = info.main_only(say)
        self.progress = progress and info.is_main
        self.out = Path(cfg.out)
        self.device = info.device
        model.to(self.device)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.model = model
        self.wrapped = wrap_model(model, info, cfg.strategy)
        if info.enabled and cfg.strategy == "fsdp" and (cfg.optimizer != "adamw" or cfg.optimizer_states != "memory"):
            raise LmforgeError("--optimizer adamw8bit and --optimizer-states paged step whole tensors: run them on one process "
                               "or under --strategy ddp, not fsdp (whose shards they do not know)")
        paged = None
        if cfg.optimizer_states == "paged":  # each process pages its own moments
            paged = self.out / (PAGED_STATES if info.world_size == 1 else f"{PAGED_STATES}-rank{info.rank}")
        self.optimizer = build_optimizer(self.wrapped, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.optimizer, paged)
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.amp = autocast_dtype(cfg.dtype, self.device)
        self.step = 0
        self.draws = 0  # the data cursor: steps attempted, skipped ones included
        self.skipped = 0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.last_val: tuple[int, float] | None = None
        self.samples: list[str] = []
        self.last_val_metrics: dict[str, float] = {}
        self._eval_seconds = 0.0  # how long the last evaluation (with samples) took: the end's reserve
        if fit_to_time and info.enabled:  # every rank plans rank 0's estimate
            self.max_steps = _from_rank0(self.max_steps, self.device)
        self._warn_long_warmup()
        # --resume is checked now, before the recipe writes anything: a checkpoint of another
        # model or tokenizer is refused while the run folder is still as it was
        self._resume_from = self.check_resumable(cfg.resume) if cfg.resume else None

    # --- state --------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        state = {"step": self.step, "draws": self.draws, "skipped_steps": self.skipped, "tokens_seen": self.tokens_seen,
                 "max_steps": self.max_steps, "config": self.cfg.to_dict()}
        if self.extra_state is not None:
            state["extra"] = self.extra_state.state_dict()
        fingerprint = getattr(self.tokenizer, "fingerprint", None)
        if isinstance(fingerprint, str):  # what a resume checks its data against
            state["tokenizer"] = {"name": getattr(self.tokenizer, "name", ""), "fingerprint": fingerprint}
        return state

    def save(self) -> Path | None:
        """Checkpoint after `self.step` steps: every rank gathers, rank 0 writes. A save
        that fails (a full disk) stops every rank with rank 0's error."""
        model_state, optim_state = full_state(self.wrapped, self.optimizer, self.info)
        path, error = None, None
        if self.info.is_main:
            val = self.last_val[1] if self.last_val and self.last_val[0] == self.step else None
            try:
                path = save_checkpoint(
                    self.out, self.step, config=self.model.config, model_state=model_state, optimizer_state=optim_state,
                    trainer_state=self._trainer_state(), rng=capture_rng(), tokenizer=self.tokenizer, val_loss=val,
                    keep_last=self.cfg.keep_last, write_model=self.write_model,
                )
            except LmforgeError as e:
                error = e
            else:
                self.last_checkpoint = path
        if self._agree(error is not None):
            raise error or LmforgeError(f"the main process could not save the checkpoint of step {self.step} (its error says why)")
        barrier(self.info)
        return path

    def resume(self, where: str) -> None:
        """Load a checkpoint: "latest" is the newest intact one in the run folder. It must
        have been trained with this model and this tokenizer (`check_resumable`)."""
        self._load(self.check_resumable(where))

    def check_resumable(self, where: str) -> Path:
        """The checkpoint `--resume where` names, checked without loading it: it exists
        and is intact, and the run that wrote it trained the model this trainer holds
        (same model settings, same model config) with the same tokenizer."""
        if where == "latest":
            folder, given = self.out, "--resume"
        else:
            folder, given = Path(where), f"--resume {where}"
        path = find_resumable(folder, say=self.say) if folder.exists() or where != "latest" else None
        if path is None:
            searched = folder / CHECKPOINTS if folder.name != CHECKPOINTS else folder
            found = list_checkpoints(folder)
            if found:
                what = f"no intact checkpoint in {searched} (all {len(found)} are damaged, see above)"
            else:
                what = f"no checkpoint in {searched}"
            fix = ("start without --resume" if where == "latest"
                   else f"give a run folder with {CHECKPOINTS}/step-NNNNNNNN in it, or one of those folders")
            raise LmforgeError(f"{given}: {what}; {fix}")
        state, config = read_checkpoint_state(path)
        self._check_same_tokenizer(path, state)  # first: other data usually means another vocabulary too
        self._check_same_model(path, state, config)
        return path

    def _check_same_model(self, path: Path, state: dict, config: Config | None) -> None:
        changes = []
        old = state.get("config")
        if isinstance(old, dict):
            new = self.cfg.to_dict()
            for name in getattr(type(self.cfg), "model_settings", ()):
                if name in old and name in new and _plain(old[name]) != _plain(new[name]):
                    changes.append(f"{_setting(name)} {_show(old[name])} -> {_show(new[name])}")
        if config is not None:
            a, b = config.to_dict(), self.model.config.to_dict()
            differ = [k for k in b if k != "name" and _plain(a.get(k)) != _plain(b.get(k))]
            if differ:
                shown = ", ".join(f"{k} {_show(a.get(k))} -> {_show(b.get(k))}" for k in differ[:8])
                changes.append(f"the model: {shown}{', ...' if len(differ) > 8 else ''}")
        if changes:
            raise LmforgeError(
                f"--resume: {path} was trained with other model settings than this run's ({'; '.join(changes)}); "
                "a checkpoint continues only the model it holds. Resume with the settings it was trained with, "
                "or train this model as a new run (another --out, without --resume)"
            )

    def _check_same_tokenizer(self, path: Path, state: dict) -> None:
        old = state.get("tokenizer")
        new = getattr(self.tokenizer, "fingerprint", None)
        if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), str) or not isinstance(new, str):
            return  # a checkpoint from before fingerprints were recorded, or no tokenizer: nothing to compare
        if old["fingerprint"] != new:
            raise LmforgeError(
                f"--resume: {path} was trained with tokenizer {old.get('name', '')!r} (fingerprint {old['fingerprint'][:12]}), "
                f"this data was made with tokenizer {getattr(self.tokenizer, 'name', '')!r} (fingerprint {new[:12]}): "
                "the same ids stand for other text. Resume with the data the run was trained on, "
                "or start a new run (another --out, without --resume)"
            )

    def _load(self, path: Path) -> None:
        ckpt = read_checkpoint(path, verify=False)  # `check_resumable` verified it
        model_state = ckpt.model_state
        if self.read_model is not None:
            self.read_model(path / "model")
            model_state = None  # the weights are in place: restore the optimizer only
        elif not model_state:
            raise LmforgeError(f"{path} holds adapters, not a whole model: resume it with the recipe that trained them")
        load_full_state(self.wrapped, self.optimizer, model_state, ckpt.optimizer_state, self.info)
        if ckpt.rng is not None:  # the loop reseeds torch each step; this restores Python's and NumPy's too
            restore_rng(ckpt.rng)
        self.step = int(ckpt.trainer_state["step"])
        self.draws = int(ckpt.trainer_state.get("draws", self.step))
        self.skipped = int(ckpt.trainer_state.get("skipped_steps", 0))
        self.tokens_seen = int(ckpt.trainer_state.get("tokens_seen", 0))
        if self.extra_state is not None:
            if "extra" not in ckpt.trainer_state:
                raise LmforgeError(f"{path} holds no state of this recipe (another kind of run wrote it); resume a run of this recipe")
            self.extra_state.load_state_dict(ckpt.trainer_state["extra"])
        self.last_checkpoint = path
        if ckpt.val_loss is not None:
            self.last_val = (self.step, float(ckpt.val_loss))
        self.say(f"resumed from {path} at step {self.step}")
        self._continue_schedule(ckpt.trainer_state)

    def _continue_schedule(self, state: dict) -> None:
        """Say how the learning-rate schedule goes on after a resume. A run sized by time
        finishes the steps its checkpoint planned; a run given other schedule settings
        than the checkpoint's (a longer --max-steps to train on) continues on the new
        schedule, and the jump in the learning rate is said, never silent."""
        planned = state.get("max_steps", (state.get("config") or {}).get("max_steps"))
        if self.fit_to_time:
            if isinstance(planned, int) and planned > 0:
                self.max_steps, self.fit_to_time = planned, False
                self.say(f"the run was sized by its time limit: it finishes the {planned:,} steps it planned")
            return
        old = state.get("config") or {}
        old_cfg = dataclasses.replace(self.cfg, **{k: old[k] for k in _SCHEDULE if k in old})
        if isinstance(planned, int) and planned > 0:
            old_cfg.max_steps = planned
        changes = [f"{_setting(k)} {_show(getattr(old_cfg, k))} -> {_show(getattr(self.cfg, k))}"
                   for k in _SCHEDULE if getattr(old_cfg, k) != getattr(self.cfg, k)]
        if not changes or self.step >= self.max_steps:
            return
        before = lr_at(self.step, **_schedule(old_cfg, old_cfg.max_steps))
        after = lr_at(self.step, **_schedule(self.cfg, self.max_steps))
        self.say(f"note: the schedule differs from the checkpoint's ({', '.join(changes)}): from step {self.step} the "
                 f"learning rate follows the new one ({before:.3g} -> {after:.3g} at this step)")

    def _warn_long_warmup(self) -> None:
        """A configured warm-up longer than the run never lets the learning rate reach
        --lr: it is capped to the run (`TrainConfig.warmup_for`) and said once."""
        if self._warmup_warned or not self.cfg.warmup_steps or self.cfg.warmup_steps <= self.max_steps:
            return
        self._warmup_warned = True
        self.say(f"warning: --warmup-steps {self.cfg.warmup_steps} is longer than the run's {self.max_steps:,} steps; the "
                 f"warm-up is cut to {self.max_steps:,} steps so the learning rate reaches --lr (pass a smaller "
                 "--warmup-steps, or 0 to warm up over --warmup-fraction of the steps)")

    # --- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """The mean loss over the evaluation batches; None when there are none (no
        evaluation set, or zero batches): an evaluation of nothing is no loss, never 0."""
        if self.eval_batches is None:
            return None
        self.wrapped.eval()
        total, n = torch.zeros((), device=self.device), 0
        try:
            for x, y in self.eval_batches():
                x, y = to_device((x, y), self.device)
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    total += self.loss_fn(self.wrapped, x, y).float()
                n += 1
        finally:
            self.wrapped.train()
        if not self._agree(n > 0):
            return None
        loss = float(all_reduce_mean(total / max(n, 1), self.info))
        self.last_val = (self.step, loss)
        return loss

    def sample(self) -> list[str]:
        """Continuations of the fixed prompts (seeded, so comparable across evaluations).
        Every rank runs them: under FSDP each forward needs all ranks."""
        if self.tokenizer is None or not self.cfg.sample_prompts or self.cfg.sample_tokens <= 0:
            return []
        engine = Engine(unwrap(self.wrapped), self.tokenizer, packed=False)
        params = SamplingParams(temperature=0.8, top_k=50)
        out = engine.generate(list(self.cfg.sample_prompts), max_new_tokens=self.cfg.sample_tokens, sampling=params, seed=self.cfg.seed)
        self.wrapped.train()
        return [p + c.text for p, c in zip(self.cfg.sample_prompts, out)]

    # --- the loop -----------------------------------------------------------------
    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, draw = self.cfg, self.draws
        self.draws += 1
        torch.manual_seed(step_seed(cfg.seed, self.info.rank, draw))
        lr = lr_at(self.step, **_schedule(cfg, self.max_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = to_device(self.batch(draw, micro), self.device)
            with no_sync(self.wrapped, micro < cfg.grad_accum - 1), torch.autocast(
                self.device.type, dtype=self.amp, enabled=self.amp is not None
            ):
                loss = self.loss_fn(self.forward, x, y) / cfg.grad_accum
            loss.backward()
            total += loss.detach().float()
            self.tokens_seen += num_tokens(x) * self.info.world_size
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        return total, grad_norm

    def fit(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        if self._resume_from is not None:
            self._load(self._resume_from)
            if self.step >= self.max_steps:  # nothing to train: no evaluation, no record, no checkpoint
                self.say(f"the run is complete: {self.last_checkpoint} is step {self.step:,} of {self.max_steps:,}; "
                         "to train on, resume with a larger --max-steps")
                plot = self.out / LOSS_PLOT if info.is_main and (self.out / LOSS_PLOT).is_file() else None
                return TrainResult(self.step, self.last_checkpoint, self.last_val[1] if self.last_val else None, "done",
                                   self.skipped, self.out / METRICS, plot, [], self._logged_val_metrics())
        log = MetricsLog(self.out, enabled=info.is_main, resume_step=self.step if cfg.resume else None)
        try:
            stopped = self._run(log)
            plot = log.plot()
        finally:
            log.close()
            if getattr(self.optimizer, "store", None) is not None:  # paged moments: scratch files, the checkpoints hold them
                self.optimizer.store.close()
        return TrainResult(self.step, self.last_checkpoint, self.last_val[1] if self.last_val else None, stopped,
                           self.skipped, log.path, plot, self.samples, self.last_val_metrics)

    def _run(self, log: MetricsLog) -> str:
        """The steps, evaluations and checkpoints up to max_steps (or a stop); how it ended."""
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.wrapped.train()
        start_time = time.monotonic()
        bad_in_a_row, stopped = 0, "done"
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        window_tokens, window_start = 0, time.monotonic()
        pace = _Pace(self.step)
        next_line = start_time + PROGRESS_EVERY
        with _StopOnSignal() as stop, contextlib.closing(bar):
            while self.step < self.max_steps:
                if self._agree(stop.requested):
                    stopped = stop.reason
                    break
                # (a run fitted to its time limit ends by its step count, which `_fit_to_time` keeps on time)
                if cfg.time_limit and not self.fit_to_time and self._agree(time.monotonic() - start_time >= cfg.time_limit):
                    stopped = "time limit"
                    break
                seen_before = self.tokens_seen
                loss, grad_norm = self._train_step()
                window_tokens += self.tokens_seen - seen_before
                if not torch.isfinite(grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.skipped += 1
                    bad_in_a_row += 1
                    log.write({"step": self.step, "split": "skipped", "loss": _finite_or_none(loss), "grad_norm": None})
                    self.say(f"step {self.step}: non-finite loss or gradient, step skipped ({bad_in_a_row} in a row)")
                    if bad_in_a_row >= cfg.max_bad_steps:
                        where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
                        raise LmforgeError(
                            f"{bad_in_a_row} steps in a row had a non-finite loss or gradient norm (at step {self.step}, "
                            f"loss {float(loss)}){where}. Lower --lr, raise --warmup-steps or keep --grad-clip on, "
                            "then --resume"
                        )
                    continue  # the same step again, with the next batches
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                bad_in_a_row = 0
                self.step += 1
                bar.update(1)
                pace.record(self.step)
                if self.fit_to_time:
                    self._fit_to_time(pace, start_time, bar)
                if self.step % max(cfg.log_every, 1) == 0 or self.step == self.max_steps:
                    mean_loss = float(all_reduce_mean(loss, info))
                    elapsed = time.monotonic() - window_start
                    rate = window_tokens / elapsed if elapsed > 0 else 0.0
                    window_tokens, window_start = 0, time.monotonic()
                    record = {"step": self.step, "split": "train", "loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"],
                              "grad_norm": float(grad_norm), "tokens": self.tokens_seen, "tokens_per_s": rate}
                    if self.log_extra is not None:
                        record.update(self.log_extra())
                    log.write(record)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{rate:,.0f}")
                if not self.progress and info.is_main and time.monotonic() >= next_line:
                    next_line = time.monotonic() + PROGRESS_EVERY
                    self.say(self._progress_line(float(loss), pace, start_time))
                evaluate_now = cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.max_steps
                if evaluate_now:
                    self._evaluate_and_log(log, bar)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.max_steps:
                    self.save()
            bar.close()
            # a run a signal stopped only saves: the user (or the scheduler) is waiting
            if stopped not in ("interrupted", "terminated") and (self.last_val is None or self.last_val[0] != self.step):
                self._evaluate_and_log(log, None)
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}"):
                self.save()
        return stopped

    def _fit_to_time(self, pace: _Pace, start_time: float, bar: tqdm) -> None:
        """Re-estimate the step count so the run, its last evaluation and checkpoint end at
        the time limit: the steps left are the time left over the recent pace (which
        includes the periodic evaluations and saves). Every rank takes rank 0's estimate."""
        per_step = pace.seconds_per_step()
        if per_step is None:
            return
        left = self.cfg.time_limit - (time.monotonic() - start_time) - self._eval_reserve(per_step)
        estimate = self.step + max(0, int(left / per_step))
        if self.info.enabled:
            estimate = _from_rank0(estimate, self.device)
        if estimate != self.max_steps:
            self.max_steps = estimate
            bar.total = estimate
            bar.refresh()
            self._warn_long_warmup()

    def _eval_reserve(self, per_step: float) -> float:
        """Seconds to keep for the final evaluation: what the last one took, or before the
        first, its forward passes at a third of a training micro-batch's time each."""
        if self._eval_seconds or self.eval_batches is None:
            return self._eval_seconds
        return self.cfg.eval_batches * per_step / (3 * self.cfg.grad_accum)

    def _progress_line(self, loss: float, pace: _Pace, start_time: float) -> str:
        """One line of what a progress bar shows (this step's loss on this process, the
        recent pace), for output that is not a terminal."""
        elapsed = time.monotonic() - start_time
        per_step = pace.seconds_per_step()
        if per_step is None:
            pace_and_eta = ""
        else:
            tokens_per_step = self.tokens_seen / max(self.draws, 1)
            pace_and_eta = (f", {tokens_per_step / per_step:,.0f} tokens/s, "
                            f"about {_duration((self.max_steps - self.step) * per_step)} left")
        return (f"step {self.step:,}/{self.max_steps:,} ({100 * self.step / max(self.max_steps, 1):.0f}%), loss {loss:.3f}"
                f"{pace_and_eta}, {_duration(elapsed)} in")

    def _evaluate_and_log(self, log: MetricsLog, bar: tqdm | None) -> None:
        started = time.monotonic()
        val = self.evaluate()
        if val is None:
            return
        extra = self.val_metrics(val) if self.val_metrics is not None else {}
        self.last_val_metrics = extra
        log.write({"step": self.step, "split": "val", "loss": val, **extra, "tokens": self.tokens_seen})
        self.samples = self.sample()
        for prompt, text in zip(self.cfg.sample_prompts, self.samples):
            log.write({"step": self.step, "split": "sample", "prompt": prompt, "text": text})
        shown = "".join(f", {METRIC_NAMES.get(k, k)} {v:.4g}" for k, v in extra.items())
        message = f"step {self.step}: val loss {val:.4f}{shown}"
        (bar.write if bar is not None and self.progress else self.say)(message)
        log.plot()
        self._eval_seconds = time.monotonic() - started

    def _logged_val_metrics(self) -> dict[str, float]:
        """The validation metrics metrics.jsonl holds for this step (a finished run, resumed)."""
        if not self.info.is_main or not (self.out / METRICS).is_file():
            return {}
        found = [r for r in read_metrics(self.out / METRICS) if r.get("split") == "val" and r.get("step") == self.step]
        return {k: v for k, v in found[-1].items() if k in METRIC_NAMES} if found else {}

    def _agree(self, flag: bool) -> bool:
        """Whether any rank says so: every rank must stop at the same step."""
        if not self.info.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


class _Pace:
    """Seconds per optimizer step over the recent third of the session's steps (at least
    the last 5): recent enough to follow a machine that slows down, long enough to
    include the periodic evaluations and saves. The first step (allocation, warm-up)
    is left out."""

    def __init__(self, step: int) -> None:
        self.marks: list[tuple[int, float]] = []
        self.first = step + 1

    def record(self, step: int) -> None:
        if step >= self.first:
            self.marks.append((step, time.monotonic()))

    def seconds_per_step(self) -> float | None:
        if len(self.marks) < 3:
            return None
        start = max(0, min(len(self.marks) - 6, len(self.marks) * 2 // 3))
        (s0, t0), (s1, t1) = self.marks[start], self.marks[-1]
        return (t1 - t0) / (s1 - s0)


_SCHEDULE = ("max_steps", "lr", "min_lr", "warmup_steps", "warmup_fraction")  # what sets the learning rate of a step


def _schedule(cfg: TrainConfig, max_steps: int) -> dict[str, Any]:
    """`lr_at`'s settings for a run of `max_steps`."""
    return {"lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_for(max_steps), "max_steps": max_steps}


def _from_rank0(value: int, device: torch.device) -> int:
    t = torch.tensor([float(value)], device=device)
    torch.distributed.broadcast(t, src=0)
    return int(t.item())


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _finite_or_none(t: torch.Tensor) -> float | None:
    value = float(t)
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    """A setting as its JSON round trip gives it (tuples become lists), for comparing a
    run's settings with those a checkpoint recorded."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return value


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _setting(name: str) -> str:
    """How a user gives a run setting: its flag (= its TOML key), the `[model]` table for `model`."""
    return "[model] / --set" if name == "model" else "--" + name.replace("_", "-")
