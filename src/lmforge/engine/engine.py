"""Inference: the `Engine` owns a preallocated KV cache and turns prompts into tokens.

Generation is prefill (all prompt tokens in one forward pass, filling the cache), then
one decode step per new token (one token in, its keys and values appended to the
cache). A batch of prompts of different lengths is left-padded so that every row
writes the same cache slot each step; each row gets its own positions (starting at 0
at its first real token) and a mask that hides the padding, so a row's tokens are
what it would get alone.

`generate_uncached` is the slow reference the engine is tested against: the whole
sequence through the model for every new token, no cache.

Context: a prompt longer than the model's context_length is an error; generation
stops when the context is full (finish_reason "context"), it never slides.

The output head and the CPU tuning of one-row decoding (oneDNN-packed, fused weights)
are in `cpu_decode.py`; the engine only calls them.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.engine.cache import KVCache
from lmforge.engine.cpu_decode import CpuDecoder
from lmforge.engine.sampling import SamplingParams, sample
from lmforge.engine.text import TextCodec, TextStream, bytes_after, find_stop
from lmforge.errors import LmforgeError
from lmforge.model import GPT


def end_of_text_ids(tokenizer: object | None) -> list[int]:
    """The ids that end a text for this tokenizer: `<|endoftext|>`, or a sentencepiece EOS,
    and its BOS too (a model that starts a new sequence has finished this one, as
    llama2.c's run.c stops there)."""
    ids = [getattr(tokenizer, name, None) for name in ("eot_id", "eos_id", "bos_id")]
    return sorted({i for i in ids if i is not None})


@dataclass
class Completion:
    """One prompt's result: the new ids (stop id excluded), their text, and why it ended."""

    ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (a stop id or string), "length" (max_new_tokens), "context" (context full)
    stop: int | str | None = None  # the stop id or stop string that ended it ("stop" only)


class Engine:
    """Generate from a model: prefill, then decode one token at a time with a KV cache.

    The engine works on the caller's model, not a copy. It calls `model.eval()`
    (generation runs without dropout) and never switches back: a caller that goes on
    training calls `model.train()` afterwards. Nothing else in the model changes: for
    one-row decoding on CPU the engine keeps packed copies of the weights
    (`lmforge.engine.cpu_decode`), rebuilt when a weight changes.
    """

    def __init__(self, model: GPT, tokenizer: TextCodec | None = None, *, packed: bool = True, compile: bool = False) -> None:
        """`packed=False` decodes one row through the model's own layers, without the
        packed copy of the weights that makes it faster on CPU (e.g. while training a
        model close to the memory limit). `compile=True` decodes one row of fp32 or int8
        weights on CPU through a step compiled by Inductor (`lmforge.engine.compiled`):
        fastest, after a compile of 25-120 s, and recompiled whenever a weight changes."""
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.cpu = CpuDecoder(model, packed, compile)  # the output head and the one-row decode on CPU

    def _forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        T = ids.size(1)
        if self.cpu.active and T == 1:  # one row decoding on CPU: the packed or compiled step
            return self.cpu.next_logits(ids, cache)
        hidden = self.model.hidden_states(ids, pos=cache.positions(T), visible=cache.visible(T), cache=cache)
        return self.cpu.logits(hidden[:, -1])

    # --- the step loop ---------------------------------------------------------------
    def _prompts(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, str) or any(_is_int(p) for p in prompts):
            raise LmforgeError("generate takes a list of prompts: wrap one prompt in a list, e.g. ['Once upon'] or [[1, 2, 3]]")
        if not prompts:
            raise LmforgeError("no prompts given: pass at least one prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise LmforgeError("this model has no tokenizer: give prompts as token ids")
                p = self.tokenizer.encode(p)
            p = [int(t) for t in p]
            if not p:
                raise LmforgeError("a prompt is empty: give at least one token (e.g. the BOS or <|endoftext|> id)")
            if len(p) > self.config.context_length:
                raise LmforgeError(
                    f"prompt of {len(p)} tokens does not fit the model's context_length {self.config.context_length}; "
                    "shorten it (keep its last tokens)"
                )
            bad = next(((i, t) for i, t in enumerate(p) if not 0 <= t < self.config.vocab_size), None)
            if bad is not None:
                raise LmforgeError(
                    f"prompt has token id {bad[1]} (at position {bad[0]}), outside the vocabulary 0..{self.config.vocab_size - 1}"
                )
            out.append(p)
        return out

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """One prompt as checked token ids: text is encoded; an empty prompt, one longer than
        the context or an id outside the vocabulary is refused (`LmforgeError`)."""
        return self._prompts([prompt])[0]

    def check_request(
        self,
        *,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        stop_ids: int | Sequence[int] = (),
        stop_strings: str | Sequence[str] = (),
    ) -> tuple[list[int], list[str]]:
        """Check a request's settings before any work is done; returns (stop_ids, stop_strings)
        as lists (a lone id or string counts as a list of one).

        `max_new_tokens` is a whole number >= 1; `seed` a whole number in [0, 2**64);
        every stop id is inside the model's vocabulary (an id outside it can never be
        generated, so it would never stop anything); no stop string is empty (it would
        match before the first token, so nothing would be generated).
        """
        if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
            raise LmforgeError(f"max_new_tokens must be a whole number >= 1 (how many tokens to generate), got {max_new_tokens!r}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise LmforgeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if seed is not None and not (_is_int(seed) and 0 <= seed < 2**64):
            raise LmforgeError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}")
        ids = [stop_ids] if _is_int(stop_ids) else list(stop_ids)  # type: ignore[arg-type]
        vocab = self.config.vocab_size
        for t in ids:
            if not _is_int(t):
                raise LmforgeError(f"stop id {t!r} is not a token id (a whole number)")
            if not 0 <= t < vocab:
                raise LmforgeError(
                    f"stop id {t} is outside the model's vocabulary of {vocab:,} ids (0..{vocab - 1}), so it could never stop "
                    "generation; give an id the model can produce"
                )
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        for text in strings:
            if not isinstance(text, str):
                raise LmforgeError(f"stop string {text!r} is not a string")
            if not text:
                raise LmforgeError("a stop string is empty; it would match before the first token, so nothing would be generated: drop it")
        if strings and self.tokenizer is None:
            raise LmforgeError("stop strings need a tokenizer")
        return [int(t) for t in ids], strings

    @torch.inference_mode()
    def steps(
        self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams, seed: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (next token (B,), the logits it was drawn from (B, V)) per step,
        up to max_new_tokens times or until the context is full."""
        self.check_request(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
        device = self.model.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        longest = int(lengths.max())
        max_len = min(longest + max_new_tokens, self.config.context_length)
        pad = longest - lengths
        ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, int(pad[b]) :] = torch.tensor(p, device=device)
        cache = KVCache(self.config, pad, self.cpu.cache_length(max_len, len(prompts)), self.model.tok_emb.weight.dtype)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        logits = self._forward(ids, cache)
        with self.cpu.decoding(len(prompts)):
            for step in range(max_new_tokens):
                token = sample(logits, sampling, generator)
                yield token, logits
                if step + 1 == max_new_tokens or cache.length == max_len:
                    return
                logits = self._forward(token[:, None], cache)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
    ) -> list[Completion]:
        """Complete each prompt (text or ids). A row stops at a stop id (not included in its
        ids), after the token that completes a stop string (its text is cut before the
        string), at max_new_tokens, or when the context is full."""
        stop_ids, stop_strings = self.check_request(
            max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids, stop_strings=stop_strings
        )
        rows = self._prompts(prompts)
        stops = set(stop_ids)
        out: list[list[int]] = [[] for _ in rows]
        reason = ["context"] * len(rows)
        stopped_by: list[int | str | None] = [None] * len(rows)
        done = [False] * len(rows)
        for token, _ in self.steps(rows, max_new_tokens, sampling, seed):
            for b, t in enumerate(token.tolist()):
                if done[b]:
                    continue
                if t in stops:
                    done[b], reason[b], stopped_by[b] = True, "stop", t
                    continue
                out[b].append(t)
                text = self._decode_after(rows[b], out[b]) if stop_strings else ""
                cut = find_stop(text, stop_strings) if stop_strings else None
                if cut is not None:
                    done[b], reason[b] = True, "stop"
                    stopped_by[b] = next(s for s in stop_strings if text.startswith(s, cut))
                elif len(out[b]) == max_new_tokens:
                    done[b], reason[b] = True, "length"
            if all(done):
                break
        return [Completion(ids, self._text(row, ids, stop_strings), r, by)
                for row, ids, r, by in zip(rows, out, reason, stopped_by)]

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
    ) -> Iterator[tuple[int | None, str]]:
        """Yield (token id, new text) as each token arrives; the texts joined equal `generate`'s text.

        Text is held back while it ends in an incomplete UTF-8 character or could be the
        start of a stop string, and released once it cannot be; what is still held when
        generation ends comes last, as (None, text).
        """
        stop_ids, stop_strings = self.check_request(
            max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids, stop_strings=stop_strings
        )
        rows = self._prompts([prompt])
        if self.tokenizer is None:
            for token, _ in self.steps(rows, max_new_tokens, sampling, seed):
                if int(token[0]) in stop_ids:
                    return
                yield int(token[0]), ""
            return
        text = TextStream(self.tokenizer, rows[0][-1], stop_strings)
        for token, _ in self.steps(rows, max_new_tokens, sampling, seed):
            t = int(token[0])
            if t in stop_ids:
                break
            yield t, text.push(t)
            if text.stop is not None:
                return
        if rest := text.finish():
            yield None, rest

    def _decode_after(self, prompt: list[int], ids: list[int]) -> str:
        return bytes_after(self.tokenizer, prompt[-1:], ids).decode("utf-8", "replace")

    def _text(self, prompt: list[int], ids: list[int], stop_strings: Sequence[str]) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._decode_after(prompt, ids)
        cut = find_stop(text, stop_strings)
        return text if cut is None else text[:cut]


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@torch.inference_mode()
def generate_uncached(
    model: GPT, prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(temperature=0), seed: int | None = None
) -> tuple[list[int], list[torch.Tensor]]:
    """The reference: run the whole sequence for every new token. Returns (new ids, each step's logits)."""
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    ids = torch.tensor([list(prompt)], device=model.device)
    new, all_logits = [], []
    for _ in range(max_new_tokens):
        if ids.size(1) > model.config.context_length:
            break
        logits = model(ids)[:, -1]
        token = sample(logits, sampling, generator)
        all_logits.append(logits[0])
        new.append(int(token))
        ids = torch.cat([ids, token[:, None]], dim=1)
    return new, all_logits
