"""The local eval data (shared/data/eval) as lm-eval's stock tasks read it: JSON lines in
the Hugging Face schema of each task's dataset, and the task dicts that point lm-eval at
them (tests/lm_eval_tasks/*.yaml; its README lists each conversion).

Written independently of `lmforge.eval.tasks` (raw file -> the HF rows lm-eval expects),
so a parity test compares two readings of the same files, not one reading with itself.
The one shared idea is HellaSwag's: the stored line joins ctx_a and ctx_b, and ctx_b is
taken to be the lower-case fragment after the last sentence end.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path
from typing import Any

import yaml

TASK_YAMLS = Path(__file__).resolve().parent / "lm_eval_tasks"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _hellaswag(eval_dir: Path) -> list[dict[str, Any]]:
    with bz2.open(eval_dir / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for i in range(0, len(lines) - 5, 6):
        label, ctx = lines[i].split(": ", 1)
        m = re.search(r'[.!?]"? ([a-z][^.!?]*)$', ctx)
        ctx_a, ctx_b = (ctx[: m.start(1) - 1], m.group(1)) if m else (ctx, "")
        rows.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": lines[i + 2 : i + 6], "label": lines[i + 1]})
    return rows


def _arc_original(path: Path) -> list[dict[str, Any]]:
    return [{"id": r["id"], "question": r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]], "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in _jsonl(path)]


def hf_rows(task: str, eval_dir: Path) -> list[dict[str, Any]]:
    if task == "lambada_openai":
        return _jsonl(eval_dir / "lambada" / "lambada_test.jsonl")
    if task == "hellaswag":
        return _hellaswag(eval_dir)
    if task == "arc_easy":
        return json.loads((eval_dir / "arc" / "hf_dump_arc_easy" / "test.json").read_text(encoding="utf-8"))
    if task == "arc_challenge":
        return _arc_original(eval_dir / "arc" / "ARC-Challenge" / "ARC-Challenge-Dev.jsonl")
    if task == "piqa":
        labels = (eval_dir / "piqa" / "valid-labels.lst").read_text().split()
        return [r | {"label": int(y)} for r, y in zip(_jsonl(eval_dir / "piqa" / "valid.jsonl"), labels, strict=True)]
    if task == "winogrande":
        return _jsonl(eval_dir / "winogrande" / "dev.jsonl")
    if task == "boolq":
        return [{"question": r["question"], "passage": r["passage"], "label": int(r["answer"])} for r in _jsonl(eval_dir / "boolq" / "dev.jsonl")]
    if task == "openbookqa":
        return [{"id": r["id"], "question_stem": r["question"]["stem"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]], "label": [c["label"] for c in r["question"]["choices"]]},
                 "answerKey": r["answerKey"]} for r in _jsonl(eval_dir / "openbookqa" / "test.jsonl")]
    if task == "sciq":
        return json.loads((eval_dir / "sciq" / "test.json").read_text(encoding="utf-8"))
    raise KeyError(task)


def lm_eval_task(task: str, eval_dir: Path, out: Path, task_manager: Any, rows: int | None = None) -> str:
    """Write `task`'s converted file into `out` (its first `rows` rows: lm-eval's --limit reads
    no further; a few-shot pool needs them all) and a YAML file that includes lm-eval's stock
    config of the task (from `task_manager`'s index) with ours on top; return that file's path,
    a task spec for simple_evaluate."""
    config = yaml.safe_load((TASK_YAMLS / f"{task}.yaml").read_text(encoding="utf-8"))
    files = config["dataset_kwargs"]["data_files"]
    out.mkdir(parents=True, exist_ok=True)
    for split, name in files.items():
        data = hf_rows(task, eval_dir)[:rows]
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
        files[split] = str(out / name)
    config["dataset_kwargs"]["cache_dir"] = str(out / "hf-datasets-cache")
    config["include"] = str(task_manager.task_index[task].yaml_path)
    spec = out / f"{task}.yaml"
    spec.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(spec)
