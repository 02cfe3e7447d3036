"""The nine benchmark tasks, read from local files and turned into the exact strings
lm-evaluation-harness (0.4.13) scores, so that a score here means what it means there.

Each task is named as lm-eval names it and reads the public files of a data folder laid
out like `shared/data/eval/` (its SOURCES.md says where each came from). A task reads
its files into `Item`s: the question text (`doc_to_text`), the answer choices
(`doc_to_choice`), the gold index (`doc_to_target`). `requests` renders an item,
with its few-shot examples, into (context, continuation) pairs:

- multiple choice (hellaswag, arc_*, piqa, boolq, openbookqa, sciq): one context, each
  choice a continuation after the target delimiter " ";
- partial scoring (winogrande): one context per option (the sentence up to the blank,
  filled in), one shared continuation (the rest of the sentence);
- LAMBADA: the passage without its last word, and " " + that word.

Few-shot examples are "question<space>answer" joined by blank lines ("\\n\\n") before
the question, as lm-eval renders them. They are drawn by `random.Random(seed)` in item
order (seed 1234, lm-eval's default): from a split other than the evaluated one where the
folder has one (arc_easy: validation, openbookqa: dev, sciq: valid), k at a time; else
from the evaluated split itself, k + 1 at a time with the item itself removed, so an item
is never its own example. lm-eval draws from the training splits, which the folder does
not hold; given the same pool it draws exactly as here (it too removes the item when the
pool is a validation split being scored, though not from a test split such as LAMBADA's).
"""

from __future__ import annotations

import bz2
import itertools
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import read_jsonl_objects

FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "
DEFAULT_SEED = 1234  # lm-eval's fewshot_random_seed


@dataclass(frozen=True)
class Item:
    """One evaluated document. `text` is the question (a list: one context per choice, for
    partial scoring); `target` the shared continuation of partial scoring or LAMBADA's word."""

    doc: dict[str, Any]
    text: str | list[str]
    choices: list[str] = field(default_factory=list)
    gold: int = 0
    target: str = ""

    def shot(self) -> str:
        """This item as a solved few-shot example: question, target delimiter, answer, blank line."""
        question = self.text[self.gold] if isinstance(self.text, list) else self.text
        answer = self.target if isinstance(self.text, list) or not self.choices else self.choices[self.gold]
        return question + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER


@dataclass(frozen=True)
class Task:
    """A benchmark: where its files are, how to read them, what it reports."""

    name: str
    kind: str  # "multiple_choice", "partial" (contexts differ per option) or "loglikelihood" (LAMBADA)
    split: str
    files: tuple[str, ...]
    read: Callable[..., list[Item]]
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    fewshot_files: tuple[str, ...] = ()  # empty: draw from the evaluated split itself
    fewshot_split: str = ""
    note: str = ""

    def paths(self, data_dir: Path, files: tuple[str, ...] | None = None) -> list[Path]:
        return [data_dir / f for f in (self.files if files is None else files)]


# --- readers ---------------------------------------------------------------------------------
def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    return read_jsonl_objects(path, "a task file")


def _json_array(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path} is not JSON ({e}); the file is damaged: copy it again") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LmforgeError(f"{path} should hold a JSON array of objects")
    yield from enumerate(rows, 1)


def _field(row: dict[str, Any], key: str, path: Path, n: int, kind: type = str) -> Any:
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise LmforgeError(f"{path}:{n} has no {kind.__name__} field {key!r}; is this the right file?")
    return value


def _lambada(path: Path) -> list[Item]:
    items = []
    for n, row in _jsonl(path):
        words = _field(row, "text", path, n).split(" ")
        items.append(Item(row, " ".join(words[:-1]), target=" " + words[-1]))
    return items


def capitalize_tail(ctx: str) -> str:
    """lm-eval's HellaSwag query from the stored line: `activity_label: ctx_a ctx_b` with
    ctx_b capitalized (str.capitalize: first letter up, the rest down).

    The stored file (llama.cpp's layout) joined ctx_a and ctx_b and kept ctx_b as written:
    lower case, the start of the sentence the endings finish ("... on a roof. he"). Its
    boundary is not stored; ctx_b is taken to be the fragment after the last sentence end
    when it starts with a lower-case letter (ActivityNet items: 3,236 of 10,042). WikiHow
    items have an empty ctx_b, which lm-eval leaves as it is.
    """
    m = re.search(r'[.!?]"? ([^\W\d_A-Z][^.!?]*)$', ctx)
    if m is None or not m.group(1)[0].islower():
        return ctx
    tail = m.group(1)
    return ctx[: m.start(1)] + tail.capitalize()


def read_hellaswag_lines(path: Path, limit: int | None = None) -> list[tuple[str, int, list[str]]]:
    """(context line, gold, 4 endings) per task from llama.cpp's 6-line layout (bz2 or plain);
    with `limit`, only that many tasks are decompressed."""
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="\n") as f:
            lines = [line.removesuffix("\n") for line in itertools.islice(f, None if limit is None else 6 * limit)]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise LmforgeError(f"cannot read {path}: {e}; the file is damaged: copy it again") from None
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise LmforgeError(f"{path} has {len(lines)} lines, not 6 per task (context, gold label, 4 endings)")
    out = []
    for i in range(0, len(lines), 6):
        gold = lines[i + 1].strip()
        if gold not in ("0", "1", "2", "3"):
            raise LmforgeError(f"{path}:{i + 2} should be the gold ending 0-3, got {gold!r}")
        out.append((lines[i], int(gold), lines[i + 2 : i + 6]))
    return out


def _hellaswag(path: Path, limit: int | None = None) -> list[Item]:
    items = []
    for ctx, gold, endings in read_hellaswag_lines(path, limit):
        doc = {"ctx": ctx, "endings": endings, "label": gold}
        items.append(Item(doc, capitalize_tail(ctx), list(endings), gold))
    return items


def _keyed_item(row: dict[str, Any], text: str, texts: list[str], labels: list[str], key: str, path: Path, n: int) -> Item:
    """An AI2-style item (ARC, OpenBookQA): the gold choice is the one whose label is the answer key."""
    if key not in labels:
        raise LmforgeError(f"{path}:{n}: answerKey {key!r} is not one of the labels {labels}")
    return Item(row, text, texts, labels.index(key))


def _arc_item(row: dict[str, Any], question: str, texts: list[str], labels: list[str], path: Path, n: int) -> Item:
    return _keyed_item(row, f"Question: {question}\nAnswer:", texts, labels, _field(row, "answerKey", path, n), path, n)


def _arc_hf(path: Path) -> list[Item]:
    """The Hugging Face ai2_arc schema (question, choices {text, label}, answerKey); a JSON array or JSONL."""
    rows = _json_array(path) if path.suffix == ".json" else _jsonl(path)
    items = []
    for n, row in rows:
        choices = _field(row, "choices", path, n, dict)
        items.append(_arc_item(row, _field(row, "question", path, n), list(choices.get("text", [])), list(choices.get("label", [])),
                               path, n))
    return items


def _arc_original(path: Path) -> list[Item]:
    """AI2's own layout: question {stem, choices [{text, label}]}, answerKey."""
    items = []
    for n, row in _jsonl(path):
        items.append(_arc_item(row, *_stem_and_choices(row, path, n), path, n))
    return items


def _stem_and_choices(row: dict, path: Path, n: int) -> tuple[str, list[str], list[str]]:
    """AI2's question layout (ARC, OpenBookQA): question {stem, choices [{text, label}]} -> (stem, texts, labels)."""
    q = _field(row, "question", path, n, dict)
    choices = q.get("choices") or []
    return _field(q, "stem", path, n), [c["text"] for c in choices], [c["label"] for c in choices]


def _piqa(path: Path, labels: Path) -> list[Item]:
    golds = labels.read_text(encoding="utf-8").split()
    rows = list(_jsonl(path))
    if len(golds) != len(rows):
        raise LmforgeError(f"{labels} has {len(golds)} labels for the {len(rows)} rows of {path}; they must align line by line")
    items = []
    for (n, row), gold in zip(rows, golds):
        if gold not in ("0", "1"):
            raise LmforgeError(f"{labels}:{n}: the label should be 0 or 1, got {gold!r}")
        text = f"Question: {_field(row, 'goal', path, n)}\nAnswer:"
        items.append(Item(row, text, [_field(row, "sol1", path, n), _field(row, "sol2", path, n)], int(gold)))
    return items


def _winogrande(path: Path) -> list[Item]:
    items = []
    for n, row in _jsonl(path):
        sentence = _field(row, "sentence", path, n)
        if "_" not in sentence or row.get("answer") not in ("1", "2"):
            raise LmforgeError(f"{path}:{n} needs a sentence with a blank (_) and answer '1' or '2'")
        blank = sentence.index("_")
        contexts = [sentence[:blank] + _field(row, f"option{k}", path, n) for k in (1, 2)]
        items.append(Item(row, contexts, contexts, int(row["answer"]) - 1, sentence[blank + 1 :].strip()))
    return items


def _boolq(path: Path) -> list[Item]:
    items = []
    for n, row in _jsonl(path):
        text = f"{_field(row, 'passage', path, n)}\nQuestion: {_field(row, 'question', path, n)}?\nAnswer:"
        items.append(Item(row, text, ["no", "yes"], int(_field(row, "answer", path, n, bool))))
    return items


def _openbookqa(path: Path) -> list[Item]:
    items = []
    for n, row in _jsonl(path):
        items.append(_keyed_item(row, *_stem_and_choices(row, path, n), _field(row, "answerKey", path, n).lstrip(), path, n))
    return items


def _sciq(path: Path) -> list[Item]:
    items = []
    for n, row in _json_array(path):
        text = f"{_field(row, 'support', path, n).lstrip()}\nQuestion: {_field(row, 'question', path, n)}\nAnswer:"
        choices = [_field(row, k, path, n) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
        items.append(Item(row, text, choices, 3))
    return items


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("lambada_openai", "loglikelihood", "test", ("lambada/lambada_test.jsonl",), _lambada, ("acc", "perplexity")),
    Task("hellaswag", "multiple_choice", "validation", ("hellaswag/hellaswag_val_full.txt.bz2",), _hellaswag),
    Task("arc_easy", "multiple_choice", "test", ("arc/hf_dump_arc_easy/test.json",), _arc_hf,
         fewshot_files=("arc/hf_dump_arc_easy/validation.json",), fewshot_split="validation"),
    Task("arc_challenge", "multiple_choice", "dev", ("arc/ARC-Challenge/ARC-Challenge-Dev.jsonl",), _arc_original,
         note="arc_challenge is scored on the dev split (299 questions): the test split (1,172) lm-eval reports is not in the "
              "data folder, so this score is not comparable with published ARC-Challenge numbers"),
    Task("piqa", "multiple_choice", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    Task("winogrande", "partial", "dev", ("winogrande/dev.jsonl",), _winogrande, ("acc",)),
    Task("boolq", "multiple_choice", "dev", ("boolq/dev.jsonl",), _boolq, ("acc",)),
    Task("openbookqa", "multiple_choice", "test", ("openbookqa/test.jsonl",), _openbookqa,
         fewshot_files=("openbookqa/dev.jsonl",), fewshot_split="dev"),
    Task("sciq", "multiple_choice", "test", ("sciq/test.json",), _sciq, fewshot_files=("sciq/valid.json",), fewshot_split="valid"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LmforgeError(f"unknown task {name!r}; the tasks are: {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(spec: str) -> list[Task]:
    """'arc_easy,hellaswag' (or 'all') -> the tasks, in the order given, each once."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise LmforgeError(f"--tasks is empty; give one or more of: {', '.join(TASKS)} (comma-separated), or all")
    if names == ["all"]:
        names = list(TASKS)
    return [get_task(n) for n in dict.fromkeys(names)]


def resolve_data_dir(data_dir: str | Path) -> Path:
    """The folder holding the task folders (lambada/, arc/, ...); its parent (shared/data) works too."""
    path = Path(data_dir)
    if not path.is_dir():
        raise LmforgeError(f"--data-dir {path} is not a folder; give the folder laid out like shared/data/eval (lambada/, arc/, ...)")
    if not any((path / t.files[0]).parent.is_dir() for t in TASKS.values()) and (path / "eval").is_dir():
        return path / "eval"
    return path


def load_items(task: Task, data_dir: Path, fewshot: bool = False, limit: int | None = None) -> list[Item]:
    """The evaluated items (or, with `fewshot`, the pool few-shot examples come from); `limit`
    lets a reader that can stop early (HellaSwag's 7.8 MB of bzip2) read only the first items."""
    files = task.fewshot_files if fewshot and task.fewshot_files else task.files
    paths = task.paths(data_dir, files)
    for p in paths:
        if not p.is_file():
            raise LmforgeError(
                f"{task.name} needs {p}, which is missing (or not a file); point --data-dir at a folder laid out like "
                "shared/data/eval (see shared/data/SOURCES.md for each file)"
            )
    try:
        items = task.read(*paths, limit) if limit is not None and task.name == "hellaswag" else task.read(*paths)
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{task.name}: {paths[0]} is not UTF-8 text ({e})") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise LmforgeError(f"{task.name}: {paths[0]} does not have the fields this task reads ({e!r}); is it the right file?") from None
    if not items:
        raise LmforgeError(f"{task.name}: {paths[0]} holds no items")
    return items[:limit]


class FewshotSampler:
    """lm-eval's default sampler: one Random(seed) per task, consumed item by item. From the
    evaluated split itself (`same_split`) k + 1 examples are drawn and the item (and any
    identical row) removed; from another split, k."""

    def __init__(self, pool: list[Item], seed: int = DEFAULT_SEED, same_split: bool = True) -> None:
        self.pool = pool
        self.rng = random.Random(seed)
        self.same_split = same_split

    def sample(self, k: int, item: Item) -> list[Item]:
        if k == 0:
            return []
        need = k + 1 if self.same_split else k
        if need > len(self.pool):
            raise LmforgeError(f"--num-fewshot {k} needs at least {need} examples to draw from, the split has {len(self.pool)}")
        if not self.same_split:
            return self.rng.sample(self.pool, k)
        picked = [x for x in self.rng.sample(self.pool, need) if x.doc != item.doc][:k]
        if len(picked) < k:  # the pool held copies of the item: draw again without any of them
            picked = self.rng.sample([x for x in self.pool if x.doc != item.doc], k)
        return picked


def fewshot_prefix(shots: list[Item]) -> str:
    return "".join(s.shot() for s in shots)


def requests(task: Task, item: Item, prefix: str = "") -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval scores for one item, after the few-shot prefix."""
    if task.kind == "loglikelihood":
        return [(prefix + item.text, item.target)]  # type: ignore[operator]
    if task.kind == "partial":
        return [(prefix + ctx, TARGET_DELIMITER + item.target) for ctx in item.text]
    return [(prefix + item.text, TARGET_DELIMITER + c) for c in item.choices]  # type: ignore[operator]
