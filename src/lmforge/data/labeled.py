"""Classification data: labelled texts in, padded token batches with their labels out.

The path of LLMs-from-scratch ch06 (spam or not), made general:

- `read_labeled` reads the SMS Spam Collection layout (`label<TAB>text` lines, no
  header), CSV/TSV with a header, or JSONL, into `Example(text, label)` with the label
  names. Lines are split on their first tab with no quote handling: 145 SMS messages
  contain `"` and a csv reader with the default quoting merges some of them (5,572
  rows instead of 5,574).
- `balanced_split` undersamples every class to the smallest one's count and splits
  70/10/20. The split sizes are the book's (`int(n * 0.7)`, `int(n * 0.1)`, the rest:
  1045/149/300 for SMS spam's 2 x 747), and, unlike the book's one shuffle of the whole
  set, each split is class-balanced too (its class counts differ by at most one).
- `ClassificationBatches` encodes every text once and pads per batch, to the longest
  row of that batch rather than of the data set, and says where each row's last real
  token is: a causal model's state there has seen the whole text, so that is the
  position to classify from (the book reads position -1, a pad token for short rows).

Batches are stateless in the step, like `RandomWindows`: batch k depends only on
(seed, k), so a run resumed at step k sees what it would have seen.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.corpus import file_kind
from lmforge.data.batches import EXAMPLE_SPLITS, EpochBatches
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text
from lmforge.tokenizer import Tokenizer

Format = Literal["auto", "label-tab-text", "csv", "tsv", "jsonl"]


@dataclass(frozen=True)
class Example:
    """One labelled text; `label` indexes the label names `read_labeled` returns."""

    text: str
    label: int


# --- reading ------------------------------------------------------------------------


def read_labeled(
    path: str | os.PathLike,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    *,
    format: Format = "auto",
) -> tuple[list[Example], list[str]]:
    """Read labelled texts; returns (examples, label names), label i being `names[i]`.

    Formats ("auto" decides by the file name): `.jsonl` / `.json` -> one JSON object per
    line (or a JSON array of objects), fields `text_field` and `label_field`; `.csv` /
    `.tsv` -> a header row naming the columns (matched exactly, else ignoring case);
    anything else -> the SMS Spam Collection layout, `label<TAB>text` per line, no header,
    no quoting. Label names are sorted (numerically when all are integers, so "10" comes
    after "2") unless `labels` gives them: SMS spam gets ["ham", "spam"], spam = 1.
    """
    path = Path(path)
    kind = file_kind(path)  # a stat only: a FIFO is never opened, so this cannot block
    if kind == "missing":
        raise LmforgeError(f"no file at {path}")
    if kind is not None:
        raise LmforgeError(f"{path} is not a regular file: it is {kind}; give a labelled text file (.tsv, .csv or .jsonl)")
    fmt = format if format != "auto" else _format_of(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror}") from None
    if fmt == "label-tab-text":
        rows = _read_label_tab_text(path, text)
    elif fmt in ("csv", "tsv"):
        rows = _read_table(path, text, "," if fmt == "csv" else "\t", text_field, label_field)
    elif fmt == "jsonl":
        rows = _read_json_rows(path, text, text_field, label_field)
    else:
        raise LmforgeError(f"unknown format {format!r}; use one of auto, label-tab-text, csv, tsv, jsonl")
    if not rows:
        raise LmforgeError(f"{path} holds no examples; it is empty or has only a header")
    names = list(labels) if labels is not None else _sorted_names({label for _, _, label in rows})
    if len(set(names)) != len(names):
        raise LmforgeError(f"the label names {names} repeat a name; give each label once")
    index = {name: i for i, name in enumerate(names)}
    examples = []
    for where, text_value, label in rows:
        if label not in index:
            raise LmforgeError(f"{path}, {where}: unknown label {label!r}; the labels are {names}")
        examples.append(Example(text_value, index[label]))
    return examples, names


def _format_of(path: Path) -> Format:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]  # type: ignore[return-value]
    return "label-tab-text"


def _read_label_tab_text(path: Path, text: str) -> list[tuple[str, str, str]]:
    # split("\n"), not splitlines(): messages may hold \x0b, \x1c, \u2028 ..., which are not line ends here
    rows = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        label, tab, message = line.partition("\t")
        if not tab:
            raise LmforgeError(f"{path}, line {n}: no tab; each line must be <label><TAB><text> (the SMS Spam Collection layout)")
        rows.append((f"line {n}", message, label))
    return rows


def _column(names: Sequence[str], wanted: str, path: Path, what: str) -> str:
    if wanted in names:
        return wanted
    matches = [n for n in names if n.lower() == wanted.lower()]
    if len(matches) == 1:
        return matches[0]
    raise LmforgeError(f"{path}, line 1: no {what} column {wanted!r} in the header {list(names)}; pass the right {what}_field")


def _read_table(path: Path, text: str, delimiter: str, text_field: str, label_field: str) -> list[tuple[str, str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    if not header:
        return []
    text_col = _column(header, text_field, path, "text")
    label_col = _column(header, label_field, path, "label")
    rows = []
    for record in reader:
        for col in (text_col, label_col):
            if record.get(col) is None:
                raise LmforgeError(f"{path}, line {reader.line_num}: the row has no value in column {col!r} (too few fields)")
        rows.append((f"line {reader.line_num}", record[text_col], record[label_col]))
    return rows


def _read_json_rows(path: Path, text: str, text_field: str, label_field: str) -> list[tuple[str, str, str]]:
    if text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text)))  # items 0-based, as read_instructions names them
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path} is not valid JSON: {e}") from None
        where = "item"
    else:
        records = []
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise LmforgeError(f"{path}, line {n}: not valid JSON ({e})") from None
        where = "line"
    rows = []
    for n, record in records:
        if not isinstance(record, Mapping):
            raise LmforgeError(f"{path}, {where} {n}: expected a JSON object, got {type(record).__name__}")
        for field in (text_field, label_field):
            if field not in record:
                raise LmforgeError(f"{path}, {where} {n}: no field {field!r} (it has {sorted(record)}); pass the right text_field/label_field")
        value, label = record[text_field], record[label_field]
        if not isinstance(value, str):
            raise LmforgeError(f"{path}, {where} {n}: field {text_field!r} must be a string, got {type(value).__name__}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise LmforgeError(f"{path}, {where} {n}: field {label_field!r} must be a string or an integer, got {label!r}")
        rows.append((f"{where} {n}", value, str(label)))
    return rows


def _sorted_names(names: set[str]) -> list[str]:
    def is_int(s: str) -> bool:
        return s.lstrip("-").isdigit() and str(int(s)) == s

    if all(is_int(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


# --- splitting ----------------------------------------------------------------------


def _check_fractions(fractions: Sequence[float]) -> list[Fraction]:
    """The fractions as the decimals they were written as (0.7 means 7/10), checked."""
    if len(fractions) != 3 or any(not 0 <= f <= 1 for f in fractions):
        raise LmforgeError(f"fractions must be three numbers in [0, 1] for train, val, test, got {tuple(fractions)}")
    exact = [Fraction(str(f)) for f in fractions]
    if sum(exact) != 1:
        raise LmforgeError(f"fractions must add up to 1, got {tuple(fractions)} (sum {float(sum(exact))})")
    return exact


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """The book's sizes: train int(n * f0), the second split int(n * f1), the third the rest."""
    f = _check_fractions(fractions)
    a, b = int(n * f[0]), int(n * f[1])
    return a, b, n - a - b


def balanced_split(
    examples: Sequence[Example],
    *,
    per_class: int | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 123,
    label_names: Sequence[str] | None = None,
) -> dict[str, list[Example]]:
    """Undersample each class to `per_class` (default: the smallest class's count), then
    split into train/val/test with the sizes of `split_sizes` and every split balanced.

    Each class is shuffled by the seed and its first `per_class` examples kept. Split j
    of size s_j gives s_j // K to each of the K classes and its s_j % K extra rows to
    the classes next in a cycle that runs on across splits, so each split's class
    counts differ by at most one and each class contributes exactly `per_class`. Each
    split is then shuffled. Same examples and seed, same splits; they are disjoint.

    The examples must hold at least two classes, and enough of each that every split
    with a positive fraction gets at least one row of every class (10 per class for the
    default fractions); the error says how many rows each class has and how many are
    needed. `label_names` (label i is `label_names[i]`) only names the classes in errors.
    """
    if not examples:
        raise LmforgeError("balanced_split needs at least one example")
    by_class: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_class.setdefault(ex.label, []).append(i)
    classes = sorted(by_class)
    counts = _class_counts(by_class, label_names)
    if len(classes) < 2:
        raise LmforgeError(
            f"the examples hold only one class ({counts}); a classifier needs examples of at least two classes "
            "(with one, every answer is right and accuracy means nothing), so add rows of another label"
        )
    smallest = min(len(v) for v in by_class.values())
    if per_class is None:
        per_class = smallest
    if not (isinstance(per_class, int) and 1 <= per_class <= smallest):
        raise LmforgeError(f"per_class must be between 1 and the smallest class's count {smallest} (counts {counts}), got {per_class!r}")
    _check_fractions(fractions)
    needed = min_per_class(len(classes), fractions)
    if per_class < needed:
        sizes = split_sizes(per_class * len(classes), fractions)
        short = [f"{name} would get {size} row{'s' * (size != 1)}" for name, size, f in zip(EXAMPLE_SPLITS, sizes, fractions)
                 if f > 0 and size < len(classes)]
        used = "the smallest class's count" if per_class == smallest else "per_class"
        raise LmforgeError(
            f"too few examples for a balanced train/val/test split {tuple(fractions)}: with {per_class} rows of each class "
            f"({used}), {', '.join(short)}, fewer than one per class ({len(classes)} classes). "
            f"Rows per class: {counts}; every class needs at least {needed} rows"
        )
    sizes = split_sizes(per_class * len(classes), fractions)
    rng = np.random.default_rng(seed)
    kept = {c: [by_class[c][j] for j in rng.permutation(len(by_class[c]))[:per_class]] for c in classes}
    share = {c: [] for c in classes}  # share[c][j]: how many of class c go to split j
    cursor = 0
    for size in sizes:
        base, extra = divmod(size, len(classes))
        gets = {classes[(cursor + e) % len(classes)] for e in range(extra)}
        cursor = (cursor + extra) % len(classes)
        for c in classes:
            share[c].append(base + (c in gets))
    splits: dict[str, list[Example]] = {}
    start = dict.fromkeys(classes, 0)
    for j, name in enumerate(EXAMPLE_SPLITS):
        rows = []
        for c in classes:
            rows += kept[c][start[c] : start[c] + share[c][j]]
            start[c] += share[c][j]
        splits[name] = [examples[rows[k]] for k in rng.permutation(len(rows))]
    return splits


def min_per_class(num_classes: int, fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> int:
    """The fewest rows per class for which `balanced_split` gives every split with a
    positive fraction at least one row of each of `num_classes` classes."""
    _check_fractions(fractions)
    per_class = 1
    while True:
        sizes = split_sizes(per_class * num_classes, fractions)
        if all(size >= num_classes for size, f in zip(sizes, fractions) if f > 0):
            return per_class
        per_class += 1


def _class_counts(by_class: Mapping[int, Sequence[int]], label_names: Sequence[str] | None) -> str:
    """"ham 4, spam 2": each class's rows, by name when the names are known (absent names count 0)."""
    if label_names is None:
        return ", ".join(f"label {c}: {len(by_class[c])}" for c in sorted(by_class))
    named = {c: len(by_class.get(c, ())) for c in range(len(label_names))} | {c: len(v) for c, v in by_class.items()}
    return ", ".join(f"{label_names[c] if 0 <= c < len(label_names) else f'label {c}'}: {n}" for c, n in sorted(named.items()))


def save_split(splits: Mapping[str, Sequence[Example]], folder: str | os.PathLike, label_names: Sequence[str]) -> dict[str, Path]:
    """Write each split as `<name>.jsonl` ({"text", "label": its name}), readable by `read_labeled`."""
    folder = Path(folder)
    paths = {}
    for name, examples in splits.items():
        lines = [json.dumps({"text": ex.text, "label": label_names[ex.label]}, ensure_ascii=False) + "\n" for ex in examples]
        paths[name] = folder / f"{name}.jsonl"
        atomic_write_text(paths[name], "".join(lines))
    return paths


# --- batching -----------------------------------------------------------------------


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, padding_side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row: (ids (B, T) int64, attention_mask (B, T) int64, 1 on real tokens).

    The model reads each row's last real token from the mask (`lmforge.model.last_real_index`)
    and, for left padding, gives the row its own positions and hides the pads, so either
    side gives each row exactly what it would get alone.
    """
    if padding_side not in ("right", "left"):
        raise LmforgeError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not rows or any(len(r) == 0 for r in rows):
        raise LmforgeError("every row needs at least one token")
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        where = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
        out[b, where] = torch.tensor(r, dtype=torch.long)
        mask[b, where] = 1
    return out, mask


class ClassificationBatches(EpochBatches[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Examples -> `(input_ids (B, T), attention_mask (B, T), labels (B,))`, all int64.

    Texts are encoded once (special-token strings as plain text), cut to their first
    `max_length` tokens if given, and padded per batch with `pad_id` (default the
    tokenizer's `<|endoftext|>`). `batch(step)` draws training batches (see
    `EpochSampler`); `iter_eval(batch_size)` walks every example once, in order.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seed: int = 123,
        max_length: int | None = None,
        pad_id: int | None = None,
        padding_side: Literal["right", "left"] = "right",
        drop_last: bool = True,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise LmforgeError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.check_settings(tokenizer, pad_id, max_length)
        self.ids: list[list[int]] = []
        self.truncated = 0
        for i, ex in enumerate(examples):
            ids = tokenizer.encode(ex.text)
            if not ids:
                raise LmforgeError(f"example {i} has an empty text; there is nothing to classify (drop it)")
            if max_length is not None and len(ids) > max_length:
                ids, self.truncated = ids[:max_length], self.truncated + 1
            self.ids.append(ids)
        self.labels = [ex.label for ex in examples]
        self.padding_side = padding_side
        super().__init__(len(self.ids), batch_size=batch_size, seed=seed, drop_last=drop_last)

    def collate(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, mask = pad_rows([self.ids[i] for i in indices], self.pad_id, self.padding_side)
        return x, mask, torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
