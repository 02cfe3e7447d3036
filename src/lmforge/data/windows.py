"""Training examples from a flat token array: (x, y) windows with y = x shifted by one.

Two ways to walk the tokens:

- `TokenWindows`: the fixed sliding windows of a torch `Dataset` (window i starts at
  i * stride), for epochs over a small corpus or an exact pass over a validation split.
  It counts exactly what LLMs-from-scratch's `GPTDatasetV1` does (`range(0, N - L, S)`).
- `RandomWindows`: a batch of windows at random offsets per step, for corpora too large
  to walk in epochs. A batch depends only on (seed, rank, step), never on what was drawn
  before, so a run resumed at step k draws exactly the batches it would have drawn.

Both read the array lazily (a `np.memmap` stays on disk) and return int64 tensors, the
dtype `nn.Embedding` and `cross_entropy` take.
"""

from __future__ import annotations

import copy
import mmap
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from lmforge.errors import LmforgeError


def _as_tokens(tokens: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
    array = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asanyarray(tokens)  # keeps a memmap a memmap
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise LmforgeError(f"tokens must be a 1-D array of integer ids, got shape {array.shape} of {array.dtype}")
    return array


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise LmforgeError(f"{name} must be a positive integer, got {value!r}")


def _window(tokens: np.ndarray, start: int, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(np.array(tokens[start : start + context_length + 1], dtype=np.int64))
    return w[:-1], w[1:]


class _MappedFile(NamedTuple):
    filename: str
    dtype: str
    offset: int
    length: int


class _OverTokens:
    """Holds `tokens`; pickles a memmap of a whole file as the file's name, not its contents.

    DataLoader workers started by spawn or forkserver (macOS; Linux from Python 3.14)
    get the dataset pickled, and a memmap would otherwise be copied whole into each.
    """

    tokens: np.ndarray

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        t = self.tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap):  # not a view into a larger map
            state["tokens"] = _MappedFile(t.filename, t.dtype.str, t.offset, len(t))
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(t := state["tokens"], _MappedFile):
            state["tokens"] = np.memmap(t.filename, dtype=t.dtype, mode="r", offset=t.offset, shape=(t.length,))
        self.__dict__.update(state)


class TokenWindows(_OverTokens, Dataset):
    """Sliding windows: item i = (x, y), x = tokens[i*S : i*S+L], y = tokens[i*S+1 : i*S+L+1].

    L = context_length, S = stride (default L: windows that do not overlap). There are
    (N - L - 1) // S + 1 windows when N > L, else none: every window has its next-token
    target inside the array.

    For distributed training, give each rank `shard(rank, world_size)`: the windows i
    with i % world_size == rank, so the shards are disjoint and together cover every
    window (they differ in length by at most one). For epochs, iterate a shard in
    `order(epoch, seed)`: a shuffle that is the same on every run for the same
    (epoch, seed) and differs between epochs; pass it to a DataLoader as its `sampler`.
    """

    def __init__(
        self,
        tokens: np.ndarray | torch.Tensor | list[int],
        context_length: int,
        stride: int | None = None,
    ) -> None:
        stride = context_length if stride is None else stride
        _check_positive(context_length=context_length, stride=stride)
        self.tokens = _as_tokens(tokens)
        self.context_length = int(context_length)
        self.stride = int(stride)
        n = len(self.tokens)
        count = (n - self.context_length - 1) // self.stride + 1 if n > self.context_length else 0
        self._starts = range(0, count * self.stride, self.stride)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _window(self.tokens, self._starts[index], self.context_length)

    def shard(self, rank: int, world_size: int) -> TokenWindows:
        """This rank's share: windows i with i % world_size == rank (of this dataset's windows)."""
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise LmforgeError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        shard = copy.copy(self)
        shard._starts = self._starts[rank::world_size]
        return shard

    def order(self, epoch: int, seed: int) -> list[int]:
        """A permutation of range(len(self)) fixed by (seed, epoch): the item order of one epoch."""
        return np.random.default_rng([seed, epoch]).permutation(len(self)).tolist()


class RandomWindows(_OverTokens):
    """Batches of windows at random offsets: `batch(step)` -> (x, y), each (batch_size, L) int64.

    Step k's global batch is `batch_size * world_size` offsets from
    `np.random.default_rng([seed, step])`, and rank r takes its r-th slice: stateless in
    the step (resuming at step k gives the same batch k), disjoint across ranks, and one
    process with `batch_size * world_size` rows sees exactly the windows N processes see
    together, so a torchrun run can be checked against a single process. Every window
    start in 0 .. N-L-1 is equally likely, so each window has its full target.
    """

    def __init__(
        self,
        tokens: np.ndarray | torch.Tensor | list[int],
        context_length: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive(context_length=context_length, batch_size=batch_size, world_size=world_size)
        if not 0 <= rank < world_size:
            raise LmforgeError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise LmforgeError(f"seed must be a non-negative integer, got {seed}")
        self.tokens = _as_tokens(tokens)
        if len(self.tokens) <= context_length:
            raise LmforgeError(
                f"{len(self.tokens):,} tokens are too few for context_length {context_length}: "
                f"a window needs {context_length + 1} (its inputs plus the next-token target); use more text or a shorter context"
            )
        self.context_length = int(context_length)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._offsets = np.arange(self.context_length + 1)

    def starts(self, step: int) -> np.ndarray:
        """The window starts of batch `step`."""
        if step < 0:
            raise LmforgeError(f"step must be non-negative, got {step}")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.context_length, size=self.batch_size * self.world_size)
        return starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.tokens[self.starts(step)[:, None] + self._offsets].astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:]))

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """batch(start_step), batch(start_step + 1), ... without end: resume by passing the next step."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)
