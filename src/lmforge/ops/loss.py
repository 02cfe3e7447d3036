"""The next-token cross-entropy through the output layer, blockwise: `GPT.forward(idx, targets)`.

With a GPT-2 vocabulary the output layer is most of a small model's work (62% of the
FLOPs at width 384), and the plain route through it -- logits (N, V), their
log-softmax, the gradient of each, all fp32 -- writes four tensors of N x 50257 floats
per step. `linear_cross_entropy` computes the same loss and gradients a block of rows
at a time: one block's logits become its softmax, the softmax becomes the gradient,
and the gradients of the hidden states and of the head's weight are taken then and
there, so nothing of size N x V is ever held. Same arithmetic, different order of
summation (agreement to float rounding, not bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label value that takes no part in the loss (padding, prompt tokens)
BLOCK_ROWS = 512  # rows of logits per block: fewer make the weight-gradient matmul slower, more gain nothing (measured)
# A frozen head (LoRA, QLoRA, a classifier over a frozen base) needs no weight gradient,
# the matmul that wants tall blocks: 128 rows keep a quarter of the two fp32 blocks (at
# gpt2's vocabulary 147 of 196 MiB less, QLoRA's peak 0.43x -> 0.37x full fine-tuning)
# for a loss ~20% slower, about 1% of such a step (measured).
FROZEN_HEAD_BLOCK_ROWS = 128
BLOCK_FLOATS = 1 << 25  # and floats per block, at most (128 MiB fp32; 261 rows of a 128256 vocabulary)


def head_loss(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of `head(h)` (..., V) against `targets` (...): what `GPT.forward(idx, targets)` returns.

    A plain bias-free fp32 nn.Linear head goes through `linear_cross_entropy`; anything
    else (autocast, bf16 weights, an adapted or quantized head, torch.compile, which
    fuses on its own) through the logits.
    """
    fused = (
        type(head) is nn.Linear
        and head.bias is None
        and h.dtype == head.weight.dtype == torch.float32
        and not torch.is_autocast_enabled(h.device.type)
        and not torch.compiler.is_compiling()
    )
    if fused:
        return linear_cross_entropy(h.reshape(-1, h.size(-1)), head.weight, targets.reshape(-1), ignore_index)
    logits = head(h).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=ignore_index), h (N, C), weight (V, C),
    computed without materialising the (N, V) logits; gradients are taken in the forward."""
    need_h = torch.is_grad_enabled() and h.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, need_h, need_w)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, need_h, need_w):
        h = h.contiguous()
        n, vocab = h.size(0), weight.size(0)
        valid = targets != ignore_index
        count = valid.sum()
        scale = (valid / count).to(h.dtype)[:, None]  # d(mean loss) / d(row loss); 0 for ignored rows
        tgt = torch.where(valid, targets, 0).long()[:, None]
        rows = max(1, min(n, BLOCK_ROWS if need_w else FROZEN_HEAD_BLOCK_ROWS, BLOCK_FLOATS // vocab))
        # rows padded to a multiple of 16 floats (64 bytes): a 50257-float row would leave
        # every row but the first misaligned, and the logits matmul runs ~25% slower.
        # The padding holds -inf, so the softmax over the whole padded row puts 0 there.
        width = -(-vocab // 16) * 16
        logits = h.new_full((rows, width), float("-inf"))
        probs = torch.empty_like(logits)
        row_loss = h.new_empty(n)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for s in range(0, n, rows):
            e = min(s + rows, n)
            hb, tb = h[s:e], tgt[s:e]
            r = e - s
            torch.mm(hb, weight.t(), out=logits[:r, :vocab])
            z = logits[:r]  # (r, width)
            p = torch.softmax(z, dim=-1, out=probs[:r])
            # logsumexp(z) = max(z) + log(sum(exp(z - max))), and the softmax's largest
            # entry is exactly 1 / sum(exp(z - max)): no second pass of exp
            row_loss[s:e] = z.amax(-1) - p.amax(-1).log() - z.gather(1, tb).squeeze(1)
            if need_h or need_w:
                p.scatter_add_(1, tb, p.new_full(tb.shape, -1.0))  # d(row loss)/dz = softmax - onehot
                p = p[:, :vocab]
                if need_h:
                    torch.mm(p, weight, out=grad_h[s:e]).mul_(scale[s:e])
                if need_w:
                    grad_w.addmm_(p.t(), hb * scale[s:e])
        ctx.save_for_backward(grad_h, grad_w)
        return torch.where(valid, row_loss, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors  # used once: scaled in place (a second backward is refused)
        return (
            grad_h.mul_(grad_out) if grad_h is not None else None,
            grad_w.mul_(grad_out) if grad_w is not None else None,
            None,
            None,
            None,
            None,
        )
