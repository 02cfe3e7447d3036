"""Token ids to text while they arrive, for streaming.

A token is not always a whole character (byte-level BPE splits a Korean syllable or an
emoji over several tokens), and the text generated so far may be the first half of a
stop string. `TextStream` releases text only once neither can change it: it holds back
an incomplete UTF-8 character and any tail that could still grow into a stop string, so
the pieces a client receives, joined, are exactly the final text, and never contain a
stop string or half a character. `Engine.stream` and the continuous batcher both use it.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Protocol


class TextCodec(Protocol):
    """The tokenizer interface the engine uses (our `Tokenizer`, the llama2.c one, ...)."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...


def bytes_after(tokenizer: TextCodec, context: list[int], ids: list[int]) -> bytes:
    """The bytes `ids` add after `context`: a sentencepiece tokenizer drops the space of a
    piece that follows BOS, so a token's text depends on the one before it."""
    before = tokenizer.decode_bytes(context)
    return tokenizer.decode_bytes(context + ids)[len(before) :]


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    hits = [i for s in stop_strings if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string."""
    for n in range(min(len(text), max((len(s) for s in stop_strings), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop_strings):
            return n
    return 0


class TextStream:
    """One sequence's text: `push` each new token, get back the text now safe to show."""

    def __init__(self, tokenizer: TextCodec, previous: int, stop_strings: Sequence[str] = ()) -> None:
        """`previous` is the prompt's last token (the one the first new token follows)."""
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.text = ""  # everything decoded so far (a stop string included, if one arrived)
        self.sent = 0  # how much of it has been released
        self.stop: str | None = None  # the stop string that ended the text
        self._previous = previous
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        """The new text that can be released after `token`; once a stop string has
        appeared (`self.stop` is set) it is the text up to it, and nothing more comes."""
        if self.stop is not None:
            return ""
        self.text += self._decoder.decode(bytes_after(self.tokenizer, [self._previous], [token]))
        self._previous = token
        cut = find_stop(self.text, self.stop_strings)
        if cut is not None:
            self.stop = next(s for s in self.stop_strings if self.text.startswith(s, cut))
            out, self.sent = self.text[self.sent : cut], cut
            self.text = self.text[:cut]
            return out
        safe = max(self.sent, len(self.text) - held_back(self.text, self.stop_strings))
        out, self.sent = self.text[self.sent : safe], safe
        return out

    def finish(self) -> str:
        """What is still held back when generation ends (an incomplete character comes out
        as U+FFFD, a partial stop string as itself)."""
        if self.stop is None:
            self.text += self._decoder.decode(b"", final=True)
        out, self.sent = self.text[self.sent :], len(self.text)
        return out
