"""The decode prefetcher: same tokens as without it, and it leaves no thread or setting behind."""

from __future__ import annotations

import threading

import pytest
import torch
from test_engine import GREEDY, make_model

from lmforge.engine import Engine


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lmforge-prefetch"]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("preset", ["nano", "small"])
def test_prefetching_changes_nothing_but_speed(preset, two_threads):
    model = make_model(preset)
    engine = Engine(model)
    prompt = [3, 14, 15, 92, 65, 35]
    seen = []
    steps = engine.steps([prompt], 30, GREEDY)
    with_prefetch = []
    for token, logits in steps:
        seen.append((torch.get_num_threads(), len(prefetch_threads())))
        with_prefetch.append((int(token), logits.clone()))
    assert set(seen) == {(1, 1)}  # active for every decode step, on one intra-op thread
    assert torch.get_num_threads() == 2 and not prefetch_threads()
    torch.set_num_threads(1)  # one core: no prefetcher
    without = list(engine.steps([prompt], 30, GREEDY))
    assert [t for t, _ in with_prefetch] == [int(t) for t, _ in without]
    assert max((a - b[0]).abs().max().item() for (_, a), (_, b) in zip(with_prefetch, without)) <= 1e-4


def test_an_abandoned_generation_restores_the_thread_count(two_threads):
    engine = Engine(make_model("nano"))
    steps = engine.steps([[1, 2, 3]], 50, GREEDY)
    next(steps)
    assert torch.get_num_threads() == 1
    steps.close()
    assert torch.get_num_threads() == 2 and not prefetch_threads()


def test_batches_do_not_prefetch(two_threads):
    engine = Engine(make_model("nano"))
    for _ in engine.steps([[1, 2, 3], [4, 5]], 5, GREEDY):
        assert torch.get_num_threads() == 2 and not prefetch_threads()
