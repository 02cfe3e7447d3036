"""Instruction and chat data: items -> prompt/response text -> masked next-token examples.

Two text formats, each a template with one interface (`render`, `segments`,
`item_segments`, `stop_strings`) that training and `ChatSession` both use, so a model
is chatted with in the format it was tuned on:

`AlpacaTemplate`, the format of Stanford Alpaca and LLMs-from-scratch ch07 (the book's
`format_input` + "\\n\\n### Response:\\n", verbatim; Stanford's own prompt for items
with an input says "...describes a task, paired with an input that provides further
context..." instead, which we do not use)::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:                  <- only when the item's input is not empty
    {input}

    ### Response:
    {output}

A chat turn is an instruction and its reply a response; a system message replaces the
first line, and later turns repeat the Instruction/Response blocks.

`ChatTemplate`, for messages with roles system/user/assistant: each message is a role
marker line and its content, messages joined by one newline, and the reply follows
"<|assistant|>\\n"::

    <|system|>
    You are terse.
    <|user|>
    Hi
    <|assistant|>
    Hello.
    <|user|>
    Bye
    <|assistant|>
    {reply}

The markers are plain text, not special tokens (`ChatSession` encodes text with
specials as plain text, and training does the same), so the template works with any
tokenizer. The end of a reply is the `<|endoftext|>` *id*, which training appends after
the last assistant turn and generation stops at; earlier turns are followed by the next
marker, as in a rendered history.

Training sees `prompt + response + <|endoftext|>` with the prompt and response encoded
separately, exactly as generation sees them (an encoded prompt, then new tokens), so
the learned part decodes to exactly the response. Labels are the next token at each
position, -100 where that token is prompt text: every assistant turn and the final
end-of-text token are learned, once.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch

from lmforge.data.labeled import EpochSampler, split_sizes
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train.loss import IGNORE_INDEX  # the label the loss skips (-100, cross_entropy's default)

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

Message = Mapping[str, str]
Segments = list[tuple[str, str]]


# --- the Alpaca format --------------------------------------------------------------


def format_alpaca(item: Mapping[str, Any], preamble: str = ALPACA_PREAMBLE) -> tuple[str, str]:
    """(prompt, response) for an item with instruction, optional input and output (missing: "")."""
    if "instruction" not in item:
        raise LmforgeError(f"an Alpaca item needs an 'instruction' key; this one has {sorted(item)}")
    prompt = f"{preamble}\n\n### Instruction:\n{item['instruction']}"
    if item.get("input"):
        prompt += f"\n\n### Input:\n{item['input']}"
    return prompt + "\n\n### Response:\n", item.get("output") or ""


def alpaca_messages(item: Mapping[str, Any]) -> list[dict[str, str]]:
    """An Alpaca item as one user/assistant exchange (the input, if any, after a blank line)."""
    user = item["instruction"] + (f"\n\n{item['input']}" if item.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": item.get("output") or ""}]


# --- messages and templates ---------------------------------------------------------


def check_messages(messages: Any, where: str = "messages") -> None:
    """An optional system message, then user and assistant alternating, starting with user."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise LmforgeError(f"{where} must be a list of messages, got {type(messages).__name__}")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise LmforgeError(f"{where}[{i}] must be an object with 'role' and 'content', got {m!r:.100}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise LmforgeError(f"{where}[{i}] has role {role!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise LmforgeError(f"{where}[{i}] content must be a string, got {type(content).__name__}")
        if role == "system" and i == 0:
            continue
        if role != expected:
            raise LmforgeError(
                f"{where}[{i}] is a {role} message where a {expected} message belongs: a conversation is an "
                "optional system message first, then user and assistant messages taking turns"
            )
        expected = "assistant" if role == "user" else "user"


def session_messages(system: str | None, turns: Sequence[tuple[str, str]], user: str) -> list[dict[str, str]]:
    """`ChatSession`'s state (system prompt, past (user, reply) turns, new message) as messages."""
    messages = [{"role": "system", "content": system}] if system else []
    for u, a in turns:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": user}]


def _session_form(system: str | None, turns: Sequence[tuple[str, str]], user: str) -> None: ...
def _messages_form(messages: Sequence[Message], add_generation_prompt: bool) -> None: ...


_SESSION = inspect.signature(_session_form)
_MESSAGES = inspect.signature(_messages_form)


class _Template:
    """A template is a list of text pieces, each prompt text or learned reply text."""

    stop_strings: tuple[str, ...]

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def _checked_pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        check_messages(messages)
        if add_generation_prompt and (not messages or messages[-1]["role"] != "user"):
            raise LmforgeError("a generation prompt needs a conversation that ends with a user message")
        return self._pieces(messages, add_generation_prompt)

    @overload
    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str: ...
    @overload
    def render(self, system: str | None, turns: Sequence[tuple[str, str]], user: str) -> str: ...
    def render(self, *args: Any, **kwargs: Any) -> str:
        """The text of `messages` (plus the reply's opening if `add_generation_prompt`).

        Also takes `ChatSession`'s call, `render(system, turns, user)`: the system prompt,
        the past (user, reply) turns and the new user message, with the generation prompt.
        """
        try:
            s = _SESSION.bind(*args, **kwargs).arguments
        except TypeError:
            m = _MESSAGES.bind(*args, **kwargs).arguments
            messages, generation = m["messages"], m["add_generation_prompt"]
        else:
            messages, generation = session_messages(s["system"], s["turns"], s["user"]), True
        return "".join(text for text, _ in self._checked_pieces(messages, generation))

    def segments(self, messages: Sequence[Message]) -> Segments:
        """[(prompt, reply), ...], one per assistant message; joined they are the rendered text.

        A prompt is everything since the previous reply: the text a model conditions on,
        never learned. The conversation must end with an assistant message.
        """
        pieces = self._checked_pieces(messages, False)
        if not messages or messages[-1]["role"] != "assistant":
            raise LmforgeError("a training conversation must end with an assistant message (the reply to learn)")
        out: Segments = []
        prompt = ""
        for text, learned in pieces:
            if learned:
                out.append((prompt, text))
                prompt = ""
            else:
                prompt += text
        return out

    def item_segments(self, item: Mapping[str, Any]) -> Segments:
        """The segments of an item from `read_instructions` (Alpaca or chat)."""
        if "messages" in item:
            return self.segments(item["messages"])
        if "instruction" in item:
            return self.segments(alpaca_messages(item))
        raise LmforgeError(f"an item needs 'messages' or 'instruction'; this one has {sorted(item)}")


@dataclass(frozen=True)
class ChatTemplate(_Template):
    """Role markers on their own lines (see the module docstring); replies end with <|endoftext|>."""

    stop_strings: tuple[str, ...] = ("\n<|user|>",)

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        pieces = []
        for i, m in enumerate(messages):
            sep = "\n" if i else ""
            if m["role"] == "assistant":
                pieces += [(f"{sep}<|assistant|>\n", False), (m["content"], True)]
            else:
                pieces.append((f"{sep}<|{m['role']}|>\n{m['content']}", False))
        if add_generation_prompt:
            pieces.append(("\n<|assistant|>\n", False))
        return pieces


@dataclass(frozen=True)
class AlpacaTemplate(_Template):
    """The Alpaca format as a chat: a turn is "### Instruction:", a reply "### Response:"."""

    preamble: str = ALPACA_PREAMBLE
    stop_strings: tuple[str, ...] = ("\n### Instruction:", "\n### Input:", "\n### Response:")

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else self.preamble
        pieces = [(system, False)]
        for m in messages:
            if m["role"] == "user":
                pieces.append((f"\n\n### Instruction:\n{m['content']}", False))
            elif m["role"] == "assistant":
                pieces += [("\n\n### Response:\n", False), (m["content"], True)]
        if add_generation_prompt:
            pieces.append(("\n\n### Response:\n", False))
        return pieces

    def item_segments(self, item: Mapping[str, Any]) -> Segments:
        """Alpaca items keep their "### Input:" section (`format_alpaca` with this preamble)."""
        if "instruction" in item and "messages" not in item:
            return [format_alpaca(item, self.preamble)]
        return super().item_segments(item)


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
    if not path.is_file():
        raise LmforgeError(f"no file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path} is not valid JSON: {e}") from None
    else:
        raw = []
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LmforgeError(f"{path}, line {n}: not valid JSON ({e})") from None
    if not raw:
        raise LmforgeError(f"{path} holds no items")
    return [_normalize(item, f"{path}, item {i}") for i, item in enumerate(raw)]


def _text_field(item: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
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
        messages = [{"role": "system", "content": _text_field(item, "system", where)}] if item.get("system") else []
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
        _text_field(item, "instruction", where)
        _text_field(item, "output", where)
        item["input"] = _text_field(item, "input", where, default="")
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


class InstructionBatches:
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
        template: _Template | None = None,
        mask_prompt: bool = True,
        max_length: int | None = None,
        pad_id: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        drop_last: bool = True,
    ) -> None:
        template = AlpacaTemplate() if template is None else template
        self.pad_id = tokenizer.eot_id if pad_id is None else pad_id
        if self.pad_id is None:
            raise LmforgeError("this tokenizer has no <|endoftext|> to pad with; pass pad_id")
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
        self.sampler = EpochSampler(len(self.examples), batch_size, seed, drop_last)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def collate(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_pairs([self.examples[i] for i in indices], self.pad_id, self.ignore_index)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch `step`: a function of (seed, step) only."""
        return self.collate(self.sampler.indices(step))

    def iter_eval(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every kept example once, in order, the last batch possibly smaller."""
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise LmforgeError(f"batch_size must be a positive integer, got {batch_size!r}")
        for start in range(0, len(self.examples), batch_size):
            yield self.collate(range(start, min(start + batch_size, len(self.examples))))


# --- which template a model was tuned with ----------------------------------------------

TEMPLATES: dict[str, type[_Template]] = {"alpaca": AlpacaTemplate, "chat": ChatTemplate}


def template_named(name: str) -> _Template:
    """The template saved as `tokenizer.chat_template` by instruction tuning."""
    if name not in TEMPLATES:
        raise LmforgeError(f"unknown chat template {name!r}; lmforge knows {', '.join(TEMPLATES)}")
    return TEMPLATES[name]()


def template_for(tokenizer: object | None) -> _Template | None:
    """The chat template of an instruction-tuned model's tokenizer, or None for a base model."""
    name = getattr(tokenizer, "chat_template", None)
    return template_named(name) if name else None
