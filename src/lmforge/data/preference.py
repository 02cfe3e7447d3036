"""Preference pairs (prompt, chosen, rejected) for reward models and DPO.

Three kinds of file, one kind per file (`PREFERENCE_KINDS`):

- "alpaca": LLMs-from-scratch ch07's preference data, Alpaca items with "chosen" and
  "rejected" responses ({"instruction", "input"?, "output"?, "chosen", "rejected"}).
- "chat": LLaMA-Factory's DPO data, a ShareGPT history ("conversations" of {"from",
  "value"} with an optional "system" key) or "messages" ({"role", "content"}), ending
  with a user turn, and the two replies (a string, an assistant message or a list of one).
- "dialogue": Anthropic HH-RLHF, two whole transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...";
  the prompt is `chosen` up to and including its last "\\n\\nAssistant:" and the
  responses are what follows it in each, kept exactly (they start with a space). A row
  with a "prompt" text holds its responses as they are.

`read_preferences` reads them (JSON array or JSONL, gzip or not) into `PreferenceData`.
A malformed row is an error that names the row; a row that is well formed but holds no
preference (an empty response, the same response twice, two dialogues that differ
before the last Assistant turn) is dropped and listed, for the caller to report.

`render_pair` turns an item into text: the prompt exactly as instruction tuning renders
it with the same template (so a DPO run starts from the SFT model's own format), and
the raw responses. `PreferenceBatches` encodes pairs into (B, 2, T) batches, row 0 the
chosen and row 1 the rejected response, each row masked like instruction tuning's
examples (`encode_segments`): `prompt + response + <|endoftext|>`, the prompt and the
response encoded separately, labels -100 where the next token is prompt text, so both
rows learn exactly their response and one end-of-text.

Truncation to `max_length` (input positions per row) keeps what the preference is
about, the responses and the prompt text nearest them. When len(prompt) + len(longer
response) - 1 > max_length:

1. a prompt longer than max_length // 2 is cut from its start down to
   max(max_length // 2, max_length - len(longer response) + 1) tokens (its end stays);
2. each response is cut at its end to fit (max_length - len(prompt) + 1 tokens), losing
   the end-of-text first.

Both rows of a pair share the prompt, so they differ only in their responses. Such a
pair counts in `truncated`. A pair is dropped when a row would have nothing learned: a
learned token is predicted from the prompt, so a prompt cut to nothing leaves none.
Under the rule above that happens only at max_length 1 (the prompt's share,
max_length // 2, is 0; any larger max_length leaves the prompt and each response at
least one token).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.batches import EXAMPLE_SPLITS, EpochBatches
from lmforge.data.instruct import SHAREGPT_ROLES, book_split, read_records, string_field
from lmforge.errors import LmforgeError
from lmforge.ops.loss import IGNORE_INDEX
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.templates import AlpacaTemplate, ChatTemplate, Template, check_messages

PREFERENCE_KINDS = ("alpaca", "chat", "dialogue")
ASSISTANT_TURN = "\n\nAssistant:"  # HH-RLHF's marker; the prompt ends with the last one
_KIND_KEYS = "alpaca rows have 'instruction', chat rows 'conversations' or 'messages', dialogue rows 'chosen'/'rejected' texts"


@dataclass
class PreferenceData:
    """The pairs of one file, normalized (see `read_preferences`), and the rows left out.

    Each item carries its 0-based row in the file under "row": the splits are made over
    the file's rows, so a row's split does not depend on which other rows were dropped.
    """

    items: list[dict]
    kind: str
    dropped: list[tuple[int, str]]
    source: str


# --- reading ------------------------------------------------------------------------


def read_preferences(path: str | os.PathLike) -> PreferenceData:
    """Read a preference file: a JSON array or JSONL (one object per non-blank line), either
    gzip-compressed (a ".gz" name or gzip's magic bytes).

    Items come out normalized, each with its "row" (0-based, blank lines not counted) and
    "chosen" / "rejected" as plain strings:

    - alpaca: {"instruction", "input" ("" when absent or null), "output"? (kept if given), ...};
    - chat: {"messages": the history, an optional system message then user and assistant
      taking turns, ending with a user message (ShareGPT roles mapped as `read_instructions`
      maps them: human -> user, gpt -> assistant)};
    - dialogue: {"prompt", ...}, the responses split off the transcripts (module docstring).

    Other keys are kept. Errors (LmforgeError) name the file, the row and what is wrong: a
    row that is not an object, a missing key, a non-string value, a chat reply from
    someone other than the assistant, a row of another kind than row 0's. Dropped rows
    (listed with the reason, not errors): an empty response (after strip), chosen equal
    to rejected, dialogues that differ before the last Assistant turn. All dropped: an error.
    """
    path = Path(path)
    rows = read_records(path)
    kind = (_row_kind(rows[0]) or "dialogue") if isinstance(rows[0], Mapping) else ""
    items: list[dict] = []
    dropped: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        where = f"{path}, row {i}"
        if not isinstance(row, Mapping):
            raise LmforgeError(f"{where}: expected a JSON object, got {type(row).__name__}")
        own = _row_kind(row)
        if own is not None and own != kind:
            raise LmforgeError(f"{where} is a row of kind {own!r}, but row 0 made this a file of {kind!r} rows; "
                               f"a file holds one kind ({_KIND_KEYS})")
        item, reason = _PARSERS[kind](dict(row), where)
        if reason is None and (not item["chosen"].strip() or not item["rejected"].strip()):
            reason = "an empty response"
        if reason is None and item["chosen"] == item["rejected"]:
            reason = "chosen equals rejected"
        if reason is not None:
            dropped.append((i, reason))
            continue
        item["row"] = i
        items.append(item)
    if not items:
        reasons = sorted({r for _, r in dropped})
        raise LmforgeError(f"{path}: all {len(rows)} rows were dropped ({'; '.join(reasons)}); there is no pair to learn from")
    return PreferenceData(items=items, kind=kind, dropped=dropped, source=str(path))


def _row_kind(row: Mapping[str, Any]) -> str | None:
    """The kind a row's keys say it is; None for a row with none of the marking keys (a
    dialogue row, or a row of the file's kind missing its key: its parser says which)."""
    if "conversations" in row or "messages" in row:
        return "chat"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        return "dialogue"
    return None


def _parse_alpaca(item: dict[str, Any], where: str) -> tuple[dict[str, Any], str | None]:
    string_field(item, "instruction", where)
    string_field(item, "chosen", where)
    string_field(item, "rejected", where)
    item["input"] = string_field(item, "input", where, default="")
    if item.get("output") is None:
        item.pop("output", None)
    else:
        string_field(item, "output", where)
    return item, None


def _parse_chat(item: dict[str, Any], where: str) -> tuple[dict[str, Any], str | None]:
    if "conversations" in item:
        turns = item.pop("conversations")
        if not isinstance(turns, list):
            raise LmforgeError(f"{where}: 'conversations' must be a list, got {type(turns).__name__}")
        messages = [{"role": "system", "content": string_field(item, "system", where)}] if item.get("system") else []
        item.pop("system", None)
        for j, t in enumerate(turns):
            messages.append(_message(t, f"{where}: conversations[{j}]"))
    elif "messages" in item:
        messages = item["messages"]
    else:
        raise LmforgeError(f"{where}: missing key 'conversations' or 'messages' (it has {sorted(item)})")
    check_messages(messages, f"{where}: the history")
    if not messages or messages[-1]["role"] != "user":
        raise LmforgeError(f"{where}: the history must end with a user message (the one chosen and rejected reply to)")
    item["messages"] = [dict(m) for m in messages]
    for key in ("chosen", "rejected"):
        item[key] = _reply(item, key, where)
    return item, None


def _message(m: Any, where: str) -> dict[str, str]:
    """A ShareGPT {"from", "value"} or a {"role", "content"} message, as {"role", "content"}."""
    if isinstance(m, Mapping) and "from" in m and "value" in m:
        role, content = m["from"], m["value"]
    elif isinstance(m, Mapping) and "role" in m and "content" in m:
        role, content = m["role"], m["content"]
    else:
        raise LmforgeError(f"{where} must be a message with keys 'from' and 'value' (or 'role' and 'content'), got {m!r:.100}")
    if role not in SHAREGPT_ROLES:
        raise LmforgeError(f"{where} is from {role!r}; known: {', '.join(SHAREGPT_ROLES)}")
    if not isinstance(content, str):
        raise LmforgeError(f"{where}: the text must be a string, got {type(content).__name__}")
    return {"role": SHAREGPT_ROLES[role], "content": content}


def _reply(item: Mapping[str, Any], key: str, where: str) -> str:
    """A chat row's chosen or rejected reply: a string, an assistant message or a list of one."""
    if key not in item:
        raise LmforgeError(f"{where}: missing key {key!r} (it has {sorted(item)})")
    value = item[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) != 1:
            raise LmforgeError(f"{where}: {key!r} must be one reply, got a list of {len(value)} messages")
        value = value[0]
    if not isinstance(value, Mapping):
        raise LmforgeError(f"{where}: {key!r} must be a string or an assistant message, got {type(value).__name__}")
    m = _message(value, f"{where}: {key!r}")
    if m["role"] != "assistant":
        raise LmforgeError(f"{where}: {key!r} is a {m['role']} message; a reply must be from the assistant (gpt/assistant)")
    return m["content"]


def _parse_dialogue(item: dict[str, Any], where: str) -> tuple[dict[str, Any], str | None]:
    chosen = string_field(item, "chosen", where)
    rejected = string_field(item, "rejected", where)
    if "prompt" in item:
        string_field(item, "prompt", where)
        return item, None
    cut = chosen.rfind(ASSISTANT_TURN)
    if cut < 0:
        raise LmforgeError(f"{where}: 'chosen' has no {ASSISTANT_TURN!r} turn; a dialogue row is a transcript "
                           "'\\n\\nHuman: ...\\n\\nAssistant: ...' (or give the prompt as 'prompt')")
    prompt = chosen[: cut + len(ASSISTANT_TURN)]
    item.update(prompt=prompt, chosen=chosen[len(prompt) :], rejected=rejected[len(prompt) :])
    if not rejected.startswith(prompt):
        return item, "the two dialogues differ before the last Assistant turn"
    return item, None


_PARSERS = {"alpaca": _parse_alpaca, "chat": _parse_chat, "dialogue": _parse_dialogue}


# --- splitting ----------------------------------------------------------------------


def preference_split(data: PreferenceData, seed: int = 123) -> dict[str, list[dict]]:
    """Train / val / test items, 85 / 5 / 10 of the file's rows, made over the rows before
    dropping (a row's split does not depend on which rows were dropped, then dropped rows
    are simply absent).

    Alpaca (LLMs-from-scratch's preference file): the book's split in file order,
    `book_split`, ignoring the seed: its 1,100 rows give rows 0-934 / 1045-1099 / 935-1044,
    the same positions as the book's instruction data. Other kinds: the rows in the order
    `np.random.default_rng(seed).permutation(n)`, then split as `book_split` splits (train
    int(0.85 n), test int(0.10 n), val the rest); items keep that shuffled order.
    """
    if not (isinstance(seed, int) and seed >= 0):
        raise LmforgeError(f"seed must be a non-negative integer, got {seed!r}")
    n = len(data.items) + len(data.dropped)
    by_row: dict[int, dict] = {}
    for item in data.items:
        row = item.get("row")
        if not isinstance(row, int) or not 0 <= row < n or row in by_row:
            raise LmforgeError(f"an item of {data.source} has no valid, distinct 'row' ({row!r}); split read_preferences' data")
        by_row[row] = item
    order = list(range(n)) if data.kind == "alpaca" else np.random.default_rng(seed).permutation(n).tolist()
    rows = book_split(order)
    return {name: [by_row[r] for r in rows[name] if r in by_row] for name in EXAMPLE_SPLITS}


# --- text ---------------------------------------------------------------------------


def render_pair(item: Mapping[str, Any], kind: str, template: Template | None) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text of an item from `read_preferences`.

    Alpaca and chat: the prompt is what the template (default `AlpacaTemplate` /
    `ChatTemplate`) puts before the reply, exactly as instruction tuning and `answer()`
    build it (everything before the last segment's reply), so the preference model reads
    the format its SFT start was tuned on. Dialogue: the transcript's own text, no template
    (passing one is an error). The responses are the raw strings in every kind.
    """
    if kind not in PREFERENCE_KINDS:
        raise LmforgeError(f"unknown preference kind {kind!r}; the kinds are {', '.join(PREFERENCE_KINDS)}")
    for key in ("chosen", "rejected"):
        if not isinstance(item.get(key), str):
            raise LmforgeError(f"a preference item needs a string {key!r}; this one has {sorted(item)}")
    if kind == "dialogue":
        if template is not None:
            raise LmforgeError("dialogue pairs are raw transcripts: their prompt takes no template (pass template=None)")
        if not isinstance(item.get("prompt"), str):
            raise LmforgeError(f"a dialogue item needs a string 'prompt'; this one has {sorted(item)}")
        return item["prompt"], item["chosen"], item["rejected"]
    if kind == "alpaca":
        if "instruction" not in item:
            raise LmforgeError(f"an alpaca item needs 'instruction'; this one has {sorted(item)}")
        template = AlpacaTemplate() if template is None else template
        sft_item: dict[str, Any] = {**item, "output": item["chosen"]}
        sft_item.pop("messages", None)
    else:
        if "messages" not in item:
            raise LmforgeError(f"a chat item needs 'messages'; this one has {sorted(item)}")
        template = ChatTemplate() if template is None else template
        sft_item = {"messages": [*item["messages"], {"role": "assistant", "content": item["chosen"]}]}
    segments = template.item_segments(sft_item)
    prompt = "".join(p + r for p, r in segments[:-1]) + segments[-1][0]
    return prompt, item["chosen"], item["rejected"]


# --- encoding and batching ----------------------------------------------------------


def _fit(p: list[int], c: list[int], r: list[int], max_length: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """The pair cut to `max_length` input positions per row (the module docstring's rule);
    the flag says whether anything was cut."""
    longer = max(len(c), len(r))
    if max_length is None or len(p) + longer - 1 <= max_length:
        return p, c, r, False
    half = max_length // 2
    if len(p) > half:
        keep = min(len(p), max(half, max_length - longer + 1))
        p = p[len(p) - keep :]
    room = max_length - len(p) + 1
    return p, c[:room], r[:room], True


def _row(p: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    """(inputs, labels) of prompt + response: labels -100 where the next token is prompt text."""
    ids = p + response
    return ids[:-1], [IGNORE_INDEX] * (len(p) - 1) + response


class PreferenceBatches(EpochBatches[dict[str, torch.Tensor]]):
    """(prompt, chosen, rejected) text triples -> batches of both rows of each pair.

    `collate` gives {"input_ids", "labels", "attention_mask"}: (B, 2, T) int64, [:, 0] the
    chosen row and [:, 1] the rejected one, right-padded to the batch's longest row
    (inputs with `pad_id`, default the eot id; labels with -100; the mask 1 on real
    tokens), and "index" (B,), each pair's position in `pairs` plus `first_index` (a run
    numbers the pairs of all its splits in one sequence, by which cached values are found). Both rows of a pair are
    in one batch because DPO and a reward model's loss compare them.

    All pairs are encoded once (see the module docstring for masking and truncation);
    `truncated` counts kept pairs cut to fit, `dropped` lists the pairs left with nothing
    to learn, `kept` the others in order. `batch(step)` draws training batches stateless
    in the step (`EpochSampler`); `iter_eval(batch_size)` walks every kept pair in order.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str, str]],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seed: int = 123,
        max_length: int | None = None,
        pad_id: int | None = None,
        drop_last: bool = True,
        first_index: int = 0,
    ) -> None:
        self.check_settings(tokenizer, pad_id, max_length)
        self.first_index = first_index
        eot = tokenizer.eot_id
        if eot is None:
            raise LmforgeError("this tokenizer has no <|endoftext|>, which ends every response; use one that has it")
        self.examples: list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]] = []
        self.kept: list[int] = []
        self.dropped: list[int] = []
        self.truncated = 0
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 3 and all(isinstance(t, str) for t in pair)):
                raise LmforgeError(f"pair {i} must be three strings (prompt, chosen, rejected), got {pair!r:.100}")
            prompt, chosen, rejected = pair
            p = tokenizer.encode(prompt)
            if not p:
                raise LmforgeError(f"pair {i}: the prompt is empty: a response's first token would have no position "
                                   "to be predicted from")
            p, c, r, cut = _fit(p, tokenizer.encode(chosen) + [eot], tokenizer.encode(rejected) + [eot], max_length)
            if not p or not c or not r:
                self.dropped.append(i)
                continue
            self.truncated += int(cut)
            self.examples.append((_row(p, c), _row(p, r)))
            self.kept.append(i)
        if not self.examples:
            raise LmforgeError(f"none of the {len(self.dropped)} pairs has a response left to learn; raise max_length")
        super().__init__(len(self.examples), batch_size=batch_size, seed=seed, drop_last=drop_last)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.examples[i] for i in indices]
        width = max(len(x) for pair in rows for x, _ in pair)
        shape = (len(rows), 2, width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        for b, pair in enumerate(rows):
            for k, (x, y) in enumerate(pair):
                input_ids[b, k, : len(x)] = torch.tensor(x, dtype=torch.long)
                labels[b, k, : len(y)] = torch.tensor(y, dtype=torch.long)
                attention_mask[b, k, : len(x)] = 1
        index = torch.tensor([self.first_index + self.kept[i] for i in indices], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "index": index}
