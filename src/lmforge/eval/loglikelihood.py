"""Log-likelihoods of continuations given contexts, and of whole texts in sliding windows.

What a benchmark asks of a model is log p(continuation | context) summed over the
continuation's tokens, and whether greedy decoding would have produced it. The token
pairs are what lm-evaluation-harness feeds its models: the context's trailing spaces move
to the continuation; the continuation's ids are those of encode(context + continuation)
after the first len(encode(context)) ids; a pair longer than the model's context keeps
its last context_length + 1 tokens (left truncation).

`score_pairs` computes exactly those numbers, faster:

- pairs with the same (truncated) context form a group; the context runs through the
  model once, filling a KV cache, and every continuation of the group is then scored
  from that cache (a question with four answers costs one question, not four); where
  that saves less than the second pass costs (a lone continuation, as in LAMBADA, or
  short contexts with long answers, as in PIQA) each pair runs whole, in one pass;
- groups are sorted by length and `batch_size` of them make a batch (contexts
  left-padded so that the continuations start at the same cache slot);
- logits are computed only where a continuation token is predicted, not for every
  position (the output layer is most of a small model's work).

`score_pairs_uncached` is the plain reference: each full sequence through the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.engine.cache import KVCache
from lmforge.errors import LmforgeError
from lmforge.model import GPT

Pair = tuple[Sequence[int], Sequence[int]]
HEAD_FLOATS = 1 << 25  # logits held at once (128 MiB of fp32)


@dataclass(frozen=True)
class Scored:
    """A continuation's log-likelihood (nats), whether it is the greedy one, and its length in tokens."""

    loglikelihood: float
    is_greedy: bool
    tokens: int


class TextEncoder:
    """Text to ids as the model's tokenizer does in its Hugging Face form (what lm-eval's
    `hf` model calls): a sentencepiece (llama2.c) tokenizer starts every text with BOS,
    a byte-level BPE adds nothing. `prefix_id` conditions a text with no context: BOS,
    else <|endoftext|>."""

    def __init__(self, tokenizer: object | None) -> None:
        if tokenizer is None:
            raise LmforgeError("this model has no tokenizer, so text cannot be scored; give a model folder that holds its tokenizer")
        self.tokenizer = tokenizer
        self.bos_id: int | None = getattr(tokenizer, "bos_id", None)
        prefix = self.bos_id if self.bos_id is not None else getattr(tokenizer, "eot_id", None)
        self.prefix_id: int | None = prefix

    def encode(self, text: str, special: bool = True) -> list[int]:
        if self.bos_id is not None:
            return list(self.tokenizer.encode(text, bos=special))  # type: ignore[attr-defined]
        return list(self.tokenizer.encode(text))  # type: ignore[attr-defined]

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval splits them."""
        if not context:
            if self.prefix_id is None:
                raise LmforgeError("an empty context needs a BOS or <|endoftext|> token to condition on; this tokenizer has neither")
            cont = self.encode(continuation, special=False)
            return ([self.prefix_id], cont) if not cont or cont[0] != self.prefix_id else (cont[:1], cont[1:])
        stripped = context.rstrip()
        if len(stripped) < len(context):
            context, continuation = stripped, context[len(stripped):] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


def fit(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """The context the model sees: ctx + cont cut to its last max_len + 1 tokens (the last is
    only predicted), as lm-eval truncates from the left."""
    if not continuation:
        raise LmforgeError("a continuation encodes to no tokens, so it has no likelihood; check the task's choices")
    if len(continuation) > max_len:
        raise LmforgeError(f"a continuation of {len(continuation)} tokens does not fit the model's context of {max_len} tokens")
    keep = max_len + 1 - len(continuation)
    return list(context[-keep:]), list(continuation)


@torch.inference_mode()
def score_pairs(model: GPT, pairs: Sequence[Pair], batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[Scored]:
    """Each (context ids, continuation ids) pair scored; contexts shared by several pairs run
    once. A batch is `batch_size` contexts, each with all its continuations: on a CPU a
    forward pass costs much the same for a few tokens as for a few hundred, so fewer, fuller
    passes are what make this fast."""
    if batch_size < 1:
        raise LmforgeError(f"batch size must be at least 1, got {batch_size}")
    model.eval()
    L = model.config.context_length
    fitted = [fit(c, k, L) for c, k in pairs]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (c, _) in enumerate(fitted):
        groups.setdefault(tuple(c), []).append(i)
    order = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(len(fitted[i][1]) for i in g[1])))
    out: list[Scored | None] = [None] * len(pairs)
    shared = [g for g in order if _worth_sharing(len(g[0]), [len(fitted[i][1]) for i in g[1]])]
    alone = [i for g in order if not _worth_sharing(len(g[0]), [len(fitted[i][1]) for i in g[1]]) for i in g[1]]
    for start in range(0, len(shared), batch_size):
        batch = shared[start : start + batch_size]
        _score_batch(model, batch, fitted, out)
        if progress:
            progress(sum(len(idx) for _, idx in batch))
    for start in range(0, len(alone), batch_size):
        _score_alone(model, alone[start : start + batch_size], fitted, out)
        if progress:
            progress(len(alone[start : start + batch_size]))
    return out  # type: ignore[return-value]


def _worth_sharing(context: int, continuations: list[int]) -> bool:
    """Whether running the context once saves more tokens ((k - 1) contexts) than the second
    pass over the continuations costs: ARC, HellaSwag, BoolQ yes; PIQA's short goals with long
    solutions, and a lone continuation (LAMBADA, WinoGrande's per-option contexts), no."""
    return len(continuations) > 1 and (len(continuations) - 1) * context >= sum(continuations)


def _score_alone(model: GPT, idx: list[int], fitted: list[tuple[list[int], list[int]]], out: list[Scored | None]) -> None:
    """Pairs whose context no other pair shares: context + continuation[:-1], right-padded, one pass."""
    seqs = [fitted[i][0] + fitted[i][1][:-1] for i in idx]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long, device=model.device)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(seq, device=model.device)  # right padding: never attended to
    h = model.hidden_states(ids)
    conts = [fitted[i][1] for i in idx]
    rows = torch.cat([h[r, len(fitted[i][0]) - 1 : len(seqs[r])] for r, i in enumerate(idx)])  # the positions predicting each continuation
    targets = torch.tensor([t for k in conts for t in k], device=model.device)
    logprobs, greedy = _head_logprobs(model, rows, targets)
    lengths = [len(k) for k in conts]
    for i, lp, gr, n in zip(idx, logprobs.split(lengths), greedy.split(lengths), lengths):
        out[i] = Scored(float(lp.sum()), bool(gr.all()), n)


def _score_batch(model: GPT, batch: list[tuple[tuple[int, ...], list[int]]], fitted: list[tuple[list[int], list[int]]],
                 out: list[Scored | None]) -> None:
    device = model.device
    G, N = len(batch), max(len(ctx) for ctx, _ in batch)
    members = [(g, i) for g, (_, idx) in enumerate(batch) for i in idx]
    conts = [fitted[i][1] for _, i in members]
    M = max(len(k) for k in conts)
    pad = torch.tensor([N - len(ctx) for ctx, _ in batch], device=device)
    ids = torch.zeros(G, N, dtype=torch.long, device=device)
    for g, (ctx, _) in enumerate(batch):
        ids[g, N - len(ctx):] = torch.tensor(ctx, device=device)
    cache = KVCache(model.config, pad, N + M - 1, model.tok_emb.weight.dtype)
    last = model.hidden_states(ids, pos=cache.positions(N), visible=cache.visible(N), cache=cache)[:, -1]  # (G, C)
    owner = torch.tensor([g for g, _ in members], device=device)
    hidden = last[owner][:, None]  # (R, 1, C): predicts each continuation's first token
    if M > 1:  # the rest of each continuation, read from its context's cache
        if len(members) != G:
            cache = _rows_of(cache, owner, model)
        inp = torch.zeros(len(members), M - 1, dtype=torch.long, device=device)
        for r, k in enumerate(conts):
            inp[r, : len(k) - 1] = torch.tensor(k[:-1], device=device)
        pos = cache.positions(M - 1).clamp(max=model.config.context_length - 1)  # padding past a row's end may run over
        rest = model.hidden_states(inp, pos=pos, visible=cache.visible(M - 1), cache=cache)
        hidden = torch.cat([hidden, rest], dim=1)  # (R, M, C); right padding is never attended to
    lengths = torch.tensor([len(k) for k in conts], device=device)
    real = torch.arange(M, device=device)[None] < lengths[:, None]
    targets = torch.tensor([t for k in conts for t in k], device=device)
    logprobs, greedy = _head_logprobs(model, hidden[real], targets)  # only the predicted positions, in row order
    for (_, i), lp, gr, k in zip(members, logprobs.split(lengths.tolist()), greedy.split(lengths.tolist()), conts):
        out[i] = Scored(float(lp.sum()), bool(gr.all()), len(k))


def _head_logprobs(model: GPT, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether it is the argmax, for hidden states h (n, C), a block of rows
    at a time so that at most HEAD_FLOATS logits exist at once (a GPT-2 vocabulary is 50,257 wide)."""
    rows = max(1, HEAD_FLOATS // model.config.vocab_size)
    lps, greedy = [], []
    for i in range(0, len(h), rows):
        logits = model.lm_head(h[i : i + rows]).float()
        t = targets[i : i + rows]
        lps.append(F.log_softmax(logits, dim=-1).gather(1, t[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == t)
    return torch.cat(lps), torch.cat(greedy)


def _rows_of(cache: KVCache, owner: torch.Tensor, model: GPT) -> KVCache:
    """A cache with one row per continuation, each a copy of its context's filled slots."""
    rows = KVCache(model.config, cache.pad[owner], cache.max_len, cache.k.dtype)
    rows.k[:, :, :, : cache.length] = cache.k[:, owner, :, : cache.length]
    rows.v[:, :, :, : cache.length] = cache.v[:, owner, :, : cache.length]
    rows.length = cache.length
    return rows


@torch.inference_mode()
def score_pairs_uncached(model: GPT, pairs: Sequence[Pair]) -> list[Scored]:
    """The reference: every (fitted) context + continuation through the model on its own."""
    model.eval()
    out = []
    for c, k in pairs:
        c, k = fit(c, k, model.config.context_length)
        seq = torch.tensor([c + k], device=model.device)
        logits = model(seq[:, :-1])[0, -len(k):].float()
        target = seq[0, -len(k):]
        lp = F.log_softmax(logits, dim=-1).gather(1, target[:, None])
        out.append(Scored(float(lp.sum()), bool((logits.argmax(-1) == target).all()), len(k)))
    return out


# --- whole texts ---------------------------------------------------------------------------------
def rolling_windows(n_tokens: int, max_len: int, stride: int) -> list[tuple[int, int]]:
    """(end, scored) per window over [prefix] + tokens (n_tokens + 1 ids): the window's input
    is ids[max(0, end - 1 - max_len) : end - 1], and it scores ids[end - scored : end].

    The first window scores its every token; each next one advances `stride` tokens and
    scores only those, with the max_len tokens before them as context. stride = max_len
    is lm-eval's `loglikelihood_rolling` (disjoint windows); a smaller stride gives every
    token at least max_len - stride tokens of context, at max_len / stride times the cost.
    """
    if not 1 <= stride <= max_len:
        raise LmforgeError(f"stride must be from 1 to the model's context length {max_len}, got {stride}")
    if n_tokens == 0:
        return []
    end = min(max_len, n_tokens) + 1
    windows = [(end, end - 1)]
    while end < n_tokens + 1:
        nxt = min(end + stride, n_tokens + 1)
        windows.append((nxt, nxt - end))
        end = nxt
    return windows


@torch.inference_mode()
def rolling_loglikelihood(model: GPT, ids: Sequence[int], prefix_id: int, stride: int, batch_size: int = 8,
                          progress: Callable[[int], None] | None = None) -> float:
    """log p(ids) (nats): every token scored once, conditioned on `prefix_id` then on the
    tokens before it inside a sliding window (see `rolling_windows`)."""
    model.eval()
    L = model.config.context_length
    seq = [prefix_id, *ids]
    windows = rolling_windows(len(ids), L, stride)
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        inputs = [seq[max(0, end - 1 - L) : end - 1] for end, _ in chunk]
        T = max(len(x) for x in inputs)
        batch = torch.zeros(len(chunk), T, dtype=torch.long, device=model.device)
        for r, x in enumerate(inputs):
            batch[r, : len(x)] = torch.tensor(x, device=model.device)  # right padding: never attended to
        h = model.hidden_states(batch)
        rows = torch.cat([h[r, len(x) - n : len(x)] for r, (x, (_, n)) in enumerate(zip(inputs, chunk))])
        targets = torch.tensor([t for end, n in chunk for t in seq[end - n : end]], device=model.device)
        total += float(_head_logprobs(model, rows, targets)[0].sum())
        if progress:
            progress(len(chunk))
    return total
