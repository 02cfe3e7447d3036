"""Continuous batching: sequences join and leave the running decode batch between steps.

`Engine.generate` runs a fixed batch from the first token to the last, so a new request
waits for the slowest one. A server instead keeps one running batch that requests join
and leave at any step:

- `add` prefills a newcomer alone (its prompt in one forward pass), copies its keys and
  values into a free row of the shared `SlotCache`, and samples its first token;
- `step` decodes one token for every running row in one forward pass; each row has its
  own length, positions, sampling settings, seeded generator, stops and limits;
- `remove` takes a row out (finished, or its client went away) and frees it at once.

A row's tokens are the ones `Engine.generate` gives the same prompt, settings and seed
alone (a batched matrix product may round differently in the last bit, nothing more).
Rows live in the first `len(rows)` slots of the cache; removing one moves the last row
into its place, so the decode step never runs on empty rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmforge.config import Config
from lmforge.engine.cache import KVCache
from lmforge.engine.engine import Engine
from lmforge.engine.sampling import SamplingParams, sample
from lmforge.engine.text import TextStream
from lmforge.errors import LmforgeError


class SlotCache:
    """Keys and values of every layer for up to `rows` sequences of different lengths.

    k, v: (n_layer, rows, nkv, capacity, hd); row b holds `lengths[b]` filled slots from
    slot 0 (no padding: each row starts at position 0). Capacity grows on demand, up to
    the context length, so a server with short requests holds a short cache.
    """

    def __init__(self, config: Config, rows: int, dtype: torch.dtype, device: torch.device, capacity: int = 256) -> None:
        self.config = config
        capacity = min(capacity, config.context_length)
        shape = (config.n_layer, rows, config.n_kv_head, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.n = 0  # rows 0..n-1 are in use
        self._span = 0
        self._rows = torch.arange(0)
        self._last_layer = config.n_layer - 1

    @property
    def capacity(self) -> int:
        return self.k.size(3)

    def reserve(self, length: int) -> None:
        """Make room for `length` slots in every row (doubling, at most the context length)."""
        if length <= self.capacity:
            return
        new = min(max(length, 2 * self.capacity), self.config.context_length)
        pad = (0, 0, 0, new - self.capacity)
        self.k = torch.nn.functional.pad(self.k, pad)
        self.v = torch.nn.functional.pad(self.v, pad)

    def put(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill `row` with a prefilled sequence's keys and values (n_layer, nkv, L, hd)."""
        L = k.size(2)
        self.reserve(L)
        self.k[:, row, :, :L] = k
        self.v[:, row, :, :L] = v
        self.lengths[row] = L

    def move(self, src: int, dst: int) -> None:
        L = int(self.lengths[src])
        self.k[:, dst, :, :L] = self.k[:, src, :, :L]
        self.v[:, dst, :, :L] = self.v[:, src, :, :L]
        self.lengths[dst] = L

    # --- one decode step of rows 0..n-1: what attention needs (`lmforge.model.Cache`) ---------
    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (n, 1) and visible slots (n, 1, 1, S) for one new token per row."""
        lengths = self.lengths[: self.n]
        self._rows = torch.arange(self.n, device=lengths.device)  # every layer's update writes these rows
        self._span = int(lengths.max()) + 1
        self.reserve(self._span)
        key = torch.arange(self._span, device=lengths.device)
        return lengths[:, None], (key[None] <= lengths[:, None])[:, None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new k, v (n, nkv, 1, hd) at its own length; return (n, nkv, S, hd)."""
        at = self.lengths[: self.n]
        self.k[layer, self._rows, :, at] = k[:, :, 0]
        self.v[layer, self._rows, :, at] = v[:, :, 0]
        if layer == self._last_layer:
            self.lengths[: self.n] += 1
        return self.k[layer, : self.n, :, : self._span], self.v[layer, : self.n, :, : self._span]


@dataclass(eq=False)
class Generation:
    """One sequence to generate: what was asked, and what it has produced so far.

    `logprobs`: None for no log-probabilities; k >= 0 for each new token's log-probability
    and the k most likely ids at its step. `prompt_logprobs`: also score the prompt's
    tokens (each given the ones before it), as `echo` with log-probabilities asks.
    Log-probabilities are the model's own (its logits, before temperature or top-p).
    """

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # filled in while it runs
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"
    prompt_scores: list[tuple[float, list[tuple[int, float]]]] | None = None  # prompt tokens 1.. (the first has none)
    generator: torch.Generator | None = None
    text: TextStream | None = None


@dataclass
class Emitted:
    """What one step gave one generation: a token (None for the last held-back text), the
    text it releases, its log-probability and the top alternatives, and whether it ended."""

    generation: Generation
    token: int | None
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


class Batcher:
    """The running batch of an `Engine`'s model: add, step, remove (see the module docstring)."""

    def __init__(self, engine: Engine, max_batch: int) -> None:
        if max_batch < 1:
            raise LmforgeError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.model = engine.model
        self.config = engine.config
        self.max_batch = max_batch
        self.rows: list[Generation] = []
        self.cache = SlotCache(self.config, max_batch, self.model.tok_emb.weight.dtype, self.model.device)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    def check(self, g: Generation) -> None:
        """Refuse what could not run, before it takes a row (`LmforgeError` names the problem).
        `max_new_tokens` may be 0: nothing is generated, and the prompt is only scored
        (`prompt_logprobs`) or only echoed."""
        self.engine.check_request(
            max_new_tokens=g.max_new_tokens or 1, sampling=g.sampling,
            seed=g.seed, stop_ids=g.stop_ids, stop_strings=g.stop_strings,
        )
        g.prompt = self.engine.prompt_ids(g.prompt)

    @torch.inference_mode()
    def add(self, g: Generation) -> list[Emitted]:
        """Prefill `g` into a free row and sample its first token."""
        if not self.free:
            raise LmforgeError("the batch is full: remove a finished generation first")
        self.check(g)
        if g.max_new_tokens == 0 and not g.prompt_logprobs:
            return [self._finish(g, "length")]
        if g.seed is not None:
            g.generator = torch.Generator(device=self.model.device).manual_seed(g.seed)
        if self.engine.tokenizer is not None:
            g.text = TextStream(self.engine.tokenizer, g.prompt[-1], g.stop_strings)
        L = len(g.prompt)
        ids = torch.tensor([g.prompt], device=self.model.device)
        prefill = KVCache(self.config, torch.zeros(1, dtype=torch.long, device=ids.device), L, self.cache.k.dtype)
        hidden = self.model.hidden_states(ids, pos=prefill.positions(L), visible=prefill.visible(L), cache=prefill)[0]
        if g.prompt_logprobs:
            logits = self.engine.cpu.logits(hidden)  # (L, V): every prompt position
            g.prompt_scores = _scores(logits[:-1], g.prompt[1:], g.logprobs or 0)
            logits = logits[-1:]
        else:
            logits = self.engine.cpu.logits(hidden[-1:])
        if g.max_new_tokens == 0:  # scoring only (echo): nothing to generate, no row taken
            return [self._finish(g, "length")]
        self.cache.put(len(self.rows), prefill.k[:, 0], prefill.v[:, 0])
        self.rows.append(g)
        return self._emit([g], logits)

    @torch.inference_mode()
    def step(self) -> list[Emitted]:
        """One new token for every running generation; finished ones are removed."""
        if not self.rows:
            return []
        self.cache.n = len(self.rows)
        pos, visible = self.cache.step_inputs()
        last = torch.tensor([[g.ids[-1]] for g in self.rows], device=self.model.device)
        hidden = self.model.hidden_states(last, pos=pos, visible=visible, cache=self.cache)
        return self._emit(list(self.rows), self.engine.cpu.logits(hidden[:, -1]))

    def remove(self, g: Generation) -> None:
        """Take `g` out of the batch (finished or cancelled); its row is free at once."""
        row = next((i for i, r in enumerate(self.rows) if r is g), None)
        if row is None:
            return
        last = len(self.rows) - 1
        if row != last:
            self.cache.move(last, row)
            self.rows[row] = self.rows[last]
        self.rows.pop()

    # --- choosing and reporting tokens ---------------------------------------------------
    def _emit(self, gens: list[Generation], logits: torch.Tensor) -> list[Emitted]:
        greedy = logits.argmax(dim=-1).tolist()
        logp = None
        if any(g.logprobs is not None for g in gens):
            logp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for i, g in enumerate(gens):
            if g.sampling.greedy:
                t = greedy[i]
            else:
                t = int(sample(logits[i : i + 1], g.sampling, g.generator)[0])
            out.extend(self._advance(g, t, logp[i] if logp is not None and g.logprobs is not None else None))
        return out

    def _advance(self, g: Generation, t: int, logp: torch.Tensor | None) -> list[Emitted]:
        if t in g.stop_ids:
            return [self._finish(g, "stop")]
        g.ids.append(t)
        logprob, top = None, None
        if logp is not None:
            logprob = float(logp[t])
            top = _top(logp, g.logprobs or 0)
        text = g.text.push(t) if g.text is not None else ""
        done = None
        if g.text is not None and g.text.stop is not None:
            done = "stop"
        elif len(g.ids) == g.max_new_tokens or len(g.prompt) + len(g.ids) >= self.config.context_length:
            done = "length"  # the limit, or the context is full (the last token can no longer be fed)
        emitted = [Emitted(g, t, text, logprob, top)]
        if done:
            emitted.append(self._finish(g, done))
        return emitted

    def _finish(self, g: Generation, reason: str) -> Emitted:
        g.finish_reason = reason
        self.remove(g)
        rest = g.text.finish() if g.text is not None else ""
        return Emitted(g, None, rest, finish_reason=reason)


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely ids and their log-probabilities, most likely first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logp, k)
    return list(zip(ids.tolist(), values.tolist()))


def _scores(logits: torch.Tensor, targets: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each target's log-probability under the logits of the position before it, and the top k there."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[torch.arange(len(targets)), torch.tensor(targets)].tolist()
    if k <= 0:
        return [(c, []) for c in chosen]
    values, ids = torch.topk(logp, k, dim=-1)
    return [(c, list(zip(i.tolist(), v.tolist()))) for c, i, v in zip(chosen, ids, values)]

