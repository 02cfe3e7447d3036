"""`lmforge finetune classify | instruct` and `lmforge classify`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from lmforge.cli.common import add_command, add_group, progress_enabled
from lmforge.cli.flags import add_flags, config_from_args
from lmforge.cli.pretrain import exit_status
from lmforge.recipes.config import TRAINABLE_HELP, FinetuneConfig
from lmforge.text import plural

# TrainConfig fields that describe building a model from a preset: a fine-tuning run has a --base instead
NOT_FOR_FINETUNING = ("preset", "model", "context_length", "max_tokens", "init_from")


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "finetune", "teach a pretrained model a task: classification or instruction following")
    c = add_command(
        group,
        "classify",
        "train a classification head (e.g. spam vs ham) on a labelled file",
        _finetune_classify,
        examples="""
        lmforge finetune classify --base runs/base --data data/SMSSpamCollection --epochs 5 --out runs/spam
        lmforge finetune classify --base runs/base --data data/SMSSpamCollection --epochs 5 --trainable last-1 --out runs/spam-last
        lmforge finetune classify --base runs/base --data reviews.csv --text-field review --label-field stars --lora-r 8 --out runs/reviews
        """,
        description=f"""
        A head on the last real token's hidden state learns the labels of a file: the SMS spam
        collection (label<TAB>text), a CSV with a header, or JSON/JSONL records (--text-field,
        --label-field). Classes are balanced by undersampling and split 70/10/20 (seed 123).
        Weights that learn: --trainable {TRAINABLE_HELP}; or LoRA adapters (--lora-r) over a
        frozen base, in 4 bits with --quantize nf4. Writes checkpoints/, metrics.jsonl, loss.png
        and metrics.json (loss and accuracy per split, before and after, on at most
        --eval-examples examples of each split) into --out.
        """,
    )
    # sample prompts are continued by the language-model head, which a classifier does not train
    _add_finetune_flags(c, skip=("mask_prompt", "template", "sample_prompts", "sample_tokens"))
    i = add_command(
        group,
        "instruct",
        "instruction tuning on Alpaca-format or chat-format examples (responses learned, prompts masked)",
        _finetune_instruct,
        examples="""
        lmforge finetune instruct --base runs/base --data data/instruction-data.json --epochs 2 --out runs/instruct
        lmforge finetune instruct --base runs/base --data alpaca.json --lora-r 16 --lora-targets all-linear --out runs/alpaca-lora
        lmforge finetune instruct --base runs/base --data alpaca.json --lora-r 16 --quantize nf4 --out runs/alpaca-qlora
        """,
        description="""
        Each example (Alpaca instruction/input/output, or chat messages) is rendered with its
        template; the loss is taken on the responses only (--no-mask-prompt to learn prompts
        too), with <|endoftext|> learned once at each response's end. The file is split
        85/5/10 in order (the book's split). After training, greedy responses to the test
        prompts are written to responses.jsonl. Writes checkpoints/, metrics.jsonl, loss.png
        and metrics.json (the response loss of each split before and after) into --out. The
        losses and the answers cover at most --eval-examples examples of each split.
        """,
    )
    _add_finetune_flags(i, skip=("text_field", "label_field", "padding_side", "from_scratch"))
    p = add_command(
        sub,
        "classify",
        "label texts with a fine-tuned classifier",
        _classify,
        examples="""
        lmforge classify --model runs/spam "You are a winner! Claim your prize now"
        lmforge classify --model runs/spam "See you at 6?" "URGENT: your account is locked"
        """,
    )
    p.add_argument("--model", required=True, help="a classifier: a fine-tuning run folder or a model folder with labels")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument("texts", nargs="+", help="texts to label")


def _add_finetune_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...]) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with the same keys as these flags")
    add_flags(parser, skip=NOT_FOR_FINETUNING + skip, cls=FinetuneConfig)


def _finetune_classify(args: argparse.Namespace) -> int:
    from lmforge.data.batches import EXAMPLE_SPLITS
    from lmforge.recipes.classify import run

    result = _run(run, args)
    splits = result.metrics["splits"]
    print(ending(result.stopped, result.metrics["steps"]))
    for s in EXAMPLE_SPLITS:
        before = splits[s].get("before")
        was = f"{100 * before['accuracy']:6.2f}% -> " if before else ""
        print(f"{s:5} accuracy {was}{100 * splits[s]['after']['accuracy']:6.2f}%   loss {splits[s]['after']['loss']:.4f}"
              f"   ({measured_on(splits[s])})")
    print(f"model:   {result.checkpoint}")
    print(f"metrics: {result.out / 'metrics.json'}")
    print(f"try:     lmforge classify --model {result.out} \"Congratulations, you won a free cruise! Reply YES\"")
    resume_hint(result.stopped, result.out, "finetune classify")
    return exit_status(result.stopped)


def _finetune_instruct(args: argparse.Namespace) -> int:
    from lmforge.recipes.instruct import run

    result = _run(run, args)
    m = result.metrics
    print(ending(result.stopped, m["steps"]))
    for s, v in m["splits"].items():
        before = f"{v['before']['loss']:.4f} -> " if "before" in v else ""
        print(f"{s:5} response loss {before}{v['after']['loss']:.4f}   ({measured_on(v)})")
    print(f"model:     {result.checkpoint}")
    print(f"responses: {result.responses}")
    print(f"metrics:   {result.out / 'metrics.json'}")
    print(f"try:       lmforge chat --model {result.out}")
    resume_hint(result.stopped, result.out, "finetune instruct")
    return exit_status(result.stopped)


def ending(stopped: str, steps: int) -> str:
    """How the run ended: "trained 20 steps", or "stopped (time limit) after 12 steps"."""
    return f"trained {plural(steps, 'step')}" if stopped == "done" else f"stopped ({stopped}) after {plural(steps, 'step')}"


def measured_on(split: dict, what: str = "example") -> str:
    """"200 of 935 examples": how much of a split the before/after numbers read (--eval-examples)."""
    n, k = split["examples"], split.get("evaluated", split["examples"])
    return plural(n, what) if k == n else f"{k:,} of {plural(n, what)}"


def _run(recipe: Callable[..., Any], args: argparse.Namespace) -> Any:
    """The recipe on the run config from --config and the flags, narrating on stderr."""
    cfg = config_from_args(args, args.config, cls=FinetuneConfig)
    return recipe(cfg, say=lambda m: print(m, file=sys.stderr), progress=progress_enabled())


def resume_hint(stopped: str, out: object, command: str) -> None:
    if stopped != "done":
        print(f"continue with: lmforge {command} --config {out}/run.json --resume")


def _classify(args: argparse.Namespace) -> int:
    from lmforge.device import pick_device
    from lmforge.loading import load
    from lmforge.recipes.classify import predict

    model = load(args.model, device=pick_device(args.device))
    for text, (label, prob) in zip(args.texts, predict(model, args.texts)):
        print(f"{label}\t{prob:.4f}\t{text}")
    return 0
