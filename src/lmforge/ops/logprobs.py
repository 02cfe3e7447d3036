"""Per-token log-probabilities of given targets through the output layer, blockwise.

Preference training (DPO, ORPO, a reference model's scores) needs log p(target) for
every response token, not a mean loss. The plain route -- `log_softmax(head(h))` then
a gather -- holds the whole (N, V) logits and, for backward, their softmax: with a
GPT-2 vocabulary a batch of 8 pairs x 512 tokens is 8192 x 50257 fp32, 1.6 GB per
tensor. Most of those rows are prompt or padding, whose log-probabilities nobody reads.
`token_logprobs` keeps only the rows with a target, then computes them a block at a
time under activation checkpointing, so neither the forward nor the backward holds more
than one block's logits; the price is one more head matmul per block in backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.ops.loss import BLOCK_FLOATS, BLOCK_ROWS, IGNORE_INDEX


def token_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log softmax(head(h))[target] (fp32) for h (..., C) and targets (...); 0.0 where target == ignore_index.

    `head` is any module mapping (rows, C) to (rows, V) (a plain or adapted nn.Linear, a
    quantized layer); gradients reach `h` and the head's parameters. The logits are taken
    in fp32 whatever the head's dtype, as the log-softmax of a bf16 row loses the small
    differences between log-probabilities that preference losses are made of.
    """
    return _blockwise(head, h, targets, ignore_index, 1.0, entropy=False)[0]


def token_logprobs_entropy(
    head: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` of the distribution the sampler drew from, softmax(head(h) / temperature),
    and that distribution's entropy at each target's position; both 0.0 where ignored.
    What PPO needs: the log-prob of each sampled token exactly as sampled, and the entropy
    it logs (or rewards)."""
    return _blockwise(head, h, targets, ignore_index, temperature, entropy=True)  # type: ignore[return-value]


def _blockwise(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float, *,
               entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"hidden states {tuple(h.shape)} do not match targets {tuple(targets.shape)}")
    flat_targets = targets.reshape(-1)
    keep = (flat_targets != ignore_index).nonzero().squeeze(1)
    hs = h.reshape(-1, h.size(-1)).index_select(0, keep)
    ts = flat_targets.index_select(0, keep).long()
    n = hs.size(0)
    vocab = getattr(head, "out_features", None)
    if vocab is None:
        with torch.no_grad():
            vocab = head(hs[:1]).size(-1)
    rows = max(1, min(BLOCK_ROWS, BLOCK_FLOATS // vocab))
    grad = torch.is_grad_enabled()
    pieces = []
    # at least one block, empty if every target is ignored: the zeros it scatters still
    # hang off h and the head, so a loss built on them can call backward (all-zero gradients)
    for s in range(0, max(n, 1), rows):
        hb, tb = hs[s : s + rows], ts[s : s + rows]
        if grad:
            pieces.append(checkpoint(_block, head, hb, tb, temperature, entropy, use_reentrant=False))
        else:
            pieces.append(_block(head, hb, tb, temperature, entropy))
    block = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # (n, 1 or 2): log-prob, entropy
    out = torch.zeros((flat_targets.numel(), block.size(1)), dtype=torch.float32, device=h.device)
    out = out.index_put((keep,), block)
    logps = out[:, 0].reshape(targets.shape)
    return logps, out[:, 1].reshape(targets.shape) if entropy else None


def _block(head: nn.Module, hb: torch.Tensor, tb: torch.Tensor, temperature: float, entropy: bool) -> torch.Tensor:
    logits = head(hb).float()
    if temperature != 1.0:
        logits = logits / temperature
    normalizer = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(1, tb[:, None]).squeeze(1) - normalizer
    if not entropy:
        return logps[:, None]
    probs = torch.softmax(logits, dim=-1)
    return torch.stack([logps, normalizer - (probs * logits).sum(-1)], dim=1)
