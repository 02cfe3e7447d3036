"""Chat templates: messages -> the text a model reads, one format per template.

Every template has one interface (`render`, `segments`, `item_segments`,
`stop_strings`) that instruction tuning (`lmforge.data.instruct`) and chat sessions
(`lmforge.serve.chat`) both use, so a model is chatted with in the format it was tuned
on; instruction tuning saves the template's name as `tokenizer.chat_template`.


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

`DialogueTemplate` is Anthropic's HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ..."), the
format of those preference pairs, so a model aligned on them is prompted as it learned.

`PlainTranscript` is for a base model, which was tuned on no format: a transcript it
can continue ("User: ...\\nAssistant: ...").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ROLES = ("system", "user", "assistant")

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
                f"{where}[{i}] is {_a(role)} message where {_a(expected)} message belongs: a conversation is an "
                "optional system message first, then user and assistant messages taking turns"
            )
        expected = "assistant" if role == "user" else "user"


def _a(word: str) -> str:
    return f"{'an' if word.startswith('a') else 'a'} {word}"  # a system, a user, an assistant


def session_messages(system: str | None, turns: Sequence[tuple[str, str]], user: str) -> list[dict[str, str]]:
    """`ChatSession`'s state (system prompt, past (user, reply) turns, new message) as messages."""
    messages = [{"role": "system", "content": system}] if system else []
    for u, a in turns:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": user}]


class Template:
    """A template is a list of text pieces, each prompt text or learned reply text."""

    stop_strings: tuple[str, ...]

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def _checked_pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        check_messages(messages)
        if add_generation_prompt and (not messages or messages[-1]["role"] != "user"):
            raise LmforgeError("a generation prompt needs a conversation that ends with a user message")
        return self._pieces(messages, add_generation_prompt)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The text of `messages`, plus the reply's opening if `add_generation_prompt`."""
        return "".join(text for text, _ in self._checked_pieces(messages, add_generation_prompt))

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
class ChatTemplate(Template):
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
class AlpacaTemplate(Template):
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


@dataclass(frozen=True)
class PlainTranscript(Template):
    """What a base model can continue: a plain "User: ... / Assistant: ..." transcript, the
    system prompt first; a reply ends where the model starts the user's next line."""

    stop_strings: tuple[str, ...] = ("\nUser:",)

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        pieces = []
        for i, m in enumerate(messages):
            sep = "\n" if i else ""
            if m["role"] == "system":
                pieces.append((f"{m['content'].strip()}\n", False))
            elif m["role"] == "user":
                pieces.append((f"{sep}User: {m['content']}", False))
            else:
                pieces += [(f"{sep}Assistant: ", False), (m["content"], True)]
        if add_generation_prompt:
            pieces.append(("\nAssistant:", False))
        return pieces


@dataclass(frozen=True)
class DialogueTemplate(Template):
    """Anthropic's HH-RLHF dialogue text: "\n\nHuman: ..." and "\n\nAssistant:" turns. A
    reply is the text after "Assistant:" exactly as the data has it (its leading space
    included), so a model tuned on HH-RLHF pairs is prompted as it learned."""

    stop_strings: tuple[str, ...] = ("\n\nHuman:",)

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        pieces = []
        for m in messages:
            if m["role"] == "system":
                pieces.append((m["content"], False))
            elif m["role"] == "user":
                pieces.append((f"\n\nHuman: {m['content']}", False))
            else:
                pieces += [("\n\nAssistant:", False), (m["content"], True)]
        if add_generation_prompt:
            pieces.append(("\n\nAssistant:", False))
        return pieces


# --- which template a model was tuned with ----------------------------------------------
TEMPLATES: dict[str, type[Template]] = {"alpaca": AlpacaTemplate, "chat": ChatTemplate, "dialogue": DialogueTemplate}


def template_named(name: str) -> Template:
    """The template saved as `tokenizer.chat_template` by instruction tuning."""
    if name not in TEMPLATES:
        raise LmforgeError(f"unknown chat template {name!r}; lmforge knows {', '.join(TEMPLATES)}")
    return TEMPLATES[name]()


def template_for(tokenizer: object | None) -> Template:
    """The template a model was instruction-tuned with (its tokenizer's `chat_template`),
    else `PlainTranscript` for a base model."""
    name = getattr(tokenizer, "chat_template", None)
    return template_named(name) if name else PlainTranscript()


def template_note(tokenizer: object | None, model: str) -> str | None:
    """What to tell a user who chats with `model` when it has no chat template: the reply
    then comes from a plain transcript, which a base model merely continues, and a silent
    fallback reads as if the model had been tuned to answer. None when the tokenizer names
    the template the model was instruction-tuned with."""
    if getattr(tokenizer, "chat_template", None):
        return None
    return (f"note: {model} has no chat template (it was not instruction-tuned with `lmforge finetune instruct`); "
            "using the plain transcript a base model can continue (\"User: ...\" / \"Assistant:\")")
