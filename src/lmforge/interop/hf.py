"""Hugging Face folders <-> lmforge models: the one place the Hugging Face model names live.

Two architectures map onto our one decoder: `GPT2LMHeadModel` (model_type "gpt2") and
`LlamaForCausalLM` (model_type "llama"); each is a `Family`, whose fields hold what
differs. Everything here is a renaming plus two layout changes, so imported weights give
`transformers`' logits:

- GPT-2 stores its linear layers as Conv1D, weight (in, out), where nn.Linear is
  (out, in): transpose; and it fuses q, k, v into one `attn.c_attn`: split / concatenate.
- Llama's keys are a plain rename; RoPE already uses the same "rotate half" layout.

Weights are read only from safetensors (a pickle can run code when loaded). The
tokenizer files beside them are converted by `hf_tokenizer.py`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.interop.hf_tokenizer import TOKENIZER_FILES, load_hf_tokenizer, read_json, write_hf_sentencepiece, write_hf_tokenizer
from lmforge.io import atomic_file, atomic_write_text
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.llama2c import Llama2cTokenizer
from lmforge.weights import StoredTensor, TensorStream, check_tensors, meta_state_dict, model_from_state_dict, stored_tensors

# Hugging Face's file names (HF_WEIGHTS is spelled as our `weights.WEIGHTS` but holds their names)
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
DOWNLOAD_AGAIN = "it may be truncated: download it again"
T = TypeVar("T")  # what a reader gives for each stored tensor: the tensor, or where it lies (`StoredTensor`)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: there is one of each
class Family:
    """One Hugging Face architecture we read and write; each way it differs from the other is a field.

    Its tensors are named `prefix` + an embedding, `prefix` + f"{layers}.{i}." + a block
    module, `prefix` + `final_norm`, and "lm_head".
    """

    model_type: str
    architecture: str
    # config.json
    read_config: Callable[[Mapping[str, Any]], Config]  # refuses what lmforge would compute differently
    write_config: Callable[[Config], dict[str, Any]]  # this architecture's own keys
    requires: Mapping[str, tuple[Any, ...]]  # our Config fields it fixes -> the values it can express
    own_heads: bool  # sets n_kv_head and head_dim; else they are n_head and n_embd // n_head
    # state dict
    prefix: str  # the backbone's key prefix ("transformer." / "model."), absent in base-model files
    embeddings: tuple[tuple[str, str], ...]  # (ours, theirs)
    layers: str
    block: tuple[tuple[tuple[str, ...], str], ...]  # (our modules, theirs) in each block; several: concatenated
    conv1d: frozenset[str]  # block modules stored as Conv1D, weight (in, out): transposed
    final_norm: str
    ignored: re.Pattern[str]  # buffers old checkpoints carry that hold no weights


# GPT-2's activation_function names -> our mlp
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


# --- config ----------------------------------------------------------------------------
def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """A `transformers` config.json (as a dict) -> our Config; anything we would compute differently is refused."""
    return _family_of_hf(hf_config).read_config(hf_config)


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


def _gpt2_from_hf(hf: Mapping[str, Any]) -> Config:
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


def _gpt2_to_hf(config: Config) -> dict[str, Any]:
    return {
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


def _llama_from_hf(hf: Mapping[str, Any]) -> Config:
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


def _llama_to_hf(config: Config) -> dict[str, Any]:
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
    return {
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


# --- the two families ----------------------------------------------------------------------
GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    read_config=_gpt2_from_hf,
    write_config=_gpt2_to_hf,
    requires={"norm": ("layernorm",), "positions": ("learned",), "bias": (True,), "mlp": ("gelu_tanh", "gelu")},
    own_heads=False,
    prefix="transformer.",
    embeddings=(("tok_emb", "wte"), ("pos_emb", "wpe")),
    layers="h",
    block=(
        (("norm1",), "ln_1"),
        (("attn.q", "attn.k", "attn.v"), "attn.c_attn"),
        (("attn.o",), "attn.c_proj"),
        (("norm2",), "ln_2"),
        (("mlp.fc",), "mlp.c_fc"),
        (("mlp.proj",), "mlp.c_proj"),
    ),
    conv1d=frozenset({"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    final_norm="ln_f",
    ignored=re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"),
)
LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    read_config=_llama_from_hf,
    write_config=_llama_to_hf,
    requires={"norm": ("rmsnorm",), "mlp": ("swiglu",), "positions": ("rope",)},
    own_heads=True,
    prefix="model.",
    embeddings=(("tok_emb", "embed_tokens"),),
    layers="layers",
    block=(
        (("norm1",), "input_layernorm"),
        (("norm2",), "post_attention_layernorm"),
        *(((f"attn.{p}",), f"self_attn.{p}_proj") for p in "qkvo"),
        *(((f"mlp.{p}",), f"mlp.{p}_proj") for p in ("gate", "up", "down")),
    ),
    conv1d=frozenset(),
    final_norm="norm",
    ignored=re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
)
FAMILIES = {f.model_type: f for f in (GPT2, LLAMA)}


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
    wanted = {} if family.own_heads else {"n_kv_head": (config.n_head,), "head_dim": (config.n_embd // config.n_head,)}
    return [
        f"{name}={' or '.join(map(repr, allowed))} (has {getattr(config, name)!r})"
        for name, allowed in {**family.requires, **wanted}.items()
        if getattr(config, name) not in allowed
    ]


def config_to_hf(config: Config) -> dict[str, Any]:
    """Our Config -> a config.json dict that `transformers` loads into GPT2LMHeadModel or LlamaForCausalLM."""
    family = family_of(config)
    common = {"architectures": [family.architecture], "model_type": family.model_type, "vocab_size": config.vocab_size}
    common |= {"tie_word_embeddings": config.tie_embeddings, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return common | family.write_config(config)


# --- state dict --------------------------------------------------------------------------
# (our modules, the Hugging Face module, stored as Conv1D (in, out)). Several of ours for one
# of theirs are concatenated along the output dimension (GPT-2's fused q, k, v).
ModuleMap = list[tuple[tuple[str, ...], str, bool]]


def module_map(config: Config) -> ModuleMap:
    """Every weight-holding module of ours and its Hugging Face counterpart."""
    family = family_of(config)
    p = family.prefix
    m: ModuleMap = [((ours,), p + theirs, False) for ours, theirs in family.embeddings]
    for i in range(config.n_layer):
        b, h = f"blocks.{i}", f"{p}{family.layers}.{i}"
        m += [(tuple(f"{b}.{o}" for o in ours), f"{h}.{theirs}", theirs in family.conv1d) for ours, theirs in family.block]
    m.append((("norm_f",), p + family.final_norm, False))
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
    return dict(_ours_from_hf(hf, lambda t: t, config))


def _ours_from_hf(hf: Mapping[str, T], read: Callable[[T], torch.Tensor], config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors by name from Hugging Face's (normalized and checked), reading one of
    theirs at a time (`read`) in module order: Conv1D weights transposed, GPT-2's fused
    q, k, v split."""
    ours = _our_shapes(config)
    for mine, theirs, conv1d in module_map(config):
        for suffix in ("weight", "bias"):
            key = f"{theirs}.{suffix}"
            if key in hf:
                names = [f"{m}.{suffix}" for m in mine]
                yield from _pieces(read(hf[key]), names, [ours[n][0] for n in names], conv1d and suffix == "weight")


def _pieces(t: torch.Tensor, names: list[str], sizes: list[int], conv1d: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """One Hugging Face tensor as ours: transposed if Conv1D, split along the output dimension.

    A generator of its own, so that its tensor is let go once its pieces are given: the
    next one is read only then.
    """
    for name, piece in zip(names, (t.t() if conv1d else t).split(sizes), strict=True):
        yield name, piece.contiguous()


def _normalized(hf_state_dict: Mapping[str, T], config: Config) -> dict[str, T]:
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
    """A Hugging Face folder -> our GPT in eval mode, `.tokenizer` set when it converts exactly
    (byte-level BPE, or a Llama tokenizer as `export_hf` writes one), else None.

    `dtype` None keeps the checkpoint's (its embedding's) dtype.
    """
    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"{path} is not a folder; a Hugging Face model is a folder with {HF_CONFIG} and {HF_WEIGHTS}")
    hf_config = read_json(path / HF_CONFIG)
    model = from_hf_state_dict(hf_config, read_hf_weights(path), device=device, dtype=dtype, source=str(path))
    model.tokenizer = load_hf_tokenizer(path)
    return model


def hf_stream(path: str | os.PathLike) -> TensorStream:
    """A Hugging Face folder's weights as our tensors, one of theirs read at a time (what
    `load_hf` reads whole), the names and shapes checked first; shards are read in turn."""
    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"{path} is not a folder; a Hugging Face model is a folder with {HF_CONFIG} and {HF_WEIGHTS}")
    config = config_from_hf(read_json(path / HF_CONFIG))
    stored = _normalized(_hf_tensors(path, lambda file: stored_tensors(file, DOWNLOAD_AGAIN)), config)
    check_tensors({k: s.meta for k, s in stored.items()}, expected_hf_shapes(config), str(path))
    embedding = next(theirs for ours, theirs, _ in module_map(config) if ours == ("tok_emb",))
    tensors = _ours_from_hf(stored, StoredTensor.read, config)
    return TensorStream(config, stored[f"{embedding}.weight"].dtype, tensors, str(path), load_hf_tokenizer(path))


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



def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards its index names; never a pickle."""
    return _hf_tensors(path, _read_safetensors)


def _hf_tensors(path: Path, read: Callable[[Path], dict[str, T]]) -> dict[str, T]:
    """`read` of model.safetensors, or of each shard its index names (all of them checked first)."""
    if (path / HF_WEIGHTS).is_file():
        return read(path / HF_WEIGHTS)
    if (path / HF_INDEX).is_file():
        return _read_shards(path, read)
    pickles = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
    if pickles:
        raise LmforgeError(
            f"{path} has only pickled PyTorch weights ({', '.join(pickles[:3])}); lmforge loads safetensors only, "
            "because unpickling can run arbitrary code. Convert them once, in a place you trust: "
            "transformers.AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise LmforgeError(f"{path} has neither {HF_WEIGHTS} nor {HF_INDEX}")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{file} is not a readable safetensors file ({e}); {DOWNLOAD_AGAIN}") from None


def _read_shards(path: Path, read: Callable[[Path], dict[str, T]]) -> dict[str, T]:
    weight_map = read_json(path / HF_INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LmforgeError(f"{path / HF_INDEX} has no weight_map (name -> shard file)")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).name != s]
    if outside:
        raise LmforgeError(f"{path / HF_INDEX} names shard files outside the folder: {outside[:3]}")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        held = [k for k, s in weight_map.items() if s in missing]
        raise LmforgeError(
            f"{path}: shard file(s) {', '.join(missing)} listed in {HF_INDEX} are missing "
            f"(they hold {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}); download them again"
        )
    tensors: dict[str, T] = {}
    for shard in shards:
        tensors.update(read(path / shard))
    absent = [k for k in weight_map if k not in tensors]
    if absent:
        raise LmforgeError(f"{path}: {HF_INDEX} lists {absent[:3]} but their shard files do not hold them")
    return tensors


# --- saving --------------------------------------------------------------------------------
@dataclass
class HfExport:
    """What `export_hf` wrote: the folder, every file's name, and notes on what it could not
    carry over exactly (a tokenizer with no Hugging Face form, say) for the caller to say."""

    path: Path
    files: list[str]
    notes: list[str]


def save_hf(
    model: GPT,
    out: str | os.PathLike,
    tokenizer: Tokenizer | Llama2cTokenizer | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a folder `transformers` loads (see `export_hf`); each note on what could not be
    written exactly is a UserWarning, since a library has no other voice."""
    export = export_hf(model, out, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    for note in export.notes:
        warnings.warn(note, stacklevel=2)
    return export.path


def export_hf(
    model: GPT,
    out: str | os.PathLike,
    tokenizer: Tokenizer | Llama2cTokenizer | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> HfExport:
    """Write a folder `transformers` loads: config.json, model.safetensors (or shards + index), tokenizer files.

    Each file is written atomically. The tokenizer (default: `model.tokenizer`): our
    byte-level `Tokenizer` as vocab.json + merges.txt (GPT-2's format) and as
    tokenizer.json (which also carries the pre-tokenizer regex) when it has an exact
    spelling there; llama2.c's as a Llama tokenizer.json (BPE with byte fallback). The
    result lists the files written and, rather than warning, what was not exact.
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
    notes: list[str] = []
    if isinstance(tokenizer, Tokenizer):
        hf_config |= {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        files, notes = write_hf_tokenizer(out, tokenizer, config.context_length)
        written += files
    elif isinstance(tokenizer, Llama2cTokenizer):
        hf_config |= {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        files, notes = write_hf_sentencepiece(out, tokenizer, config.context_length)
        written += files
    elif tokenizer is not None:
        notes = [f"{type(tokenizer).__name__} has no Hugging Face form here; no tokenizer files written"]
    atomic_write_text(out / HF_CONFIG, json.dumps(hf_config, indent=2) + "\n")
    _remove_stale(out, written)
    return HfExport(out, [*written, HF_CONFIG], notes)


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
        with atomic_file(out / HF_WEIGHTS) as f:
            f.write(save(shards[0], metadata=metadata))
        return [HF_WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        with atomic_file(out / name) as f:
            f.write(save(shard, metadata=metadata))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s}}
    atomic_write_text(out / HF_INDEX, json.dumps(index, indent=2) + "\n")
    return [*names, HF_INDEX]


def _remove_stale(out: Path, written: list[str]) -> None:
    """Weights and tokenizer files of an earlier save would be read instead of (or with) the new ones."""
    for p in [*out.glob("model*.safetensors"), out / HF_WEIGHTS, out / HF_INDEX, *(out / n for n in TOKENIZER_FILES)]:
        if p.name not in written and p.is_file():
            p.unlink()

