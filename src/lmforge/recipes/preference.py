"""What the preference recipes (reward, DPO, ORPO, iterative DPO) share: pairs read, split
and batched; each sequence's log-probability under the policy and under the reference;
and the held-out figures every alignment run writes before and after training.

A batch of pairs is `(x, labels)`: x holds "input_ids" and "attention_mask" (B, 2, T)
with the chosen row first and the rejected one second, and "index" (B,), each pair's
number in the run (what the precomputed reference log-probs are looked up by); labels
(B, 2, T) are -100 on prompt and padding in *both* rows. Both rows of every pair go
through the model in one forward pass of 2B rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from lmforge.align.losses import PreferenceLoss, sequence_logprobs
from lmforge.data.batches import EXAMPLE_SPLITS
from lmforge.data.instruct import InstructionBatches, pad_pairs
from lmforge.data.preference import PreferenceBatches, PreferenceData, preference_split, read_preferences, render_pair
from lmforge.engine import SamplingParams, end_of_text_ids
from lmforge.errors import LmforgeError
from lmforge.finetune.adapter import weights_fingerprint
from lmforge.finetune.lora import adapters_disabled, lora_layers
from lmforge.io import atomic_write_bytes, atomic_write_text
from lmforge.loading import load, resolve_model_path
from lmforge.model import GPT
from lmforge.ops.logprobs import token_logprobs_entropy
from lmforge.ops.loss import IGNORE_INDEX
from lmforge.recipes.common import (
    distributed_run,
    eval_rows,
    example_length,
    load_base,
    set_trainable,
    train_on_splits,
    write_metrics,
)
from lmforge.recipes.config import AlignConfig
from lmforge.recipes.instruct import respond, response_loss
from lmforge.text import plural
from lmforge.tokenizer.templates import template_named
from lmforge.train.distributed import DistInfo

EVAL_BATCH = 8
RESPONSE_TOKENS = 256  # greedy held-out responses, at most
KL_TOKENS = 128  # the sampled responses the KL to the reference is measured on, at most
REFERENCE_FILE = "reference_logps.safetensors"


# --- pairs ---------------------------------------------------------------------------------


@dataclass
class Pairs:
    """A preference file read, split and rendered: `items[s]` as read, `texts[s]` as
    (prompt, chosen, rejected) strings in the template `template`."""

    data: PreferenceData
    template: str
    items: dict[str, list[dict]]
    texts: dict[str, list[tuple[str, str, str]]]

    def offset(self, split: str) -> int:
        """The run-wide number of `split`'s first pair (train, then val, then test)."""
        return sum(len(self.texts[s]) for s in EXAMPLE_SPLITS[: EXAMPLE_SPLITS.index(split)])


def read_pairs(path: str, template: str, say: Callable[[str], None]) -> Pairs:
    """The pairs of `path`, split (the book's split in order for the Alpaca-shaped file,
    else seeded 85/5/10) and rendered with `template` ("auto": the data's own format)."""
    data = read_preferences(path)
    name = data.kind if template == "auto" else template
    if (data.kind == "dialogue") != (name == "dialogue"):
        raise LmforgeError(f"{path} holds {data.kind} pairs, which the {name} template cannot render: "
                           f"use --template auto (or {data.kind})")
    splits = preference_split(data)
    rendered = template_named(name) if data.kind != "dialogue" else None
    texts = {s: [render_pair(item, data.kind, rendered) for item in splits[s]] for s in EXAMPLE_SPLITS}
    kept = sum(len(v) for v in splits.values())
    split_note = "split in order" if data.kind == "alpaca" else "split 85/5/10 (seeded)"
    say(f"data: {plural(kept, 'preference pair')} ({data.kind}, {name} template); {split_note}: "
        + ", ".join(f"{s} {len(splits[s]):,}" for s in EXAMPLE_SPLITS))
    if data.dropped:
        reasons: dict[str, list[int]] = {}
        for row, reason in data.dropped:
            reasons.setdefault(reason, []).append(row)
        say("note: left out " + "; ".join(f"{plural(len(rows), 'row')} ({reason}: {_rows(rows)})"
                                           for reason, rows in reasons.items()))
    return Pairs(data, name, splits, texts)


def pair_batches(pairs: Pairs, tokenizer: Any, cfg: AlignConfig, info: DistInfo, max_length: int,
                 say: Callable[[str], None]) -> dict[str, PreferenceBatches]:
    """Each split's pairs as batches (a training batch holds batch_size x world_size pairs),
    saying how many were cut to `max_length` and which were left with nothing to learn."""
    out = {}
    for s in EXAMPLE_SPLITS:
        out[s] = PreferenceBatches(pairs.texts[s], tokenizer, batch_size=cfg.batch_size * (info.world_size if s == "train" else 1),
                                   seed=cfg.seed, max_length=max_length, drop_last=s == "train", first_index=pairs.offset(s))
        if out[s].truncated:
            say(f"note: {plural(out[s].truncated, f'{s} pair')} cut to {max_length} tokens (the prompt's start first, "
                "then the responses' ends)")
        if out[s].dropped:
            say(f"note: {plural(len(out[s].dropped), f'{s} pair')} left out: the prompt fills all {max_length} tokens")
    return out


def as_inputs(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A collated batch of pairs as the trainer's (inputs, labels)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "index": batch["index"]}, batch["labels"]


# --- log-probabilities ---------------------------------------------------------------------


@dataclass
class PairLogps:
    """Summed log-probabilities of each pair's responses (B, 2) and their token counts."""

    sum: torch.Tensor
    count: torch.Tensor

    def value(self, average: bool) -> torch.Tensor:
        """(B, 2) sequence log-probabilities: summed, or per token with `average`."""
        return self.sum / self.count if average else self.sum


def pair_logps(model: torch.nn.Module, x: dict[str, torch.Tensor], labels: torch.Tensor) -> PairLogps:
    """Both responses of every pair in one forward pass of 2B rows (through the model's
    forward, wrapped or not, so DDP's hooks run)."""
    B = labels.size(0)
    flat = labels.flatten(0, 1)
    token = model(x["input_ids"].flatten(0, 1), flat, attention_mask=x["attention_mask"].flatten(0, 1), logprobs=True)
    learned = flat != IGNORE_INDEX
    total = sequence_logprobs(token, learned, average=False)
    return PairLogps(total.view(B, 2), learned.sum(-1).to(total.dtype).view(B, 2))


@contextlib.contextmanager
def evaluating(model: GPT) -> Iterator[GPT]:
    """The model in eval mode (no dropout) inside the block, its mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Reference:
    """The reference policy DPO measures the policy against, in one of three forms: the
    policy with its LoRA adapters switched off (no second model: the base *is* the
    reference), a frozen copy of the starting weights, or log-probabilities computed once
    and looked up by pair (`precompute`), after which the model itself is freed."""

    def __init__(self, policy: GPT, frozen: GPT | None = None) -> None:
        if frozen is None and not lora_layers(policy):
            raise LmforgeError("a reference needs a frozen model unless the policy trains LoRA adapters")
        self.policy, self.frozen = policy, frozen
        self.cache: dict[str, torch.Tensor] | None = None
        self.key: dict[str, Any] = {}

    @torch.no_grad()
    def logps(self, x: dict[str, torch.Tensor], labels: torch.Tensor) -> PairLogps:
        if self.cache is not None:
            index = x["index"].cpu()
            device = labels.device
            return PairLogps(self.cache["sum"][index].to(device), self.cache["count"][index].to(device))
        with self.model() as model:
            return pair_logps(model, x, labels)

    @contextlib.contextmanager
    def model(self) -> Iterator[GPT]:
        """The reference as a model (eval mode) inside the block."""
        if self.frozen is not None:
            with evaluating(self.frozen) as model:
                yield model
        else:
            with adapters_disabled(self.policy), evaluating(self.policy) as model:
                yield model

    def precompute(self, batches: dict[str, PreferenceBatches], key: dict, folder: Path, say: Callable[[str], None]) -> None:
        """Every pair's reference log-probs, read from `folder/REFERENCE_FILE` when it was
        made for the same `key` (base weights, data, lengths, tokenizer: a resumed run reads
        what it computed), else computed now (`write_cache` saves them once the run folder
        is set up); then the frozen copy is freed."""
        path = folder / REFERENCE_FILE
        self.key = key
        cached = _read_cache(path, key)
        if cached is not None:
            say(f"reference log-probs: reusing {path}")
            self.cache = cached
        else:
            n = sum(len(b) + len(b.dropped) for b in batches.values())
            total, count = torch.full((n, 2), float("nan")), torch.zeros(n, 2)
            say(f"reference log-probs: computing them once for {plural(sum(len(b) for b in batches.values()), 'pair')}")
            device = self.policy.device
            for b in batches.values():
                for batch in b.iter_eval(EVAL_BATCH):
                    x, labels = as_inputs(batch)
                    logps = self.logps({k: v.to(device) for k, v in x.items()}, labels.to(device))
                    total[x["index"]], count[x["index"]] = logps.sum.float().cpu(), logps.count.float().cpu()
            self.cache = {"sum": total, "count": count}
        self.frozen = None  # the copy is not needed any more: its memory goes back

    def write_cache(self, folder: Path) -> None:
        """Save the precomputed log-probs in the run folder (a resume reuses them)."""
        if self.cache is not None:
            atomic_write_bytes(folder / REFERENCE_FILE, save(self.cache, metadata={"key": json.dumps(self.key, sort_keys=True)}))


def reference_key(cfg: AlignConfig, pairs: Pairs, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """What precomputed reference log-probs depend on: the base's weights, the pairs as
    rendered (data, template, split), how they are cut, and the tokenizer."""
    base = resolve_model_path(cfg.base)
    rendered = json.dumps([pairs.texts[s] for s in EXAMPLE_SPLITS], ensure_ascii=False).encode()
    return {
        "base": weights_fingerprint(base) or str(base),
        "pairs": hashlib.sha256(rendered).hexdigest(),
        "max_length": max_length,
        "tokenizer": getattr(tokenizer, "fingerprint", None),
    }


def _read_cache(path: Path, key: dict) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("key")
        if stored != json.dumps(key, sort_keys=True):
            return None
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None  # a damaged cache is computed again, never trusted


# --- held-out figures --------------------------------------------------------------------------


def check_same_tokenizer(models: dict[str, GPT]) -> None:
    """Refuse models that read text differently (a reward model scoring a policy's ids, a
    reference scoring the policy's): the same ids would stand for other text."""
    named = {name: getattr(m.tokenizer, "fingerprint", None) for name, m in models.items()}
    first, fingerprint = next(iter(named.items()))
    for name, other in named.items():
        if other != fingerprint:
            raise LmforgeError(
                f"the {first} and the {name} use different tokenizers ({str(fingerprint)[:12]} vs {str(other)[:12]}): "
                f"the same ids would stand for other text. Train the {name} from the same base (or tokenizer) as the {first}"
            )


@dataclass
class HeldOut:
    """The test split's prompts and reference responses, measured before and after
    training: greedy responses (length, how many end with <|endoftext|>), the SFT loss on
    the held-out reference responses (does the model keep what it knew?) and, after
    training, the KL to the reference on the policy's own samples."""

    prompts: list[str]
    references: list[str]  # the "output" of an Alpaca item, else the chosen response
    stop_strings: tuple[str, ...]
    responses: dict[str, list[str | None]]

    @classmethod
    def of(cls, pairs: Pairs, limit: int) -> HeldOut:
        items, texts = pairs.items["test"], pairs.texts["test"]
        rows = eval_rows(len(texts), limit)
        stops = template_named(pairs.template).stop_strings
        refs = [items[i].get("output") or texts[i][1] for i in rows]
        return cls([texts[i][0] for i in rows], refs, stops, {})

    def measure(self, when: str, policy: GPT, reference: Callable[[], Reference] | None, progress: bool) -> dict[str, Any]:
        """The figures of `when` ("before", "after"); the KL to `reference()` after training
        (before, the policy is the reference: 0)."""
        completions = respond(policy, self.prompts, stop_strings=self.stop_strings, max_new_tokens=RESPONSE_TOKENS,
                              progress=progress, desc=f"{when}: greedy answers")
        self.responses[when] = [c.text if c is not None else None for c in completions]
        done = [c for c in completions if c is not None]
        out = {
            "sft_loss": self.sft_loss(policy),
            "response_tokens": sum(len(c.ids) for c in done) / max(len(done), 1),
            "ends_with_eot": sum(c.stop in end_of_text_ids(policy.tokenizer) for c in done) / max(len(done), 1),
            "responses": len(done),
        }
        if reference is not None:
            out["kl_to_reference"] = 0.0 if when == "before" else kl_to_reference(policy, reference(), self.prompts)
        return out


    def sft_loss(self, policy: GPT) -> float | None:
        """The response loss of the held-out reference responses (those whose prompt leaves
        room in the context); None when no prompt does."""
        segments = [[(p, r)] for p, r in zip(self.prompts, self.references)]
        try:
            sft = InstructionBatches(segments, policy.tokenizer, batch_size=EVAL_BATCH, drop_last=False,
                                     max_length=policy.config.context_length)
        except LmforgeError:  # every prompt fills the context: nothing of a response is left to measure
            return None
        return response_loss(policy, sft.iter_eval(EVAL_BATCH))["loss"]


@torch.no_grad()
def kl_to_reference(policy: GPT, reference: Reference, prompts: Sequence[str], seed: int = 0, max_new_tokens: int = KL_TOKENS,
                    temperature: float = 1.0) -> float:
    """KL(policy || reference) per response, estimated on one sampled response per prompt
    (at `temperature`, at most `max_new_tokens` tokens): the mean over prompts of log pi(y)
    - log ref(y), summed over the response's tokens and its <|endoftext|> when it ended
    there, both distributions taken at that temperature (what the sampler drew from)."""
    tok = policy.tokenizer
    completions = respond(policy, prompts, max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=temperature),
                          seed=seed)
    rows = []
    for prompt, c in zip(prompts, completions):
        if c is None:
            continue
        p = tok.encode(prompt)
        ids = p + c.ids + ([tok.eot_id] if c.finish_reason == "stop" else [])
        if len(ids) > len(p) and len(ids) <= policy.config.context_length + 1:
            rows.append((ids[:-1], [IGNORE_INDEX] * (len(p) - 1) + ids[len(p):]))
    if not rows:
        return 0.0
    total = 0.0
    for start in range(0, len(rows), EVAL_BATCH):
        chunk = rows[start : start + EVAL_BATCH]
        x, y = (t.to(policy.device) for t in pad_pairs(chunk, tok.eot_id))
        with evaluating(policy):
            pi = logprobs_at(policy, x, y, temperature).sum(-1)
        with reference.model() as ref:
            total += float((pi - logprobs_at(ref, x, y, temperature).sum(-1)).sum())
    return total / len(rows)


def logprobs_at(model: GPT, x: torch.Tensor, y: torch.Tensor, temperature: float,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits / temperature)[y] (B, T) of `model`: the sampled tokens' log-probs
    under the distribution the sampler drew from; 0 where y is IGNORE_INDEX."""
    return token_logprobs_entropy(model.lm_head, model.hidden_states(x, attention_mask=attention_mask), y, temperature)[0]


def frozen_reference(cfg: AlignConfig, policy: GPT) -> GPT | None:
    """A frozen copy of the starting weights as the reference, unless the policy trains
    LoRA adapters (then the reference is the policy with them off)."""
    if cfg.lora_r:
        return None
    reference = load(cfg.base, device=policy.device)
    reference.requires_grad_(False)
    return reference.eval()


def write_responses(path: Path, held: HeldOut, pairs: Pairs) -> None:
    """responses.jsonl: each held-out prompt with its chosen and rejected responses and the
    policy's greedy responses before and after training."""
    texts = pairs.texts["test"]
    rows = eval_rows(len(texts), len(held.prompts)) if held.prompts else []
    lines = []
    for k, i in enumerate(rows):
        record = {"prompt": texts[i][0], "chosen": texts[i][1], "rejected": texts[i][2]}
        record.update({when: responses[k] for when, responses in held.responses.items()})
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _rows(rows: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


# --- one run over pairs ------------------------------------------------------------------------

# a pair objective: (model, inputs, labels) -> the per-pair loss with the rewards it implies
Objective = Callable[[torch.nn.Module, dict, torch.Tensor], PreferenceLoss]


@dataclass
class AlignResult:
    out: Path
    checkpoint: Path | None
    metrics: dict
    responses: Path | None
    stopped: str
    model: GPT


@torch.no_grad()
def measure_pairs(objective: Objective, model: GPT, batches: Iterable[tuple[dict, torch.Tensor]]) -> dict[str, float]:
    """Mean loss, accuracy (chosen reward above rejected), margin and rewards over `batches`."""
    sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
    n = 0
    with evaluating(model):
        for x, y in batches:
            x, y = {k: v.to(model.device) for k, v in x.items()}, y.to(model.device)
            out = objective(model, x, y)
            for name, value in (("loss", out.loss), ("accuracy", out.accuracy), ("margin", out.margins),
                                ("chosen_reward", out.chosen_rewards), ("rejected_reward", out.rejected_rewards)):
                sums[name] += float(value.float().sum())
            n += len(y)
    return {**{k: v / max(n, 1) for k, v in sums.items()}, "pairs": n}


def fit_pairs(
    cfg: AlignConfig,
    task: str,
    objective: Callable[[GPT, Reference | None], Objective],
    *,
    say: Callable[[str], None],
    progress: bool,
    pairs: Pairs | None = None,
    labels: list[str] | None = None,
    reference: str | None = "loss",
    respond_after: bool = True,
    extra: dict | None = None,
    reserve: int = 0,
) -> AlignResult:
    """The alignment recipes' one scaffold over `train_on_splits` and the `Trainer`: read
    and split the pairs (or take `pairs`), load the base (with a reward head when
    `labels`), choose what learns, set up the `Reference` (`reference` "loss": the
    objective uses it; "kl": only the held-out KL is measured against the base), train on
    `objective(policy, reference)` per pair, and measure every split and the held-out
    prompts before and after into metrics.json and responses.jsonl. `reserve` positions
    of the context stay free beyond each row's inputs (a reward model reads its last label too)."""
    with distributed_run(cfg, say) as (info, say):
        pairs = pairs or read_pairs(cfg.data, cfg.template, say)
        policy = load_base(cfg, labels)
        policy.tokenizer.chat_template = pairs.template  # saved with every checkpoint: chat uses the format it learned
        max_length = example_length(cfg, policy) - reserve
        batches = pair_batches(pairs, policy.tokenizer, cfg, info, max_length, say)
        torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn next: --seed decides them, not the RNG's history
        report = set_trainable(policy, cfg, say)
        say(str(report))
        policy.to(info.device)
        ref = None
        if reference == "loss":
            ref = Reference(policy, frozen_reference(cfg, policy))
            if cfg.precompute_ref:
                ref.precompute(batches, reference_key(cfg, pairs, policy.tokenizer, max_length), Path(cfg.out), say)
        step_objective = objective(policy, ref)
        held = HeldOut.of(pairs, cfg.eval_examples) if respond_after else None

        def held_out(when: str) -> dict:
            if held is None or not info.is_main:
                return {}

            def kl_reference() -> Reference:
                if ref is not None and (ref.frozen is not None or lora_layers(policy)):
                    return ref
                return Reference(policy, frozen_reference(cfg, policy))  # the base, loaded again to measure

            return held.measure(when, policy, kl_reference if reference is not None else None, progress)

        def write_cache() -> None:
            if ref is not None and ref.cache is not None:
                ref.write_cache(Path(cfg.out))

        run = train_on_splits(
            policy, cfg, report, info, batches, measure=lambda m, b: measure_pairs(step_objective, m, b),
            measures="the loss, accuracy and margins of the pairs", summary=_summary, eval_batch=EVAL_BATCH, say=say,
            progress=progress, inputs=as_inputs, loss_fn=lambda m, x, y: step_objective(m, x, y).loss.mean(),
            before_fit=write_cache, held_out=held_out, unit="pair",
        )
        responses = None
        if held is not None and info.is_main:
            responses = Path(cfg.out) / "responses.jsonl"
            write_responses(responses, held, pairs)
        metrics = {
            "task": task,
            "base": cfg.base,
            "data": cfg.data,
            "template": pairs.template,
            **(extra or {}),
            "trainable": report.to_dict(),
            "steps": run.result.step,
            "skipped_steps": run.result.skipped_steps,
            "dropped_rows": len(pairs.data.dropped),
            "truncated_pairs": {s: batches[s].truncated for s in EXAMPLE_SPLITS},
            "splits": {s: {"pairs": len(batches[s]), "evaluated": run.evaluated[s],
                           **({"before": run.before[s]} if run.before else {}), "after": run.after[s]} for s in EXAMPLE_SPLITS},
            **({"held_out": run.held_out} if any(run.held_out.values()) else {}),
        }
        write_metrics(cfg, info, metrics)
        return AlignResult(Path(cfg.out), run.result.checkpoint, metrics, responses, run.result.stopped, policy)


def _summary(m: dict) -> str:
    return ", ".join(f"{s} accuracy {m[s]['accuracy']:.3f} margin {m[s]['margin']:.3f}" for s in EXAMPLE_SPLITS)
