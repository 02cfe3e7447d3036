"""`lmforge pretrain` and `lmforge quickstart` (the whole pipeline in one command)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lmforge.cli.common import add_command, add_corpus_flags, progress_enabled
from lmforge.cli.flags import add_flags, config_from_args
from lmforge.text import plural


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "pretrain",
        "train a model from scratch on a prepared data folder",
        _pretrain,
        examples="""
        lmforge pretrain --data runs/data --preset micro --out runs/micro --max-steps 2000
        lmforge pretrain --config run.toml --lr 6e-4            # flags override the file
        lmforge pretrain --config run.toml --resume             # newest intact checkpoint in --out
        torchrun --nproc_per_node=2 -m lmforge pretrain --config run.toml   # DDP (--strategy fsdp for FSDP)
        """,
        description="""
        Next-token pretraining: AdamW (no decay on norms, biases, embeddings), warmup then
        cosine decay, gradient clipping and accumulation, evaluation (loss, perplexity,
        sampled continuations), checkpoints that resume exactly. The run folder (--out)
        holds checkpoints/, metrics.jsonl, loss.png and run.json.
        """,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with the same keys as these flags; [model] overrides the preset")
    add_flags(p)

    q = add_command(
        sub,
        "quickstart",
        "the whole pipeline on the built-in corpus: tokenizer, data, a small model, samples",
        _quickstart,
        examples="""
        lmforge quickstart                      # 6 minutes of training, about 6 min 15 s in all on 2 CPU cores
        lmforge quickstart --minutes 2 --out runs/try
        lmforge quickstart --input my_texts/ --vocab-size 2048
        """,
    )
    q.add_argument("--out", default="runs/quickstart", help="folder for everything it makes (default: runs/quickstart)")
    q.add_argument("--minutes", type=float, default=6.0, help="training time budget in minutes (default: 6)")
    # the defaults are QuickstartConfig's (the measured best), not repeated here
    q.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default: 2048, the measured best for the built-in corpus)")
    q.add_argument("--preset", help="model preset (default: tiny, 4 layers x 128, the measured best for 6 minutes)")
    add_corpus_flags(q, workers="processes for the tokenizer, threads for the data",
                     overwrite="replace the tokenizer/, data/ and model/ an earlier quickstart left in --out "
                               "(only those, and never a folder that holds an --input)")


def _pretrain(args: argparse.Namespace) -> int:
    from lmforge.recipes.pretrain import run

    cfg = config_from_args(args, args.config)
    result = run(cfg, say=lambda m: print(m, file=sys.stderr), progress=progress_enabled())
    _report(result, cfg.out)
    return exit_status(result.stopped)


# A run a signal stopped (after writing its checkpoint) exits as the signal asks: 128 + its
# number, so a scheduler or a shell script can tell it from a finished run.
STOPPED_BY = {"interrupted": 130, "terminated": 143}  # Ctrl-C (SIGINT), SIGTERM


def exit_status(stopped: str) -> int:
    """The exit status of a run that ended as `TrainResult.stopped` says: 0 when it
    finished or reached its time limit, 130 after Ctrl-C, 143 after SIGTERM."""
    return STOPPED_BY.get(stopped, 0)


def _report(result: object, out: str) -> None:
    from lmforge.train.distributed import DistInfo

    if DistInfo.launched_rank() != 0:
        return
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    if "bpb" in result.val_metrics:
        val += f" ({result.val_metrics['bpb']:.3f} bits per byte)"
    skipped = f", {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""
    print(f"{result.stopped} at step {result.step}{val}{skipped}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.metrics}")
    if result.plot:
        print(f"loss curve: {result.plot}")
    if result.stopped != "done":
        print(f"continue with: lmforge pretrain --config {Path(out) / 'run.json'} --resume  (or the same flags plus --resume)")


def _quickstart(args: argparse.Namespace) -> int:
    from lmforge.recipes.quickstart import QuickstartConfig, python_shape, run

    started = time.monotonic()
    say = lambda message: print(message, flush=True)  # noqa: E731
    chosen = {k: v for k, v in (("vocab_size", args.vocab_size), ("preset", args.preset)) if v is not None}
    cfg = QuickstartConfig(out=args.out, minutes=args.minutes, inputs=args.input or (), text_field=args.text_field,
                           workers=args.workers, overwrite=args.overwrite, **chosen)
    result = run(cfg, say=say, progress=progress_enabled())
    out = Path(args.out)
    minutes = (time.monotonic() - started) / 60
    if result.val_loss is not None:
        bpb = result.val_metrics.get("bpb")
        val = f"validation loss {result.val_loss:.3f} nats per token" + (f", {bpb:.3f} bits per byte" if bpb is not None else "")
    else:
        val = "no validation loss yet"
    if result.stopped in STOPPED_BY:
        say(f"\nStopped ({result.stopped}) after {minutes:.1f} minutes: {plural(result.step, 'step')}, {val}.")
    else:
        say(f"\nDone in {minutes:.1f} minutes: {plural(result.step, 'step')}, {val}.")
    if result.samples:
        say("\nWhat the model writes now (temperature 0.8, top-k 50):")
        for text in result.samples:
            say("  > " + text.replace("\n", "\n    "))
        if not args.input:
            say(f"  Python so far: {python_shape(result.samples).summary()}")
    say(f"\nloss curve:  {result.plot}")
    say(f"checkpoint:  {result.checkpoint}")
    say(f"metrics:     {result.metrics}")
    say("\nNext, try:")
    prompt = "The " if args.input else "def fibonacci(n):"
    say(f"  lmforge generate --model {out / 'model'} --prompt '{prompt}' --max-new-tokens 100 --stream")
    say(f"  lmforge chat --model {out / 'model'}")
    say(f"  lmforge pretrain --config {out / 'model' / 'run.json'} --max-steps {result.step * 3} --time-limit 0 --resume"
        "   # train longer: a new, longer cosine from here")
    return exit_status(result.stopped)
