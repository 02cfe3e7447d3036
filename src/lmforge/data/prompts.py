"""Plain prompts for a policy to continue: the first words of a review, a question as is.

RLHF samples its own responses, so it needs prompts only. A preference-pairs file gives
its rendered prompts (`recipes.preference.read_pairs`); this reads the other kind, text
the policy continues with no template: a `.txt` file with one prompt per line, or JSON /
JSONL rows with a "prompt" string. They are split 90/10 into training and held-out
prompts, seeded, so the held-out ones are the same in every run over the file.
"""

from __future__ import annotations

import random
from pathlib import Path

from lmforge.corpus import file_kind
from lmforge.data.instruct import read_records, string_field
from lmforge.errors import LmforgeError

PROMPT_SPLIT_SEED = 123
HELD_OUT_FRACTION = 0.1


def read_prompts(path: str | Path) -> list[str] | None:
    """Every prompt of `path`, in file order, or None when its rows are preference pairs
    (a "chosen" beside the prompt, or no "prompt": `recipes.preference.read_pairs` reads
    those). An empty prompt is an error naming its row."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        kind = file_kind(path)
        if kind is not None:
            raise LmforgeError(f"no file at {path}" if kind == "missing" else f"{path} is not a regular file: it is {kind}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from None
        prompts = [line for line in text.split("\n") if line.strip()]
    else:
        rows = read_records(path, "prompts")
        first = rows[0]
        if not (isinstance(first, dict) and "prompt" in first and "chosen" not in first):
            return None
        prompts = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise LmforgeError(f"{path}, row {i}: expected a JSON object with a \"prompt\", got {type(row).__name__}")
            prompt = string_field(row, "prompt", f"{path}, row {i}")
            if not prompt.strip():
                raise LmforgeError(f"{path}, row {i}: the prompt is empty; give the policy something to continue or drop the row")
            prompts.append(prompt)
    if not prompts:
        raise LmforgeError(f"{path} holds no prompts")
    return prompts


def split_prompts(prompts: list[str]) -> dict[str, list[str]]:
    """{"train": ..., "test": ...}: a seeded tenth (at least one prompt) held out."""
    if len(prompts) < 2:
        raise LmforgeError(f"{len(prompts)} prompt is too few: some train the policy and a tenth are held out to measure it")
    order = list(range(len(prompts)))
    random.Random(PROMPT_SPLIT_SEED).shuffle(order)
    n_test = max(1, round(HELD_OUT_FRACTION * len(prompts)))
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return {"train": [prompts[i] for i in train], "test": [prompts[i] for i in test]}
