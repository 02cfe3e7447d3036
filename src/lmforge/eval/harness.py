"""Run benchmark tasks (and a text file's perplexity) on a model: the results as one dict.

The dict is what `lmforge eval` writes as JSON: every score under its task and metric
name (`acc`, `acc_norm`, `perplexity`, each with `*_stderr`), the settings, the
model's identity (given by the caller, who loaded the model), notes on what differs
from lm-eval's setup, and, with `log_samples`, every item's requests and per-choice
log-likelihoods.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval import metrics
from lmforge.eval.loglikelihood import Scored, TextEncoder, rolling_loglikelihood, score_pairs
from lmforge.eval.tasks import DEFAULT_SEED, FewshotSampler, Item, Task, fewshot_prefix, load_items, requests
from lmforge.io import atomic_write_text
from lmforge.model import GPT

FORMAT = "lmforge-eval"  # marks our results file: the only kind --out replaces


@dataclass(frozen=True)
class Settings:
    num_fewshot: int = 0
    limit: int | None = None
    batch_size: int = 16
    seed: int = DEFAULT_SEED
    bootstrap_iters: int = metrics.BOOTSTRAP_ITERS
    log_samples: bool = False

    def check(self) -> None:
        if self.num_fewshot < 0:
            raise LmforgeError(f"--num-fewshot must be 0 or more (examples put before each question), got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise LmforgeError(f"--limit must be at least 1 (items per task; leave it out for every item), got {self.limit}")
        if self.batch_size < 1:
            raise LmforgeError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.bootstrap_iters < 0:
            raise LmforgeError(f"--bootstrap-iters must be 0 (no perplexity stderr) or more, got {self.bootstrap_iters}")


Progress = Callable[[str, int], Callable[[int], None]]  # (what, total) -> advance(n)


def evaluate_tasks(model: GPT, tasks: Sequence[Task], data_dir: Path, settings: Settings = Settings(),
                   progress: Progress | None = None) -> dict[str, Any]:
    """{"results": {task: scores}, "samples": {task: [...]} (with log_samples), "notes": [...]}."""
    settings.check()
    encoder = TextEncoder(model.tokenizer)
    results: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    notes = [t.note for t in tasks if t.note]
    prepared = []  # every file read and encoded before any model work: a bad item fails in seconds, not after a task
    for task in tasks:
        items, prompts = _prepare(task, data_dir, settings)
        encoded = [[encoder.pair(c, k) for c, k in reqs] for reqs in prompts]
        fits = [all(len(k) <= model.config.context_length for _, k in pairs) for pairs in encoded]
        if not all(fits):
            left = len(fits) - sum(fits)
            if left == len(fits):
                raise LmforgeError(f"{task.name}: every answer is longer than the model's context of {model.config.context_length} "
                                   "tokens; a model with a longer context can score this task")
            notes.append(f"{task.name}: left out {left} of {len(fits)} items with an answer longer than the model's context "
                         f"({model.config.context_length} tokens), which no window can score whole")
            items, prompts, encoded = ([x for x, ok in zip(xs, fits) if ok] for xs in (items, prompts, encoded))
        prepared.append((task, items, prompts, encoded, len(fits) - len(items)))
    for task, items, prompts, encoded, left_out in prepared:
        start = time.perf_counter()
        pairs = [pair for item_pairs in encoded for pair in item_pairs]
        advance = progress(task.name, len(pairs)) if progress else None
        scored = score_pairs(model, pairs, settings.batch_size, advance)
        per_item, at = [], 0
        for reqs in prompts:
            per_item.append(scored[at : at + len(reqs)])
            at += len(reqs)
        results[task.name], rows = _scores(task, items, per_item, settings)
        if left_out:
            results[task.name]["left_out"] = left_out
        results[task.name]["seconds"] = round(time.perf_counter() - start, 3)
        if settings.log_samples:
            samples[task.name] = [row | {"arguments": [list(r) for r in reqs]} for row, reqs in zip(rows, prompts)]
    return {"results": results, "samples": samples, "notes": notes}


def _prepare(task: Task, data_dir: Path, settings: Settings) -> tuple[list[Item], list[list[tuple[str, str]]]]:
    same_split_pool = settings.num_fewshot and not task.fewshot_files  # needs the whole split, not just the first items
    everything = load_items(task, data_dir, limit=None if same_split_pool else settings.limit)
    items = everything[: settings.limit] if settings.limit else everything
    prompts = []
    if settings.num_fewshot:
        pool = load_items(task, data_dir, fewshot=True) if task.fewshot_files else everything
        sampler = FewshotSampler(pool, settings.seed, same_split=not task.fewshot_files)
        for item in items:
            prompts.append(requests(task, item, fewshot_prefix(sampler.sample(settings.num_fewshot, item))))
    else:
        prompts = [requests(task, item) for item in items]
    return items, prompts


def _scores(task: Task, items: list[Item], per_item: list[list[Scored]], settings: Settings) -> tuple[dict[str, Any], list[dict]]:
    out: dict[str, Any] = {"split": task.split, "n": len(items), "num_fewshot": settings.num_fewshot}
    if task.fewshot_split and settings.num_fewshot:
        out["fewshot_split"] = task.fewshot_split
    rows: list[dict[str, Any]] = []
    if task.kind == "loglikelihood":
        lls = [s[0].loglikelihood for s in per_item]
        acc = [float(s[0].is_greedy) for s in per_item]
        out |= {"acc": metrics.mean(acc), "acc_stderr": metrics.mean_stderr(acc), "perplexity": metrics.perplexity(lls),
                "perplexity_stderr": metrics.perplexity_stderr(lls, settings.bootstrap_iters)}
        rows = [{"doc_id": i, "target": it.target, "loglikelihood": s[0].loglikelihood, "is_greedy": s[0].is_greedy,
                 "tokens": s[0].tokens, "acc": a} for i, (it, s, a) in enumerate(zip(items, per_item, acc))]
        return out, rows
    accs, norms = [], []
    for i, (item, scored) in enumerate(zip(items, per_item)):
        lls = [s.loglikelihood for s in scored]
        acc, norm = metrics.choice_scores(lls, item.choices, item.gold)
        accs.append(acc)
        norms.append(norm)
        rows.append({"doc_id": i, "gold": item.gold, "loglikelihoods": lls, "is_greedy": [s.is_greedy for s in scored],
                     "tokens": [s.tokens for s in scored], "acc": acc} | ({"acc_norm": norm} if "acc_norm" in task.metrics else {}))
    out |= {"acc": metrics.mean(accs), "acc_stderr": metrics.mean_stderr(accs)}
    if "acc_norm" in task.metrics:
        out |= {"acc_norm": metrics.mean(norms), "acc_norm_stderr": metrics.mean_stderr(norms)}
    out["chance"] = metrics.mean([1 / len(it.choices) for it in items])
    return out, rows


def evaluate_text(model: GPT, path: Path, stride: int | None = None, batch_size: int = 8,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Perplexity and bits per byte of one text file, read as one document (UTF-8; undecodable
    bytes count as U+FFFD), in windows of the model's context advancing `stride` tokens
    (default: the context length, lm-eval's disjoint windows)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"--text {path} is not a regular file; give a text file to measure")
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text:
        raise LmforgeError(f"--text {path} is empty; there is nothing to measure")
    encoder = TextEncoder(model.tokenizer)
    if encoder.prefix_id is None:
        raise LmforgeError("measuring a text needs a BOS or <|endoftext|> token to start from; this tokenizer has neither")
    L = model.config.context_length
    stride = L if stride is None else stride
    if not 1 <= stride <= L:
        raise LmforgeError(f"--stride must be from 1 to the model's context length {L}, got {stride}")
    ids = encoder.encode(text, special=False)
    start = time.perf_counter()
    n_windows = max(1, math.ceil(max(0, len(ids) - L) / stride) + 1)
    advance = progress(path.name, n_windows) if progress else None
    ll = rolling_loglikelihood(model, ids, encoder.prefix_id, stride, batch_size, advance)
    n_bytes = len(text.encode("utf-8"))
    return {"file": str(path), "bytes": n_bytes, "tokens": len(ids), "window": L, "stride": stride, "loglikelihood": ll,
            "perplexity": math.exp(-ll / len(ids)), "bits_per_byte": metrics.bits_per_byte(ll, n_bytes),
            "byte_perplexity": math.exp(-ll / n_bytes), "seconds": round(time.perf_counter() - start, 3)}


def results_document(model_info: dict[str, Any], settings: Settings, tasks: Sequence[Task], data_dir: Path | None,
                     task_results: dict[str, Any] | None, text: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON file's content: format marker, model, settings, scores, notes, samples last."""
    doc: dict[str, Any] = {"format": FORMAT, "version": 1, "model": model_info,
                           "settings": asdict(settings) | {"tasks": [t.name for t in tasks],
                                                           "data_dir": str(data_dir) if data_dir else None}}
    if task_results is not None:
        doc["results"] = task_results["results"]
        doc["notes"] = task_results["notes"]
    if text is not None:
        doc["text"] = text
    if task_results is not None and settings.log_samples:
        doc["samples"] = task_results["samples"]
    return doc


def check_out_path(path: Path) -> Path:
    """Refuse, before any work, to write over anything but an earlier results file of ours."""
    if str(path) == "" or path.name in ("", ".", ".."):
        raise LmforgeError(f"--out {str(path)!r} is not a file name; give e.g. --out eval.json")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise LmforgeError(f"--out {path} exists and is not a regular file; give a new file name, e.g. {path}/eval.json"
                               if path.is_dir() else f"--out {path} exists and is not a regular file; give a new file name")
        try:
            fmt = json.loads(path.read_text(encoding="utf-8")).get("format")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            fmt = None
        if fmt != FORMAT:
            raise LmforgeError(f"--out {path} exists and is not an `lmforge eval` results file; choose another name "
                               "(only an earlier results file is replaced)")
    if path.parent.exists() and not path.parent.is_dir():
        raise LmforgeError(f"--out {path}: {path.parent} is not a folder")
    return path


def write_results(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
