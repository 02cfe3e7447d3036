"""LoRA adapters: exact start at the base, only adapters train, merge = unmerged, files round-trip, peft agrees.

Models are tiny and random (every parameter, norm gains included), built here in both
families; adapters get random B so that "equal" never holds by B being zero.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import shared
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.finetune.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir, load_adapter, save_adapter
from lmforge.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    lora_class_for,
    lora_layers,
    merge_lora,
    register_lora_class,
    resolve_targets,
)
from lmforge.loading import load, load_adapted
from lmforge.model import GPT
from lmforge.tokenizer import train_bpe
from lmforge.weights import save_pretrained

VOCAB = 300
TOL = 1e-5
LLAMA_ALL = ("q", "k", "v", "o", "gate", "up", "down")


# --- helpers ---------------------------------------------------------------------------------
@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (std 0.05): gains around 1, everything else around 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.05
        is_gain = p.dim() == 1 and "norm" in name and name.endswith("weight")
        p.copy_(noise + 1.0 if is_gain else noise)
    return model.eval()


def llama(seed: int = 0, **overrides) -> GPT:
    config = Config.from_name("nano", **{"n_layer": 2, "vocab_size": VOCAB, "context_length": 64, **overrides})
    return randomize(GPT(config), seed)


def gpt2(seed: int = 0, **overrides) -> GPT:
    config = Config.from_name("gpt2", **{"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": VOCAB, "context_length": 64, **overrides})
    return randomize(GPT(config), seed)


FAMILIES = {"llama": llama, "gpt2": gpt2}


def ids(seed: int = 1, T: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb_adapters(model: nn.Module, seed: int = 7, std: float = 0.05) -> None:
    """Random A and B, so the adapter changes the output (B is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g) * std)
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * std)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    return model(ids() if x is None else x)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = float((a - b).detach().abs().max())
    print(f"max |logits diff| = {d:.2e}")
    return d


# --- settings ---------------------------------------------------------------------------------
def test_config_scale_and_validation():
    assert LoRAConfig().scale == 2.0
    assert LoRAConfig(r=16, alpha=8, rslora=True).scale == 8 / 4
    assert LoRAConfig(targets="q, v,q").targets == ("q", "v")
    assert LoRAConfig(targets=["up", "down"]).targets == ("up", "down")
    c = LoRAConfig(r=4, alpha=8.5, dropout=0.1, targets=("all-linear",), rslora=True)
    assert LoRAConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    bad = [
        (dict(r=0), "rank r must be a positive integer"),
        (dict(r=2.5), "rank r must be a positive integer"),
        (dict(alpha=0), "alpha must be a positive number"),
        (dict(alpha=float("nan")), "alpha must be a positive number"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(targets=()), "at least one target"),
        (
            dict(targets=("q", "query")),
            r"unknown LoRA target\(s\) \['query'\]; choose among q, k, v, o, gate, up, down, fc, proj or all-linear",
        ),
    ]
    for kw, message in bad:
        with pytest.raises(LmforgeError, match=message):
            LoRAConfig(**kw)
    with pytest.raises(LmforgeError, match="unknown LoRA setting"):
        LoRAConfig.from_dict({"rank": 8})


def test_target_names_in_both_families():
    lm, g2 = llama(), gpt2()
    per_layer = lambda names: [n.removeprefix("blocks.0.") for n in names if n.startswith("blocks.0.")]
    assert per_layer(resolve_targets(lm, ("q", "k", "v", "o"))) == ["attn.q", "attn.k", "attn.v", "attn.o"]
    assert per_layer(resolve_targets(lm, ("gate", "up", "down"))) == ["mlp.gate", "mlp.up", "mlp.down"]
    # fc/proj are the GPT-2 spellings of up/down: each selects the other family's layer too
    assert per_layer(resolve_targets(lm, ("fc", "proj"))) == ["mlp.up", "mlp.down"]
    assert per_layer(resolve_targets(g2, ("up", "down"))) == ["mlp.fc", "mlp.proj"]
    assert per_layer(resolve_targets(g2, ("v", "fc"))) == ["attn.v", "mlp.fc"]
    for model in (lm, g2):
        everything = resolve_targets(model, ("all-linear",))
        assert everything == [n for n, _ in model.named_linears()]
        assert len(everything) == model.config.n_layer * (7 if model is lm else 6)
        assert not any("lm_head" in n or "emb" in n for n in everything)
    assert resolve_targets(lm, ("all-linear", "q")) == resolve_targets(lm, ("all-linear",))
    with pytest.raises(LmforgeError, match=r"target 'gate' matches no linear layer.*named q, k, v, o, fc, proj \(or use all-linear\)"):
        resolve_targets(g2, ("q", "gate"))
    with pytest.raises(LmforgeError, match="matches no linear layer"):
        apply_lora(g2, LoRAConfig(targets=("gate",)))
    assert not lora_layers(g2), "a refused target must leave the model untouched"


# --- applying ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_apply_starts_exactly_at_the_base_and_keeps_the_weight_tensors(family):
    model = FAMILIES[family]()
    base = logits(model)
    weights = {n: (m.weight, m.weight.data_ptr()) for n, m in model.named_linears()}
    cfg = LoRAConfig(r=4, alpha=8, targets=("all-linear",))
    report = apply_lora(model, cfg)
    assert torch.equal(logits(model), base)
    for name, layer in lora_layers(model):
        assert type(layer) is LoRALinear and isinstance(layer, nn.Linear)
        assert layer.weight is weights[name][0] and layer.weight.data_ptr() == weights[name][1]
        assert not layer.weight.requires_grad and torch.count_nonzero(layer.lora_b) == 0
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) as nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
        assert layer.lora_a.abs().max() <= bound and layer.lora_a.std() > bound / 4
    adapters = sum(4 * (m.in_features + m.out_features) for _, m in lora_layers(model))
    assert report.layers == [n for n, _ in model.named_linears()]
    assert report.trainable == adapters and report.total == model.num_params()
    assert report.total == adapters + sum(p.numel() for p in GPT(model.config).parameters())
    assert f"LoRA r=4 on {len(report.layers)} layers" in str(report) and f"{report.percent:.2f}%" in str(report)
    with pytest.raises(LmforgeError, match="already has LoRA adapters"):
        apply_lora(model, cfg)


def test_only_adapters_and_declared_extras_train():
    model = llama()
    report = apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("q", "v", "down")), trainable=["norm_f"])
    assert report.trainable == sum(4 * (m.in_features + m.out_features) for _, m in lora_layers(model)) + model.config.n_embd
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = ids(3, 32)
    for step in range(3):
        opt.zero_grad()
        loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        for name, p in model.named_parameters():
            trains = ".lora_" in name or name.startswith("norm_f")
            assert (p.grad is not None) == trains, name
            if trains and step > 0:  # A's gradient is B^T(...): zero until B has moved once
                assert p.grad.abs().sum() > 0, name
        opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (".lora_" in name or name.startswith("norm_f")), name
    with pytest.raises(LmforgeError, match=r"trainable prefix\(es\) \['head'\] match no parameter name.*tok_emb, blocks, norm_f, lm_head"):
        apply_lora(llama(), LoRAConfig(), trainable=["head"])


# --- merging and switching off -------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_logits_equal_unmerged(family, rslora):
    model = FAMILIES[family]()
    base_keys = set(model.state_dict())
    base = logits(model)
    apply_lora(model, LoRAConfig(r=8, alpha=32, targets=("all-linear",), rslora=rslora))
    perturb_adapters(model, std=0.02)
    adapted = logits(model)
    assert max_diff(adapted, base) > 1e-2, "the adapter must change the output for the comparison to mean anything"
    weight = model.blocks[0].attn.q.weight
    assert merge_lora(model) is model
    assert model.blocks[0].attn.q.weight is weight, "a dense merge updates the weight in place"
    assert not lora_layers(model) and all(type(m) is nn.Linear for _, m in model.named_linears())
    assert set(model.state_dict()) == base_keys
    assert max_diff(logits(model), adapted) <= TOL


@settings(max_examples=25)
@given(
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 24),
    r=st.integers(1, 8),
    alpha=st.floats(0.5, 64),
    rslora=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_merge_unmerge_round_trip(n_in, n_out, r, alpha, rslora, bias, seed):
    r = min(r, n_in, n_out)  # a larger rank is refused (test_rank_above_the_layer_is_refused)
    torch.manual_seed(seed)
    layer = LoRALinear(n_in, n_out, bias=bias, r=r, alpha=alpha, rslora=rslora)
    nn.init.normal_(layer.lora_b, std=0.1)
    x = torch.randn(3, n_in)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        expected = F.linear(x, original, layer.bias) + x @ layer.lora_a.T @ layer.lora_b.T * layer.scale
        assert torch.allclose(unmerged, expected, atol=1e-5, rtol=1e-5)
        assert layer.merge() is layer and layer.merged
        assert layer.merge() is layer, "merging twice must not add the adapter twice"
        assert torch.allclose(layer(x), unmerged, atol=1e-5, rtol=1e-5), "the merged forward must not add the adapter again"
        layer.unmerge()
        assert not layer.merged
        assert torch.allclose(layer.weight, original, atol=1e-6, rtol=1e-6)
        assert torch.allclose(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(LmforgeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_adapters_give_the_base_exactly(family):
    model = FAMILIES[family]()
    base = logits(model)
    apply_lora(model, LoRAConfig(targets=("all-linear",)))
    perturb_adapters(model)
    adapted = logits(model)
    with adapters_disabled(model) as m:
        assert m is model
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), adapted)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(model):
        raise RuntimeError("boom")
    assert all(layer.enabled for _, layer in lora_layers(model)), "the switches come back after an exception"
    name, layer = lora_layers(model)[-1]
    layer.merge()
    with pytest.raises(LmforgeError, match=rf"{name} is merged"), adapters_disabled(model):
        pass
    assert all(layer.enabled for _, layer in lora_layers(model))


# --- a quantized-style base: cooperative forward, dequantizing merge -------------------------------
class CodedLinear(nn.Linear):
    """Stands in for `Linear4bit`: int8 codes + one scale; its forward dequantizes."""

    @classmethod
    def quantize(cls, linear: nn.Linear) -> CodedLinear:
        with torch.no_grad():
            qscale = linear.weight.abs().max() / 127
            codes = torch.round(linear.weight / qscale).to(torch.int8)
        linear.__class__ = cls
        linear.weight = nn.Parameter(codes, requires_grad=False)
        linear.register_buffer("qscale", qscale)
        return linear

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.qscale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)


def test_a_linear_subclass_gets_its_own_lora_class_and_merges_dequantized():
    model = gpt2()
    for _, m in model.named_linears():
        CodedLinear.quantize(m)
    base = logits(model)
    apply_lora(model, LoRAConfig(targets=("q", "fc")))
    cls = lora_class_for(CodedLinear)
    assert cls is lora_class_for(CodedLinear) and cls.__name__ == "LoRACodedLinear"
    layer = model.blocks[0].attn.q
    assert type(layer) is cls and isinstance(layer, CodedLinear) and layer.lora_a.dtype == torch.float32
    assert torch.equal(logits(model), base), "the base output comes from the subclass's own forward"
    perturb_adapters(model)
    adapted = logits(model)
    with pytest.warns(UserWarning, match="not the quantized one"):
        plain = layer.merge()
    assert type(plain) is nn.Linear and not layer.merged and plain.bias is layer.bias
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_lora(model)
    assert len(caught) == 1 and "4 layer(s)" in str(caught[0].message)
    assert type(model.blocks[0].attn.q) is nn.Linear and type(model.blocks[0].attn.k) is CodedLinear
    assert max_diff(logits(model), adapted) <= TOL

    class MyLoRACoded(LoRALinear, CodedLinear):
        pass

    register_lora_class(CodedLinear, MyLoRACoded)
    assert lora_class_for(CodedLinear) is MyLoRACoded
    with pytest.raises(TypeError):
        register_lora_class(CodedLinear, LoRALinear)


# --- adapter files -------------------------------------------------------------------------------
def test_save_then_load_onto_a_fresh_base_reproduces_logits(tmp_path):
    base_dir = save_pretrained(llama(), tmp_path / "base")
    model = load(base_dir)
    cfg = LoRAConfig(r=4, alpha=16, targets=("q", "v", "up"), rslora=True)
    apply_lora(model, cfg, trainable=["norm_f"])
    perturb_adapters(model)
    with torch.no_grad():
        model.norm_f.weight.mul_(1.5)
    adapted = logits(model)
    out = save_adapter(model, tmp_path / "adapter", base=base_dir, cfg=cfg)
    assert is_adapter_dir(out) and not is_adapter_dir(base_dir) and not is_adapter_dir(tmp_path / "missing")
    tensors = load_file(out / ADAPTER_WEIGHTS)
    assert set(tensors) == {f"blocks.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.q", "attn.v", "mlp.up") for ab in "ab"} | {
        "norm_f.weight"
    }
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["format"] == "lmforge.lora" and meta["lmforge_version"]
    assert (meta["r"], meta["alpha"], meta["targets"], meta["rslora"]) == (4, 16, ["q", "v", "up"], True)
    assert meta["base"] == str(base_dir.resolve()) and meta["base_config"] == model.config.to_dict()
    assert meta["trainable"] == ["norm_f.weight"]

    fresh = load(base_dir)
    assert load_adapter(fresh, out) == cfg
    assert torch.equal(logits(fresh), adapted)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(tensors), "a loaded adapter trains on as before"
    assert torch.equal(logits(load_adapted(out)), adapted), "the recorded base is used when none is given"
    # loading into a model adapted the same way (resuming) loads the tensors only
    again = load(base_dir)
    apply_lora(again, cfg, trainable=["norm_f"])
    load_adapter(again, out)
    assert torch.equal(logits(again), adapted)
    # saving again replaces the adapter folder; an unrelated folder is refused
    save_adapter(model, out, base=None, cfg=cfg)
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base"] is None
    with pytest.raises(LmforgeError, match="already exists"):
        save_adapter(model, base_dir, base=None, cfg=cfg)
    with pytest.raises(LmforgeError, match="does not record its base"):
        load_adapted(out)
    with pytest.raises(LmforgeError, match=r"not the ones the model's adapters were made with"):
        save_adapter(model, tmp_path / "a2", base=None, cfg=LoRAConfig(r=8, targets=("q", "v", "up")))
    assert torch.equal(adapter_state_dict(model)["norm_f.weight"], tensors["norm_f.weight"])


def test_mismatched_base_and_damaged_adapters_are_refused(tmp_path):
    model = llama()
    cfg = LoRAConfig(r=4, targets=("q", "k"))
    apply_lora(model, cfg)
    out = save_adapter(model, tmp_path / "adapter", base="some-base", cfg=cfg)
    other = llama(n_embd=64, n_head=4, mlp_hidden=128)
    with pytest.raises(
        LmforgeError,
        match=r"made for a different base model: head_dim=32 \(adapter\) vs 16 \(this model\); mlp_hidden=256 \(adapter\) vs 128.*n_embd=128 \(adapter\) vs 64.*recorded base: some-base",
    ):
        load_adapter(other, out)
    assert not lora_layers(other), "a refused adapter changes nothing"
    with pytest.raises(LmforgeError, match="different base model"):
        load_adapter(gpt2(), out)
    # same architecture, other name or dropout: still its base
    load_adapter(GPT(model.config.replace(name="renamed", dropout=0.1)), out)
    # a tampered file: wrong rank in one tensor, a tensor missing
    tensors = load_file(out / ADAPTER_WEIGHTS)
    tensors["blocks.0.attn.q.lora_a"] = torch.zeros(2, 128)
    del tensors["blocks.1.attn.k.lora_b"]
    save_file(tensors, out / ADAPTER_WEIGHTS)
    with pytest.raises(
        LmforgeError,
        match=r"missing 1 tensor\(s\): blocks\.1\.attn\.k\.lora_b.*wrong shape: blocks\.0\.attn\.q\.lora_a is \(2, 128\), expected \(4, 128\)",
    ):
        load_adapter(fresh := llama(), out)
    assert not lora_layers(fresh), "a refused adapter changes nothing"
    (out / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(LmforgeError, match="not a readable safetensors file"):
        load_adapter(llama(), out)
    (out / ADAPTER_CONFIG).write_text('{"format": "peft"}')
    with pytest.raises(LmforgeError, match="not an lmforge LoRA adapter"):
        load_adapter(llama(), out)
    with pytest.raises(LmforgeError, match="not a LoRA adapter folder"):
        load_adapter(llama(), tmp_path)
    with pytest.raises(LmforgeError, match="no LoRA adapters to save"):
        save_adapter(llama(), tmp_path / "none", base=None, cfg=cfg)


# --- the CLI -----------------------------------------------------------------------------------
def run_cli(*argv: str) -> int:
    from lmforge.cli import lora as lora_cli

    parser = argparse.ArgumentParser(prog="lmforge")
    lora_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_merge_writes_a_model_folder_with_the_merged_logits(tmp_path, capsys):
    text = shared("tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    tok = train_bpe([text], VOCAB, progress=False)  # 256 bytes + 43 merges + <|endoftext|>
    model = gpt2()
    save_pretrained(model, tmp_path / "base", tokenizer=tok)
    model = load(tmp_path / "base")
    cfg = LoRAConfig(r=4, alpha=8, targets=("q", "v", "up", "down"))
    apply_lora(model, cfg)
    perturb_adapters(model)
    adapted = logits(model)
    save_adapter(model, tmp_path / "adapter", base=tmp_path / "base", cfg=cfg)

    assert run_cli("lora", "merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")) == 0
    printed = capsys.readouterr().out
    assert "r=4, alpha=8, 8 layers" in printed and "with the base's tokenizer" in printed
    # what was written where; the base was only read (never "merged ... into <base>")
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    assert printed.startswith(f"wrote a merged model (base {base} + adapter {adapter}: ")
    assert f") to {out}; {base} is unchanged\n" in printed and " into " not in printed
    merged = load(tmp_path / "merged")
    assert max_diff(logits(merged), adapted) <= TOL
    assert merged.tokenizer is not None and merged.tokenizer.encode("To be, or not") == tok.encode("To be, or not")
    assert set(load_file(tmp_path / "merged" / "model.safetensors")) == set(load_file(tmp_path / "base" / "model.safetensors"))

    with pytest.raises(LmforgeError, match="already exists"):
        run_cli("lora", "merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    explicit = ("--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert run_cli("lora", "merge", *explicit, "--overwrite") == 0
    assert max_diff(logits(load(tmp_path / "merged")), adapted) <= TOL
    save_pretrained(llama(), tmp_path / "llama")
    with pytest.raises(LmforgeError, match="different base model"):
        run_cli("lora", "merge", "--base", str(tmp_path / "llama"), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m2"))
    assert not Path(tmp_path / "m2").exists()


# --- against peft ---------------------------------------------------------------------------------
def _peft_model(model: GPT, tmp_path: Path, target_modules: list[str], r: int, alpha: float, rslora: bool, **patterns):
    import peft  # a test dependency (pyproject [test]): missing, the reference check fails rather than skips
    from transformers import AutoModelForCausalLM

    from lmforge.interop.hf import save_hf

    save_hf(_base_copy(model), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    pcfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, use_rslora=rslora, **patterns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D: "fan_in_fan_out is set to True"
        return peft.get_peft_model(hf, pcfg).eval()


def _base_copy(model: GPT) -> GPT:
    """The base weights of an adapted model, as a model of their own."""
    base = GPT(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    return base.eval()


def _lora_modules(peft_model: nn.Module) -> dict[str, nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_same_adapters_in_peft_llama_give_the_same_logits(tmp_path, rslora):
    model = llama(tie_embeddings=False)
    apply_lora(model, LoRAConfig(r=4, alpha=12, targets=LLAMA_ALL, rslora=rslora))
    perturb_adapters(model)
    theirs = _peft_model(model, tmp_path, [f"{p}_proj" for p in LLAMA_ALL], r=4, alpha=12, rslora=rslora)
    modules = _lora_modules(theirs)
    assert len(modules) == len(lora_layers(model)) == 14
    with torch.no_grad():
        for name, layer in lora_layers(model):
            i, kind, p = name.split(".")[1:]
            m = modules[f"model.layers.{i}.{'self_attn' if kind == 'attn' else 'mlp'}.{p}_proj"]
            m.lora_A["default"].weight.copy_(layer.lora_a)
            m.lora_B["default"].weight.copy_(layer.lora_b)
    x = ids(5)
    assert max_diff(logits(model, x), _base_copy(model)(x)) > 1e-2
    assert max_diff(logits(model, x), theirs(x).logits) <= TOL


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_same_adapters_in_peft_gpt2_give_the_same_logits(tmp_path, rslora):
    """GPT-2 fuses q, k, v into one Conv1D `c_attn`: our three rank-r adapters are one
    rank-3r adapter there, A stacked and B block-diagonal, with alpha raised to keep the scale."""
    model = gpt2()
    r, alpha = 4, 12.0
    apply_lora(model, LoRAConfig(r=r, alpha=alpha, targets=("q", "k", "v", "o", "fc", "proj"), rslora=rslora))
    perturb_adapters(model)
    fused_alpha = alpha * (math.sqrt(3) if rslora else 3)
    theirs = _peft_model(
        model, tmp_path, ["c_attn", "c_proj", "c_fc"], r=r, alpha=alpha, rslora=rslora,
        rank_pattern={"c_attn": 3 * r}, alpha_pattern={"c_attn": fused_alpha},
    )  # fmt: skip
    modules = _lora_modules(theirs)
    ours = dict(lora_layers(model))
    with torch.no_grad():
        for i in range(model.config.n_layer):
            q, k, v = (ours[f"blocks.{i}.attn.{p}"] for p in "qkv")
            fused = modules[f"transformer.h.{i}.attn.c_attn"]
            fused.lora_A["default"].weight.copy_(torch.cat([q.lora_a, k.lora_a, v.lora_a]))
            fused.lora_B["default"].weight.copy_(torch.block_diag(q.lora_b, k.lora_b, v.lora_b))
            for theirs_name, our_name in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
                m, layer = modules[f"transformer.h.{i}.{theirs_name}"], ours[f"blocks.{i}.{our_name}"]
                m.lora_A["default"].weight.copy_(layer.lora_a)
                m.lora_B["default"].weight.copy_(layer.lora_b)
    x = ids(6)
    assert max_diff(logits(model, x), _base_copy(model)(x)) > 1e-2
    assert max_diff(logits(model, x), theirs(x).logits) <= TOL


# --- with the rest of fine-tuning: an NF4 base (QLoRA) and a classifier head ------------------------
def test_lora_over_an_nf4_base_round_trips_and_merges_into_the_dense_base(tmp_path, capsys):
    from lmforge.finetune.nf4 import Linear4bit, quantize_model

    base_dir = save_pretrained(llama(), tmp_path / "base")
    model = load(base_dir)
    quantize_model(model)
    quantized = logits(model)
    cfg = LoRAConfig(r=4, alpha=8, targets=("all-linear",))
    apply_lora(model, cfg)
    layer = model.blocks[0].mlp.down
    assert type(layer).__name__ == "LoRALinear4bit" and isinstance(layer, Linear4bit) and layer.weight is None
    assert layer.lora_a.dtype == torch.float32 and not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    assert torch.equal(logits(model), quantized)
    perturb_adapters(model)
    adapted = logits(model)
    save_adapter(model, tmp_path / "adapter", base=base_dir, cfg=cfg, quantize="nf4")
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["quantize"] == "nf4"
    assert torch.equal(logits(load_adapted(tmp_path / "adapter")), adapted), "the recorded NF4 base is rebuilt exactly"

    dense = load_adapted(tmp_path / "adapter", dense_base=True)
    assert not any(isinstance(m, Linear4bit) for m in dense.modules())
    dense_adapted = logits(dense)
    assert run_cli("lora", "merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")) == 0
    assert "trained over an NF4 (4-bit) copy of the base; it was merged into the full-precision base" in capsys.readouterr().out
    assert max_diff(logits(load(tmp_path / "merged")), dense_adapted) <= TOL
    with pytest.warns(UserWarning, match="not the quantized one"):
        merge_lora(model)  # merging the 4-bit model itself: dequantized weights + adapter
    assert all(type(m) is nn.Linear for _, m in model.named_linears())
    assert max_diff(logits(model), adapted) <= TOL


def test_a_classifier_adapter_carries_its_head(tmp_path):
    base = llama()
    base_dir = save_pretrained(base, tmp_path / "base")
    labels = ["neg", "neutral", "pos"]
    model = GPT(base.config.replace(labels=labels))
    model.load_state_dict(base.state_dict(), strict=False)
    randomize(model.score, 3)
    cfg = LoRAConfig(r=4, targets=("q", "v"))
    report = apply_lora(model, cfg, trainable=["score"])
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) + 3 * model.config.n_embd
    perturb_adapters(model)
    x = ids(9)
    scores = model(x)
    save_adapter(model, tmp_path / "adapter", base=base_dir, cfg=cfg)
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["trainable"] == ["score.weight"]
    with pytest.raises(LmforgeError, match=r"labels=\['neg', 'neutral', 'pos'\] \(adapter\) vs \[\]"):
        load_adapter(load(base_dir), tmp_path / "adapter")
    again = load_adapted(tmp_path / "adapter")
    assert again.config.labels == labels and torch.equal(again(x), scores)
    assert run_cli("lora", "merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")) == 0
    merged = load(tmp_path / "merged")
    assert merged.config.labels == labels
    assert max_diff(merged(x), scores) <= TOL


def test_rank_above_the_layer_is_refused_naming_it():
    """Regression: r > min(in_features, out_features) was accepted without a word. B A has rank at most
    min(in, out), so such an r only adds parameters (and changes alpha / r): refused, not warned."""
    model = GPT(Config.from_name("nano", vocab_size=64, n_layer=1, context_length=16, n_embd=32, n_head=4, n_kv_head=2, mlp_hidden=48))
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    with pytest.raises(
        LmforgeError,
        match=r"LoRA rank r=17 is larger than the layer blocks.0.attn.k \(32 inputs, 16 outputs\), the narrowest of the 7 target "
        r"layers: its update B A can have rank at most 16, .*lower r \(--lora-r\) to at most 16",
    ):
        apply_lora(model, LoRAConfig(r=17, targets=("all-linear",)), trainable=["norm_f"])
    assert lora_layers(model) == []  # nothing changed: no layer converted, no parameter frozen
    assert all(p.requires_grad == before[n][0] and torch.equal(p, before[n][1]) for n, p in model.named_parameters())
    with pytest.raises(LmforgeError, match=r"r=33 is larger than the layer blocks.0.attn.q \(32 inputs, 32 outputs\): .*at most 32"):
        apply_lora(model, LoRAConfig(r=33, targets=("q",)))
    report = apply_lora(model, LoRAConfig(r=16, targets=("all-linear",)))  # r = the narrowest layer's size is fine
    assert len(report.layers) == 7 and all(m.r == 16 for _, m in lora_layers(model))

    with pytest.raises(LmforgeError, match=r"r=8 is larger than this layer \(4 inputs, 3 outputs\)"):
        LoRALinear(4, 3, r=8)
    linear = nn.Linear(2, 10)
    with pytest.raises(LmforgeError, match="r=4 is larger than this layer"):
        LoRALinear.from_linear(linear, LoRAConfig(r=4))
    assert type(linear) is nn.Linear and not hasattr(linear, "lora_a")
