"""Hugging Face interop against `transformers` itself: same logits, same greedy tokens, both ways.

Every model is small and randomly initialised with a fixed seed; every parameter
(norm gains and biases included) is randomised so that a transposed, swapped or
mis-split tensor cannot hide behind a default value of ones or zeros.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import shared
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmforge.config import Config
from lmforge.engine import Engine
from lmforge.engine.sampling import SamplingParams
from lmforge.errors import LmforgeError
from lmforge.interop.hf import config_from_hf, config_to_hf, export_hf, load_hf, save_hf
from lmforge.interop.hf_tokenizer import GPT4_PATTERN_ONIG, tokenizer_from_hf_json
from lmforge.loading import load  # the public entry point: ours, Hugging Face or llama2.c
from lmforge.model import GPT
from lmforge.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer

TOL = 1e-4
VOCAB = 300
PROMPT_LEN, NEW_TOKENS = 20, 32


def llama3_scaling(**changes: float) -> dict:
    """A fresh dict each time: transformers adds keys (rope_theta) to the one it is given."""
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64} | changes


# --- helpers ---------------------------------------------------------------------------
@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: gains around 1, everything else around 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.05
        is_gain = p.dim() == 1 and ("norm" in name or ".ln_" in name or "layernorm" in name) and name.endswith("weight")
        p.copy_(noise + 1.0 if is_gain else noise * 2)
    return model.eval()


def hf_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    kw = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=None, eos_token_id=None)
    return randomize(GPT2LMHeadModel(GPT2Config(**(kw | overrides))), seed)


def hf_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kw = dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
    )
    return randomize(LlamaForCausalLM(LlamaConfig(**(kw | overrides))), seed)


def random_ids(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_diff(ours: GPT, theirs: torch.nn.Module, ids: torch.Tensor) -> float:
    a, b = ours(ids), theirs(ids).logits
    assert a.shape == b.shape
    assert b.abs().max() > 0.1, "degenerate model: logits near zero would compare equal by accident"
    diff = float((a - b).abs().max())
    print(f"max |logits diff| = {diff:.2e}")
    return diff


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, ids: torch.Tensor) -> list[list[int]]:
    """transformers' own generate, with its KV cache; no eos so nothing stops or is suppressed early."""
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
    )
    return out[:, ids.size(1) :].tolist()


def our_greedy(model: GPT, ids: torch.Tensor) -> list[list[int]]:
    done = Engine(model).generate(ids.tolist(), max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0))
    return [c.ids for c in done]


def assert_same_model(ours: GPT, theirs: torch.nn.Module, seed: int = 1) -> None:
    ids = random_ids(seed, ours.config.vocab_size)
    assert logits_diff(ours, theirs, ids) <= TOL
    expected = hf_greedy(theirs, ids)
    assert all(len(row) == NEW_TOKENS for row in expected)
    assert our_greedy(ours, ids) == expected


def our_gpt2_config(**overrides) -> Config:
    return Config(**(dict(vocab_size=VOCAB, context_length=64, n_layer=2, n_head=4, n_embd=64) | overrides))


def our_llama_config(**overrides) -> Config:
    kw = dict(
        vocab_size=VOCAB, context_length=128, n_layer=2, n_head=8, n_kv_head=2, n_embd=64, mlp_hidden=96,
        norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_embeddings=False, norm_eps=1e-6,
    )  # fmt: skip
    return Config(**(kw | overrides))


def our_model(config: Config, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return randomize(GPT(config), seed)


# --- import: transformers -> lmforge ----------------------------------------------------------
GPT2_CASES = {
    "default": {},
    "n_inner": dict(n_inner=96),
    "gelu_exact": dict(activation_function="gelu"),
    "untied": dict(tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", GPT2_CASES)
def test_import_gpt2_matches_transformers(tmp_path: Path, case: str) -> None:
    theirs = hf_gpt2(**GPT2_CASES[case])
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours = load(tmp_path)
    assert not ours.training and ours.config.positions == "learned"
    assert ours.config.mlp_hidden == GPT2_CASES[case].get("n_inner", 4 * 64)
    assert_same_model(ours, theirs)


LLAMA_CASES = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "rope_theta": dict(rope_theta=500.0),
    "llama3_scaling_8": dict(num_attention_heads=4, num_key_value_heads=2, rope_scaling=llama3_scaling()),
    "llama3_scaling_32": dict(
        num_attention_heads=4,
        rope_theta=50000.0,
        rope_scaling=llama3_scaling(factor=32.0, high_freq_factor=8.0, original_max_position_embeddings=128),
    ),
    "head_dim_32": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "biases": dict(attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_import_llama_matches_transformers(tmp_path: Path, case: str) -> None:
    theirs = hf_llama(**LLAMA_CASES[case])
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours = load(tmp_path)
    c = theirs.config
    assert (ours.config.n_head, ours.config.n_kv_head, ours.config.head_dim) == (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert ours.config.tie_embeddings == c.tie_word_embeddings
    assert (ours.lm_head.weight is ours.tok_emb.weight) == c.tie_word_embeddings
    assert_same_model(ours, theirs)
    direct = load_hf(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), ours.state_dict().values(), strict=True))


def test_llama3_scaling_changes_the_logits(tmp_path: Path) -> None:
    """The scaling case would pass vacuously if its frequencies were left alone."""
    theirs = hf_llama(rope_scaling=llama3_scaling())
    theirs.save_pretrained(tmp_path)
    ours = load(tmp_path)
    unscaled = GPT(ours.config.replace(rope_scaling=None))
    unscaled.load_state_dict(ours.state_dict())
    ids = random_ids()
    with torch.no_grad():
        assert (unscaled.eval()(ids) - ours(ids)).abs().max() > 1e-3


def test_rope_config_spellings_agree() -> None:
    """transformers 5 writes rope_parameters; 4.x rope_theta + rope_scaling ("type" in older files)."""
    base = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    scaling = {k: v for k, v in llama3_scaling().items() if k != "rope_type"}
    new = config_from_hf(base | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}})
    old = config_from_hf(base | {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}})
    older = config_from_hf(base | {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}})
    assert new == old == older
    assert new.rope_theta == 500000.0
    assert new.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 64}
    written = LlamaConfig(**{k: v for k, v in base.items() if k != "model_type"}, rope_theta=1234.0).to_dict()
    assert config_from_hf(written).rope_theta == 1234.0  # whatever the installed version writes


def test_old_gpt2_checkpoint_without_prefix_and_with_buffers(tmp_path: Path) -> None:
    """Early GPT-2 files: keys without `transformer.`, plus the attn.bias / attn.masked_bias buffers."""
    theirs = hf_gpt2()
    theirs.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    for i in range(2):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(old, tmp_path / "model.safetensors")
    assert_same_model(load(tmp_path), theirs)


# --- export: lmforge -> transformers --------------------------------------------------------
EXPORT_CASES = {
    "gpt2": our_gpt2_config(),
    "gpt2_untied_gelu": our_gpt2_config(tie_embeddings=False, mlp="gelu", mlp_hidden=96),
    "llama_gqa": our_llama_config(),
    "llama_tied_scaled": our_llama_config(
        tie_embeddings=True,
        rope_theta=50000.0,
        rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 64},
    ),
    "llama_head_dim": our_llama_config(n_head=4, n_kv_head=1, head_dim=32),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_loads_in_transformers_and_round_trips(tmp_path: Path, case: str) -> None:
    config = EXPORT_CASES[case]
    ours = our_model(config)
    out = save_hf(ours, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    expected_class = GPT2LMHeadModel if config.positions == "learned" else LlamaForCausalLM
    assert type(theirs) is expected_class
    assert_same_model(ours, theirs)

    back = load(out)
    assert back.config.replace(name=config.name) == config
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_a_model_with_no_hf_equivalent(tmp_path: Path) -> None:
    mixed = our_gpt2_config(positions="rope")  # GPT-2 otherwise, but rotary positions
    with pytest.raises(LmforgeError, match=r"GPT2LMHeadModel it would need positions='learned'.*LlamaForCausalLM it would need norm='rmsnorm'"):
        config_to_hf(mixed)
    with pytest.raises(LmforgeError, match="no Hugging Face equivalent"):
        save_hf(GPT(mixed), tmp_path / "x")


def test_save_refuses_non_empty_folder_and_overwrite_replaces_old_weights(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    model = our_model(our_gpt2_config())
    save_hf(model, out, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    with pytest.raises(LmforgeError, match="not empty"):
        save_hf(model, out)
    other = our_model(our_gpt2_config(), seed=5)
    save_hf(other, out, overwrite=True)  # unsharded this time: the old shards and index must go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load(out).tok_emb.weight, other.tok_emb.weight)


# --- sharded folders --------------------------------------------------------------------------
def test_import_sharded_transformers_folder(tmp_path: Path) -> None:
    theirs = hf_llama(num_attention_heads=8, num_key_value_heads=2)
    theirs.save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=True)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and not (tmp_path / "model.safetensors").exists()
    assert_same_model(load(tmp_path), theirs)


def test_export_sharded_loads_in_transformers(tmp_path: Path) -> None:
    ours = our_model(our_llama_config())
    out = save_hf(ours, tmp_path / "hf", max_shard_bytes=20_000)
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (out / "model.safetensors").exists()
    assert_same_model(ours, AutoModelForCausalLM.from_pretrained(out).eval())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), load(out).state_dict().values()))


# --- tokenizer -------------------------------------------------------------------------------
TEXTS = [
    "Hello, world",
    "It's 2024: they'll pay $1,234,567.89 -- don't they?\n\n\tIndented   spaces   ",
    "Ünïcødé café 東京 🚀 naïve\r\nline two",
]


@pytest.fixture(scope="module")
def gpt2_hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face GPT-2 folder with the real vocabulary files beside a tiny model."""
    path = tmp_path_factory.mktemp("gpt2_tok")
    hf_gpt2(vocab_size=50257, n_layer=1, n_embd=32).save_pretrained(path)
    shutil.copy(shared("gpt2/encoder.json"), path / "vocab.json")
    shutil.copy(shared("gpt2/vocab.bpe"), path / "merges.txt")
    return path


def test_gpt2_vocab_and_merges_become_the_tokenizer(gpt2_hf_folder: Path, gpt2_tok: Tokenizer) -> None:
    model = load(gpt2_hf_folder)
    assert model.tokenizer is not None
    assert model.tokenizer.encode("Hello, world") == [15496, 11, 995]
    assert model.tokenizer.eot_id == 50256
    assert model.tokenizer.fingerprint == gpt2_tok.fingerprint
    done = Engine(model, model.tokenizer).generate(["Hello, world"], max_new_tokens=4, sampling=SamplingParams(temperature=0))
    assert done[0].text == model.tokenizer.decode(done[0].ids)


def test_gpt2_tokenizer_json_converts_exactly(tmp_path: Path) -> None:
    """tokenizer.json alone (as transformers writes it) gives the same ids as `tokenizers`."""
    from transformers import GPT2TokenizerFast

    shutil.copy(shared("gpt2/encoder.json"), tmp_path / "vocab.json")
    shutil.copy(shared("gpt2/vocab.bpe"), tmp_path / "merges.txt")
    hf_tok = GPT2TokenizerFast.from_pretrained(tmp_path)
    hf_tok.save_pretrained(tmp_path / "saved")
    d = json.loads((tmp_path / "saved" / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(d["model"]["vocab"]) == 50257
    ours = tokenizer_from_hf_json(d)
    assert ours.pattern == GPT2_PATTERN and ours.eot_id == 50256
    for text in TEXTS:
        assert ours.encode(text) == hf_tok.encode(text), text


LLAMA3_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def test_split_regex_tokenizer_json_converts_exactly(gpt2_tok: Tokenizer) -> None:
    """Llama 3's layout: Split(regex) then ByteLevel without its own regex; a BOS special."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    vocab = json.loads(shared("gpt2/encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in shared("gpt2/vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if line]
    vocab.pop("<|endoftext|>")
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|begin_of_text|>"])
    ours = tokenizer_from_hf_json(json.loads(tok.to_str()))
    assert ours.special_tokens == {"<|begin_of_text|>": 50256}
    assert LLAMA3_REGEX == GPT4_PATTERN_ONIG and ours.pattern == GPT4_PATTERN  # the same regex in tiktoken's spelling
    for text in TEXTS:
        assert ours.encode(text) == tok.encode(text).ids, text
    assert ours.encode(TEXTS[1]) != gpt2_tok.encode(TEXTS[1])  # the regex matters: digits go in threes


def test_unconvertible_tokenizer_json_leaves_none_with_a_warning(tmp_path: Path) -> None:
    hf_gpt2().save_pretrained(tmp_path)
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": None, "decoder": None}
    (tmp_path / "tokenizer.json").write_text(json.dumps(wordpiece))
    with pytest.warns(UserWarning, match="WordPiece"):
        model = load(tmp_path)
    assert model.tokenizer is None


def test_prefix_space_byte_level_is_not_converted() -> None:
    d = {
        "model": {"type": "BPE", "vocab": {}, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True},
        "decoder": {"type": "ByteLevel"},
    }
    with pytest.raises(LmforgeError, match="pre-tokenizer"):
        tokenizer_from_hf_json(d)


def small_tokenizer(gpt2_tok: Tokenizer, pattern: str) -> Tokenizer:
    """GPT-2's first 700 merges with <|endoftext|> right after them: a small vocabulary in GPT-2's alphabet."""
    merges = gpt2_tok.merges[:700]
    return Tokenizer(merges, {"<|endoftext|>": 256 + len(merges)}, pattern, gpt2_tok.byte_order)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2_pattern", "gpt4_pattern"])
def test_exported_tokenizer_loads_in_transformers(tmp_path: Path, gpt2_tok: Tokenizer, pattern: str) -> None:
    from transformers import AutoTokenizer

    tok = small_tokenizer(gpt2_tok, pattern)
    model = our_model(our_gpt2_config(vocab_size=tok.vocab_size))
    out = save_hf(model, tmp_path / "hf", tokenizer=tok)
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok.encode(text) == tok.encode(text), text
    assert hf_tok.convert_tokens_to_ids("<|endoftext|>") == tok.eot_id
    back = load(out)
    assert back.tokenizer is not None and back.tokenizer.fingerprint == tok.fingerprint
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eot_id



def test_export_lists_what_it_wrote_and_notes_what_it_could_not(tmp_path: Path, gpt2_tok: Tokenizer) -> None:
    """A pattern with no exact Hugging Face spelling: no tokenizer.json, and the export says
    so in its notes (save_hf: a warning) instead of claiming a file it did not write."""
    tok = Tokenizer(gpt2_tok.merges[:50], {"<|endoftext|>": 306}, r"\p{L}+|\p{N}{1,3}+|\s+|[^\s\p{L}\p{N}]+", gpt2_tok.byte_order)
    model = our_model(our_gpt2_config(vocab_size=tok.vocab_size))
    export = export_hf(model, tmp_path / "hf", tokenizer=tok)
    assert sorted(export.files) == sorted(p.name for p in export.path.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert len(export.notes) == 1 and "no exact Hugging Face spelling" in export.notes[0] and "no tokenizer.json" in export.notes[0]
    with pytest.warns(UserWarning, match="no exact Hugging Face spelling"):
        save_hf(model, tmp_path / "hf", tokenizer=tok, overwrite=True)
    assert export_hf(model, tmp_path / "hf", tokenizer=gpt2_tok, overwrite=True).notes == []


# --- errors ------------------------------------------------------------------------------------
def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(LmforgeError, match=r"model_type 'bert' is not supported.*gpt2.*llama"):
        load(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(model_type="gpt2", activation_function="relu"), "activation_function='relu'"),
        (dict(model_type="gpt2", scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(model_type="llama", hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(model_type="llama", attention_bias=True, mlp_bias=False), "one switch"),
        (dict(model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
        (dict(model_type="llama", hidden_size=None), "lacks 'hidden_size'"),
        (dict(model_type="llama", intermediate_size="missing"), "lacks 'intermediate_size'"),
        (dict(model_type="llama", num_hidden_layers=2.5), "num_hidden_layers must be a positive integer"),
    ],
)
def test_unsupported_options_are_named(change: dict, message: str) -> None:
    gpt2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    llama = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    hf = (gpt2 if change["model_type"] == "gpt2" else llama) | change
    hf = {k: v for k, v in hf.items() if v != "missing"}
    with pytest.raises(LmforgeError, match=message):
        config_from_hf(hf)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path: Path) -> None:
    hf_gpt2().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: reading this would raise UnpicklingError")
    for loader in (load, load_hf):
        with pytest.raises(LmforgeError, match=r"pytorch_model\.bin.*safetensors"):
            loader(tmp_path)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    hf_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LmforgeError, match=rf"{shard.name}.*missing"):
        load(tmp_path)


def test_wrong_shape_missing_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    hf_gpt2().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    good = load_file(file)

    def fails_with(sd: dict, message: str) -> None:
        save_file(sd, file)
        with pytest.raises(LmforgeError, match=message):
            load(tmp_path)

    bad = dict(good) | {"transformer.h.1.attn.c_attn.weight": good["transformer.h.1.attn.c_attn.weight"].t().contiguous()}
    fails_with(bad, r"transformer\.h\.1\.attn\.c_attn\.weight is \(192, 64\), expected \(64, 192\)")
    fails_with({k: v for k, v in good.items() if k != "transformer.ln_f.bias"}, r"missing 1 tensor\(s\): transformer\.ln_f\.bias")
    fails_with(good | {"transformer.h.2.ln_1.weight": torch.ones(64)}, r"unexpected tensor\(s\): transformer\.h\.2\.ln_1\.weight")


def test_truncated_weights_are_a_clear_error(tmp_path: Path) -> None:
    hf_gpt2().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(LmforgeError, match="truncated"):
        load(tmp_path)
