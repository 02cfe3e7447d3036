"""NF4: our 4-bit weights against bitsandbytes, the error bound, the layer and the model."""

from __future__ import annotations

from itertools import pairwise

import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge import LmforgeError
from lmforge.config import Config
from lmforge.finetune.nf4 import (
    NF4_LEVELS,
    Linear4bit,
    NF4Weight,
    create_dynamic_map,
    dequantize_nf4,
    quantize_blockwise_8bit,
    quantize_model,
    quantize_nf4,
)
from lmforge.model import GPT
from lmforge.weights import state_dict_for_saving

SHAPES = [(64,), (33,), (100, 70), (3, 5, 7), (300, 129), (256, 512)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NF4_HALF_GAP = max(b - a for a, b in pairwise(NF4_LEVELS)) / 2  # 0.152, between -1 and -0.696
DYN = create_dynamic_map(signed=True)
DYN_HALF_GAP = float((DYN[1:] - DYN[:-1]).max()) / 2


@pytest.fixture(autouse=True, scope="module")
def _eager_bitsandbytes():
    """bitsandbytes dequantizes odd last dimensions through torch.compile: run it eagerly (same arithmetic, no compile time)."""
    import torch._dynamo

    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = before


def bnb_reference_8bit(values: torch.Tensor, block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' reference (pure PyTorch, "default" backend) blockwise 8-bit kernel, bypassing its CPU C one."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, values, bnbf.create_dynamic_map(), block_size)


def bnb_state(q: NF4Weight) -> bnbf.QuantState:
    """A bitsandbytes QuantState holding our tensors as they are: bitsandbytes dequantizes our format."""
    nested = None
    if q.double_quant:
        nested = bnbf.QuantState(absmax=q.absmax_scale, code=bnbf.create_dynamic_map(), blocksize=256, dtype=torch.float32)
    return bnbf.QuantState(
        absmax=q.absmax, shape=torch.Size(q.shape), dtype=q.dtype, blocksize=q.block_size,
        code=bnbf.get_4bit_type("nf4", device="cpu"), quant_type="nf4", offset=q.absmax_offset, state2=nested,
    )  # fmt: skip


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


# --- the tables --------------------------------------------------------------------------
def test_nf4_levels_are_bitsandbytes_and_normal_quantiles():
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    assert torch.equal(levels, bnbf.get_4bit_type("nf4", device="cpu"))
    # QLoRA's create_normal_map(offset=0.9677083): 8 positive and 7 negative N(0,1) quantiles, 0, scaled to [-1, 1]
    pos = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8)[:-1].double())
    rebuilt = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(levels.double(), rebuilt / rebuilt.max(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
    ours = create_dynamic_map(signed=signed)
    assert torch.equal(ours, bnbf.create_dynamic_map(signed=signed))
    assert ours.shape == (256,) and bool((ours[1:] >= ours[:-1]).all()) and ours[-1] == 1.0 and 0.0 in ours.tolist()


# --- 4-bit codes and values against bitsandbytes ----------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_and_values_equal_bitsandbytes(shape, dtype):
    w = weights(shape, dtype)
    q = quantize_nf4(w, block_size=64, double_quant=False)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(q.codes, packed.reshape(-1))  # same bytes, high nibble first, same padding
    assert torch.equal(q.absmax, state.absmax)
    ours = dequantize_nf4(q, dtype)
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state).reshape(shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_equals_bitsandbytes_reference(shape, dtype):
    w = weights(shape, dtype, seed=1)
    q = quantize_nf4(w, block_size=64, double_quant=True)
    _, plain = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    offset = plain.absmax.mean()  # bitsandbytes' compress_statistics, step by step
    codes, scales = bnb_reference_8bit(plain.absmax - offset)
    assert torch.equal(q.absmax_offset, offset) and q.absmax_offset.dtype == torch.float32
    assert torch.equal(q.absmax, codes) and torch.equal(q.absmax_scale, scales)
    # bitsandbytes reads our double-quantized weight as we do, bit for bit
    assert torch.equal(dequantize_nf4(q, dtype), bnbf.dequantize_4bit(q.codes[:, None], bnb_state(q)).reshape(shape))


def test_double_quant_against_bitsandbytes_cpu_kernel():
    """bitsandbytes' CPU C kernel for the 8-bit step searches approximately: where it differs, ours is nearer."""
    w = weights((768, 3072), torch.float32, seed=2)
    q = quantize_nf4(w, double_quant=True)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.codes, packed.reshape(-1))
    assert torch.equal(q.absmax_offset, state.offset) and torch.equal(q.absmax_scale, state.state2.absmax)
    exact = quantize_nf4(w, double_quant=False).absmax
    target = (exact - q.absmax_offset) / q.absmax_scale.repeat_interleave(256)[: exact.numel()]
    ours, theirs = (target - DYN[q.absmax.long()]).abs(), (target - DYN[state.absmax.long()]).abs()
    differ = q.absmax != state.absmax
    assert bool((ours <= theirs).all()) and bool((ours[differ] < theirs[differ]).all())
    assert differ.float().mean() < 0.01  # measured 0.18% (67 of 36,864)
    gap = (dequantize_nf4(q) - bnbf.dequantize_4bit(packed, state)).abs().max()
    assert gap <= q.absmax_scale.max() * 2 * DYN_HALF_GAP  # at most one map step of the absmax (measured 5.5e-4)

    wide = torch.randn(20_000, generator=torch.Generator().manual_seed(3)) * torch.exp(torch.randn(20_000) * 3)
    codes, scales = quantize_blockwise_8bit(wide)
    ref_codes, ref_scales = bnb_reference_8bit(wide)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    c_codes, _ = bnbf.quantize_blockwise(wide, blocksize=256)
    normed = wide / scales.repeat_interleave(256)[: wide.numel()]
    assert bool(((normed - DYN[codes.long()]).abs() <= (normed - DYN[c_codes.long()]).abs()).all())


# --- properties ------------------------------------------------------------------------------
finite32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@given(
    values=st.lists(st.one_of(finite32, st.just(0.0)), min_size=1, max_size=700),
    block_size=st.sampled_from([2, 7, 32, 64, 256]),
    absmax_block_size=st.sampled_from([3, 256]),
    double_quant=st.booleans(),
)
@example(values=[0.0] * 5, block_size=2, absmax_block_size=3, double_quant=True)  # found by hypothesis on a CI run
def test_round_trip_error_is_bounded(values, block_size, absmax_block_size, double_quant):
    x = torch.tensor(values, dtype=torch.float32)
    q = quantize_nf4(x, block_size, double_quant, absmax_block_size)
    y = dequantize_nf4(q)
    n_blocks = -(x.numel() // -block_size)
    exact = F.pad(x.abs(), (0, n_blocks * block_size - x.numel())).view(n_blocks, block_size).amax(1)
    stored = exact.clone()  # bitsandbytes stores a partial last block's absmax clamped to 1e-38
    if x.numel() % block_size:
        stored[-1] = stored[-1].clamp(min=1e-38)
    decoded = q.block_absmax()
    if double_quant:  # the absmax is off by at most half a step of the dynamic map (times the block's scale)
        scale = q.absmax_scale.repeat_interleave(absmax_block_size)[:n_blocks]
        # plus one FLT_MIN: below it fp32 is subnormal and keeps fewer bits (all-zero blocks
        # beside a clamped 1e-38 one decode it as 7.8e-39)
        tiny = torch.finfo(torch.float32).tiny
        assert bool(((decoded - stored).abs() <= scale * DYN_HALF_GAP * (1 + 1e-5) + stored * 1e-6 + tiny).all())
    else:
        assert torch.equal(decoded, stored)
    per = lambda t: t.repeat_interleave(block_size)[: x.numel()]
    bound = per(exact) * NF4_HALF_GAP + per((decoded - exact).abs()) + per(exact) * 1e-6
    assert bool(((x - y).abs() <= bound).all())


@given(values=st.lists(st.one_of(finite32, st.just(0.0)), min_size=1, max_size=300), dtype=st.sampled_from(DTYPES))
def test_codes_equal_bitsandbytes_on_any_values(values, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    q = quantize_nf4(x, 64, double_quant=False)
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(q.codes, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q, dtype), bnbf.dequantize_4bit(packed, state).reshape(x.shape))


def test_bytes_per_parameter():
    w = weights((768, 3072), torch.bfloat16)
    dq, plain = quantize_nf4(w, double_quant=True), quantize_nf4(w, double_quant=False)
    assert dq.nbytes / dq.numel <= 0.52  # 0.5 codes + 1/64 absmax codes + 4/(64*256) scales + offset
    assert dq.nbytes == 768 * 3072 // 2 + 768 * 3072 // 64 + 4 * (768 * 3072 // 64 // 256) + 4
    assert plain.nbytes / plain.numel == 0.5 + 4 / 64


def test_quantize_refuses_what_it_cannot_represent():
    with pytest.raises(LmforgeError, match="fp32, fp16 or bf16"):
        quantize_nf4(torch.ones(4, dtype=torch.float64))
    with pytest.raises(LmforgeError, match="inf or NaN"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(LmforgeError, match="empty"):
        quantize_nf4(torch.ones(0, 3))


# --- saving --------------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip_through_safetensors(tmp_path, double_quant):
    q = quantize_nf4(weights((37, 91), torch.bfloat16), double_quant=double_quant)
    save_file(q.state_dict(), tmp_path / "w.safetensors")
    back = NF4Weight.from_state_dict(load_file(tmp_path / "w.safetensors"))
    assert (back.shape, back.dtype, back.block_size, back.double_quant) == ((37, 91), torch.bfloat16, 64, double_quant)
    assert torch.equal(dequantize_nf4(back, torch.bfloat16), dequantize_nf4(q, torch.bfloat16))
    assert back.nbytes == q.nbytes
    moved = back.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(dequantize_nf4(moved), dequantize_nf4(q))

    sd = q.state_dict()
    sd["codes"] = sd["codes"][:-1]
    with pytest.raises(LmforgeError, match="'codes' should be torch.uint8 with 1684 elements"):
        NF4Weight.from_state_dict(sd)
    with pytest.raises(LmforgeError, match=r"needs the tensors \['meta'\]"):
        NF4Weight.from_state_dict({"codes": q.codes, "absmax": q.absmax})


# --- the layer --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_forward_and_backward(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias).to(dtype)
    layer = Linear4bit.from_linear(linear)
    assert layer.weight is None and (layer.in_features, layer.out_features) == (96, 40)
    assert all(not p.requires_grad for p in layer.parameters())
    if bias:
        assert layer.bias.data_ptr() == linear.bias.data_ptr()  # shared, not copied
    w = layer.dequantized_weight()
    assert w.dtype == dtype and torch.equal(w, dequantize_nf4(quantize_nf4(linear.weight), dtype))

    dense = nn.Linear(96, 40, bias=bias).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if bias:
            dense.bias.copy_(linear.bias)
    x = torch.randn(2, 5, 96, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert torch.equal(y, F.linear(x, w, layer.bias))
    assert (40, 96) not in saved  # backward keeps no dense weight (it dequantizes again)
    g = torch.randn_like(y)
    y.backward(g)
    dense(x_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    assert all(p.grad is None for p in layer.parameters())


def test_linear4bit_bias_gradient_when_unfrozen():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 8))
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 4, 64)
    layer(x).pow(2).sum().backward()
    dense = nn.Linear(64, 8)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight())
        dense.bias.copy_(layer.bias)
    dense(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


def test_linear4bit_under_autocast_matches_a_dense_layer():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(128, 64))
    dense = nn.Linear(128, 64)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight())
        dense.bias.copy_(layer.bias)
    x = torch.randn(4, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x), dense(x_ref)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x_ref.grad)


def test_dtype_casts_keep_the_fp32_statistics():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(200, 30))
    before = layer.dequantized_weight(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and layer.weight_codes.dtype == torch.uint8
    assert layer.weight_absmax_scale.dtype == layer.weight_absmax_offset.dtype == torch.float32
    assert torch.equal(layer.dequantized_weight(torch.float32), before)
    assert layer(torch.randn(2, 200, dtype=torch.bfloat16)).dtype == torch.bfloat16
    plain = Linear4bit.from_linear(nn.Linear(200, 30), double_quant=False).half()
    assert plain.weight_absmax.dtype == torch.float32


def test_linear4bit_is_a_cooperative_base():
    """The shape of LoRALinear4bit(LoRALinear, Linear4bit): base output from super().forward, built via cls."""

    class Adapted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + self.extra(x)

    class Adapted4bit(Adapted, Linear4bit):
        pass

    torch.manual_seed(0)
    layer = Adapted4bit.from_linear(nn.Linear(64, 16))
    assert type(layer) is Adapted4bit
    layer.extra = nn.Linear(64, 16, bias=False)
    x = torch.randn(3, 64, requires_grad=True)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias) + layer.extra(x)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    layer(x).sum().backward()
    assert layer.extra.weight.grad is not None and x.grad is not None


def test_skeleton_layer_loads_a_quantized_one_and_refuses_a_different_one():
    torch.manual_seed(0)
    source = Linear4bit.from_linear(nn.Linear(70, 20))
    skeleton = Linear4bit(70, 20)
    assert torch.equal(skeleton(torch.ones(1, 70)), torch.zeros(1, 20))
    skeleton.load_state_dict(source.state_dict())
    assert torch.equal(skeleton.dequantized_weight(), source.dequantized_weight())
    other = Linear4bit(70, 20, dtype=torch.bfloat16)  # same tensor sizes, another original dtype
    with pytest.raises(LmforgeError, match="quantize the model with the same settings"):
        other.load_state_dict(source.state_dict())


# --- the model ---------------------------------------------------------------------------------
def tiny(preset: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    extra = {"n_embd": 128, "n_head": 4} if preset == "gpt2" else {}
    return GPT(Config.from_name(preset, n_layer=2, vocab_size=300, context_length=64, **extra)).eval()


@pytest.mark.parametrize("preset", ["nano", "gpt2"])
def test_quantize_model(preset):
    model = tiny(preset)
    linears = [name for name, _ in model.named_linears()]
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(idx)
        summary = quantize_model(model)
        out = model(idx)
    assert summary["layers"] == len(linears) and summary["skipped"] == []
    assert summary["bytes_per_param"] <= 0.52  # measured 0.5161 (nano) and 0.5160 (gpt2 family)
    assert summary["bytes"] * 7 < summary["dense_bytes"]
    assert all(isinstance(m, Linear4bit) for _, m in model.named_linears())
    assert not any(name.startswith("blocks.") and name.endswith(".weight") and p.dim() == 2 for name, p in model.named_parameters())
    # the quantized model is exactly a dense one holding the dequantized weights
    dense = tiny(preset)
    with torch.no_grad():
        for (_, d), (_, m) in zip(dense.named_linears(), model.named_linears()):
            d.weight.copy_(m.dequantized_weight())
        torch.testing.assert_close(dense(idx), out, rtol=0, atol=1e-5)
    # and close to the fp32 model (measured: relative error 0.09 / 0.12, every argmax the same)
    assert (out - ref).norm() / ref.norm() < 0.2
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_quantize_model_skips_and_refuses():
    model = tiny("nano")
    summary = quantize_model(model, skip={"down", "blocks.0.attn.q"})
    assert sorted(summary["skipped"]) == ["blocks.0.attn.q", "blocks.0.mlp.down", "blocks.1.mlp.down"]
    assert type(model.blocks[0].attn.q) is nn.Linear and isinstance(model.blocks[1].attn.q, Linear4bit)
    assert quantize_model(model)["layers"] == 3  # the rest; quantized ones are left alone
    model = tiny("nano")
    assert quantize_model(model, skip=lambda name: ".attn." in name)["layers"] == 6
    model.blocks[0].mlp.up = type("Custom", (nn.Linear,), {})(128, 256, bias=False)
    with pytest.raises(LmforgeError, match=r"blocks\.0\.mlp\.up is a Custom.*quantize the model before adding adapters"):
        quantize_model(model)
    with pytest.raises(LmforgeError, match="expects an lmforge GPT"):
        quantize_model(nn.Linear(3, 3))


def test_quantized_model_round_trip_through_safetensors(tmp_path):
    model, other = tiny("gpt2", seed=0), tiny("gpt2", seed=1)
    quantize_model(model)
    quantize_model(other)
    save_file(state_dict_for_saving(model), tmp_path / "model.safetensors")
    result = other.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == []  # the tied head
    idx = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(other(idx), model(idx))
    for (_, a), (_, b) in zip(model.named_linears(), other.named_linears()):
        assert torch.equal(a.dequantized_weight(), b.dequantized_weight())
