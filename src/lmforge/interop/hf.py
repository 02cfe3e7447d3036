"""Hugging Face folders <-> lmforge models: the one place the Hugging Face names live.

Two architectures map onto our one decoder: `GPT2LMHeadModel` (model_type "gpt2") and
`LlamaForCausalLM` (model_type "llama"). Everything here is a renaming plus two
layout changes, so imported weights give `transformers`' logits:

- GPT-2 stores its linear layers as Conv1D, weight (in, out), where nn.Linear is
  (out, in): transpose; and it fuses q, k, v into one `attn.c_attn`: split / concatenate.
- Llama's keys are a plain rename; RoPE already uses the same "rotate half" layout.

Weights are read only from safetensors (a pickle can run code when loaded). The
tokenizer is converted when that can be done exactly (GPT-2's vocab.json +
merges.txt, or a byte-level BPE tokenizer.json); `tokenizers` is never needed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.io import atomic_file, atomic_write_text
from lmforge.model import GPT
from lmforge.pretrained import check_tensors, meta_state_dict, model_from_state_dict
from lmforge.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, from_gpt2_files
from lmforge.tokenizer.bytes_unicode import bytes_to_printable, printable_to_bytes

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture we read and write."""

    model_type: str
    architecture: str
    prefix: str  # the backbone's key prefix ("transformer." / "model."), absent in base-model files
    ignored: re.Pattern[str]  # buffers old checkpoints carry that hold no weights


GPT2 = Family("gpt2", "GPT2LMHeadModel", "transformer.", re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"))
LLAMA = Family("llama", "LlamaForCausalLM", "model.", re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"))
FAMILIES = {f.model_type: f for f in (GPT2, LLAMA)}

# GPT-2's activation_function names -> our mlp
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


# --- config ----------------------------------------------------------------------------
def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """A `transformers` config.json (as a dict) -> our Config; anything we would compute differently is refused."""
    family = _family_of_hf(hf_config)
    return _gpt2_config(hf_config) if family is GPT2 else _llama_config(hf_config)


def _family_of_hf(hf: Mapping[str, Any]) -> Family:
    model_type = hf.get("model_type")
    if model_type is None:
        arch = (hf.get("architectures") or [""])[0]
        model_type = next((f.model_type for f in FAMILIES.values() if f.architecture == arch), arch or None)
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())
        raise LmforgeError(f"Hugging Face model_type {model_type!r} is not supported; lmforge reads {supported}")
    return FAMILIES[model_type]


def _size(hf: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of `keys` set (not null) in config.json, as a positive integer; `default` if none is."""
    value = next((hf[k] for k in keys if hf.get(k) is not None), default)
    if value is None:
        raise LmforgeError(f"config.json lacks {keys[0]!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LmforgeError(f"config.json: {keys[0]} must be a positive integer, got {value!r}")
    return value


def _refuse(family: Family, checks: list[tuple[bool, str]]) -> None:
    """Raise naming every option (of those checked) that is set to something we do not compute."""
    problems = [message for bad, message in checks if bad]
    if problems:
        raise LmforgeError(f"this {family.architecture} config uses what lmforge does not implement: {'; '.join(problems)}")


def _gpt2_config(hf: Mapping[str, Any]) -> Config:
    activation = hf.get("activation_function", "gelu_new")
    _refuse(
        GPT2,
        [
            (activation not in GPT2_ACTIVATIONS, f"activation_function={activation!r} (supported: {', '.join(GPT2_ACTIVATIONS)})"),
            (not hf.get("scale_attn_weights", True), "scale_attn_weights=false"),
            (bool(hf.get("scale_attn_by_inverse_layer_idx")), "scale_attn_by_inverse_layer_idx=true"),
            (bool(hf.get("add_cross_attention")), "add_cross_attention=true"),
        ],
    )
    n_embd = _size(hf, "n_embd")
    return Config(
        name="hf-gpt2",
        vocab_size=_size(hf, "vocab_size"),
        context_length=_size(hf, "n_positions", "n_ctx"),
        n_layer=_size(hf, "n_layer"),
        n_head=_size(hf, "n_head"),
        n_embd=n_embd,
        mlp=GPT2_ACTIVATIONS[activation],
        mlp_hidden=_size(hf, "n_inner", default=4 * n_embd),  # null: 4 * n_embd
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        positions="learned",
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _llama_config(hf: Mapping[str, Any]) -> Config:
    act = hf.get("hidden_act", "silu")
    attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    _refuse(
        LLAMA,
        [
            (act != "silu", f"hidden_act={act!r} (SwiGLU needs silu)"),
            (
                attention_bias != mlp_bias,
                f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (lmforge's `bias` is one switch for every linear layer)",
            ),
        ],
    )
    rope_theta, rope_scaling = _rope_from_hf(hf)
    n_embd, n_head = _size(hf, "hidden_size"), _size(hf, "num_attention_heads")
    return Config(
        name="hf-llama",
        vocab_size=_size(hf, "vocab_size"),
        context_length=_size(hf, "max_position_embeddings", default=2048),
        n_layer=_size(hf, "num_hidden_layers"),
        n_head=n_head,
        n_kv_head=_size(hf, "num_key_value_heads", default=n_head),
        n_embd=n_embd,
        head_dim=_size(hf, "head_dim", default=n_embd // n_head),
        mlp="swiglu",
        mlp_hidden=_size(hf, "intermediate_size"),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        positions="rope",
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        bias=attention_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, our rope_scaling) from either spelling.

    transformers < 5 writes top-level `rope_theta` and `rope_scaling` ({"rope_type" or
    "type", "factor", ...}); 5.x writes one `rope_parameters` dict holding rope_theta too.
    """
    params = dict(hf.get("rope_parameters") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise LmforgeError(f"per-layer-type rope_parameters ({', '.join(params)}) are not supported; lmforge has one RoPE for all layers")
    params = {**(hf.get("rope_scaling") or {}), **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise LmforgeError(f"rope_type {rope_type!r} is not supported; lmforge implements the default RoPE and 'llama3' scaling")
    try:
        return theta, {
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_context_length": int(params["original_max_position_embeddings"]),
        }
    except KeyError as e:
        raise LmforgeError(f"llama3 rope scaling is missing {e.args[0]!r} in config.json") from None


def family_of(config: Config) -> Family:
    """The Hugging Face architecture that computes exactly what `config` does; else say what stands in the way."""
    mismatches = {family: _mismatches(config, family) for family in FAMILIES.values()}
    for family, problems in mismatches.items():
        if not problems:
            return family
    detail = "; ".join(f"as {f.architecture} it would need {', '.join(p)}" for f, p in mismatches.items())
    raise LmforgeError(f"this model has no Hugging Face equivalent: {detail}")


def _mismatches(config: Config, family: Family) -> list[str]:
    if config.labels:
        return [f"a classification head (labels {config.labels}); export the base model or a merged language model"]
    if family is GPT2:
        wanted = (
            ("norm", "layernorm"),
            ("positions", "learned"),
            ("bias", True),
            ("n_kv_head", config.n_head),
            ("head_dim", config.n_embd // config.n_head),
        )
        problems = [f"{name}={value!r} (has {getattr(config, name)!r})" for name, value in wanted if getattr(config, name) != value]
        if config.mlp not in ("gelu_tanh", "gelu"):
            problems.append(f"mlp='gelu_tanh' or 'gelu' (has {config.mlp!r})")
        return problems
    wanted = (("norm", "rmsnorm"), ("mlp", "swiglu"), ("positions", "rope"))
    return [f"{name}={value!r} (has {getattr(config, name)!r})" for name, value in wanted if getattr(config, name) != value]


def config_to_hf(config: Config) -> dict[str, Any]:
    """Our Config -> a config.json dict that `transformers` loads into GPT2LMHeadModel or LlamaForCausalLM."""
    family = family_of(config)
    common = {"architectures": [family.architecture], "model_type": family.model_type, "vocab_size": config.vocab_size}
    common |= {"tie_word_embeddings": config.tie_embeddings, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if family is GPT2:
        return common | {
            "n_positions": config.context_length,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.mlp_hidden,
            "activation_function": "gelu_new" if config.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
        }
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope_parameters |= {
            "rope_type": "llama3",
            "factor": s["factor"],
            "low_freq_factor": s["low_freq_factor"],
            "high_freq_factor": s["high_freq_factor"],
            "original_max_position_embeddings": int(s["original_context_length"]),
        }
    return common | {
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
        # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta + rope_scaling
        "rope_parameters": rope_parameters,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else {k: v for k, v in rope_parameters.items() if k != "rope_theta"},
    }


# --- state dict --------------------------------------------------------------------------
# (our modules, the Hugging Face module, stored as Conv1D (in, out)). Several of ours for one
# of theirs are concatenated along the output dimension (GPT-2's fused q, k, v).
ModuleMap = list[tuple[tuple[str, ...], str, bool]]


def module_map(config: Config) -> ModuleMap:
    """Every weight-holding module of ours and its Hugging Face counterpart."""
    family = family_of(config)
    if family is GPT2:
        m: ModuleMap = [(("tok_emb",), "transformer.wte", False), (("pos_emb",), "transformer.wpe", False)]
        for i in range(config.n_layer):
            b, h = f"blocks.{i}", f"transformer.h.{i}"
            m += [
                ((f"{b}.norm1",), f"{h}.ln_1", False),
                ((f"{b}.attn.q", f"{b}.attn.k", f"{b}.attn.v"), f"{h}.attn.c_attn", True),
                ((f"{b}.attn.o",), f"{h}.attn.c_proj", True),
                ((f"{b}.norm2",), f"{h}.ln_2", False),
                ((f"{b}.mlp.fc",), f"{h}.mlp.c_fc", True),
                ((f"{b}.mlp.proj",), f"{h}.mlp.c_proj", True),
            ]
        m.append((("norm_f",), "transformer.ln_f", False))
    else:
        m = [(("tok_emb",), "model.embed_tokens", False)]
        for i in range(config.n_layer):
            b, h = f"blocks.{i}", f"model.layers.{i}"
            m += [((f"{b}.norm1",), f"{h}.input_layernorm", False), ((f"{b}.norm2",), f"{h}.post_attention_layernorm", False)]
            m += [((f"{b}.attn.{p}",), f"{h}.self_attn.{p}_proj", False) for p in "qkvo"]
            m += [((f"{b}.mlp.{p}",), f"{h}.mlp.{p}_proj", False) for p in ("gate", "up", "down")]
        m.append((("norm_f",), "model.norm", False))
    if not config.tie_embeddings:  # a tied head is the embedding: stored once
        m.append((("lm_head",), "lm_head", False))
    return m


def state_dict_to_hf(state_dict: Mapping[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face names and layouts (contiguous; a tied head left out)."""
    out, used = {}, set()
    for ours, theirs, conv1d in module_map(config):
        for suffix in ("weight", "bias"):
            names = [f"{m}.{suffix}" for m in ours if f"{m}.{suffix}" in state_dict]
            if not names:
                continue
            t = torch.cat([state_dict[n] for n in names]) if len(names) > 1 else state_dict[names[0]]
            out[f"{theirs}.{suffix}"] = (t.t() if conv1d and suffix == "weight" else t).contiguous()
            used.update(names)
    left = set(state_dict) - used - ({"lm_head.weight"} if config.tie_embeddings else set())
    if left:
        raise LmforgeError(f"no Hugging Face name for {sorted(left)[:5]}: the model has weights the export map does not know")
    return out


def state_dict_from_hf(
    hf_state_dict: Mapping[str, torch.Tensor], config: Config, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts -> our state dict, after checking every name and shape."""
    hf = _normalized(hf_state_dict, config)
    check_tensors(hf, expected_hf_shapes(config), source)
    ours = _our_shapes(config)
    out = {}
    for mine, theirs, conv1d in module_map(config):
        for suffix in ("weight", "bias"):
            key = f"{theirs}.{suffix}"
            if key not in hf:
                continue
            t = hf[key].t() if conv1d and suffix == "weight" else hf[key]
            sizes = [ours[f"{m}.{suffix}"][0] for m in mine]
            for m, piece in zip(mine, t.split(sizes), strict=True):
                out[f"{m}.{suffix}"] = piece.contiguous()
    return out


def _normalized(hf_state_dict: Mapping[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Add the backbone prefix base-model files lack; drop buffers and a tied head's copy."""
    family = family_of(config)
    out = {}
    for key, t in hf_state_dict.items():
        if not key.startswith((family.prefix, "lm_head.")):
            key = family.prefix + key
        if family.ignored.fullmatch(key) or (config.tie_embeddings and key == "lm_head.weight"):
            continue
        out[key] = t
    return out


def _our_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in meta_state_dict(config).items()}


def expected_hf_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """The Hugging Face names and shapes a checkpoint for `config` must hold: our export of an empty model."""
    return {k: tuple(v.shape) for k, v in state_dict_to_hf(meta_state_dict(config), config).items()}


# --- loading -----------------------------------------------------------------------------
def load_hf(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """A Hugging Face folder -> our GPT in eval mode, `.tokenizer` set when it converts exactly (else None).

    `dtype` None keeps the checkpoint's (its embedding's) dtype.
    """
    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"{path} is not a folder; a Hugging Face model is a folder with {CONFIG} and {WEIGHTS}")
    hf_config = read_json(path / CONFIG)
    model = from_hf_state_dict(hf_config, read_hf_weights(path), device=device, dtype=dtype, source=str(path))
    model.tokenizer = load_hf_tokenizer(path)
    return model


def from_hf_state_dict(
    hf_config: Mapping[str, Any],
    hf_state_dict: Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "the checkpoint",
) -> GPT:
    """Build our GPT (eval mode) from a Hugging Face config dict and state dict."""
    config = config_from_hf(hf_config)
    sd = state_dict_from_hf(hf_state_dict, config, source)
    return model_from_state_dict(config, sd, device=device, dtype=dtype, source=source)


def read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"no {file.name} in {file.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{file} is truncated or not JSON ({e})") from None


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards its index names; never a pickle."""
    if (path / WEIGHTS).is_file():
        return _read_safetensors(path / WEIGHTS)
    if (path / INDEX).is_file():
        return _read_shards(path)
    pickles = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
    if pickles:
        raise LmforgeError(
            f"{path} has only pickled PyTorch weights ({', '.join(pickles[:3])}); lmforge loads safetensors only, "
            "because unpickling can run arbitrary code. Convert them once, in a place you trust: "
            "transformers.AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise LmforgeError(f"{path} has neither {WEIGHTS} nor {INDEX}")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{file} is not a readable safetensors file ({e}); it may be truncated: download it again") from None


def _read_shards(path: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json(path / INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LmforgeError(f"{path / INDEX} has no weight_map (name -> shard file)")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).name != s]
    if outside:
        raise LmforgeError(f"{path / INDEX} names shard files outside the folder: {outside[:3]}")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        held = [k for k, s in weight_map.items() if s in missing]
        raise LmforgeError(
            f"{path}: shard file(s) {', '.join(missing)} listed in {INDEX} are missing "
            f"(they hold {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}); download them again"
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(_read_safetensors(path / shard))
    absent = [k for k in weight_map if k not in tensors]
    if absent:
        raise LmforgeError(f"{path}: {INDEX} lists {absent[:3]} but their shard files do not hold them")
    return tensors


# --- tokenizer -----------------------------------------------------------------------------
# The Hugging Face (Oniguruma) spelling of our tiktoken-form GPT-4 pattern: Oniguruma reads
# `X{1,3}+` as (X{1,3})+, not as a possessive repeat, so the pattern must be written without it.
GPT4_PATTERN_ONIG = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_ONIG_DIFFERS = re.compile(r"\{\d*,?\d*\}\+")  # `X{n,m}+`: the spelling the two regex engines read differently
_ALPHABET = frozenset(bytes_to_printable(bytes(range(256))))  # GPT-2's printable stand-ins for bytes


def load_hf_tokenizer(path: Path) -> Tokenizer | None:
    """Our Tokenizer from tokenizer.json (byte-level BPE) or vocab.json + merges.txt; None (with a warning) if not exact.

    tokenizer.json comes first: it also says which regex cuts the text, which
    vocab.json + merges.txt leave implicit (GPT-2's).
    """
    reasons = []
    if (path / "tokenizer.json").is_file():
        try:
            return tokenizer_from_hf_json(read_json(path / "tokenizer.json"))
        except LmforgeError as e:
            reasons.append(f"tokenizer.json: {e}")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        try:
            return from_gpt2_files(path / "vocab.json", path / "merges.txt")
        except LmforgeError as e:
            reasons.append(f"vocab.json + merges.txt: {e}")
    if reasons:
        warnings.warn(f"{path}: no exact conversion of the tokenizer ({'; '.join(reasons)}); model.tokenizer is None", stacklevel=3)
    return None


def tokenizer_from_hf_json(d: Mapping[str, Any]) -> Tokenizer:
    """A `tokenizers` tokenizer.json -> our Tokenizer, when it is byte-level BPE we reproduce exactly.

    Exact means: no normalizer, GPT-2's byte alphabet, ids 0..255 the single bytes and
    merge k making id 256 + k, specials as added tokens. A post-processor template (a
    BOS some tokenizers prepend) is not applied: `encode` gives the text's ids only.
    """
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise LmforgeError(f"tokenizer model {model.get('type')!r} is not BPE")
    unsupported = [k for k in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback") if model.get(k)]
    if unsupported or d.get("normalizer") is not None:
        raise LmforgeError(f"tokenizer options {unsupported + ['normalizer'] * (d.get('normalizer') is not None)} are not byte-level BPE")
    if (d.get("decoder") or {}).get("type") != "ByteLevel":
        raise LmforgeError(f"decoder {(d.get('decoder') or {}).get('type')!r} is not ByteLevel")
    pattern = _pattern_from_pre_tokenizer(d.get("pre_tokenizer") or {})
    try:
        added = d.get("added_tokens") or []
        plain = [t["content"] for t in added if not t.get("special")]
        specials = {t["content"]: int(t["id"]) for t in added}
        vocab = {tok: int(i) for tok, i in model["vocab"].items() if tok not in specials}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LmforgeError(f"tokenizer.json is malformed ({type(e).__name__}: {e})") from None
    if plain:
        raise LmforgeError(f"non-special added tokens {plain[:3]} are matched before BPE, which lmforge does not do")
    return bpe_from_vocab(vocab, merges, specials, pattern, name="hf-bpe")


def _pattern_from_pre_tokenizer(pre: Mapping[str, Any]) -> str:
    """The regex a byte-level pre-tokenizer cuts text with: ByteLevel's own (GPT-2's), or a Split before it.

    A Split regex is taken as written (GPT-4 / Llama 3's in tiktoken's spelling). That is
    exact for regexes that match every character, as these do: text a regex skips stays
    a piece in `tokenizers` but is dropped by tiktoken.
    """
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"]:
        split, byte_level = steps
        regex = (split.get("pattern") or {}).get("Regex")
        if (
            regex is not None
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")
            and not _ONIG_DIFFERS.search(regex)
        ):
            return GPT4_PATTERN if regex == GPT4_PATTERN_ONIG else regex
    raise LmforgeError(f"pre-tokenizer {kinds} is not one lmforge reproduces exactly (ByteLevel, or Split(regex) then ByteLevel)")


def bpe_from_vocab(
    vocab: Mapping[str, int], merges: list[tuple[str, ...]], specials: Mapping[str, int], pattern: str, name: str
) -> Tokenizer:
    """Our Tokenizer from a printable-alphabet vocab and its merges, if ids follow the merge order."""
    try:
        id_bytes = {i: printable_to_bytes(tok) for tok, i in vocab.items()}
    except KeyError:
        raise LmforgeError("the vocabulary is not in GPT-2's byte-level alphabet") from None
    if any(len(id_bytes.get(i, b"")) != 1 for i in range(256)):
        raise LmforgeError("ids 0..255 are not the 256 single bytes")
    byte_order = [id_bytes[i][0] for i in range(256)]
    token_id = {bytes([b]): i for i, b in enumerate(byte_order)}
    pairs = []
    for k, merge in enumerate(merges):
        if len(merge) != 2:
            raise LmforgeError(f"merge {k} ({merge}) is not a pair")
        left, right = (printable_to_bytes(p) if set(p) <= _ALPHABET else None for p in merge)
        if left not in token_id or right not in token_id or id_bytes.get(256 + k) != left + right:
            raise LmforgeError(f"merge {k} {merge} does not make id {256 + k}: ids do not follow the merge order")
        pairs.append((token_id[left], token_id[right]))
        token_id[left + right] = 256 + k
    if len(token_id) != len(id_bytes):
        raise LmforgeError(f"the vocabulary has {len(id_bytes) - len(token_id)} tokens no merge makes")
    try:
        return Tokenizer(pairs, specials, pattern, byte_order, name=name)
    except ValueError as e:  # tiktoken could not compile the pattern
        raise LmforgeError(f"the pre-tokenizer regex does not compile for tiktoken ({e})") from None


# --- saving --------------------------------------------------------------------------------
def save_hf(
    model: GPT,
    out: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a folder `transformers` loads: config.json, model.safetensors (or shards + index), tokenizer files.

    Each file is written atomically. The tokenizer (default: `model.tokenizer`) is
    written as vocab.json + merges.txt (GPT-2's format) and as tokenizer.json (which
    also carries the pre-tokenizer regex) when it is our byte-level `Tokenizer`.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LmforgeError(f"{out} already exists and is not empty; choose another folder or pass overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = state_dict_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, config)
    written = _write_weights(out, tensors, max_shard_bytes)
    hf_config = config_to_hf(config) | {"dtype": str(model.tok_emb.weight.dtype).removeprefix("torch.")}
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if isinstance(tokenizer, Tokenizer):
        hf_config |= {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        written += _write_tokenizer(out, tokenizer, config.context_length)
    elif tokenizer is not None:
        warnings.warn(f"{type(tokenizer).__name__} has no Hugging Face form here; no tokenizer files written", stacklevel=2)
    atomic_write_text(out / CONFIG, json.dumps(hf_config, indent=2) + "\n")
    _remove_stale(out, written)
    return out


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[str]:
    """model.safetensors, or shards of at most max_shard_bytes (a bigger tensor gets its own) + index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        with atomic_file(out / WEIGHTS) as f:
            f.write(save(shards[0], metadata=metadata))
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        with atomic_file(out / name) as f:
            f.write(save(shard, metadata=metadata))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s}}
    atomic_write_text(out / INDEX, json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


def _remove_stale(out: Path, written: list[str]) -> None:
    """Weights and tokenizer files of an earlier save would be read instead of (or with) the new ones."""
    for p in [*out.glob("model*.safetensors"), out / WEIGHTS, out / INDEX, *(out / n for n in _TOKENIZER_FILES)]:
        if p.name not in written and p.is_file():
            p.unlink()


_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def _write_tokenizer(out: Path, tokenizer: Tokenizer, context_length: int) -> list[str]:
    n_bpe = 256 + len(tokenizer.merges)
    tokens = [bytes_to_printable(tokenizer.token_bytes(i)) for i in range(n_bpe)]
    vocab = {tok: i for i, tok in enumerate(tokens)} | tokenizer.special_tokens
    merges = [(tokens[a], tokens[b]) for a, b in tokenizer.merges]
    atomic_write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    written = ["vocab.json", "merges.txt"]
    hf_json = _tokenizer_json(tokenizer, vocab, merges)
    if hf_json is None:
        warnings.warn(
            f"pattern {tokenizer.pattern!r} has no exact Hugging Face spelling; wrote vocab.json + merges.txt "
            "only, which imply GPT-2's pattern",
            stacklevel=3,
        )
        return written
    atomic_write_text(out / "tokenizer.json", json.dumps(hf_json, ensure_ascii=False) + "\n")
    eot = tokenizer.eot_id
    eos = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"} if eot is not None else {}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length, **eos}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
    return [*written, "tokenizer.json", "tokenizer_config.json"]


def _tokenizer_json(tokenizer: Tokenizer, vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, Any] | None:
    """The `tokenizers` JSON for our tokenizer, or None when its regex would mean something else there."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if tokenizer.pattern == GPT2_PATTERN:
        pre: dict[str, Any] = byte_level
    else:
        regex = GPT4_PATTERN_ONIG if tokenizer.pattern == GPT4_PATTERN else tokenizer.pattern
        if _ONIG_DIFFERS.search(regex):
            return None
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        pre = {"type": "Sequence", "pretokenizers": [split, byte_level | {"use_regex": False}]}
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": byte_level | {"trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,  # as tiktoken: a piece that is a token is taken whole
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }
