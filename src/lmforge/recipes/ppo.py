"""RLHF: the policy samples, a reward model scores, PPO (or RLOO, GRPO) learns from the scores.

An iteration samples `rollout_batch` training prompts x `samples` responses with the
`Engine` (KV cache, --rollout-temperature; a response ends at <|endoftext|> or after
--rollout-tokens), scores each with the reward (a reward model from `align reward`, or a
classifier's probability of --reward-label), and turns scores into per-token rewards with
a KL penalty to the reference (the starting policy: adapters off under LoRA, else a
frozen copy). Then `ppo_epochs` passes over the responses in shuffled minibatches, one
`Trainer` step each, on the pure functions of `align.rl`:

- ppo: a value head on the policy's trunk (`align.actor_critic` says why), GAE (lambda 1
  by default: with lambda < 1 the credit leans on a critic that starts at zero, and early
  on that favours ending a response early, measured on the sentiment task), whitened
  advantages, the clipped surrogate and the clipped value loss;
- rloo / grpo: k responses per prompt, each against the others of its prompt (leave-one-out
  mean, or the group's mean and std), no values; the same clipped surrogate and KL penalty.

The trainer owns the loop, checkpoints and resume; `batch(draw, micro)` makes a new
rollout whenever an iteration begins. Resume is exact: a rollout is seeded by (--seed,
iteration), a checkpoint keeps the adaptive KL coefficient and the running reward
statistics, and one taken mid-iteration keeps that iteration's rollout.

Dropout is off throughout (rollouts, the log-prob passes, training), so an iteration's
first minibatch has ratio exactly 1. A run stops with a diagnostic, its last checkpoint
kept, when the KL per response passes --stop-kl, the ratio explodes or the reward is not
finite; non-finite losses are the trainer's (skipped, then stopped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.align.actor_critic import ActorCritic
from lmforge.align.rl import (
    AdaptiveKL,
    RunningMoments,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
    whiten,
)
from lmforge.align.rollout import ROLLOUT_FILE, Rollout, pad_rollout
from lmforge.data.prompts import read_prompts, split_prompts
from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LmforgeError
from lmforge.finetune.adapter import load_adapter, save_adapter
from lmforge.io import atomic_write_text
from lmforge.loading import load, resolve_model_path
from lmforge.model import GPT
from lmforge.recipes.classify import label_probabilities
from lmforge.recipes.common import check_run_folder, eval_rows, load_base, own_run_folder, set_trainable, start_run, write_metrics
from lmforge.recipes.config import RLConfig
from lmforge.recipes.instruct import respond
from lmforge.recipes.preference import (
    AlignResult,
    Reference,
    check_same_tokenizer,
    frozen_reference,
    kl_to_reference,
    logprobs_at,
    read_pairs,
)
from lmforge.recipes.reward import is_reward_model, score_rendered
from lmforge.text import plural
from lmforge.tokenizer.templates import template_named
from lmforge.train.distributed import init_distributed
from lmforge.train.loop import Trainer
from lmforge.train.metrics import METRICS, plot_panels, read_metrics
from lmforge.weights import load_pretrained, save_pretrained

PLOT_FILE = "rl.png"
HELD_OUT_FOLDER = "held_out"  # held_out/iteration-K.jsonl: the greedy held-out answers at iteration K
RATIO_LIMIT = 10.0  # a minibatch whose mean pi / pi_old passes this has left the trust region for good
FORWARD_BATCH = 16  # responses per no-grad forward pass when a rollout is scored
PANELS = [("score (reward before the KL penalty)", ["score"]), ("KL to the reference per response (nats)", ["kl"]),
          ("RLHF reward (score - KL penalty)", ["rlhf_reward"]), ("entropy per token", ["entropy"]),
          ("approx KL old -> new, clip fraction", ["approx_kl", "clip_fraction"]), ("response tokens", ["response_tokens"])]


ScoreFn = Callable[[Sequence[str], Sequence[str]], list[float]]  # (prompts, responses) -> scores, higher is better


class RunStopped(LmforgeError):
    """The run went wrong in a way more steps cannot fix (KL or ratio exploded, a non-finite reward)."""


# --- the reward --------------------------------------------------------------------------------


class Reward:
    """Scores (prompt, response) texts: a reward model's score of the rendered pair, or a
    classifier's probability of `label` for prompt + response read as one text."""

    def __init__(self, model: GPT, label: str = "") -> None:
        self.model, self.label = model, label
        if is_reward_model(model):
            if label:
                raise LmforgeError("--reward-label picks a classifier's label; this is a reward model (one score): drop it")
        elif model.score is None:
            raise LmforgeError("--reward is neither a reward model (`lmforge align reward`) nor a classifier "
                               "(`lmforge finetune classify`); give one of those")
        elif label not in model.config.labels:
            labels = list(model.config.labels)
            given = f"{label!r} is not one of them" if label else "say which label's probability is the score"
            raise LmforgeError(f"--reward is a classifier with labels {labels}: {given} (e.g. --reward-label {labels[-1]})")

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if not prompts:
            return []
        if self.label:
            return label_probabilities(self.model, [p + r for p, r in zip(prompts, responses, strict=True)], self.label)
        return score_rendered(self.model, prompts, responses)


# --- prompts -----------------------------------------------------------------------------------


@dataclass
class Prompts:
    train: list[str]
    test: list[str]
    template: str  # the template the prompts are rendered in ("none": plain text)
    stop_strings: tuple[str, ...]


def read_prompt_sets(path: str, template: str, say: Callable[[str], None]) -> Prompts:
    """Plain prompts (`data.prompts`: 90/10) or the prompts of a preference-pairs file
    (rendered; its training split samples, its test split is held out)."""
    plain = read_prompts(path)
    if plain is not None:
        split = split_prompts(plain)
        say(f"prompts: {plural(len(split['train']) + len(split['test']), 'plain prompt')} (no template); "
            f"train {len(split['train']):,}, held out {len(split['test']):,}")
        return Prompts(split["train"], split["test"], "none", ())
    pairs = read_pairs(path, template, say)
    return Prompts([t[0] for t in pairs.texts["train"]], [t[0] for t in pairs.texts["test"]], pairs.template,
                   template_named(pairs.template).stop_strings)


# --- one iteration's samples --------------------------------------------------------------------


def sampled_logprobs(model: GPT, ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """log pi(target) at `temperature` (N, T - 1) of a plain GPT (the reference), in no-grad chunks."""
    return torch.cat([logprobs_at(model, ids[s : s + FORWARD_BATCH, :-1], targets[s : s + FORWARD_BATCH], temperature,
                                  attention_mask[s : s + FORWARD_BATCH, :-1]) for s in range(0, ids.size(0), FORWARD_BATCH)])


class RL:
    """The recipe's state between trainer steps: the current rollout, the KL coefficient,
    the reward statistics, and the figures of the iteration for metrics.jsonl."""

    def __init__(self, cfg: RLConfig, model: ActorCritic, reference: Reference, reward: ScoreFn, prompts: Prompts,
                 held_out: Callable[[int], dict], say: Callable[[str], None]) -> None:
        self.cfg, self.model, self.reference, self.reward, self.say = cfg, model, reference, reward, say
        self.held_out = held_out
        self.policy = model.policy
        self.tok = self.policy.tokenizer
        if self.tok.eot_id is None:
            raise LmforgeError("the policy's tokenizer has no <|endoftext|>: responses could never end")
        self.prompts = prompts
        room = self.policy.config.context_length - cfg.rollout_tokens
        if room < 1:
            raise LmforgeError(f"--rollout-tokens {cfg.rollout_tokens} leaves no room for a prompt in the context of "
                               f"{self.policy.config.context_length}; lower it")
        self.train_ids = [self.tok.encode(p)[-room:] for p in prompts.train]  # a long prompt keeps its end
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.moments = RunningMoments()
        self.rollout: Rollout | None = None
        self.rollout_stats: dict[str, float] = {}
        self.step_stats: dict[str, list[float]] = {}
        self._trained_since = time.monotonic()
        self._order: tuple[int, np.ndarray] | None = None

    # -- what the trainer checkpoints and logs
    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict(), "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])

    def log_extra(self) -> dict[str, float]:
        out = {**self.rollout_stats, **{k: float(np.mean(v)) for k, v in self.step_stats.items() if v}}
        out["train_s"] = time.monotonic() - self._trained_since
        self.step_stats = {}
        return out

    # -- batches
    def batch(self, draw: int, micro: int) -> tuple[dict, torch.Tensor]:
        cfg = self.cfg
        iteration, step = divmod(draw, cfg.steps_per_iteration)
        if self.rollout is None or self.rollout.iteration != iteration:
            held = self.held_out(iteration) if cfg.held_out_every and iteration and iteration % cfg.held_out_every == 0 else {}
            self.rollout = self.collect(iteration)
            self.rollout_stats.update({f"held_out_{k}": v for k, v in held.items() if k != "responses"})
        r = self.rollout
        epoch, minibatch = divmod(step, cfg.minibatches)
        order = torch.from_numpy(np.random.default_rng([cfg.seed, iteration, epoch]).permutation(r.ids.size(0)))
        size = cfg.batch_size * cfg.grad_accum
        rows = order[minibatch * size : (minibatch + 1) * size][micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
        rows = rows.to(r.ids.device)
        x = {"input_ids": r.ids[rows], "attention_mask": r.attention_mask[rows], "targets": r.targets()[rows],
             "logps": r.logps[rows], "values": r.values[rows], "advantages": r.advantages[rows], "returns": r.returns[rows]}
        return x, r.mask[rows]

    def _prompt_rows(self, iteration: int) -> list[int]:
        """The training prompts of an iteration: epochs of seeded shuffles, taken in turn."""
        n, k = len(self.train_ids), self.cfg.rollout_batch
        rows = []
        for j in range(iteration * k, (iteration + 1) * k):
            epoch, pos = divmod(j, n)
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, np.random.default_rng([self.cfg.seed, 7, epoch]).permutation(n))
            rows.append(int(self._order[1][pos]))
        return rows

    @torch.no_grad()
    def collect(self, iteration: int) -> Rollout:
        """Sample, score and compute the advantages of iteration `iteration` (0-based)."""
        cfg, tok, device = self.cfg, self.tok, self.policy.device
        started = time.monotonic()
        rows = [r for r in self._prompt_rows(iteration) for _ in range(cfg.responses_per_prompt)]
        prompt_ids = [self.train_ids[r] for r in rows]
        engine = Engine(self.policy, tok, packed=False)
        completions = engine.generate(prompt_ids, max_new_tokens=cfg.rollout_tokens,
                                      sampling=SamplingParams(temperature=cfg.rollout_temperature),
                                      seed=int(np.random.default_rng([cfg.seed, 11, iteration]).integers(2**63)),
                                      stop_ids=[tok.eot_id])
        self.model.train()
        generated = time.monotonic()
        responses = [c.ids + ([tok.eot_id] if c.finish_reason == "stop" else []) for c in completions]
        ended = torch.tensor([c.finish_reason == "stop" for c in completions], device=device)
        ids, attention, mask = pad_rollout(prompt_ids, responses, device)
        N, P = ids.size(0), ids.size(1) - mask.size(1)
        rollout = Rollout(iteration, ids, attention, mask, *(torch.zeros_like(mask) for _ in range(4)))
        targets = rollout.targets()
        logps, entropy, values = [], [], []
        for s in range(0, N, FORWARD_BATCH):
            lp, en, va = self.model(ids[s : s + FORWARD_BATCH, :-1], attention[s : s + FORWARD_BATCH, :-1],
                                    targets[s : s + FORWARD_BATCH], cfg.rollout_temperature)
            logps.append(lp[:, P - 1 :])
            entropy.append(en[:, P - 1 :])
            values.append(va[:, P - 1 :])
        logps, entropy, values = (torch.cat(t) * mask for t in (logps, entropy, values))
        with self.reference.model() as ref:
            ref_logps = sampled_logprobs(ref, ids, attention, targets, cfg.rollout_temperature)[:, P - 1 :] * mask

        texts = [c.text for c in completions]
        raw = torch.tensor(self.reward([self.prompts.train[r] for r in rows], texts), dtype=torch.float32, device=device)
        if not bool(torch.isfinite(raw).all()):
            raise RunStopped(f"iteration {iteration + 1}: the reward model gave non-finite scores; check --reward")
        scores = raw - cfg.missing_eos_penalty * (~ended).float()
        if cfg.reward_norm:
            self.moments.update(scores)
            scores = (scores - self.moments.mean) / self.moments.std
        if cfg.reward_clip:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        kl = kl_penalty(logps, ref_logps, cfg.kl_estimator) * mask
        kl_per_response = kl.sum(1)
        coef = self.kl.coef
        if cfg.algo == "ppo":
            rewards = token_rewards(scores, kl, mask, coef)
            advantages, returns = gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask)
        else:
            total = (scores - coef * kl_per_response).view(-1, cfg.responses_per_prompt)
            per_response = (rloo_advantages(total) if cfg.algo == "rloo" else grpo_advantages(total)).flatten()
            advantages, returns = per_response[:, None] * mask, torch.zeros_like(mask)
        rollout.logps, rollout.values, rollout.advantages, rollout.returns = logps, values * mask, advantages, returns
        mean_kl = float(kl_per_response.mean())
        self.kl.update(mean_kl, N)
        lengths = mask.sum(1)
        self.rollout_stats = {
            "iteration": iteration + 1,
            "score": float(raw.mean()),
            "kl": mean_kl,
            "kl_coef": coef,
            "rlhf_reward": float((scores - coef * kl_per_response).mean()),
            "entropy": float(masked_mean(entropy, mask)),
            "response_tokens": float(lengths.mean()),
            "eot_rate": float(ended.float().mean()),
            "generate_s": generated - started,
            "score_s": time.monotonic() - generated,
        }
        if cfg.algo == "ppo":
            self.rollout_stats["explained_variance"] = explained_variance(values * mask, returns, mask)
        if cfg.stop_kl and mean_kl > cfg.stop_kl:
            raise RunStopped(f"iteration {iteration + 1}: the KL to the reference is {mean_kl:.1f} nats per response, "
                             f"past --stop-kl {cfg.stop_kl:g}: the policy is running away from the reference "
                             "(lower --lr, raise --kl-coef or set --target-kl)")
        self._trained_since = time.monotonic()
        return rollout

    # -- the loss of one micro-batch
    def loss(self, model: torch.nn.Module, x: dict, mask: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        P = x["input_ids"].size(1) - mask.size(1)
        logps, entropy, values = model(x["input_ids"][:, :-1], x["attention_mask"][:, :-1], x["targets"], cfg.rollout_temperature)
        logps, entropy, values = logps[:, P - 1 :], entropy[:, P - 1 :], values[:, P - 1 :]
        pl = policy_loss(logps, x["logps"], x["advantages"], mask, cfg.clip_range)
        loss = pl.loss
        stats = {"policy_loss": pl.loss, "approx_kl": pl.approx_kl, "clip_fraction": pl.clip_fraction, "ratio": pl.ratio}
        if cfg.algo == "ppo":
            vl, v_clip = value_loss(values, x["values"], x["returns"], mask, cfg.value_clip)
            loss = loss + cfg.vf_coef * vl
            stats.update(value_loss=vl, value_clip_fraction=v_clip)
        mean_entropy = masked_mean(entropy, mask)
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * mean_entropy
        for k, v in stats.items():
            self.step_stats.setdefault(k, []).append(float(v.detach()))
        ratio = float(pl.ratio)
        if math.isfinite(ratio) and ratio > RATIO_LIMIT:
            raise RunStopped(f"iteration {self.rollout.iteration + 1 if self.rollout else '?'}: the mean probability ratio "
                             f"pi / pi_old reached {ratio:.3g} (> {RATIO_LIMIT:g}): the updates are far too large "
                             "(lower --lr or --ppo-epochs)")
        return loss

    # -- checkpoints: the policy (or its adapters), the value head, and a mid-iteration rollout
    def write_model(self, folder: Path, adapter_base: Path | None) -> None:
        cfg = self.cfg
        if adapter_base is not None:
            save_adapter(self.policy, folder, adapter_base, cfg.lora(), quantize=cfg.quantize or None)
        else:
            save_pretrained(self.policy, folder)
        self.model.save_value_head(folder)
        if self.rollout is not None:
            self.rollout.save(folder / ROLLOUT_FILE)

    def read_model(self, folder: Path, adapters: bool) -> None:
        if adapters:
            load_adapter(self.policy, folder)
        else:
            self.policy.load_state_dict(load_pretrained(folder, device=self.policy.device).state_dict())
        self.model.load_value_head(folder)
        if (folder / ROLLOUT_FILE).is_file():
            self.rollout = Rollout.read(folder / ROLLOUT_FILE, self.policy.device)


# --- held-out figures ---------------------------------------------------------------------------


def measure(policy: GPT, reference: Reference | None, reward: ScoreFn, prompts: Prompts, rows: list[int], cfg: RLConfig,
            progress: bool, when: str) -> tuple[dict, list[dict]]:
    """Greedy answers to the held-out prompts `rows`: mean score, length, how many ended,
    and the KL per response to the reference on sampled ones (0 when the policy is it)."""
    asked = [prompts.test[i] for i in rows]
    completions = respond(policy, asked, stop_strings=prompts.stop_strings, max_new_tokens=cfg.rollout_tokens,
                          progress=progress, desc=f"{when}: greedy answers")
    kept = [(p, c) for p, c in zip(asked, completions) if c is not None]
    scores = reward([p for p, _ in kept], [c.text for _, c in kept])
    kl = 0.0 if reference is None else kl_to_reference(policy, reference, asked, seed=cfg.seed,
                                                       max_new_tokens=cfg.rollout_tokens, temperature=cfg.rollout_temperature)
    n = max(len(kept), 1)
    figures = {"score": sum(scores) / n, "kl_to_reference": kl, "response_tokens": sum(len(c.ids) for _, c in kept) / n,
               "ended": sum(c.finish_reason == "stop" for _, c in kept) / n, "responses": len(kept)}
    answers = [{"prompt": p, "response": c.text, "score": s} for (p, c), s in zip(kept, scores)]
    return figures, answers


def _answers(path: Path) -> list[dict]:
    """A held-out measure's answers as written (none when no prompt fit the context)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- the run -----------------------------------------------------------------------------------


def run(cfg: RLConfig, say: Callable[[str], None] = print, progress: bool = True, reward: ScoreFn | None = None) -> AlignResult:
    """Run RLHF as configured. `reward`, when given, scores instead of --reward: any function
    of (prompts, responses), e.g. a rule (a verifiable answer, a format check)."""
    if not cfg.reward and reward is None:
        raise LmforgeError("RLHF needs a reward: pass --reward DIR (a reward model from `lmforge align reward`, "
                           "or a classifier from `lmforge finetune classify` with --reward-label)")
    if not cfg.prompts:
        raise LmforgeError("pass --prompts FILE: plain prompts (.txt, or JSON/JSONL rows with \"prompt\") or a "
                           "preference-pairs file whose prompts are used")
    cfg.validate()
    info = init_distributed(cfg.device or None)
    if info.enabled:
        raise LmforgeError("RLHF samples, scores and trains on one process: run it without torchrun")
    out = Path(cfg.out)
    with own_run_folder(cfg, info):
        check_run_folder(cfg, info)
        prompts = read_prompt_sets(cfg.prompts, cfg.template, say)
        policy = load_base(cfg)
        if reward is None:
            reward = Reward(load(cfg.reward, device=info.device), cfg.reward_label)
            check_same_tokenizer({"policy": policy, "reward model": reward.model})
        if prompts.template != "none":
            policy.tokenizer.chat_template = prompts.template
        torch.manual_seed(cfg.seed)  # LoRA's A matrices and nothing else random before training
        report = set_trainable(policy, cfg, say)
        policy.to(info.device)
        model = ActorCritic(policy)
        model.value_head.lr_scale = cfg.value_lr / cfg.lr  # the optimizer gives the head a group of its own
        say(str(report) + (" + a value head" if cfg.algo == "ppo" else ""))
        reference = Reference(policy, frozen_reference(cfg, policy))
        rows = eval_rows(len(prompts.test), cfg.eval_examples)

        def held_out(iteration: int, reference: Reference | None = reference) -> dict:
            """Measure the held-out prompts now, as after `iteration` iterations, into held_out/iteration-K.jsonl."""
            figures, answers = measure(policy, reference, reward, prompts, rows, cfg, progress, f"iteration {iteration}")
            lines = [json.dumps({"iteration": iteration, **a}, ensure_ascii=False) for a in answers]
            atomic_write_text(out / HELD_OUT_FOLDER / f"iteration-{iteration}.jsonl", "\n".join(lines) + "\n")
            say(f"iteration {iteration}: held-out score {figures['score']:.3f}, KL {figures['kl_to_reference']:.2f}, "
                f"{figures['response_tokens']:.1f} tokens per answer")
            return figures

        rl = RL(cfg, model, reference, reward, prompts, held_out, say)
        start_run(cfg, info, say)
        (out / HELD_OUT_FOLDER).mkdir(exist_ok=True)
        spi = cfg.steps_per_iteration
        tcfg = dataclasses.replace(cfg, max_steps=cfg.iterations * spi, log_every=spi, eval_every=0, sample_prompts=[])
        adapter_base = resolve_model_path(cfg.base) if report.lora is not None else None
        trainer = Trainer(model, tcfg, batch=rl.batch, eval_batches=None, info=info, tokenizer=policy.tokenizer,
                          loss_fn=rl.loss, say=say, progress=progress, extra_state=rl, log_extra=rl.log_extra,
                          write_model=lambda folder: rl.write_model(folder, adapter_base),
                          read_model=lambda folder: rl.read_model(folder, adapter_base is not None))
        say(f"{cfg.algo}: {plural(cfg.iterations, 'iteration')} x {cfg.rollout_batch} prompts x "
            f"{plural(cfg.responses_per_prompt, 'response')} (up to {cfg.rollout_tokens} tokens, temperature "
            f"{cfg.rollout_temperature:g}), {plural(cfg.ppo_epochs, 'pass', 'passes')} in {plural(cfg.minibatches, 'minibatch', 'minibatches')} "
            f"of {cfg.batch_size * cfg.grad_accum}; held out: {plural(len(rows), 'prompt')}")
        before_file = out / HELD_OUT_FOLDER / "before.json"
        if before_file.is_file() and cfg.resume:
            before = json.loads(before_file.read_text())
        else:
            before = held_out(0, None)  # the policy is the reference: KL 0
            atomic_write_text(before_file, json.dumps(before) + "\n")
        if before["responses"] < len(rows):
            say(f"note: {plural(len(rows) - before['responses'], 'held-out prompt')} of {len(rows)} leave no room in the "
                f"context of {policy.config.context_length} tokens and are not measured")
        try:
            result = trainer.fit()
        except RunStopped as e:
            kept = trainer.last_checkpoint or "none (pass --save-every to keep checkpoints during a run)"
            raise LmforgeError(f"{e}. Stopped; the last good checkpoint is {kept}") from None
        iterations = result.step // spi
        after = held_out(iterations)
        before_answers, after_answers = (_answers(out / HELD_OUT_FOLDER / f"iteration-{k}.jsonl") for k in (0, iterations))
        lines = [json.dumps({"prompt": a["prompt"], "before": a["response"], "after": b["response"],
                             "score_before": a["score"], "score_after": b["score"]}, ensure_ascii=False)
                 for a, b in zip(before_answers, after_answers, strict=True)]
        responses = out / "responses.jsonl"
        atomic_write_text(responses, "\n".join(lines) + "\n")
        records = read_metrics(out / METRICS) if (out / METRICS).is_file() else []
        try:
            plot_panels(records, out / PLOT_FILE, PANELS, x="iteration")
        except Exception as e:  # noqa: BLE001 - a picture never fails a run; metrics.jsonl holds the numbers
            say(f"warning: could not draw {out / PLOT_FILE} ({type(e).__name__}: {e})")
        metrics = {
            "task": cfg.algo, "base": cfg.base, "reward": cfg.reward, "reward_label": cfg.reward_label, "prompts": cfg.prompts,
            "trainable": report.to_dict(), "iterations": iterations, "steps": result.step,
            "skipped_steps": result.skipped_steps, "kl_coef": rl.kl.coef,
            "held_out": {"before": before, "after": after},
            "last_iteration": {k: v for k, v in (records[-1] if records else {}).items() if k not in ("split",)},
        }
        write_metrics(cfg, info, metrics)
        return AlignResult(out, result.checkpoint, metrics, responses, result.stopped, policy)
