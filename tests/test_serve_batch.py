"""Continuous batching (`lmforge.engine.batch`) against the engine, and streamed text.

Generations that join and leave a running batch at any step must produce the tokens each
gets alone from `Engine.generate` (greedy and seeded sampling, both model families, GQA);
echo's prompt scores must be the model's own log-softmax; and `TextStream`'s pieces,
joined, must be the final text, never splitting a character or leaking a stop string.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge import LmforgeError
from lmforge.config import Config
from lmforge.engine import Engine, SamplingParams
from lmforge.engine.batch import Batcher, Generation
from lmforge.engine.text import TextStream
from lmforge.model import GPT

GREEDY = SamplingParams(temperature=0)
WARM = SamplingParams(temperature=0.9, top_p=0.95)


def make_model(preset: str, vocab_size: int = 500, **kw) -> GPT:
    torch.manual_seed(7)
    cfg = Config.from_name(preset, **{"n_layer": 2, "vocab_size": vocab_size, "context_length": 64, "init_std": 0.2, **kw})
    if preset == "small":  # GPT-2 family: LayerNorm, GELU, learned positions
        cfg = cfg.replace(n_embd=64, n_head=4)
    return GPT(cfg).eval()


def run_schedule(batcher: Batcher, gens: list[Generation], arrivals: list[int]) -> int:
    """Add generation i at step arrivals[i] (or as soon as a row is free); step until all finish."""
    pending = sorted(range(len(gens)), key=lambda i: arrivals[i])
    step = 0
    while pending or batcher.rows:
        while pending and arrivals[pending[0]] <= step and batcher.free:
            batcher.add(gens[pending.pop(0)])
        batcher.step()
        step += 1
    return step


PROMPTS = [[1, 2, 3], [5] * 11, [7, 8], [9, 10, 11, 12, 13], [42], list(range(20, 50))]


@pytest.mark.parametrize("preset", ["nano", "small"])
@pytest.mark.parametrize("sampling", [GREEDY, WARM], ids=["greedy", "sampled"])
def test_joining_and_leaving_gives_each_its_solo_tokens(preset, sampling):
    engine = Engine(make_model(preset))
    lengths = [12, 3, 20, 7, 1, 15]  # different limits: rows leave at different steps
    solo = [engine.generate([p], max_new_tokens=n, sampling=sampling, seed=100 + i)[0].ids
            for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    gens = [Generation(p, n, sampling, seed=100 + i) for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    batcher = Batcher(engine, max_batch=3)  # fewer rows than generations: later ones wait for a free row
    run_schedule(batcher, gens, arrivals=[0, 0, 2, 3, 3, 9])
    assert [g.ids for g in gens] == solo
    assert all(g.finish_reason == "length" for g in gens)
    assert not batcher.rows and batcher.free == 3


@settings(max_examples=15, deadline=None)
@given(arrivals=st.lists(st.integers(0, 12), min_size=len(PROMPTS), max_size=len(PROMPTS)), max_batch=st.integers(1, 4))
def test_any_arrival_schedule_gives_the_same_tokens(arrivals, max_batch):
    engine = Engine(_SHARED_MODEL)
    gens = [Generation(p, 9, WARM, seed=i) for i, p in enumerate(PROMPTS)]
    run_schedule(Batcher(engine, max_batch), gens, arrivals)
    assert [g.ids for g in gens] == _SOLO


_SHARED_MODEL = make_model("nano")
_SOLO = [Engine(_SHARED_MODEL).generate([p], max_new_tokens=9, sampling=WARM, seed=i)[0].ids for i, p in enumerate(PROMPTS)]


def test_removing_a_row_frees_it_and_keeps_the_others_exact():
    engine = Engine(make_model("nano"))
    solo = engine.generate([PROMPTS[1]], max_new_tokens=10, sampling=GREEDY)[0].ids
    batcher = Batcher(engine, max_batch=2)
    a, b = Generation(PROMPTS[0], 10, GREEDY), Generation(PROMPTS[1], 10, GREEDY)
    batcher.add(a)
    batcher.add(b)
    batcher.step()
    batcher.remove(a)  # a cancelled request: b moves into row 0
    assert batcher.free == 1 and batcher.rows == [b]
    c = Generation(PROMPTS[2], 4, GREEDY)
    batcher.add(c)  # takes the freed row at once
    while batcher.rows:
        batcher.step()
    assert b.ids == solo
    assert c.ids == engine.generate([PROMPTS[2]], max_new_tokens=4, sampling=GREEDY)[0].ids


def test_stop_ids_and_the_context_end_a_row():
    model = make_model("nano")
    engine = Engine(model)
    free = engine.generate([PROMPTS[0]], max_new_tokens=8, sampling=GREEDY)[0].ids
    stop = free[3]
    g = Generation(PROMPTS[0], 8, GREEDY, stop_ids=[stop])
    batcher = Batcher(engine, 2)
    batcher.add(g)
    while batcher.rows:
        batcher.step()
    assert g.ids == free[: free.index(stop)] and g.finish_reason == "stop"
    long = Generation(list(range(1, 61)), 50, GREEDY)  # 60 of 64 positions: the context ends it
    batcher.add(long)
    while batcher.rows:
        batcher.step()
    assert len(long.ids) == 4 and long.finish_reason == "length"


def test_prompt_logprobs_are_the_models_log_softmax():
    model = make_model("small")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    g = Generation(prompt, 0, GREEDY, logprobs=2, prompt_logprobs=True)
    out = Batcher(Engine(model), 1).add(g)
    assert out[-1].finish_reason == "length" and g.ids == []
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), dim=-1)
    for i, (lp, top) in enumerate(g.prompt_scores):
        assert lp == pytest.approx(ref[i, prompt[i + 1]].item(), abs=1e-5)
        values, ids = ref[i].topk(2)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)


def test_token_logprobs_are_those_of_the_distribution_sampled_from():
    model = make_model("nano")
    engine = Engine(model)
    g = Generation(PROMPTS[3], 5, GREEDY, logprobs=3)
    batcher = Batcher(engine, 1)
    emitted = batcher.add(g)
    while batcher.rows:
        emitted += batcher.step()
    steps = [e for e in emitted if e.token is not None]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([PROMPTS[3] + g.ids]))[0].float(), dim=-1)
    for k, e in enumerate(steps):
        row = ref[len(PROMPTS[3]) - 1 + k]
        assert e.logprob == pytest.approx(row[e.token].item(), abs=1e-4)
        assert e.top[0][0] == e.token  # greedy: the chosen id is the most likely one


def test_bad_generations_are_refused_before_taking_a_row():
    batcher = Batcher(Engine(make_model("nano")), 1)
    for g, words in [(Generation([], 4), "empty"), (Generation([1, 999], 4), "outside the vocabulary"),
                     (Generation(list(range(65)), 4), "context_length"), (Generation([1], -1), "max_new_tokens"),
                     (Generation([1], 4, stop_strings=[""]), "stop string")]:
        with pytest.raises(LmforgeError, match=words):
            batcher.add(g)
        assert batcher.free == 1
    with pytest.raises(LmforgeError, match="max_batch"):
        Batcher(batcher.engine, 0)


# --- streamed text ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab 한국어🙂\n.")), min_size=1, max_size=30),
       stops=st.lists(st.text(alphabet=st.sampled_from(list("ab 한.")), min_size=1, max_size=3), max_size=1))
def test_text_stream_pieces_join_to_the_text_cut_at_the_first_stop(gpt2_tok, text, stops):
    ids = gpt2_tok.encode(text)
    stream = TextStream(gpt2_tok, previous=gpt2_tok.eot_id, stop_strings=stops)
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.stop is not None:
            break
    pieces.append(stream.finish())
    cuts = [i for s in stops if (i := text.find(s)) >= 0]
    expected = text[: min(cuts)] if cuts else text
    assert "".join(pieces) == expected
    assert all("\ufffd" not in p for p in pieces)  # no piece ends inside a character
    assert not any(s in p for p in pieces for s in stops)
