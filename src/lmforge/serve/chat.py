"""A chat session: history in, streamed reply out, over the `Engine`.

How turns become tokens is the template's job (`lmforge.tokenizer.templates`): an
instruction-tuned model names the template it learned in its tokenizer
(`tokenizer.chat_template`), a base model gets `PlainTranscript`, a transcript it can
continue, whose reply ends where the model starts the user's next line;
`template_for(tokenizer)` picks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from lmforge.engine import Engine, SamplingParams, end_of_text_ids
from lmforge.errors import LmforgeError
from lmforge.tokenizer.templates import PlainTranscript, Template, session_messages


@dataclass
class ChatSession:
    """Keeps the turns; drops the oldest ones when the transcript no longer fits the context."""

    engine: Engine
    system: str | None = None
    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.9)
    max_new_tokens: int = 256
    seed: int | None = None
    template: Template = field(default_factory=PlainTranscript)
    turns: list[tuple[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.turns.clear()

    def reply(self, user: str) -> Iterator[str]:
        """Stream the assistant's reply to `user`, then remember the turn."""
        tok = self.engine.tokenizer
        if tok is None:
            raise LmforgeError("chat needs a model with a tokenizer")
        context = self.engine.config.context_length
        reserve = min(self.max_new_tokens, context // 2)  # room for the reply; at least half the context for the history
        budget = context - reserve
        while True:
            prompt = tok.encode(self.template.render(session_messages(self.system, self.turns, user), add_generation_prompt=True))
            if len(prompt) <= budget or not self.turns:
                break
            self.turns.pop(0)  # forget the oldest turn
        if len(prompt) > budget:
            raise LmforgeError(
                f"this message needs {len(prompt)} tokens, more than the {budget} the context leaves "
                f"after {reserve} for the reply; write less or lower --max-new-tokens"
            )
        pieces = []
        for _, text in self.engine.stream(
            prompt,
            max_new_tokens=self.max_new_tokens,
            sampling=self.sampling,
            seed=None if self.seed is None else self.seed + len(self.turns),
            stop_ids=end_of_text_ids(tok),
            stop_strings=self.template.stop_strings,
        ):
            pieces.append(text)
            yield text
        self.turns.append((user, "".join(pieces).strip()))
