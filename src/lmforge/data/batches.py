"""Epoch batching of encoded examples, shared by the fine-tuning data sets.

A labelled or instruction data set is small enough to encode once and hold in memory;
training then draws batches by step: `EpochSampler` says which rows make batch k
(epochs of a seeded shuffle), and `EpochBatches` holds what every such data set does
with that (its length, steps per epoch, training batch k, an in-order pass for
evaluation). A subclass says only how its examples are encoded and how rows are
collated into tensors (`ClassificationBatches` in labeled.py, `InstructionBatches` in
instruct.py).

Batches are stateless in the step, like `RandomWindows`: batch k depends only on
(seed, k), so a run resumed at step k sees what it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

EXAMPLE_SPLITS = ("train", "val", "test")  # the splits of a labelled or instruction data set

BatchT = TypeVar("BatchT")


class EpochSampler:
    """Which rows make batch `step`: epochs of a seeded shuffle, stateless in the step.

    Epoch e's order is `np.random.default_rng([seed, e]).permutation(n)`, batch k of an
    epoch its k-th slice of `batch_size`. With `drop_last` (the default, as the book's
    training loaders) the last partial slice is skipped so every batch is full.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = True) -> None:
        _check_batch_size(batch_size)
        if seed < 0:
            raise LmforgeError(f"seed must be a non-negative integer, got {seed}")
        if n < (batch_size if drop_last else 1):
            raise LmforgeError(f"{n} examples are too few for one batch of {batch_size}; lower the batch size")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._cached[1]

    def indices(self, step: int) -> list[int]:
        if step < 0:
            raise LmforgeError(f"step must be non-negative, got {step}")
        k = step % self.steps_per_epoch
        return self.order(self.epoch(step))[k * self.batch_size : (k + 1) * self.batch_size].tolist()


class EpochBatches(Generic[BatchT]):
    """Encoded examples drawn as batches: `batch(step)` for training (see `EpochSampler`),
    `iter_eval(batch_size)` for every example once, in order.

    A subclass encodes its examples, calls `super().__init__` with how many it kept, and
    implements `collate(indices)`: the batch of those rows, padded to the longest.
    `check_settings` does the checks every subclass makes of its arguments first.
    """

    pad_id: int

    def __init__(self, n: int, *, batch_size: int, seed: int, drop_last: bool) -> None:
        self.sampler = EpochSampler(n, batch_size, seed, drop_last)

    def check_settings(self, tokenizer: Tokenizer, pad_id: int | None, max_length: int | None) -> None:
        """Check `max_length` (a positive integer or None) and set `self.pad_id`: `pad_id`,
        or by default the tokenizer's `<|endoftext|>`."""
        if max_length is not None and not (isinstance(max_length, int) and max_length >= 1):
            raise LmforgeError(f"max_length must be a positive integer or None, got {max_length!r}")
        resolved = tokenizer.eot_id if pad_id is None else pad_id
        if resolved is None:
            raise LmforgeError("this tokenizer has no <|endoftext|> to pad with; pass pad_id")
        self.pad_id = resolved

    def __len__(self) -> int:
        return self.sampler.n

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def collate(self, indices: Sequence[int]) -> BatchT:
        raise NotImplementedError

    def batch(self, step: int) -> BatchT:
        """Training batch `step`: a function of (seed, step) only."""
        return self.collate(self.sampler.indices(step))

    def iter_eval(self, batch_size: int, rows: Sequence[int] | None = None) -> Iterator[BatchT]:
        """Every example (that was kept) once, in order, the last batch possibly smaller;
        with `rows`, those examples only (a bounded measure reads a sample of a split)."""
        _check_batch_size(batch_size)
        rows = range(len(self)) if rows is None else rows
        for start in range(0, len(rows), batch_size):
            yield self.collate(rows[start : start + batch_size])


def _check_batch_size(batch_size: int) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise LmforgeError(f"batch_size must be a positive integer, got {batch_size!r}")
