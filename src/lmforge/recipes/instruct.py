"""The instruction-tuning recipe: a base model learns to answer in a template.

Examples (Alpaca instruction/input/output, or chat messages) are rendered with the
template of `lmforge.data.instruct`, batches are padded per batch, and the loss is
taken on the responses only (the prompt's labels are -100), with <|endoftext|> learned
once at the end of each. The template's name is saved in the tokenizer
(`tokenizer.chat_template`), so `lmforge chat` and `lmforge generate --chat` talk to the
model in the format it learned. After training the held-out prompts are answered
(greedy) into `responses.jsonl`: at most --eval-examples of them, spread over the test
split, as the before/after response losses read at most that many examples per split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmforge.data.batches import EXAMPLE_SPLITS
from lmforge.data.instruct import IGNORE_INDEX, InstructionBatches, book_split, read_instructions
from lmforge.engine import Completion, Engine, SamplingParams, end_of_text_ids
from lmforge.io import atomic_write_text
from lmforge.model import GPT
from lmforge.recipes.common import (
    distributed_run,
    eval_rows,
    example_length,
    load_base,
    set_trainable,
    train_on_splits,
    write_metrics,
)
from lmforge.recipes.config import FinetuneConfig
from lmforge.text import plural
from lmforge.tokenizer.templates import Template, template_named
from lmforge.train.loss import next_token_loss

EVAL_BATCH = 8
RESPONSE_TOKENS = 256  # at most, per held-out response


@torch.no_grad()
def response_loss(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Mean cross-entropy per response token (every learned label weighs the same)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        n = int((y != IGNORE_INDEX).sum())
        total += float(next_token_loss(model, x.to(model.device), y.to(model.device))) * n
        count += n
    model.train(was_training)
    return {"loss": total / max(count, 1), "tokens": count}


def choose_template(cfg: FinetuneConfig, items: list[dict]) -> str:
    if cfg.template != "auto":
        return cfg.template
    return "chat" if any("messages" in item for item in items) else "alpaca"


@torch.no_grad()
def respond(model: GPT, prompts: Sequence[str], *, stop_strings: Sequence[str] = (), max_new_tokens: int = RESPONSE_TOKENS,
            batch: int = 8, sampling: SamplingParams = SamplingParams(temperature=0.0), seed: int | None = None,
            progress: bool = False, desc: str = "answers") -> list[Completion | None]:
    """The model's completion of each rendered prompt (greedy by default), in batches with
    the `Engine`; None for a prompt that leaves no room in the context. The weights stay as
    training left them and the model is back in training mode afterwards. With `progress`,
    a bar counts the answers (up to 256 tokens each: minutes on a CPU)."""
    tok = model.tokenizer
    engine = Engine(model, tok, packed=False)
    context = model.config.context_length
    out: list[Completion | None] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="answer", leave=False, disable=not progress)
    for start in range(0, len(prompts), batch):
        chunk = [tok.encode(p) for p in prompts[start : start + batch]]
        fits = [ids for ids in chunk if len(ids) < context]
        budget = min(max_new_tokens, context - max(len(ids) for ids in fits)) if fits else 0
        done = iter(engine.generate(fits, max_new_tokens=budget, sampling=sampling, seed=None if seed is None else seed + start,
                                    stop_ids=end_of_text_ids(tok), stop_strings=stop_strings) if fits and budget > 0 else [])
        out += [next(done) if len(ids) < context and budget > 0 else None for ids in chunk]
        bar.update(len(chunk))
    bar.close()
    model.train()
    return out


def prompt_text(template: Template, item: dict) -> str:
    """What the model reads before its reply to `item`: everything before the last reply."""
    segments = template.item_segments(item)
    return "".join(p + r for p, r in segments[:-1]) + segments[-1][0]


@torch.no_grad()
def answer(model: GPT, items: list[dict], template_name: str, max_new_tokens: int = RESPONSE_TOKENS, batch: int = 8,
           progress: bool = False) -> list[dict]:
    """Greedy responses to each item's prompt (everything before its last reply), as
    records: the item with its "response" (None, with a "note", when it does not fit)."""
    template = template_named(template_name)
    context = model.config.context_length
    completions = respond(model, [prompt_text(template, item) for item in items], stop_strings=template.stop_strings,
                          max_new_tokens=max_new_tokens, batch=batch, progress=progress)
    out: list[dict] = []
    for item, completion in zip(items, completions):
        record = dict(item)
        record["response"] = completion.text.strip() if completion is not None else None
        if completion is None:
            record["note"] = f"the prompt leaves no room in the context ({context} tokens)"
        out.append(record)
    return out


@dataclass
class InstructResult:
    out: Path
    checkpoint: Path | None
    metrics: dict
    responses: Path
    stopped: str


def run(cfg: FinetuneConfig, say: Callable[[str], None] = print, progress: bool = True) -> InstructResult:
    with distributed_run(cfg, say) as (info, say):
        items = read_instructions(cfg.data)
        splits = book_split(items)
        name = choose_template(cfg, items)
        say(f"data: {plural(len(items), 'example')} ({name} template); split in order: "
            + ", ".join(f"{s} {len(splits[s]):,}" for s in EXAMPLE_SPLITS))
        model = load_base(cfg)
        tokenizer = model.tokenizer
        tokenizer.chat_template = name  # saved with every checkpoint: chat uses the format the model learned
        max_length = example_length(cfg, model)
        data = {
            s: InstructionBatches(splits[s], tokenizer, batch_size=cfg.batch_size * (info.world_size if s == "train" else 1),
                                  seed=cfg.seed, template=template_named(name), mask_prompt=cfg.mask_prompt,
                                  max_length=max_length, drop_last=s == "train")
            for s in EXAMPLE_SPLITS
        }
        for s in EXAMPLE_SPLITS:
            if data[s].dropped:
                say(f"note: {plural(len(data[s].dropped), f'{s} example')} with no response left within {max_length} tokens "
                    f"{'is' if len(data[s].dropped) == 1 else 'are'} left out")
        report = set_trainable(model, cfg, say)
        say(str(report))
        run = train_on_splits(model, cfg, report, info, data, measure=response_loss, measures="the response loss",
                              summary=_summary, eval_batch=EVAL_BATCH, say=say, progress=progress, val_metrics=_perplexity)
        responses = Path(cfg.out) / "responses.jsonl"
        test = splits["test"]
        asked = [test[i] for i in eval_rows(len(test), cfg.eval_examples)]
        if info.is_main:
            which = plural(len(test), "test example")
            if len(asked) < len(test):
                which = f"{len(asked):,} of {which} (--eval-examples N changes how many; 0 answers every one)"
            say(f"writing greedy answers for {which} to {responses}")
            lines = [json.dumps(r, ensure_ascii=False) for r in answer(model, asked, name, progress=progress)]
            atomic_write_text(responses, "\n".join(lines) + "\n")
        metrics = {
            "task": "instruct",
            "base": cfg.base,
            "template": name,
            "mask_prompt": cfg.mask_prompt,
            "trainable": report.to_dict(),
            "steps": run.result.step,
            "splits": {s: {"examples": len(data[s]), "evaluated": run.evaluated[s],
                           **({"before": run.before[s]} if run.before else {}), "after": run.after[s]} for s in EXAMPLE_SPLITS},
            "responses": len(asked),
            **({"held_out": run.held_out} if any(run.held_out.values()) else {}),  # --replay: the pretraining loss
        }
        write_metrics(cfg, info, metrics)
        return InstructResult(Path(cfg.out), run.result.checkpoint, metrics, responses, run.result.stopped)


def _perplexity(loss: float) -> dict[str, float]:
    """What the trainer's validation loss also means here: the perplexity per response token."""
    return {"ppl": math.exp(min(loss, 50.0))}


def _summary(m: dict) -> str:
    return ", ".join(f"{s} response loss {m[s]['loss']:.3f}" for s in EXAMPLE_SPLITS)
