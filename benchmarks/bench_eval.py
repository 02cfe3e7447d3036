"""`lmforge eval` vs lm-evaluation-harness's `hf` backend: the same tasks, items and model, timed side by side.

The model is exported to Hugging Face format once; lm-eval's `hf` model reads that folder
with its stock task configs pointed at the same local files (tests/lm_eval_tasks/), and
lmforge loads the same folder. Each contender's time covers loading the model and the
data and scoring every request, per task, best of --repeat runs taken in turns (the
machine is shared). Before any timing the scores are compared: every request's
log-likelihood within 1e-4 and the same accuracies, or the script stops.

    python benchmarks/bench_eval.py --model /path/to/run --limit 50
    python benchmarks/bench_eval.py                      # a random `small` model with GPT-2's tokenizer
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _common import SHARED, best_of, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the lm-eval task files and data conversion
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch
from lm_eval_data import lm_eval_task

from lmforge.config import Config
from lmforge.eval.harness import Settings, evaluate_tasks
from lmforge.eval.tasks import parse_tasks
from lmforge.interop.hf import export_hf
from lmforge.loading import load
from lmforge.model import GPT
from lmforge.tokenizer import from_gpt2_files

TASKS = "lambada_openai,hellaswag,arc_easy,piqa,winogrande"


def model_folder(path: str | None, out: Path) -> Path:
    if path:
        model = load(path)
    else:
        torch.manual_seed(0)
        tok = from_gpt2_files(SHARED / "gpt2" / "encoder.json", SHARED / "gpt2" / "vocab.bpe")
        model = GPT(Config.from_name("small", vocab_size=tok.vocab_size, context_length=512))
        model.tokenizer = tok
    export_hf(model, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="any model lmforge loads (default: a random `small` preset with GPT-2's tokenizer)")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=50, help="items per task (default: 50)")
    p.add_argument("--batch-size", type=int, default=16, help="for both (default: 16)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--data-dir", default=str(SHARED / "eval"))
    args = p.parse_args()

    import datasets.config
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    datasets.config.HF_DATASETS_OFFLINE = True
    lm_eval.evaluator.add_env_info = lambda results: None  # its pip/compiler report is not evaluation
    tasks = parse_tasks(args.tasks)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    hf = model_folder(args.model, work / "hf")
    manager = TaskManager()  # indexing lm-eval's 10,000 task files is done once, outside the timing
    specs = {t.name: lm_eval_task(t.name, Path(args.data_dir), work / "data" / t.name, manager, rows=args.limit) for t in tasks}
    settings = Settings(limit=args.limit, batch_size=args.batch_size, bootstrap_iters=0, log_samples=True)
    config = load(hf).config
    print(f"model: {args.model or 'random small'} ({config.name}, {config.n_layer} layers, n_embd {config.n_embd}, "
          f"vocab {config.vocab_size:,}, context {config.context_length}); {args.limit} items per task, batch size {args.batch_size}, "
          f"{torch.get_num_threads()} threads")

    def ours(task):
        return evaluate_tasks(load(hf), [task], Path(args.data_dir), settings)

    def theirs(task):
        return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=[specs[task.name]], device="cpu",
                                       batch_size=args.batch_size, limit=args.limit, bootstrap_iters=0, log_samples=True,
                                       task_manager=manager, verbosity="ERROR")

    rows, total = [], {"lmforge": 0.0, "lm-eval": 0.0}
    for task in tasks:
        a, b = ours(task), theirs(task)  # warm both (dataset caches, first-call costs) and check the scores agree
        worst = check_same(task.name, a, b)
        times = best_of({"lmforge": lambda t=task: ours(t), "lm-eval": lambda t=task: theirs(t)}, args.repeat)
        for k in total:
            total[k] += times[k]
        r = a["results"][task.name]
        scores = ", ".join(f"{m} {r[m]:.4f}" for m in ("acc", "acc_norm") if m in r)
        rows.append((task.name, sum(len(s["arguments"]) for s in a["samples"][task.name]), times["lm-eval"], times["lmforge"],
                     f"{times['lm-eval'] / times['lmforge']:.2f}x", scores, f"{worst:.1e}"))
    rows.append(("total", sum(r[1] for r in rows), total["lm-eval"], total["lmforge"], f"{total['lm-eval'] / total['lmforge']:.2f}x", "",
                 ""))
    print_table(["task", "requests", "lm-eval hf (s)", "lmforge (s)", "speed-up", "scores (identical)", "max |d ll| - 2e-7 |ll|"], rows)


def check_same(name: str, ours: dict, theirs: dict) -> float:
    """The largest difference of a request's log-likelihood; stops the benchmark if any exceeds
    1e-4 (plus fp32's 2e-7 of the value: a random model's answers run to -1,000 nats) or an
    accuracy differs."""
    worst = 0.0
    samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
    for row, s in zip(ours["samples"][name], samples, strict=True):
        lls = row.get("loglikelihoods", [row.get("loglikelihood")])
        worst = max([worst, *(abs(x - r[0]) - 2e-7 * abs(r[0]) for x, r in zip(lls, s["filtered_resps"], strict=True))])
        if row["acc"] != s["acc"] or row.get("acc_norm", s.get("acc_norm")) != s.get("acc_norm"):
            raise SystemExit(f"{name} doc {row['doc_id']}: accuracy differs from lm-eval's")
    for metric in ("acc", "acc_norm", "perplexity"):
        if f"{metric},none" in theirs["results"][name] and abs(ours["results"][name][metric] - theirs["results"][name][f"{metric},none"]) > 1e-6 * max(
                1.0, abs(ours["results"][name][metric])):
            raise SystemExit(f"{name}: {metric} differs from lm-eval's")
    if worst > 1e-4:
        raise SystemExit(f"{name}: a log-likelihood differs from lm-eval's by {worst:.2e}")
    return worst


if __name__ == "__main__":
    main()
