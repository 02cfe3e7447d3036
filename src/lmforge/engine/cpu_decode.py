"""CPU decode tuning: make one-row decoding run at memory speed without changing a token.

Decoding one sequence is a chain of matrix-vector products, each bound by reading a
weight matrix from memory. Three things make those reads faster on CPU, and they live
here so that `engine.py` keeps only the cache and the step loop:

- `relayout_for_decode` stores the blocks' wide weights as contiguous (in, out)
  matrices (same Parameters and values, other strides);
- `CpuDecoder.logits` multiplies one row by the output matrix kept as (C, V) blocks of
  HEAD_BLOCK_BYTES, and several rows by the weight as stored;
- `CpuDecoder.decoding` runs the weight prefetcher (`lmforge.engine.prefetch`) around
  the decode steps of one row.

Off CPU all three step aside and the model runs as it is; so does the head path for a
head that is not a plain Linear, and 4-bit block weights are neither re-laid nor
prefetched (dequantizing, not reading, is their cost).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lmforge.engine.prefetch import WeightPrefetcher
from lmforge.model import GPT

HEAD_BLOCK_BYTES = 4 * 2**20  # output-matrix block for one-row decoding: several fit the last-level cache


@torch.no_grad()
def relayout_for_decode(model: GPT) -> None:
    """Store each block Linear whose output is at least as wide as its input as the
    contiguous (in, out) matrix, in place: same Parameter, shape and values; only the
    strides change, so F.linear hands BLAS a matrix it streams row by row.

    Decoding one token is a chain of matrix-vector products bound by memory reads, and
    on CPU that layout reads faster for these shapes (measured on gpt2's, batch 1:
    768 -> 3072 at 21 GB/s against 12 GB/s as nn.Linear stores it, 768 -> 2304 at 20
    against 13). Narrowing layers (3072 -> 768) read faster as stored, so they stay.
    Batch 8 runs at the same speed either way.
    """
    for _, linear in model.named_linears():
        w = linear.weight  # None for a 4-bit layer (lmforge.finetune.nf4), which dequantizes anyway
        if w is not None and w.device.type == "cpu" and w.is_floating_point() and w.size(0) >= w.size(1) and w.is_contiguous():
            linear.weight.data = w.data.t().contiguous().t()


class CpuDecoder:
    """The output head and what runs around the decode steps, tuned for one row on CPU.

    It holds a copy of the output matrix in blocks (refreshed when the weight changes)
    and, while `decoding` is active, the prefetcher that the head's blocks report to.
    """

    def __init__(self, model: GPT, prefetch: bool = True) -> None:
        """`prefetch` lets a second core read weights ahead when decoding one row on CPU
        (see `lmforge.engine.prefetch`); False decodes without the helper thread."""
        self.model = model
        self.prefetch = prefetch
        self._head: list[torch.Tensor] | None = None
        self._head_version = -1
        self._prefetcher: WeightPrefetcher | None = None

    def _head_chunks(self) -> list[torch.Tensor]:
        """The output matrix as contiguous (C, n) column blocks of HEAD_BLOCK_BYTES each.

        Decoding one row reads the whole output matrix per token; on CPU BLAS streams a
        contiguous (C, V) matrix 2.8x faster than nn.Linear's (V, C) weight at batch 1
        (measured on `small`'s 384 x 50257 head), and blocks that fit the last-level
        cache let the prefetcher run ahead. The copy is refreshed whenever the weight
        changes in place (an optimizer step between samples bumps its version).
        """
        w = self.model.lm_head.weight
        version = 0 if w.is_inference() else w._version  # inference tensors keep no version
        if self._head is None or self._head_version != version:
            t = w.detach().t()
            n = max(1, HEAD_BLOCK_BYTES // (t.size(0) * t.element_size()))
            self._head = [t[:, i : i + n].contiguous() for i in range(0, t.size(1), n)]
            self._head_version = version
        return self._head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the last hidden state (B, C) -> (B, V), fp32.

        Several rows run 2-4x faster as W @ hidden^T on the weight as stored (made
        contiguous again: a row-wise max or softmax over the transposed result ran 3-60x
        slower, measured on (16, 8192)); one row runs fastest against the (C, V) blocks
        of `_head_chunks`.
        """
        w = self.model.lm_head.weight
        if type(self.model.lm_head) is not torch.nn.Linear or w.device.type != "cpu":
            return self.model.lm_head(hidden).float()
        if hidden.size(0) > 1:
            return (w @ hidden.t()).t().contiguous().float()
        out = []
        for j, block in enumerate(self._head_chunks()):
            if self._prefetcher is not None:
                self._prefetcher.ahead_of(self._prefetcher.tail_start + j)
            out.append(hidden @ block)
        return torch.cat(out, dim=1).float()

    def decoding(self, batch: int) -> contextlib.AbstractContextManager:
        """What runs around the decode steps: the weight prefetcher for one row on a CPU
        with a second core to spare (see `lmforge.engine.prefetch`), else nothing."""
        head = self.model.lm_head
        cpu = head.weight.device.type == "cpu" and type(head) is torch.nn.Linear
        if not (self.prefetch and cpu and batch == 1 and torch.get_num_threads() >= 2):
            return contextlib.nullcontext()
        linears = [linear for _, linear in self.model.named_linears()]
        if any(linear.weight is None for linear in linears):  # 4-bit weights: dequantizing, not reading, is the cost
            return contextlib.nullcontext()
        prefetcher = WeightPrefetcher(linears, tail=self._head_chunks())

        @contextlib.contextmanager
        def active() -> Iterator[None]:
            with prefetcher:
                self._prefetcher = prefetcher
                try:
                    yield
                finally:
                    self._prefetcher = None

        return active()
