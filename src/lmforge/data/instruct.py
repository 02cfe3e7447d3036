"""Instruction and chat data: items -> prompt/response text -> masked next-token examples.

The text formats are the chat templates of `lmforge.tokenizer.templates` (Alpaca,
chat); this module reads the items, splits them and encodes them for training.

Training sees `prompt + response + <|endoftext|>` with the prompt and response encoded
separately, exactly as generation sees them (an encoded prompt, then new tokens), so
the learned part decodes to exactly the response. Labels are the next token at each
position, -100 where that token is prompt text: every assistant turn and the final
end-of-text token are learned, once.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.corpus import file_kind
from lmforge.data.batches import EpochBatches
from lmforge.data.labeled import split_sizes
from lmforge.errors import LmforgeError
from lmforge.ops.loss import IGNORE_INDEX  # the label the loss skips (-100, cross_entropy's default)
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.templates import AlpacaTemplate, Template, check_messages

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# --- reading and splitting ----------------------------------------------------------


def read_instructions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Items from a JSON array or JSONL: Alpaca ({"instruction", "input"?, "output"}), chat
    ({"messages": [{"role", "content"}, ...]}) or ShareGPT ({"conversations": [{"from",
    "value"}, ...], "system"?}), one kind or mixed.

    Returned normalized: Alpaca items get "input" ("" when absent or null); ShareGPT items
    become {"messages": ...} (human -> user, gpt -> assistant). Other keys are kept.
    Every item must have a reply to learn; errors name the item (0-based) and the key.
    """
    path = Path(path)
    return [_normalize(item, f"{path}, item {i}") for i, item in enumerate(read_records(path, "items"))]


def read_records(path: Path, noun: str = "rows") -> list[Any]:
    """The JSON values of a file: a JSON array, or JSONL (one value per line, blank lines
    skipped), gzip-compressed or not (a .gz name or gzip's magic bytes), UTF-8 with or
    without a BOM. Errors name the file (and the line of JSONL); a FIFO or device is
    refused without being opened; an empty file is an error (it holds no `noun`)."""
    kind = file_kind(path)  # a stat only: a FIFO is never opened, so this cannot block
    if kind == "missing":
        raise LmforgeError(f"no file at {path}")
    if kind is not None:
        raise LmforgeError(f"{path} is not a regular file: it is {kind}; give a JSON or JSONL file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix.lower() == ".gz" or data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise LmforgeError(f"{path} is not a readable gzip file ({e})") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path} is not valid JSON: {e}") from None
    else:
        rows = []
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LmforgeError(f"{path}, line {n}: not valid JSON ({e})") from None
    if not rows:
        raise LmforgeError(f"{path} holds no {noun}")
    return rows


def string_field(item: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    """`item[key]`, a string; a missing key (or null, when there is a `default`) gives
    `default`, else an error naming `where` the item is and the keys it has."""
    if key not in item or (item[key] is None and default is not None):
        if default is None:
            raise LmforgeError(f"{where}: missing key {key!r} (it has {sorted(item)})")
        return default
    if not isinstance(item[key], str):
        raise LmforgeError(f"{where}: {key!r} must be a string, got {type(item[key]).__name__}")
    return item[key]


def _normalize(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise LmforgeError(f"{where}: expected a JSON object, got {type(item).__name__}")
    item = dict(item)
    if "conversations" in item:
        turns = item.pop("conversations")
        if not isinstance(turns, list):
            raise LmforgeError(f"{where}: 'conversations' must be a list")
        messages = [{"role": "system", "content": string_field(item, "system", where)}] if item.get("system") else []
        item.pop("system", None)
        for j, t in enumerate(turns):
            if not isinstance(t, Mapping) or "from" not in t or "value" not in t:
                raise LmforgeError(f"{where}: conversations[{j}] needs keys 'from' and 'value'")
            if t["from"] not in SHAREGPT_ROLES:
                raise LmforgeError(f"{where}: conversations[{j}] is from {t['from']!r}; known: {', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
        item["messages"] = messages
    if "messages" in item:
        check_messages(item["messages"], f"{where}: messages")
        if not item["messages"] or item["messages"][-1]["role"] != "assistant":
            raise LmforgeError(f"{where}: the conversation must end with an assistant message (the reply to learn)")
        return item
    if "instruction" in item:
        string_field(item, "instruction", where)
        string_field(item, "output", where)
        item["input"] = string_field(item, "input", where, default="")
        return item
    raise LmforgeError(f"{where}: missing key 'instruction' (Alpaca), 'messages' or 'conversations' (chat); it has {sorted(item)}")


def book_split(items: Sequence[Any], fractions: Sequence[float] = (0.85, 0.05, 0.10)) -> dict[str, list[Any]]:
    """LLMs-from-scratch ch07's split, no shuffle: train the first int(f_train * n), test the
    next int(f_test * n), val the rest (1,100 items: 935 / 55 / 110). Fractions are
    (train, val, test), taken as the decimals they were written as."""
    if len(fractions) != 3:
        raise LmforgeError(f"fractions must be three numbers for train, val, test, got {tuple(fractions)}")
    train, test, _ = split_sizes(len(items), (fractions[0], fractions[2], fractions[1]))
    items = list(items)
    return {"train": items[:train], "val": items[train + test :], "test": items[train : train + test]}


# --- encoding and batching ----------------------------------------------------------


def encode_segments(
    tokenizer: Tokenizer,
    segments: Sequence[tuple[str, str]],
    *,
    mask_prompt: bool = True,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """(input ids, labels) for prompt1 reply1 prompt2 reply2 ... <|endoftext|>.

    Each piece is encoded on its own (special-token strings as plain text) and the pieces
    joined, then the eot id appended; inputs = ids[:-1], labels = ids[1:] with
    IGNORE_INDEX where the label is prompt text (if `mask_prompt`). Truncation keeps the
    first `max_length` positions of both, cutting from the end (the reply's tail and the
    eot first); a prompt that fills them leaves nothing learned (all labels IGNORE_INDEX).
    """
    eot = tokenizer.eot_id
    if eot is None:
        raise LmforgeError("this tokenizer has no <|endoftext|>, which ends every training example; use one that has it")
    if max_length is not None and not (isinstance(max_length, int) and max_length >= 1):
        raise LmforgeError(f"max_length must be a positive integer or None, got {max_length!r}")
    if not segments:
        raise LmforgeError("an example needs at least one (prompt, response) segment")
    ids: list[int] = []
    learned: list[bool] = []
    for prompt, response in segments:
        p, r = tokenizer.encode(prompt), tokenizer.encode(response)
        if not ids and not p:
            raise LmforgeError("the prompt is empty: the response's first token would have no position to be predicted from")
        ids += p + r
        learned += [False] * len(p) + [True] * len(r)
    ids.append(eot)
    learned.append(True)
    labels = [t if (learn or not mask_prompt) else IGNORE_INDEX for t, learn in zip(ids[1:], learned[1:])]
    inputs = ids[:-1]
    if max_length is not None:
        inputs, labels = inputs[:max_length], labels[:max_length]
    return inputs, labels


def encode_example(
    tokenizer: Tokenizer, prompt: str, response: str, *, mask_prompt: bool = True, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """`encode_segments` for one prompt and its response: the model learns response + eot."""
    return encode_segments(tokenizer, [(prompt, response)], mask_prompt=mask_prompt, max_length=max_length)


def pad_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (inputs, labels) pairs to the longest in the batch: inputs with `pad_id`, labels with `ignore_index`."""
    width = max(len(x) for x, _ in pairs)
    x = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), width), ignore_index, dtype=torch.long)
    for b, (inputs, labels) in enumerate(pairs):
        x[b, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        y[b, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return x, y


class InstructionBatches(EpochBatches[tuple[torch.Tensor, torch.Tensor]]):
    """Items -> `(x, y)` int64 (B, T) batches padded per batch (x with the eot id, y with -100).

    `items` are dicts from `read_instructions` (turned into text by `template`, default
    `AlpacaTemplate()`) or ready lists of (prompt, response) segments. All are encoded
    once; an example left with nothing to learn by `max_length` is dropped and its index
    listed in `dropped`. `batch(step)` draws training batches stateless in the step (see
    `EpochSampler`); `iter_eval(batch_size)` walks every kept example once, in order.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any] | Sequence[tuple[str, str]]],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seed: int = 123,
        template: Template | None = None,
        mask_prompt: bool = True,
        max_length: int | None = None,
        pad_id: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        drop_last: bool = True,
    ) -> None:
        template = AlpacaTemplate() if template is None else template
        self.check_settings(tokenizer, pad_id, max_length)
        self.ignore_index = ignore_index
        self.examples: list[tuple[list[int], list[int]]] = []
        self.kept: list[int] = []
        self.dropped: list[int] = []
        for i, item in enumerate(items):
            segments = template.item_segments(item) if isinstance(item, Mapping) else list(item)
            x, y = encode_segments(tokenizer, segments, mask_prompt=mask_prompt, max_length=max_length)
            if ignore_index != IGNORE_INDEX:
                y = [ignore_index if t == IGNORE_INDEX else t for t in y]
            if all(t == ignore_index for t in y):
                self.dropped.append(i)
                continue
            self.examples.append((x, y))
            self.kept.append(i)
        if not self.examples:
            raise LmforgeError(f"none of the {len(self.dropped)} examples has a response left to learn; raise max_length")
        super().__init__(len(self.examples), batch_size=batch_size, seed=seed, drop_last=drop_last)

    def collate(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_pairs([self.examples[i] for i in indices], self.pad_id, self.ignore_index)
