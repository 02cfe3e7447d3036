"""The classification recipe: a base model learns to label texts (spam or ham).

A head on the last real token's hidden state (`GPT.score`, padding-aware) reads the
whole text, since under causal attention only the last token has seen all of it. The
labelled file is balanced by undersampling and split 70/10/20 (`lmforge.data.labeled`),
the loop, checkpoints and metrics are the trainer's, and loss and accuracy are measured
on every split before and after training into `metrics.json` (on at most --eval-examples
of each split: a pass over every example costs more than a short run's training).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.batches import EXAMPLE_SPLITS
from lmforge.data.labeled import ClassificationBatches, balanced_split, pad_rows, read_labeled, save_split
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.recipes.common import distributed_run, example_length, load_base, set_trainable, train_on_splits, write_metrics
from lmforge.recipes.config import FinetuneConfig
from lmforge.text import plural

EVAL_BATCH = 32


def classification_loss(model: torch.nn.Module, x: dict, y: torch.Tensor) -> torch.Tensor:
    return model(x["input_ids"], y, attention_mask=x["attention_mask"])  # a classifier's forward gives its loss


def as_inputs(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[dict, torch.Tensor]:
    ids, mask, labels = batch
    return {"input_ids": ids, "attention_mask": mask}, labels


@torch.no_grad()
def evaluate(model: GPT, batches: Iterable[tuple[dict, torch.Tensor]]) -> dict[str, float]:
    """Mean loss and accuracy over the examples of `batches` (as `as_inputs` gives them)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in batches:
        logits = model.classify(x["input_ids"].to(model.device), x["attention_mask"].to(model.device))
        y = y.to(model.device)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    model.train(was_training)
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "examples": n}


@torch.no_grad()
def predict(model: GPT, texts: list[str], max_length: int | None = None) -> list[tuple[str, float]]:
    """(label, probability) for each text."""
    if model.score is None:
        raise LmforgeError("this model has no classification head; train one with `lmforge finetune classify`")
    tok = model.tokenizer
    if tok is None:
        raise LmforgeError("this model has no tokenizer beside its weights")
    limit = min(max_length or model.config.context_length, model.config.context_length)
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise LmforgeError(f"text {empty[0] + 1} of {len(texts)} is empty: there is nothing to label")
    model.eval()
    out = []
    for text in texts:
        ids = tok.encode(text)[:limit] or [tok.eot_id]
        probs = model.classify(torch.tensor([ids], device=model.device)).softmax(-1)[0]
        k = int(probs.argmax())
        out.append((model.config.labels[k], float(probs[k])))
    return out


@torch.no_grad()
def label_probabilities(model: GPT, texts: Sequence[str], label: str, batch: int = EVAL_BATCH) -> list[float]:
    """The classifier's probability of `label` for each text (cut to its first
    context-length tokens), in padded batches: a classifier used as a reward or a judge."""
    if model.score is None:
        raise LmforgeError("this model has no classification head; train one with `lmforge finetune classify`")
    labels = list(model.config.labels)
    if label not in labels:
        raise LmforgeError(f"the classifier's labels are {labels}; {label!r} is not one of them (say which one scores: "
                           f"--reward-label {labels[-1]})")
    tok = model.tokenizer
    if tok is None:
        raise LmforgeError("this model has no tokenizer beside its weights")
    k, limit = labels.index(label), model.config.context_length
    rows = [tok.encode(t)[:limit] or [tok.eot_id] for t in texts]
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(rows), batch):
        ids, mask = pad_rows(rows[start : start + batch], getattr(tok, "eot_id", None) or 0)
        out += model.classify(ids.to(model.device), mask.to(model.device)).softmax(-1)[:, k].tolist()
    model.train(was_training)
    return out


@dataclass
class ClassifyResult:
    out: Path
    checkpoint: Path | None
    metrics: dict
    stopped: str


def run(cfg: FinetuneConfig, say: Callable[[str], None] = print, progress: bool = True) -> ClassifyResult:
    with distributed_run(cfg, say) as (info, say):
        examples, labels = read_labeled(cfg.data, text_field=cfg.text_field, label_field=cfg.label_field)
        try:  # the book's split (seed 123), the same whatever the training seed
            splits = balanced_split(examples, label_names=labels)
        except LmforgeError as e:
            raise LmforgeError(f"{cfg.data}: {e}") from None
        counts = ", ".join(f"{s} {len(splits[s]):,}" for s in EXAMPLE_SPLITS)
        say(f"data: {plural(len(examples), 'example')}, labels {labels}; balanced split: {counts}")
        model = load_base(cfg, labels)
        tokenizer = model.tokenizer
        max_length = example_length(cfg, model)
        data = {
            s: ClassificationBatches(splits[s], tokenizer, batch_size=cfg.batch_size * (info.world_size if s == "train" else 1),
                                     seed=cfg.seed, max_length=max_length, padding_side=cfg.padding_side,
                                     pad_id=getattr(tokenizer, "eot_id", None) or 0,  # any id: the attention mask marks the pads
                                     drop_last=s == "train")
            for s in EXAMPLE_SPLITS
        }
        if data["train"].truncated:
            cut = data["train"].truncated
            say(f"note: {plural(cut, 'training text')} {'was' if cut == 1 else 'were'} cut to {max_length} tokens")
        report = set_trainable(model, cfg, say)
        say(str(report))
        run = train_on_splits(
            model, cfg, report, info, data, measure=evaluate, measures="the loss and accuracy", summary=_summary,
            eval_batch=EVAL_BATCH, say=say, progress=progress, inputs=as_inputs, loss_fn=classification_loss,
            before_fit=lambda: save_split({s: splits[s] for s in EXAMPLE_SPLITS}, Path(cfg.out) / "split", labels),
        )
        before, after = run.before, run.after
        metrics = {
            "task": "classify",
            "base": cfg.base,
            "from_scratch": cfg.from_scratch,
            "labels": labels,
            "trainable": report.to_dict(),
            "steps": run.result.step,
            "splits": {s: {"examples": len(data[s]), "evaluated": run.evaluated[s],
                           **({"before": _strip(before[s])} if before else {}), "after": _strip(after[s])}
                       for s in EXAMPLE_SPLITS},
            **({"held_out": run.held_out} if any(run.held_out.values()) else {}),  # --replay: the pretraining loss
        }
        write_metrics(cfg, info, metrics)
        return ClassifyResult(Path(cfg.out), run.result.checkpoint, metrics, run.result.stopped)


def _strip(m: dict) -> dict:
    return {"loss": m["loss"], "accuracy": m["accuracy"]}


def _summary(m: dict) -> str:
    return ", ".join(f"{s} loss {m[s]['loss']:.3f} accuracy {100 * m[s]['accuracy']:.2f}%" for s in EXAMPLE_SPLITS)
