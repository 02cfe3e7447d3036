"""QLoRA's base built in 4 bits while it is read (`load_quantized`, `build_quantized`): the
same model as loading it dense and quantizing, from every source, and never more than
one dense layer held on the way."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import shared

from lmforge import LmforgeError
from lmforge.config import Config
from lmforge.finetune.adapter import save_adapter
from lmforge.finetune.lora import LoRAConfig, apply_lora
from lmforge.finetune.nf4 import Linear4bit, build_quantized, quantize_model, quantized_summary
from lmforge.interop.hf import load_hf, save_hf
from lmforge.loading import STREAMS, load, load_quantized
from lmforge.model import GPT
from lmforge.recipes.common import load_base
from lmforge.recipes.config import FinetuneConfig
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import save_checkpoint
from lmforge.weights import StoredTensor, save_pretrained, state_dict_for_saving

# GPT-2's family: tied embeddings, learned positions, biases, fused q/k/v in its HF files.
# Llama's: RoPE, GQA (2 KV heads of 4), SwiGLU, an untied head; 96 x 101 MLP weights end in a partial NF4 block.
FAMILIES = {
    "gpt2": {"preset": "gpt2", "n_layer": 2, "vocab_size": 300, "context_length": 64, "n_embd": 128, "n_head": 4},
    "llama": {"preset": "nano", "n_layer": 2, "vocab_size": 300, "context_length": 64, "n_embd": 96, "n_head": 4, "n_kv_head": 2,
              "mlp_hidden": 101, "tie_embeddings": False},
}  # fmt: skip
IDX = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def family_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    shape = dict(FAMILIES[family])
    return GPT(Config.from_name(shape.pop("preset"), **shape)).to(dtype).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the quick brown fox jumps over the lazy dog " * 40], 300, progress=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[tuple[str, str], Path]:
    """(family, source) -> the same random model saved as that source."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for family in FAMILIES:
        model = family_model(family)
        out[family, "ours"] = save_pretrained(model, root / family, tokenizer=tokenizer)
        out[family, "hf"] = save_hf(model, root / f"{family}-hf")
        out[family, "hf-sharded"] = save_hf(model, root / f"{family}-shards", max_shard_bytes=200_000)
        out[family, "run"] = root / f"{family}-run"
        save_checkpoint(out[family, "run"], 5, config=model.config, model_state=state_dict_for_saving(model), tokenizer=tokenizer)
        out[family, "bf16"] = save_pretrained(family_model(family, dtype=torch.bfloat16), root / f"{family}-bf16", tokenizer=tokenizer)
    return out


def dense_then_quantized(path: Path | str) -> GPT:
    """What QLoRA built before: the dense model, then quantized."""
    model = load(path)
    quantize_model(model)
    return model


def assert_same_model(streamed: GPT, reference: GPT) -> None:
    """Every parameter and buffer (NF4 codes, absmax, double-quantization state, metadata) bit for bit, and the logits."""
    got, want = streamed.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name
    assert dict(streamed.named_buffers()).keys() == dict(reference.named_buffers()).keys()  # inv_freq (not saved) too
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(streamed.named_buffers())[name], buffer), name
    quantized = [m for m in streamed.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == len([m for m in reference.modules() if isinstance(m, Linear4bit)]) > 0
    assert [p.requires_grad for p in streamed.parameters()] == [p.requires_grad for p in reference.parameters()]
    with torch.no_grad():
        assert torch.equal(streamed(IDX), reference(IDX))


@pytest.mark.parametrize("source", ["ours", "hf", "hf-sharded", "run", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_equals_dense_then_quantized(folders, family, source):
    path = folders[family, source]
    streamed = load_quantized(path)
    assert_same_model(streamed, dense_then_quantized(path))
    assert not streamed.training
    assert quantized_summary(streamed) == quantize_model(load(path))  # what set_trainable reports
    want = torch.bfloat16 if source == "bf16" else torch.float32
    assert streamed.tok_emb.weight.dtype == want and {m.weight_dtype for m in streamed.modules() if isinstance(m, Linear4bit)} == {want}
    if source != "hf" and source != "hf-sharded":  # ours carries our tokenizer (the HF export writes its own files)
        assert streamed.tokenizer is not None and streamed.tokenizer.encode("the fox") == load(path).tokenizer.encode("the fox")


def test_llama2c_file_streams_too():
    path = shared("weights/stories260K/stories260K.bin")
    streamed = load_quantized(path)
    assert_same_model(streamed, dense_then_quantized(path))


def test_skip_block_size_and_dtype_follow_quantize_model(folders):
    path = folders["llama", "hf"]
    streamed = load_quantized(path, skip={"down", "blocks.0.attn.q"}, block_size=32, double_quant=False, dtype=torch.bfloat16)
    reference = load_hf(path, dtype=torch.bfloat16)
    summary = quantize_model(reference, skip={"down", "blocks.0.attn.q"}, block_size=32, double_quant=False)
    assert_same_model(streamed, reference)
    assert quantized_summary(streamed) == summary and type(streamed.blocks[0].attn.q) is torch.nn.Linear


def test_adapter_over_an_nf4_base_loads_the_same(folders, tmp_path):
    """A QLoRA adapter's base is built streamed by `load_adapted`; a classifier's head comes back on it."""
    base = folders["gpt2", "ours"]
    for labels in (None, ["ham", "spam"]):
        model = dense_then_quantized(base)
        if labels:
            model = GPT(model.config.replace(labels=labels))  # a classifier: load_adapted rebuilds its head
            model.load_state_dict(load(base).state_dict(), strict=False)
            quantize_model(model)
        apply_lora(model, LoRAConfig(r=4, targets=("all-linear",)), trainable=["score"] if labels else ())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.normal_()
        adapter = save_adapter(model, tmp_path / f"adapter-{bool(labels)}", base, LoRAConfig(r=4, targets=("all-linear",)),
                               quantize="nf4")
        loaded = load(adapter)
        assert any(isinstance(m, Linear4bit) for m in loaded.modules())
        with torch.no_grad():
            model.eval()
            want = model.classify(IDX) if labels else model(IDX)
            got = loaded.classify(IDX) if labels else loaded(IDX)
        assert torch.equal(got, want)


def test_an_adapter_folder_is_refused(folders, tmp_path):
    model = load(folders["llama", "ours"])
    apply_lora(model, LoRAConfig(r=2))
    adapter = save_adapter(model, tmp_path / "adapter", folders["llama", "ours"], LoRAConfig(r=2))
    with pytest.raises(LmforgeError, match="LoRA adapter folder.*merge_lora it first"):
        load_quantized(adapter)


# --- the fine-tuning recipes' base -------------------------------------------------------------
@pytest.mark.parametrize("labels", [None, ["ham", "spam"]])
@pytest.mark.parametrize("family, source", [("gpt2", "ours"), ("gpt2", "bf16"), ("llama", "run")])
def test_recipe_base_is_the_dense_path_quantized(folders, family, source, labels):
    """load_base with --quantize nf4 gives what the dense path gave once set_trainable quantized it:
    with a fresh classification head (drawn as GPT(config) draws it) and the RNG left in the same state."""
    cfg = FinetuneConfig(base=str(folders[family, source]), quantize="nf4", lora_r=4, seed=3, epochs=1)
    torch.manual_seed(123)
    streamed = load_base(cfg, labels)
    rng_streamed = torch.get_rng_state()
    torch.manual_seed(123)
    reference = load_base(dataclasses.replace(cfg, quantize=""), labels)
    quantize_model(reference)
    assert torch.equal(rng_streamed, torch.get_rng_state())  # LoRA's A matrices are drawn next
    assert streamed.training == reference.training
    assert_same_model(streamed, reference)
    if labels:
        with torch.no_grad():
            assert torch.equal(streamed.classify(IDX), reference.classify(IDX))


# --- one dense layer at a time -------------------------------------------------------------------
class Holdings:
    """Which tensors a load has read and given out that are still alive, at each step of it (weak references only)."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.at_read: list[dict[int, int]] = []  # alive storages (address: bytes) as each tensor is about to be read
        self.at_pull: list[dict[int, int]] = []  # ... as the builder asks for the next tensor

    def alive(self) -> dict[int, int]:
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for r in self.refs if (t := r()) is not None}

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        self.refs.append(weakref.ref(tensor))
        return tensor

    def watch(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        while True:
            self.at_pull.append(self.alive())
            item = next(tensors, None)
            if item is None:
                return
            self.track(item[1])
            yield item
            del item

    @staticmethod
    def transient(snapshots: list[dict[int, int]], model: GPT) -> list[int]:
        """Bytes alive at each snapshot that the finished model does not keep: dense block weights."""
        kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        return [sum(n for ptr, n in snapshot.items() if ptr not in kept) for snapshot in snapshots]


@pytest.mark.parametrize("family, source", [("gpt2", "ours"), ("gpt2", "hf"), ("llama", "ours"), ("llama", "hf"), ("llama", "llama2c")])
def test_never_more_than_one_dense_layer(folders, family, source, monkeypatch):
    """When a tensor is read, no dense block weight read before it is alive; while the builder takes the
    pieces of one (GPT-2's fused q, k, v), that one tensor alone is. The dense model never exists."""
    path = shared("weights/stories260K/stories260K.bin") if source == "llama2c" else folders[family, source]
    holdings = Holdings()
    read = StoredTensor.read
    monkeypatch.setattr(StoredTensor, "read", lambda self: (holdings.at_read.append(holdings.alive()), holdings.track(read(self)))[1])
    stream = STREAMS[source](path)
    stream.tensors = holdings.watch(stream.tensors)
    model = build_quantized(stream)
    assert_same_model(model, dense_then_quantized(path))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    dense_bytes = [m.in_features * m.out_features * m.weight_dtype.itemsize for m in layers]
    assert len(holdings.at_pull) > len(layers)
    one = 3 * max(dense_bytes) if (family, source) == ("gpt2", "hf") else max(dense_bytes)  # GPT-2's c_attn: q, k, v in one
    assert max(Holdings.transient(holdings.at_pull, model)) <= one
    if source != "llama2c":
        assert len(holdings.at_read) > len(layers) and max(Holdings.transient(holdings.at_read, model)) == 0
    assert Holdings.transient([holdings.alive()], model) == [0]  # and none of them outlives the load
