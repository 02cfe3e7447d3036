"""OpenAI's original GPT-2 layout: real names and shapes, synthetic values, checked against transformers.

The reference model here is built by hand from the same arrays (HF Conv1D weight =
w[0]), independently of the renaming under test.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared
from safetensors.numpy import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from lmforge.errors import LmforgeError
from lmforge.interop.openai_gpt2 import expected_shapes, from_openai_tensors, load_openai_gpt2

HPARAMS = {"n_vocab": 300, "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2}


def synthetic(hparams: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays under the release's names: gains around 1, the rest around 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(hparams).items():
        x = rng.normal(0.0, 0.05, shape).astype(np.float32)
        out[name] = x + 1.0 if name.endswith("/g") else x * 2
    return out


def reference(arrays: dict[str, np.ndarray], h: dict) -> GPT2LMHeadModel:
    """transformers' GPT-2 with the same weights, named by hand."""
    config = GPT2Config(
        vocab_size=h["n_vocab"], n_positions=h["n_ctx"], n_embd=h["n_embd"], n_head=h["n_head"], n_layer=h["n_layer"],
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    sd = {"transformer.wte.weight": t["model/wte"], "transformer.wpe.weight": t["model/wpe"]}
    sd |= {"transformer.ln_f.weight": t["model/ln_f/g"], "transformer.ln_f.bias": t["model/ln_f/b"]}
    for i in range(h["n_layer"]):
        o, p = f"model/h{i}", f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            sd |= {f"{p}.{ln}.weight": t[f"{o}/{ln}/g"], f"{p}.{ln}.bias": t[f"{o}/{ln}/b"]}
        for conv in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            name = conv.replace("/", ".")
            sd |= {f"{p}.{name}.weight": t[f"{o}/{conv}/w"][0], f"{p}.{name}.bias": t[f"{o}/{conv}/b"]}
    model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # the head is tied to wte
    return model.eval()


def assert_matches_reference(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> float:
    ids = torch.randint(0, HPARAMS["n_vocab"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(arrays, HPARAMS)(ids).logits
        diff = float((model(ids) - want).abs().max())
    assert want.abs().max() > 0.1
    print(f"max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4
    return diff


# --- names and shapes ------------------------------------------------------------------------
def test_expected_shapes_of_the_124M_release() -> None:
    hparams = json.loads(shared("gpt2/hparams_124M.json").read_text())
    shapes = expected_shapes(hparams)
    assert shapes["model/wte"] == (50257, 768)
    assert shapes["model/wpe"] == (1024, 768)
    assert shapes["model/h0/attn/c_attn/w"] == (1, 768, 2304)
    assert shapes["model/h0/attn/c_attn/b"] == (2304,)
    assert shapes["model/h11/attn/c_proj/w"] == (1, 768, 768)
    assert shapes["model/h5/mlp/c_fc/w"] == (1, 768, 3072)
    assert shapes["model/h5/mlp/c_proj/w"] == (1, 3072, 768)
    assert shapes["model/h0/ln_1/g"] == shapes["model/ln_f/b"] == (768,)
    assert "model/h12/ln_1/g" not in shapes
    assert len(shapes) == 2 + 12 * 12 + 2
    assert sum(math.prod(s) for s in shapes.values()) == 124_439_808  # GPT-2 small, head tied


def test_hparams_must_be_complete() -> None:
    with pytest.raises(LmforgeError, match=r"lacks \['n_head'\]"):
        expected_shapes({k: v for k, v in HPARAMS.items() if k != "n_head"})


# --- values ----------------------------------------------------------------------------------
def test_from_openai_tensors_matches_transformers() -> None:
    arrays = synthetic(HPARAMS)
    model = from_openai_tensors(arrays, HPARAMS)
    assert not model.training and model.lm_head.weight is model.tok_emb.weight
    assert_matches_reference(model, arrays)
    torch_arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}  # torch tensors are accepted too
    assert_matches_reference(from_openai_tensors(torch_arrays, HPARAMS), arrays)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_load_openai_gpt2_folder(tmp_path: Path, fmt: str) -> None:
    arrays = synthetic(HPARAMS, seed=3)
    (tmp_path / "hparams.json").write_text(json.dumps(HPARAMS))
    if fmt == "npz":
        np.savez(tmp_path / "model.npz", **arrays)
    else:
        save_file(arrays, tmp_path / "model.safetensors")
    shutil.copy(shared("gpt2/encoder.json"), tmp_path / "encoder.json")
    shutil.copy(shared("gpt2/vocab.bpe"), tmp_path / "vocab.bpe")
    model = load_openai_gpt2(tmp_path)
    assert_matches_reference(model, arrays)
    assert model.tokenizer is not None and model.tokenizer.encode("Hello, world") == [15496, 11, 995]


# --- errors -----------------------------------------------------------------------------------
def test_missing_and_misshapen_tensors_are_named() -> None:
    arrays = synthetic(HPARAMS)
    missing = {k: v for k, v in arrays.items() if k != "model/h1/mlp/c_fc/b"}
    with pytest.raises(LmforgeError, match=r"missing 1 tensor\(s\): model/h1/mlp/c_fc/b"):
        from_openai_tensors(missing, HPARAMS)
    wrong = arrays | {"model/h0/attn/c_attn/w": arrays["model/h0/attn/c_attn/w"][0]}  # without the leading 1
    with pytest.raises(LmforgeError, match=r"model/h0/attn/c_attn/w is \(64, 192\), expected \(1, 64, 192\)"):
        from_openai_tensors(wrong, HPARAMS)
    extra = arrays | {"model/h2/ln_1/g": np.ones(64, np.float32)}  # a layer hparams do not have
    with pytest.raises(LmforgeError, match=r"unexpected tensor\(s\): model/h2/ln_1/g"):
        from_openai_tensors(extra, HPARAMS)


def test_tensorflow_checkpoint_without_tensorflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError, installed or not
    (tmp_path / "hparams.json").write_text(json.dumps(HPARAMS))
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    (tmp_path / "model.ckpt.index").write_bytes(b"")
    with pytest.raises(LmforgeError, match=r"pip install tensorflow.*\.npz or \.safetensors"):
        load_openai_gpt2(tmp_path)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="hparams.json"):
        load_openai_gpt2(tmp_path)
    (tmp_path / "hparams.json").write_text(json.dumps(HPARAMS))
    with pytest.raises(LmforgeError, match=r"no model\.ckpt"):
        load_openai_gpt2(tmp_path)
    np.savez(tmp_path / "a.npz", x=np.zeros(1))
    np.savez(tmp_path / "b.npz", x=np.zeros(1))
    with pytest.raises(LmforgeError, match="several weight files"):
        load_openai_gpt2(tmp_path)
