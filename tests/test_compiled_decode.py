"""The compiled one-row decode step (`Engine(compile=True)`) against the uncached reference:
tokens and logits for both families, a weight changed or a layer swapped between
generations, the cache buckets, and the layers it leaves to the packed step."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from test_engine import GREEDY, make_model

from torch._inductor.codecache import PyCodeCache

from lmforge.cli import main
from lmforge.engine import Engine, generate_uncached
from lmforge.engine import compiled, hugepages
from lmforge.engine.compiled import MIN_BUCKET, cache_length
from lmforge.engine.quantize import Int8Linear, int8_one_row, quantize
from lmforge.finetune.lora import LoRAConfig, apply_lora
from lmforge.weights import save_pretrained

PROMPT = [3, 14, 15, 92, 65, 35]


@pytest.fixture(scope="module", params=["nano", "small"])
def model(request):
    """nano: the GPT-2 family (learned positions, LayerNorm, tanh GELU, biases, tied head);
    small: the Llama family (RoPE with Llama 3's scaling, RMSNorm, SwiGLU, grouped KV heads,
    biases, untied head)."""
    if request.param == "small":
        scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}
        return make_model("small", n_kv_head=2, bias=True, rope_scaling=scaling)
    return make_model(request.param)


def test_compiled_step_equals_the_reference(model, request, monkeypatch):
    """Both families' arithmetic; the Llama model also through Inductor's C++ GEMM kernels,
    the ones a real run picks (offered alone here, so nothing is benchmarked: the search
    between them and BLAS takes half a minute even at this size)."""
    if request.node.callspec.params["model"] == "nano":
        monkeypatch.setitem(compiled.INDUCTOR_SETTINGS, "max_autotune", False)
    else:
        monkeypatch.setitem(compiled.INDUCTOR_SETTINGS, "max_autotune_gemm_backends", "CPP")
    ref_ids, ref_logits = generate_uncached(model, PROMPT, 40)
    engine = Engine(model, compile=True)
    steps = list(engine.steps([PROMPT], 40, GREEDY))
    assert engine.cpu._compiled is not None  # the compiled step ran
    assert [int(t[0]) for t, _ in steps] == ref_ids
    assert max((lg[0] - r).abs().max().item() for (_, lg), r in zip(steps, ref_logits)) <= 1e-4
    # a second request reuses the cache bucket (no recompile needed) and still matches
    assert engine.generate([PROMPT[:3]], max_new_tokens=30, sampling=GREEDY)[0].ids == generate_uncached(model, PROMPT[:3], 30)[0]


def test_a_weight_changed_or_a_layer_swapped_is_seen(monkeypatch):
    """The compiled step freezes the weights it was built from: an in-place change (an
    optimizer step) rebuilds it, and a layer swapped for one it cannot read (an adapter)
    hands decoding back to the packed step. (Inductor's kernel search is skipped here: the
    rebuild is under test, and the kernels are in the test above.)"""
    monkeypatch.setitem(compiled.INDUCTOR_SETTINGS, "max_autotune", False)
    model = make_model("small")
    engine = Engine(model, compile=True)
    engine.generate([PROMPT], max_new_tokens=4, sampling=GREEDY)
    first = engine.cpu._compiled
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5).add_(0.01)
    assert [int(t[0]) for t, _ in engine.steps([PROMPT], 12, GREEDY)] == generate_uncached(model, PROMPT, 12)[0]
    assert engine.cpu._compiled is not None and engine.cpu._compiled is not first
    # the old step's graphs go with it: Inductor's list of loaded modules lets its constants go
    old_modules = list(first._modules)
    del first
    gc.collect()
    assert old_modules and not any(m is old for m in PyCodeCache.modules for old in old_modules)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=("q", "v")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.5)
    assert [int(t[0]) for t, _ in engine.steps([PROMPT], 12, GREEDY)] == generate_uncached(model, PROMPT, 12)[0]
    assert engine.cpu._compiled is None


def test_each_model_and_cache_length_runs_its_own_graph(monkeypatch):
    """Once a cache length has run, the step skips Dynamo's guards: a cache length it has
    not run must still compile, not borrow another length's graph, and another model's
    step (a code object of its own) must not run this one's. Two models, two lengths, in
    turns, each against its reference, with their constants on huge pages where the
    machine has them."""
    monkeypatch.setitem(compiled.INDUCTOR_SETTINGS, "max_autotune", False)
    monkeypatch.setattr(compiled, "MIN_BUCKET", 16)  # 6 + 4 tokens: a 16-slot cache; 6 + 30: 64
    moved = []  # bytes moved per compiled graph; every constant, however small (these are KB, not MB)
    monkeypatch.setattr(compiled, "move_to_huge_pages", lambda tensors: moved.append(hugepages.move_to_huge_pages(tensors, min_bytes=1)))
    models = [make_model("small"), make_model("small")]
    with torch.no_grad():
        for p in models[1].parameters():
            p.add_(torch.randn_like(p), alpha=0.2)
    engines = [Engine(m, compile=True) for m in models]
    ref = {(i, n): generate_uncached(m, PROMPT, n)[0] for i, m in enumerate(models) for n in (4, 30)}
    assert ref[0, 30] != ref[1, 30]
    for i, n in [(0, 4), (1, 4), (0, 30), (1, 30), (0, 4), (1, 30), (1, 4), (0, 30)]:
        assert engines[i].generate([PROMPT], max_new_tokens=n, sampling=GREEDY)[0].ids == ref[i, n], (i, n)
    assert len(moved) == 4  # a graph per model and length, its constants moved once (and read from there since)
    if hugepages.huge_pages_available():
        assert all(n > 0 for n in moved)


@pytest.mark.parametrize("family", ["nano", "small"])
def test_int8_weights_compile_to_the_same_tokens(family, monkeypatch):
    """int8 layers go through their operator inside the compiled graph: the same kernel
    as the packed step, so the same tokens, and logits equal up to the order of the sums
    around it. A second int8 model in the same process decodes with its own weights."""
    monkeypatch.setitem(compiled.INDUCTOR_SETTINGS, "max_autotune", False)  # no fp32 matmul to search for
    model = quantize(make_model(family), "int8")
    packed = list(Engine(model).steps([PROMPT], 24, GREEDY))
    engine = Engine(model, compile=True)
    steps = list(engine.steps([PROMPT], 24, GREEDY))
    assert engine.cpu._compiled is not None
    assert [int(t[0]) for t, _ in steps] == [int(t[0]) for t, _ in packed]
    assert max((a[0] - b[0]).abs().max().item() for (_, a), (_, b) in zip(steps, packed)) <= 1e-4
    other = make_model(family)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p), alpha=0.2)
    other_ids = Engine(quantize(other, "int8")).generate([PROMPT], max_new_tokens=12, sampling=GREEDY)[0].ids
    assert other_ids != [int(t[0]) for t, _ in packed[:12]]  # the two models tell apart
    assert Engine(other, compile=True).generate([PROMPT], max_new_tokens=12, sampling=GREEDY)[0].ids == other_ids
    rows = engine.generate([PROMPT, PROMPT[:4]], max_new_tokens=8, sampling=GREEDY)  # a batch: the model's own path
    assert [r.ids for r in rows] == [generate_uncached(model, p, 8)[0] for p in (PROMPT, PROMPT[:4])]


def test_the_int8_operator_finds_its_layer_or_packs_one():
    """`lmforge::int8_one_row` on a layer's own buffers, and on copies no layer owns."""
    layer = Int8Linear.from_weight(torch.randn(48, 32), torch.randn(48))
    x = torch.randn(1, 1, 32)
    expected = layer.one_row(x)
    assert torch.equal(int8_one_row(x, layer.weight_int8, layer.weight_scale, layer.bias), expected)
    copies = (layer.weight_int8.clone(), layer.weight_scale.clone(), layer.bias.detach().clone())
    assert torch.equal(int8_one_row(x, *copies), expected)


@pytest.mark.parametrize(("needed", "context", "expected"), [
    (1, 1024, MIN_BUCKET), (MIN_BUCKET, 1024, MIN_BUCKET), (MIN_BUCKET + 1, 1024, 2 * MIN_BUCKET), (700, 1024, 1024),
    (1000, 1000, 1000), (40, 96, 96), (96, 96, 96),
])
def test_cache_buckets(needed, context, expected):
    assert cache_length(needed, context) == expected


def test_generate_compile_flag_gives_the_same_tokens(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(compiled.INDUCTOR_SETTINGS, "max_autotune", False)  # the flag's wiring is under test
    model = make_model("small")
    save_pretrained(model, tmp_path / "model")
    argv = ["generate", "--model", str(tmp_path / "model"), "--prompt-ids", ",".join(map(str, PROMPT)), "--ids",
            "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--compile"]) == 0
    assert capsys.readouterr().out == plain and json.loads(plain) == generate_uncached(model, PROMPT, 12)[0]
