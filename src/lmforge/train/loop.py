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
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.train.checkpoint import capture_rng, find_resumable, read_checkpoint, restore_rng, save_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import DistInfo, all_reduce_mean, barrier, full_state, load_full_state, no_sync, unwrap, wrap_model
from lmforge.train.loss import next_token_loss
from lmforge.train.metrics import MetricsLog
from lmforge.train.optim import build_optimizer, lr_at

# (inputs, targets): inputs are the ids (B, T) or a dict of tensors with "input_ids"
# (e.g. with an "attention_mask"); the loss function knows what its batches hold
Batch = tuple[Any, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last one written
    val_loss: float | None
    stopped: str  # "done", "time limit", "interrupted"
    skipped_steps: int
    metrics: Path
    plot: Path | None
    samples: list[str] = field(default_factory=list)


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
    """Tokens in a batch's input: the ids tensor, or the "input_ids" of a dict."""
    if isinstance(x, dict):
        x = x["input_ids"]
    return int(x.numel())


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class _StopOnSignal:
    """Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary and write a
    checkpoint; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

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
    ) -> None:
        """`write_model(folder)` / `read_model(folder)` replace the full weights in each
        checkpoint's model folder: a run that trains adapters over a frozen base saves
        and restores only those (`lmforge.finetune`)."""
        cfg.validate()
        if (write_model is None) != (read_model is None):
            raise LmforgeError("give the trainer both write_model and read_model, or neither")
        if write_model is not None and info.enabled and cfg.strategy == "fsdp":
            raise LmforgeError("adapter runs (LoRA, QLoRA) train on one process or under DDP: use --strategy ddp")
        self.write_model, self.read_model = write_model, read_model
        if cfg.max_steps <= 0:
            raise LmforgeError("the trainer needs cfg.max_steps; the recipe derives it from --max-tokens")
        self.cfg, self.info, self.tokenizer = cfg, info, tokenizer
        self.batch, self.eval_batches, self.loss_fn = batch, eval_batches, loss_fn
        self.say = info.main_only(say)
        self.progress = progress and info.is_main
        self.out = Path(cfg.out)
        self.device = info.device
        model.to(self.device)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.model = model
        self.wrapped = wrap_model(model, info, cfg.strategy)
        self.optimizer = build_optimizer(self.wrapped, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.amp = autocast_dtype(cfg.dtype, self.device)
        self.step = 0
        self.draws = 0  # the data cursor: steps attempted, skipped ones included
        self.skipped = 0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.last_val: tuple[int, float] | None = None
        self.samples: list[str] = []

    # --- state --------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"step": self.step, "draws": self.draws, "skipped_steps": self.skipped, "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict()}

    def save(self) -> Path | None:
        """Checkpoint after `self.step` steps: every rank gathers, rank 0 writes."""
        model_state, optim_state = full_state(self.wrapped, self.optimizer, self.info)
        path = None
        if self.info.is_main:
            val = self.last_val[1] if self.last_val and self.last_val[0] == self.step else None
            path = save_checkpoint(
                self.out, self.step, config=self.model.config, model_state=model_state, optimizer_state=optim_state,
                trainer_state=self._trainer_state(), rng=capture_rng(), tokenizer=self.tokenizer, val_loss=val,
                keep_last=self.cfg.keep_last, write_model=self.write_model,
            )
            self.last_checkpoint = path
        barrier(self.info)
        return path

    def resume(self, where: str) -> None:
        """Load a checkpoint: "latest" is the newest intact one in the run folder."""
        path = find_resumable(self.out if where == "latest" else Path(where), say=self.say)
        if path is None:
            raise LmforgeError(f"--resume: no checkpoint in {self.out / 'checkpoints'}; start without --resume")
        ckpt = read_checkpoint(path)
        if ckpt.trainer_state.get("config", {}).get("preset") not in (None, self.cfg.preset):
            self.say(f"note: {path} was trained with preset {ckpt.trainer_state['config']['preset']!r}")
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
        self.last_checkpoint = path
        self.say(f"resumed from {path} at step {self.step}")

    # --- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.eval_batches is None:
            return None
        self.wrapped.eval()
        total, n = torch.zeros((), device=self.device), 0
        for x, y in self.eval_batches():
            x, y = to_device((x, y), self.device)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                total += self.loss_fn(self.wrapped, x, y).float()
            n += 1
        self.wrapped.train()
        loss = float(all_reduce_mean(total / max(n, 1), self.info))
        self.last_val = (self.step, loss)
        return loss

    def sample(self) -> list[str]:
        """Continuations of the fixed prompts (seeded, so comparable across evaluations).
        Every rank runs them: under FSDP each forward needs all ranks."""
        if self.tokenizer is None or not self.cfg.sample_prompts or self.cfg.sample_tokens <= 0:
            return []
        engine = Engine(unwrap(self.wrapped), self.tokenizer, relayout=False, prefetch=False)
        params = SamplingParams(temperature=0.8, top_k=50)
        out = engine.generate(list(self.cfg.sample_prompts), max_new_tokens=self.cfg.sample_tokens, sampling=params, seed=self.cfg.seed)
        self.wrapped.train()
        return [p + c.text for p, c in zip(self.cfg.sample_prompts, out)]

    # --- the loop -----------------------------------------------------------------
    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, draw = self.cfg, self.draws
        self.draws += 1
        torch.manual_seed(step_seed(cfg.seed, self.info.rank, draw))
        lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
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
        if cfg.resume:
            self.resume(cfg.resume)
        log = MetricsLog(self.out, enabled=info.is_main, resume_step=self.step if cfg.resume else None)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.wrapped.train()
        start_time = time.monotonic()
        bad_in_a_row, stopped = 0, "done"
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        window_tokens, window_start = 0, time.monotonic()
        with _StopOnSignal() as stop:
            while self.step < cfg.max_steps:
                if self._agree(stop.requested):
                    stopped = "interrupted"
                    break
                if cfg.time_limit and self._agree(time.monotonic() - start_time >= cfg.time_limit):
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
                        log.close()
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
                if self.step % max(cfg.log_every, 1) == 0 or self.step == cfg.max_steps:
                    mean_loss = float(all_reduce_mean(loss, info))
                    elapsed = time.monotonic() - window_start
                    rate = window_tokens / elapsed if elapsed > 0 else 0.0
                    window_tokens, window_start = 0, time.monotonic()
                    record = {"step": self.step, "split": "train", "loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"],
                              "grad_norm": float(grad_norm), "tokens": self.tokens_seen, "tokens_per_s": rate}
                    log.write(record)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{rate:,.0f}")
                evaluate_now = cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps
                if evaluate_now:
                    self._evaluate_and_log(log, bar)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
            bar.close()
            if stopped != "interrupted" and (self.last_val is None or self.last_val[0] != self.step):
                self._evaluate_and_log(log, None)  # an interrupted run only saves: the user is waiting
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}"):
                self.save()
        plot = log.plot()
        log.close()
        return TrainResult(self.step, self.last_checkpoint, self.last_val[1] if self.last_val else None, stopped,
                           self.skipped, log.path, plot, self.samples)

    def _evaluate_and_log(self, log: MetricsLog, bar: tqdm | None) -> None:
        val = self.evaluate()
        if val is None:
            return
        log.write({"step": self.step, "split": "val", "loss": val, "ppl": math.exp(min(val, 50.0)), "tokens": self.tokens_seen})
        self.samples = self.sample()
        for prompt, text in zip(self.cfg.sample_prompts, self.samples):
            log.write({"step": self.step, "split": "sample", "prompt": prompt, "text": text})
        message = f"step {self.step}: val loss {val:.4f}, perplexity {math.exp(min(val, 50.0)):.2f}"
        (bar.write if bar is not None and self.progress else self.say)(message)
        log.plot()

    def _agree(self, flag: bool) -> bool:
        """Whether any rank says so: every rank must stop at the same step."""
        if not self.info.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


def _finite_or_none(t: torch.Tensor) -> float | None:
    value = float(t)
    return value if math.isfinite(value) else None
