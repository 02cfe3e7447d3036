"""`TokenWindows` (sliding windows, shards, epoch order) and `RandomWindows` (batches by step)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import small_tokenizer, write_texts
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from lmforge.data import RandomWindows, TokenWindows, prepare
from lmforge.errors import LmforgeError

TOKENS = np.arange(100)


def gpt_dataset_v1(token_ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """The loop of LLMs-from-scratch's GPTDatasetV1 (ch. 2), the reference for the windows."""
    pairs = []
    for i in range(0, len(token_ids) - max_length, stride):
        pairs.append((token_ids[i : i + max_length], token_ids[i + 1 : i + max_length + 1]))
    return pairs


@pytest.mark.parametrize(
    "context_length, stride, count",
    [(4, 4, 24), (4, 1, 96), (10, 5, 18), (99, 1, 1), (100, 1, 0), (150, 10, 0), (1, 1, 99), (8, 3, 31), (16, 16, 6)],
)
def test_counts_and_shapes_on_a_known_array(context_length: int, stride: int, count: int) -> None:
    ds = TokenWindows(TOKENS, context_length, stride)
    assert len(ds) == count == len(gpt_dataset_v1(TOKENS.tolist(), context_length, stride))
    for i in range(count):
        x, y = ds[i]
        assert x.shape == y.shape == (context_length,)
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == list(range(i * stride, i * stride + context_length))
        assert (y == x + 1).all()  # y is x shifted by one token
    with pytest.raises(IndexError):
        ds[count]


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 80), context_length=st.integers(1, 30), stride=st.integers(1, 30))
def test_windows_equal_gpt_dataset_v1(n: int, context_length: int, stride: int) -> None:
    token_ids = np.random.default_rng(n).integers(0, 50_000, n).tolist()
    ds = TokenWindows(np.array(token_ids, dtype=np.uint16), context_length, stride)
    reference = gpt_dataset_v1(token_ids, context_length, stride)
    assert len(ds) == len(reference) == ((n - context_length - 1) // stride + 1 if n > context_length else 0)
    assert [(x.tolist(), y.tolist()) for x, y in ds] == reference


def test_stride_defaults_to_the_context_length() -> None:
    assert len(TokenWindows(TOKENS, 10)) == len(TokenWindows(TOKENS, 10, 10)) == 9


def test_windows_over_a_prepared_memmap_batch_in_a_dataloader(tmp_path: Path) -> None:
    write_texts(tmp_path / "corpus", ["some text for a few windows " * 20])
    data = prepare([tmp_path / "corpus"], small_tokenizer(), tmp_path / "out", val_fraction=0)
    tokens = data.split("train")
    ds = TokenWindows(tokens, 8, 4)
    x, y = next(iter(DataLoader(ds, batch_size=3)))
    assert x.shape == y.shape == (3, 8) and x.dtype == torch.int64
    assert x[1].tolist() == tokens[4:12].tolist() and y[1].tolist() == tokens[5:13].tolist()


def test_a_memmap_is_pickled_by_file_name_for_dataloader_workers(tmp_path: Path) -> None:
    np.arange(50_000, dtype="<u2").tofile(tmp_path / "tokens.bin")
    tokens = np.memmap(tmp_path / "tokens.bin", dtype="<u2", mode="r")
    for sampler in (TokenWindows(tokens, 16).shard(1, 2), RandomWindows(tokens, 16, 4, seed=0)):
        blob = pickle.dumps(sampler)
        assert len(blob) < 2_000  # not the 100 kB of tokens
        copy = pickle.loads(blob)
        assert isinstance(copy.tokens, np.memmap) and not copy.tokens.flags.writeable
        assert np.array_equal(copy.tokens, tokens)
    shard = TokenWindows(tokens, 16).shard(1, 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(shard, pickle.loads(pickle.dumps(shard))))
    view = TokenWindows(tokens[100:], 16)  # a view is pickled as its values, which stay right
    assert torch.equal(pickle.loads(pickle.dumps(view))[0][0], torch.arange(100, 116))


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shards_partition_the_windows(world_size: int) -> None:
    ds = TokenWindows(TOKENS, 4, 2)
    starts = {}
    for rank in range(world_size):
        shard = ds.shard(rank, world_size)
        starts[rank] = [int(x[0]) for x, _ in shard]
        assert starts[rank] == [i * 2 for i in range(len(ds)) if i % world_size == rank]
    everything = sorted(s for r in starts.values() for s in r)
    assert everything == [i * 2 for i in range(len(ds))]  # disjoint and complete
    assert max(map(len, starts.values())) - min(map(len, starts.values())) <= 1


def test_shard_rank_must_be_below_world_size() -> None:
    with pytest.raises(LmforgeError, match="rank"):
        TokenWindows(TOKENS, 4).shard(2, 2)


def test_order_is_a_seeded_permutation_that_changes_by_epoch() -> None:
    ds = TokenWindows(TOKENS, 4, 1)
    first = ds.order(epoch=0, seed=1)
    assert sorted(first) == list(range(len(ds)))
    assert ds.order(epoch=0, seed=1) == first  # reproducible
    assert ds.order(epoch=1, seed=1) != first  # a new shuffle each epoch
    assert ds.order(epoch=0, seed=2) != first
    shard = ds.shard(1, 3)
    assert sorted(shard.order(5, 1)) == list(range(len(shard)))
    batches = list(DataLoader(shard, batch_size=4, sampler=shard.order(5, 1)))
    assert sum(len(x) for x, _ in batches) == len(shard)


@pytest.mark.parametrize("bad", [{"context_length": 0}, {"context_length": 4, "stride": 0}, {"context_length": -1}])
def test_bad_window_sizes_are_refused(bad: dict) -> None:
    with pytest.raises(LmforgeError, match="positive integer"):
        TokenWindows(TOKENS, **bad)


def test_tokens_must_be_one_dimensional() -> None:
    with pytest.raises(LmforgeError, match="1-D"):
        TokenWindows(np.zeros((4, 4), dtype=np.int64), 2)


# --- RandomWindows ------------------------------------------------------------------------


def test_random_batches_are_reproducible_per_step() -> None:
    a = RandomWindows(TOKENS, 8, batch_size=5, seed=3)
    b = RandomWindows(TOKENS, 8, batch_size=5, seed=3)
    for step in (0, 1, 17, 10_000):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], RandomWindows(TOKENS, 8, 5, seed=4).batch(0)[0])


def test_random_batches_resume_at_any_step() -> None:
    sampler = RandomWindows(TOKENS, 8, batch_size=4, seed=0)
    straight = [sampler.batch(s)[0] for s in range(10)]
    it = iter(sampler)
    assert all(torch.equal(next(it)[0], straight[s]) for s in range(10))
    resumed = sampler.iterate(start_step=6)
    assert all(torch.equal(next(resumed)[0], straight[s]) for s in range(6, 10))


def test_ranks_draw_different_windows() -> None:
    ranks = [RandomWindows(TOKENS, 8, 4, seed=0, rank=r, world_size=4) for r in range(4)]
    firsts = [r.batch(0)[0] for r in ranks]
    assert all(not torch.equal(firsts[i], firsts[j]) for i in range(4) for j in range(i + 1, 4))
    # together the ranks draw exactly what one process drawing the global batch draws
    whole = RandomWindows(TOKENS, 8, 16, seed=0)
    for step in (0, 5):
        x, y = whole.batch(step)
        parts = [r.batch(step) for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    with pytest.raises(LmforgeError, match="rank"):
        RandomWindows(TOKENS, 8, 4, seed=0, rank=4, world_size=4)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 60), context_length=st.integers(1, 20), batch_size=st.integers(1, 8), step=st.integers(0, 2**40))
def test_random_windows_are_in_range_and_shifted(n: int, context_length: int, batch_size: int, step: int) -> None:
    if n <= context_length:
        with pytest.raises(LmforgeError, match="too few"):
            RandomWindows(np.arange(n), context_length, batch_size, seed=0)
        return
    x, y = RandomWindows(np.arange(n, dtype=np.uint16), context_length, batch_size, seed=0).batch(step)
    assert x.shape == y.shape == (batch_size, context_length) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert (x[:, 0] >= 0).all() and (y[:, -1] <= n - 1).all()
    assert torch.equal(y, x + 1)
    assert torch.equal(x, x[:, :1] + torch.arange(context_length))  # contiguous windows of the array


def test_random_windows_reach_every_start() -> None:
    sampler = RandomWindows(np.arange(12), 9, batch_size=8, seed=0)  # starts 0, 1, 2
    seen = {int(s) for step in range(20) for s in sampler.starts(step)}
    assert seen == {0, 1, 2}
