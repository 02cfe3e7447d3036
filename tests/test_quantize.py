"""Weights for inference (int8, float16) and the one-row packed decode step, against references.

The packed step (`lmforge.engine.cpu_decode`) is the engine's default for one row on CPU,
so every engine test runs it; here it meets the configurations the common presets miss
(biases with RoPE, Llama 3 frequency scaling, one KV head, exact-erf GELU) and the
int8 / float16 layers it fuses.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from conftest import shared
from hypothesis import given, settings
from hypothesis import strategies as st

import lmforge
from lmforge import LmforgeError
from lmforge.config import Config
from lmforge.engine import Engine, SamplingParams, generate_uncached
from lmforge.engine.cpu_decode import PackedLinear
from lmforge.engine.quantize import Float16Linear, Int8Linear, quantize
from lmforge.finetune.lora import LoRAConfig, apply_lora
from lmforge.model import GPT

GREEDY = SamplingParams(temperature=0)
STORIES = shared("weights/stories260K/stories260K.bin")


def tiny(preset: str, **kw) -> GPT:
    torch.manual_seed(7)
    # a wide init (std 0.2) gives decisive logits: greedy paths do not hinge on rounding
    return GPT(Config.from_name(preset, **{"n_layer": 2, "vocab_size": 500, "context_length": 80, "init_std": 0.2, **kw})).eval()


CONFIGS = {
    "llama, GQA": dict(preset="nano"),
    "llama, one KV head, biases, Llama 3 RoPE scaling": dict(
        preset="nano", n_kv_head=1, bias=True,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16},
    ),
    "gpt2, tanh GELU": dict(preset="small", n_embd=96, n_head=4),
    "gpt2, exact GELU, untied": dict(preset="small", n_embd=96, n_head=4, mlp="gelu", tie_embeddings=False),
}  # fmt: skip


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_step_equals_the_reference(name):
    kw = dict(CONFIGS[name])
    model = tiny(kw.pop("preset"), **kw)
    prompt = [3, 14, 15, 92, 65, 35]
    ref_ids, ref_logits = generate_uncached(model, prompt, 30)
    engine = Engine(model)
    steps = list(engine.steps([prompt], 30, GREEDY))
    assert engine.cpu._layers is not None  # the packed step ran (not the model's own path)
    assert [int(t[0]) for t, _ in steps] == ref_ids
    assert max((lg[0] - r).abs().max().item() for (_, lg), r in zip(steps, ref_logits)) <= 1e-4


def test_a_model_with_an_adapter_decodes_through_its_own_layers():
    model = tiny("nano")
    apply_lora(model, LoRAConfig(r=2, targets=("q", "v")))
    for name, p in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.5)
    prompt = [5, 6, 7]
    engine = Engine(model)
    got = engine.generate([prompt], max_new_tokens=12, sampling=GREEDY)[0].ids
    assert engine.cpu._layers is None
    assert got == generate_uncached(model, prompt, 12)[0]


@settings(deadline=None, max_examples=40)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31))
def test_int8_rounds_each_weight_to_its_nearest_level(rows, cols, scale, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    layer = Int8Linear.from_weight(w, None)
    step = layer.weight_scale[:, None]
    assert torch.equal(layer.weight_scale, (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny))
    assert layer.weight_int8.abs().max() <= 127
    assert ((layer.dequantized_weight() - w).abs() <= step / 2 * (1 + 1e-5)).all()


def test_int8_matmul_quantizes_each_row_alone():
    """Each input row is quantized by its own absolute maximum, in both CPU paths (one row,
    several rows): a row's result is the same whatever rows share its call, and close to
    the exact product of the int8 weights; off the CPU paths that product is exact."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64)
    layer = Int8Linear.from_weight(lin.weight, lin.bias)
    x = torch.randn(3, 5, 96)
    x[0, 0] *= 100  # a loud row must not coarsen its neighbours
    exact = F.linear(x, layer.dequantized_weight(), lin.bias)
    with torch.no_grad():
        together = layer(x)
        alone = torch.stack([torch.stack([layer(x[i, j][None])[0] for j in range(5)]) for i in range(3)])
        pairs = torch.stack([layer(torch.stack([x[i, j], x[2 - i, 4 - j]]))[0] for i in range(3) for j in range(5)]).view(3, 5, 64)
        assert together.shape == (3, 5, 64) and torch.equal(together, pairs)
        for got in (together, alone):
            assert ((got - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item() < 0.03
        assert ((exact - lin(x)).norm() / lin(x).norm()).item() < 0.02  # per-channel int8 itself
        assert torch.equal(layer(x.double()), F.linear(x.double(), layer.dequantized_weight(torch.float64), lin.bias.double()))


def test_float16_matmul_one_row_and_several():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    layer = Float16Linear(lin.weight, lin.bias)
    one, several = torch.randn(1, 1, 64), torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(layer(one), F.linear(one.half(), lin.weight.half(), lin.bias.half()).float())
        assert torch.equal(layer(several), F.linear(several, lin.weight.half().float(), lin.bias.half().float()))


@pytest.mark.parametrize("dtype", ["int8", "float16"])
@pytest.mark.parametrize("preset", ["nano", "small"])
def test_quantized_models_decode_as_their_own_layers_do(dtype, preset):
    """The packed step fuses int8 (or float16) q, k, v and gate, up into one layer each: the
    same tokens and logits as the quantized model's own forward, and its tied embedding stays."""
    model = tiny(preset, **({"n_embd": 96, "n_head": 4} if preset == "small" else {}))
    embedding = model.tok_emb.weight.detach().clone()
    quantize(model, dtype)
    kinds = {type(layer) for _, layer in model.named_linears()} | {type(model.lm_head)}
    assert kinds == {Int8Linear if dtype == "int8" else Float16Linear}
    assert torch.equal(model.tok_emb.weight, embedding) and not any(p.requires_grad for p in model.parameters())
    prompt = [3, 14, 15, 92, 65, 35]
    own = list(Engine(model, packed=False).steps([prompt], 24, GREEDY))
    engine = Engine(model)
    steps = list(engine.steps([prompt], 24, GREEDY))
    assert engine.cpu._layers is not None
    assert any(p.layer is not None and len(p.linears) > 1 for layer in engine.cpu._layers for p in layer.packed())
    assert [int(t[0]) for t, _ in steps] == [int(t[0]) for t, _ in own]
    assert max((lg - r).abs().max().item() for (_, lg), (_, r) in zip(steps, own)) <= 1e-4
    fp32 = tiny(preset, **({"n_embd": 96, "n_head": 4} if preset == "small" else {}))
    reference = generate_uncached(fp32, prompt, 1)[1][0]  # and the weights still stand for the model's
    assert ((steps[0][1][0] - reference).norm() / reference.norm()).item() < 0.1  # measured 0.02-0.05 on these


def test_quantize_refuses_what_it_cannot_convert():
    with pytest.raises(LmforgeError, match="not one of"):
        quantize(tiny("nano"), "int4")
    model = tiny("nano")
    apply_lora(model, LoRAConfig(r=2))
    with pytest.raises(LmforgeError, match="merge LoRA adapters first"):
        quantize(model, "int8")
    with pytest.raises(LmforgeError, match="frozen"):
        Int8Linear.from_weight(torch.randn(4, 4), None).reset_parameters()


def test_packed_copies_of_int8_layers_follow_a_swap():
    model = quantize(tiny("nano"), "int8")
    prompt = [9, 8, 7]
    engine = Engine(model)
    engine.generate([prompt], max_new_tokens=3, sampling=GREEDY)
    torch.manual_seed(3)
    attn = model.blocks[1].attn
    attn.k = Int8Linear.from_weight(torch.randn(attn.k.out_features, attn.k.in_features), None)
    own = Engine(model, packed=False).generate([prompt], max_new_tokens=16, sampling=GREEDY)[0].ids
    assert engine.generate([prompt], max_new_tokens=16, sampling=GREEDY)[0].ids == own


def test_packed_linear_reads_layers_as_one():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, n) for n in (8, 16, 24)]
    packed = PackedLinear(layers)
    packed.refresh()
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        parts = packed.split(x)
        assert [p.shape[-1] for p in parts] == [8, 16, 24]
        for part, layer in zip(parts, layers):
            assert (part - layer(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_generate_and_serve_take_a_weight_dtype(capsys, dtype):
    ids = run_cli(capsys, "generate", "--model", STORIES, "--prompt", "Once upon a time", "--max-new-tokens", "24",
                  "--temperature", "0", "--ids", "--dtype", dtype, text=True, check=True)  # fmt: skip
    model = quantize(lmforge.load(STORIES), dtype)
    expected = Engine(model, model.tokenizer).generate(["Once upon a time"], max_new_tokens=24, sampling=GREEDY)[0].ids
    assert json.loads(ids.stdout) == expected
    check = run_cli(capsys, "serve", "--model", STORIES, "--dtype", dtype, "--port", "0", "--check", text=True, check=True)
    assert "260,032 parameters" in check.stdout and f"{dtype} weights" in check.stdout
