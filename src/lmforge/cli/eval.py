"""`lmforge eval`: benchmark tasks scored as lm-evaluation-harness scores them, a text
file's perplexity and bits per byte, and (`lmforge eval judge`) judges of answers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmforge.cli.common import add_command, progress_enabled
from lmforge.cli.judge import add_judge_parser
from lmforge.device import pick_device
from lmforge.errors import LmforgeError
from lmforge.eval.harness import Settings, check_out_path, evaluate_tasks, evaluate_text, results_document, write_results
from lmforge.eval.metrics import BOOTSTRAP_ITERS
from lmforge.eval.tasks import DEFAULT_SEED, TASKS, parse_tasks, resolve_data_dir
from lmforge.finetune.adapter import weights_fingerprint
from lmforge.loading import load, resolve_model_path


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "eval", "score a model on benchmark tasks (as lm-eval does) or measure a text's bits per byte", _eval,
        examples="""
        lmforge eval --model runs/quickstart --tasks arc_easy,hellaswag,piqa --data-dir ../shared/data/eval
        lmforge eval --model path/to/hf-gpt2 --tasks all --data-dir ../shared/data/eval --num-fewshot 5 --limit 200 --out gpt2.json
        lmforge eval --model runs/base --text data/tinyshakespeare.txt --stride 128
        lmforge eval judge runs/dpo/responses.jsonl runs/sft/responses.jsonl --reward-model runs/rm
        """,
        description=f"""
        Score a model (our folder or run, a Hugging Face folder, a llama2.c .bin) on benchmark
        tasks read from local files, with the prompts, metrics and standard errors of
        lm-evaluation-harness 0.4.13: {', '.join(TASKS)}. --data-dir is a folder laid out like
        shared/data/eval (lambada/, hellaswag/, arc/, ...); nothing is downloaded.
        Multiple choice reports acc and acc_norm (log-likelihood per character), LAMBADA
        acc (the last word is the greedy continuation) and perplexity. arc_challenge is the
        dev split (the test split is not in the folder). With --text, the file's perplexity
        and bits per byte in sliding windows (bits per byte compares models whose tokenizers
        differ). Prints a table and writes every score, the settings and the model's identity
        to --out (with --log-samples, every item's log-likelihoods too).
        `lmforge eval judge --help`: judging answers instead.""",
    )
    p.add_argument("--model", metavar="PATH", help="model folder or run (ours or Hugging Face) or llama2.c .bin")
    p.add_argument("--tasks", metavar="LIST", help=f"comma-separated task names, or all ({', '.join(TASKS)})")
    p.add_argument("--data-dir", metavar="DIR", help="folder laid out like shared/data/eval, holding the tasks' files")
    p.add_argument("--num-fewshot", type=int, default=0, metavar="K", help="solved examples before each question (default: 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="contexts per forward pass, each with all its answers (default: 16)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the few-shot draw (default: {DEFAULT_SEED}, lm-eval's)")
    p.add_argument("--bootstrap-iters", type=int, default=BOOTSTRAP_ITERS, metavar="N",
                   help=f"resamples for perplexity's standard error, 0 for none (default: {BOOTSTRAP_ITERS:,}, lm-eval's)")
    p.add_argument("--text", metavar="FILE", help="also measure this text file's perplexity and bits per byte")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="with --text: tokens each window advances (default: the model's context length, disjoint windows)")
    p.add_argument("--out", default="eval.json", metavar="PATH", help="results file (default: eval.json)")
    p.add_argument("--log-samples", action="store_true", help="write each item's requests and log-likelihoods to --out too")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, mps")
    add_judge_parser(p.add_subparsers(dest="eval_command", metavar="COMMAND", required=False))  # `lmforge eval judge ...`


def _eval(args: argparse.Namespace) -> int:
    if not args.model:
        raise LmforgeError("--model is required: the model to evaluate (a model folder, a run, a Hugging Face folder or a .bin)")
    if not args.tasks and args.text is None:
        raise LmforgeError(f"give --tasks (some of {', '.join(TASKS)}) and --data-dir, or --text FILE, or both")
    if args.stride is not None and args.text is None:
        raise LmforgeError("--stride is the window step of --text; give --text FILE too")
    settings = Settings(args.num_fewshot, args.limit, args.batch_size, args.seed, args.bootstrap_iters, args.log_samples)
    settings.check()
    tasks = parse_tasks(args.tasks) if args.tasks is not None else []
    if tasks and not args.data_dir:
        raise LmforgeError("--tasks needs --data-dir: the folder holding the tasks' files (laid out like shared/data/eval)")
    if args.data_dir is not None and not args.data_dir:
        raise LmforgeError("--data-dir is empty; give the folder holding the tasks' files")
    data_dir = resolve_data_dir(args.data_dir) if tasks else None
    if args.text is not None and not Path(args.text).is_file():
        raise LmforgeError(f"--text {args.text!r} is not a regular file; give a text file to measure")
    out = check_out_path(Path(args.out))
    device = pick_device(args.device)
    model = load(args.model, device=device)
    progress = _progress if progress_enabled() else None
    task_results = evaluate_tasks(model, tasks, data_dir, settings, progress) if tasks else None
    text = evaluate_text(model, Path(args.text), args.stride, min(settings.batch_size, 8), progress) if args.text is not None else None
    doc = results_document(_identity(args.model, model), settings, tasks, data_dir, task_results, text)
    write_results(out, doc)
    _print(doc)
    print(f"wrote {out}")
    return 0


def _identity(path: str, model: Any) -> dict[str, Any]:
    """What makes the scores reproducible: where the weights came from, their hashes, the shape."""
    source = resolve_model_path(path)
    tok = model.tokenizer
    return {"path": str(path), "source": str(source), "weights_sha256": weights_fingerprint(source),
            "params": model.num_params(), "config": model.config.to_dict(),
            "tokenizer": None if tok is None else {"type": type(tok).__name__, "vocab_size": getattr(tok, "vocab_size", None)}}


def _progress(what: str, total: int) -> Callable[[int], None]:
    bar = tqdm(total=total, desc=what, unit="req" if what in TASKS else "win", leave=False, file=sys.stderr)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


def _fmt(x: object) -> str:
    return "" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _print(doc: dict[str, Any]) -> None:
    rows = [("task", "split", "n", "shots", "metric", "value", "stderr", "chance")]
    for name, r in doc.get("results", {}).items():
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in r:
                chance = r.get("chance") if metric != "perplexity" else None
                rows.append((name, r["split"], f"{r['n']:,}", str(r["num_fewshot"]), metric, _fmt(r[metric]),
                             _fmt(r.get(f"{metric}_stderr")), _fmt(chance)))
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for k, row in enumerate(rows):
            print("  ".join(c.ljust(w) if i < 2 or i == 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if k == 0:
                print("  ".join("-" * w for w in widths))
    for note in doc.get("notes", []):
        print(f"note: {note}")
    if "text" in doc:
        t = doc["text"]
        print(f"{t['file']}: {t['bits_per_byte']:.4f} bits per byte, token perplexity {t['perplexity']:.3f} "
              f"({t['tokens']:,} tokens, {t['bytes']:,} bytes, window {t['window']}, stride {t['stride']})")
