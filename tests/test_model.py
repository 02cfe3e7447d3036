"""The model: config validation, attention paths agreeing, presets, checkpointing."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import LmforgeError
from lmforge.config import PRESETS, Config
from lmforge.engine import KVCache
from lmforge.model import GPT


def tiny(preset: str = "nano", **overrides) -> Config:
    return Config.from_name(preset, **{"n_layer": 2, "vocab_size": 300, "context_length": 64, **overrides})


def test_invalid_configs_say_how_to_fix():
    with pytest.raises(LmforgeError, match=r"n_head=6 is not divisible by n_kv_head=4.*among \[1, 2, 3, 6\]"):
        Config(n_head=6, n_kv_head=4, n_embd=384)
    with pytest.raises(LmforgeError, match="n_embd=100 is not divisible by n_head=12"):
        Config(n_embd=100, n_head=12)
    with pytest.raises(LmforgeError, match="norm='batchnorm' is not one of"):
        Config(norm="batchnorm")
    with pytest.raises(LmforgeError, match="head_dim=7 must be even"):
        Config(positions="rope", n_embd=28, n_head=4)
    with pytest.raises(LmforgeError, match="unknown preset 'gpt5'"):
        Config.from_name("gpt5")
    with pytest.raises(LmforgeError, match="unknown config field"):
        Config.from_dict({"n_layers": 3})


def test_replace_derives_sizes_again():
    c = Config.from_name("gpt2").replace(n_embd=96, n_head=4)
    assert (c.n_kv_head, c.head_dim, c.mlp_hidden) == (4, 24, 384)
    c = Config.from_name("nano").replace(n_head=8)  # an explicit kv-head count stays
    assert (c.n_kv_head, c.head_dim, c.mlp_hidden) == (2, 16, 256)


def test_config_json_round_trip(tmp_path):
    for name in PRESETS:
        c = Config.from_name(name)
        c.save(tmp_path)
        assert Config.load(tmp_path) == c
        assert json.loads((tmp_path / "config.json").read_text())["name"] == name


def test_preset_sizes():
    def count(name):
        with torch.device("meta"):
            return GPT(Config.from_name(name)).num_params()

    assert count("gpt2") == 124_439_808  # GPT-2 small, tied head
    assert 0.9e6 < count("nano") < 1.3e6
    assert 9e6 < count("micro") < 12e6
    assert 1.2e9 < count("llama-3.2-1b") < 1.3e9  # 1.24B with the tied head


@pytest.mark.parametrize(
    "overrides",
    [
        dict(preset="nano"),  # GQA 4 heads / 2 kv
        dict(preset="nano", n_kv_head=1),  # MQA
        dict(preset="nano", n_kv_head=4),  # MHA
        dict(preset="small", n_layer=2, n_embd=96, n_head=4),  # GPT-2 family
    ],
)
def test_reference_and_fused_attention_agree(overrides):
    torch.manual_seed(0)
    cfg = tiny(**overrides)
    fused = GPT(cfg).eval()
    ref = GPT(cfg.replace(attention="reference")).eval()
    ref.load_state_dict(fused.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    assert (fused(ids) - ref(ids)).abs().max() <= 1e-5
    # and through a KV cache with left padding (explicit boolean masks)
    pad = torch.tensor([0, 5])
    outs = []
    for model in (fused, ref):
        cache = KVCache(cfg, pad, 40, torch.float32)
        h1 = model.hidden_states(ids[:, :20], pos=cache.positions(20), visible=cache.visible(20), cache=cache)
        h2 = model.hidden_states(ids[:, 20:23], pos=cache.positions(3), visible=cache.visible(3), cache=cache)
        outs.append(torch.cat([h1, h2], dim=1))
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


def test_fused_path_does_not_repeat_kv_heads():
    # GQA goes to SDPA as (B, nkv, S, hd): no repeated copy of the keys and values
    cfg = tiny(n_kv_head=1)
    model = GPT(cfg).eval()
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1], kw.get("enable_gqa")))
        return real(q, k, v, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        model(torch.randint(0, cfg.vocab_size, (1, 8)))
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert seen and all(s == (cfg.n_head, 1, True) for s in seen)


def test_too_long_input_is_a_clear_error():
    cfg = tiny(context_length=16)
    with pytest.raises(LmforgeError, match="longer than the model's context_length 16"):
        GPT(cfg)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("preset", ["nano", "small"])
def test_gradient_checkpointing_gives_the_same_gradients(preset):
    torch.manual_seed(0)
    cfg = tiny(preset, n_embd=64, n_head=4) if preset == "small" else tiny(preset)
    model = GPT(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))

    def grads():
        model.zero_grad()
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))


def test_tied_head_shares_storage_and_untied_does_not():
    m = GPT(tiny(tie_embeddings=True))
    assert m.lm_head.weight is m.tok_emb.weight
    m = GPT(tiny(tie_embeddings=False))
    assert m.lm_head.weight is not m.tok_emb.weight
