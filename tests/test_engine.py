"""The engine against the uncached reference; sampling rules; stops; streaming; batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge import LmforgeError
from lmforge.config import Config
from lmforge.engine import Engine, generate_uncached, sampling
from lmforge.engine.cpu_decode import onednn_available
from lmforge.engine.sampling import SamplingParams, draw, filter_logits, sample
from lmforge.model import GPT

GREEDY = SamplingParams(temperature=0)


def make_model(preset: str, vocab_size: int = 1000, **kw) -> GPT:
    torch.manual_seed(1234)
    # a wide init (std 0.2, not 0.02) gives decisive, varied logits: greedy paths do not hinge on 1e-6
    cfg = Config.from_name(preset, **{"n_layer": 2, "vocab_size": vocab_size, "context_length": 96, "init_std": 0.2, **kw})
    if preset == "small":
        cfg = cfg.replace(n_embd=96, n_head=4)
    return GPT(cfg).eval()


@pytest.fixture(params=["nano", "small"])
def model(request):
    return make_model(request.param)


def test_cached_equals_uncached_tokens_and_logits(model):
    prompt = [3, 14, 15, 92, 65, 35]
    ref_ids, ref_logits = generate_uncached(model, prompt, 40)
    engine = Engine(model)
    steps = list(engine.steps([prompt], 40, GREEDY))
    assert [int(t[0]) for t, _ in steps] == ref_ids
    assert max((lg[0] - r).abs().max().item() for (_, lg), r in zip(steps, ref_logits)) <= 1e-4
    assert engine.generate([prompt], max_new_tokens=40, sampling=GREEDY)[0].ids == ref_ids


def test_packed_decoding_leaves_the_model_as_it_was(model):
    """One-row decoding reads packed copies: every parameter keeps its object, layout and
    values, and the tokens are those of the model's own layers."""
    assert onednn_available()  # this CPU build has oneDNN: the packed path is the one under test
    params = dict(model.named_parameters())
    before = {n: (p.detach().clone(), p.stride(), p.data_ptr()) for n, p in params.items()}
    prompt = [3, 14, 15, 92, 65, 35]
    engine = Engine(model)
    packed = engine.generate([prompt], max_new_tokens=20, sampling=GREEDY)[0].ids
    assert engine.cpu._layers is not None and not engine.cpu.active  # the packed step ran, and is done
    assert dict(model.named_parameters()) == params
    assert all(torch.equal(p, before[n][0]) and (p.stride(), p.data_ptr()) == before[n][1:] for n, p in params.items())
    assert packed == Engine(model, packed=False).generate([prompt], max_new_tokens=20, sampling=GREEDY)[0].ids


def test_packed_copies_follow_weight_changes(model):
    """A weight changed in place (an optimizer step between generations) or a layer swapped
    (an adapter) is seen by the next generation, as the reference sees it."""
    prompt = [3, 14, 15, 92, 65, 35]
    engine = Engine(model)
    engine.generate([prompt], max_new_tokens=4, sampling=GREEDY)  # packs the weights
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5).add_(0.01)
    assert [int(t[0]) for t, _ in engine.steps([prompt], 12, GREEDY)] == generate_uncached(model, prompt, 12)[0]
    block = model.blocks[0]
    block.attn.q = torch.nn.Linear(block.attn.q.in_features, block.attn.q.out_features, bias=block.attn.q.bias is not None)
    torch.nn.init.normal_(block.attn.q.weight, std=0.5)
    assert [int(t[0]) for t, _ in engine.steps([prompt], 12, GREEDY)] == generate_uncached(model, prompt, 12)[0]


def test_head_paths_agree_across_batch_sizes(model):
    engine = Engine(model)
    hidden = torch.randn(5, model.config.n_embd)
    one_by_one = torch.cat([engine.cpu.logits(h[None]) for h in hidden])
    together = engine.cpu.logits(hidden)
    expected = model.lm_head(hidden)
    assert (one_by_one - expected).abs().max().item() <= 1e-4
    assert (together - expected).abs().max().item() <= 1e-4


def test_each_row_of_a_batch_equals_generating_it_alone(model):
    prompts = [[5], [7, 8, 9, 10, 11, 12, 13, 14, 15], [100, 200, 300]]
    engine = Engine(model)
    alone = [engine.generate([p], max_new_tokens=24, sampling=GREEDY)[0].ids for p in prompts]
    batch = [c.ids for c in engine.generate(prompts, max_new_tokens=24, sampling=GREEDY)]
    assert batch == alone
    assert alone[1] == generate_uncached(model, prompts[1], 24)[0]


def test_context_limit(model):
    engine = Engine(model)
    ctx = model.config.context_length
    with pytest.raises(LmforgeError, match="does not fit the model's context_length"):
        engine.generate([list(range(ctx + 1))], max_new_tokens=1)
    with pytest.raises(LmforgeError, match="empty"):
        engine.generate([[]], max_new_tokens=1)
    out = engine.generate([list(range(ctx - 3))], max_new_tokens=10, sampling=GREEDY)[0]
    assert len(out.ids) == 4 and out.finish_reason == "context"  # fills the context, never slides
    assert out.ids == generate_uncached(model, list(range(ctx - 3)), 10)[0]


def test_top_k_keeps_exactly_k_with_ties_to_lower_ids():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 3.0]])
    kept = filter_logits(logits, top_k=2, top_p=None)
    assert torch.isfinite(kept[0]).nonzero().flatten().tolist() == [1, 2]
    kept = filter_logits(logits, top_k=5, top_p=None)
    assert torch.isfinite(kept[0]).nonzero().flatten().tolist() == [0, 1, 2, 3, 5]


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    for p, expected in ((0.5, [1]), (0.7, [1, 2]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2])):
        kept = filter_logits(logits, top_k=None, top_p=p)
        assert torch.isfinite(kept[0]).nonzero().flatten().tolist() == expected, p


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(4, 50)
    params = SamplingParams(temperature=1.0, top_k=3)
    draws = torch.stack([sample(logits, params, torch.Generator().manual_seed(s)) for s in range(200)])
    top3 = logits.topk(3).indices
    assert all(int(d) in top3[b].tolist() for row in draws for b, d in enumerate(row))
    a = sample(logits, params, torch.Generator().manual_seed(7))
    b = sample(logits, params, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in draws}) > 1


def test_seeded_generation_is_reproducible(model):
    engine = Engine(model)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = engine.generate([[1, 2, 3]], max_new_tokens=20, sampling=params, seed=5)[0].ids
    b = engine.generate([[1, 2, 3]], max_new_tokens=20, sampling=params, seed=5)[0].ids
    c = engine.generate([[1, 2, 3]], max_new_tokens=20, sampling=params, seed=6)[0].ids
    assert a == b and a != c


def test_stop_ids_end_a_row_without_being_emitted(model):
    engine = Engine(model)
    free = engine.generate([[1, 2, 3]], max_new_tokens=20, sampling=GREEDY)[0]
    stop = free.ids[5]
    first = free.ids.index(stop)
    out = engine.generate([[1, 2, 3]], max_new_tokens=20, sampling=GREEDY, stop_ids=[stop])[0]
    assert out.ids == free.ids[:first] and out.finish_reason == "stop"
    assert free.finish_reason == "length"


@pytest.fixture
def text_engine(small_tok):
    return Engine(make_model("nano", vocab_size=small_tok.vocab_size), small_tok)


def test_stop_strings_cut_the_text(text_engine):
    free = text_engine.generate(["To be, or not"], max_new_tokens=30, sampling=GREEDY)[0]
    assert len(free.text) > 12
    stop = free.text[8:11]
    cut = free.text.find(stop)
    out = text_engine.generate(["To be, or not"], max_new_tokens=30, sampling=GREEDY, stop_strings=[stop])[0]
    assert out.text == free.text[:cut] and out.finish_reason == "stop"
    assert stop in text_engine.tokenizer.decode(out.ids) and stop not in text_engine.tokenizer.decode(out.ids[:-1])


@pytest.mark.parametrize("with_stop", [False, True])
def test_stream_joins_to_generate(text_engine, with_stop):
    free = text_engine.generate(["To be, or not"], max_new_tokens=30, sampling=GREEDY)[0]
    stops = [free.text[10:13]] if with_stop else []
    expected = text_engine.generate(["To be, or not"], max_new_tokens=30, sampling=GREEDY, stop_strings=stops)[0]
    events = list(text_engine.stream("To be, or not", max_new_tokens=30, sampling=GREEDY, stop_strings=stops))
    assert "".join(t for _, t in events) == expected.text
    assert [i for i, _ in events if i is not None] == expected.ids


def test_stream_never_splits_a_character(gpt2_tok, monkeypatch):
    text = "한국어 🙂 ok"
    ids = gpt2_tok.encode(text)
    engine = Engine(make_model("nano", vocab_size=gpt2_tok.vocab_size), gpt2_tok)

    def scripted(self, rows, max_new_tokens, sampling, seed=None):
        for t in ids:
            yield torch.tensor([t]), None

    monkeypatch.setattr(Engine, "steps", scripted)
    pieces = [t for _, t in engine.stream([1], max_new_tokens=len(ids))]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # held back while a character was incomplete


# --- bad requests: clear errors before any work, the same from the API and the CLI ---------------


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=float("nan")), "temperature must be >= 0 and finite"),
        (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(temperature="0.7"), "temperature must be"),
        (dict(top_k=0), "top_k must be a whole number >= 1"),
        (dict(top_k=-3), "top_k must be a whole number >= 1"),
        (dict(top_k=2.5), "top_k must be a whole number >= 1"),
        (dict(top_p=-0.1), r"top_p must be in \(0, 1\]"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    ],
)
def test_sampling_params_refuse_values_out_of_range(kw, message):
    """Regression: temperature nan/inf were accepted and failed later inside torch.multinomial."""
    with pytest.raises(LmforgeError, match=message):
        SamplingParams(**kw)


def test_draws_follow_the_softmax():
    """The inverse-CDF draw against the distribution itself: 40k draws per row, every
    id's frequency within 5 binomial standard deviations of its probability."""
    logits = torch.randn(3, 30) * 2
    probs = torch.softmax(logits, -1)
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 30)
    for _ in range(n // 1000):
        ids = sample(logits.repeat_interleave(1000, 0), SamplingParams(temperature=1.0), gen).view(3, 1000)
        counts += torch.nn.functional.one_hot(ids, 30).sum(1)
    sd = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * sd + 1e-4).all()


@settings(deadline=None, max_examples=60)
@given(st.lists(st.sampled_from([0.0, 0.0, 1e-30, 1e-8, 0.3, 1.0, 5.0]), min_size=1, max_size=12).filter(any),
       st.integers(0, 2**31))
def test_an_id_with_probability_zero_is_never_drawn(weights, seed):
    probs = torch.tensor([weights] * 64)
    drawn = draw(probs, torch.Generator().manual_seed(seed))
    assert (probs.gather(1, drawn[:, None]) > 0).all()


@pytest.mark.parametrize("u", [0.0, 1.0])
def test_a_draw_at_either_end_lands_on_a_possible_id(monkeypatch, u):
    """u = 1 stands for a draw that rounds up to the total: it must not index past the last id."""
    monkeypatch.setattr(sampling.torch, "rand", lambda shape, **kw: torch.full(shape, u))
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.5, 0.0, 0.0]])
    assert draw(probs).tolist() == ([2] if u == 0 else [4])


def test_a_tiny_temperature_samples_the_greedy_token():
    """1e-45 is a valid temperature: logits / T overflowed to inf and softmax gave NaN."""
    logits = torch.randn(3, 40)
    for t in (1e-45, 1e-30):
        drawn = sample(logits, SamplingParams(temperature=t, top_p=0.9), torch.Generator().manual_seed(0))
        assert torch.equal(drawn, logits.argmax(-1))


@pytest.fixture(scope="module")
def nano_engine():
    return Engine(make_model("nano", vocab_size=100))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(max_new_tokens=-5), "max_new_tokens must be a whole number >= 1 .*got -5"),
        (dict(max_new_tokens=0), "max_new_tokens must be a whole number >= 1"),
        (dict(max_new_tokens=3.0), "max_new_tokens must be a whole number >= 1"),
        (dict(stop_ids=[99999]), r"stop id 99999 is outside the model's vocabulary of 100 ids \(0..99\)"),
        (dict(stop_ids=[-1]), "stop id -1 is outside the model's vocabulary of 100 ids"),
        (dict(stop_ids=["7"]), "stop id '7' is not a token id"),
        (dict(stop_strings=[""]), "a stop string is empty"),
        (dict(stop_strings=["ok"]), "stop strings need a tokenizer"),
        (dict(seed=-1), "seed must be a whole number from 0"),
        (dict(seed=2**64), "seed must be a whole number from 0"),
    ],
)
def test_bad_requests_are_refused_by_generate_stream_and_steps(nano_engine, kw, message):
    """Regression: max_new_tokens -5 was a KV-cache shape error; '' as a stop string silently generated
    nothing; a stop id outside the vocabulary was accepted."""
    request = dict(max_new_tokens=4) | kw
    with pytest.raises(LmforgeError, match=message):
        nano_engine.generate([[5, 6]], **request)
    with pytest.raises(LmforgeError, match=message):
        list(nano_engine.stream([5, 6], **request))
    if set(kw) <= {"max_new_tokens", "seed"}:
        with pytest.raises(LmforgeError, match=message):
            next(nano_engine.steps([[5, 6]], sampling=GREEDY, **request))


def test_a_bad_prompt_id_is_the_one_blamed(nano_engine):
    """Regression: the prompt 5,-2 was reported as having id 5 outside the vocabulary."""
    with pytest.raises(LmforgeError, match=r"prompt has token id -2 \(at position 1\), outside the vocabulary 0..99"):
        nano_engine.generate([[5, -2]], max_new_tokens=2)
    with pytest.raises(LmforgeError, match=r"prompt has token id 100 \(at position 2\)"):
        nano_engine.generate([[1, 2, 100, 3, -7]], max_new_tokens=2)


def test_prompts_must_be_a_list_of_prompts(nano_engine):
    for prompts in ("hello", [5, 6, 7]):
        with pytest.raises(LmforgeError, match="generate takes a list of prompts"):
            nano_engine.generate(prompts, max_new_tokens=2)
    with pytest.raises(LmforgeError, match="no prompts given"):
        nano_engine.generate([], max_new_tokens=2)


def test_a_lone_stop_id_or_string_counts_as_a_list_of_one(text_engine):
    free = text_engine.generate(["To be, or not"], max_new_tokens=20, sampling=GREEDY)[0]
    as_list = text_engine.generate(["To be, or not"], max_new_tokens=20, sampling=GREEDY, stop_ids=[free.ids[4]])[0]
    lone = text_engine.generate(["To be, or not"], max_new_tokens=20, sampling=GREEDY, stop_ids=free.ids[4])[0]
    assert lone == as_list and lone.finish_reason == "stop"
    stop = free.text[6:9]
    assert (text_engine.generate(["To be, or not"], max_new_tokens=20, sampling=GREEDY, stop_strings=stop)[0]
            == text_engine.generate(["To be, or not"], max_new_tokens=20, sampling=GREEDY, stop_strings=[stop])[0])


def test_a_completion_names_the_stop_that_ended_it(gpt2_tok):
    """`Completion.stop` is the stop id or the stop string that ended a row (the alignment
    recipes count the answers that end with <|endoftext|> by it), None otherwise."""
    torch.manual_seed(0)
    model = GPT(Config.from_name("nano", vocab_size=gpt2_tok.vocab_size, context_length=64)).eval()
    engine = Engine(model, gpt2_tok, packed=False)
    free = engine.generate(["Hello"], max_new_tokens=6, sampling=GREEDY)[0]
    assert (free.finish_reason, free.stop) == ("length", None) and len(free.ids) == 6
    first = free.ids[0]
    by_id = engine.generate(["Hello"], max_new_tokens=6, sampling=GREEDY, stop_ids=[first])[0]
    assert (by_id.finish_reason, by_id.stop, by_id.ids) == ("stop", first, [])
    text = gpt2_tok.decode(free.ids)
    needle = text[len(text) // 2 :][:1]
    if not needle.strip():  # a stop string of visible text, taken from what greedy decoding writes
        needle = text.strip()[-1:]
    by_string = engine.generate(["Hello"], max_new_tokens=6, sampling=GREEDY, stop_strings=["\x00never", needle])[0]
    assert (by_string.finish_reason, by_string.stop) == ("stop", needle) and needle not in by_string.text
