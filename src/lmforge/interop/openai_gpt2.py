"""Import OpenAI's original GPT-2 release (`models/124M/...`) by its TensorFlow variable names.

The release is a TensorFlow checkpoint plus `hparams.json`. Its variables are named
`model/h{i}/attn/c_attn/w` and so on; every linear weight is a 1x1 convolution kernel
(1, in, out), whose [0] is exactly Hugging Face's Conv1D weight. So we rename to the
Hugging Face GPT-2 names and reuse that conversion (`interop/hf.py`): one map, tested
against `transformers`.

TensorFlow is needed only to read the `model.ckpt.*` files themselves; the same
tensors saved as `.npz` or `.safetensors` under the same names load without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.interop.hf import from_hf_state_dict
from lmforge.interop.hf_tokenizer import read_json
from lmforge.model import GPT
from lmforge.tokenizer import from_gpt2_files
from lmforge.weights import check_tensors

HPARAMS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
Array = np.ndarray | torch.Tensor


def _checked(hparams: Mapping[str, Any]) -> dict[str, int]:
    missing = [k for k in HPARAMS if k not in hparams]
    if missing:
        raise LmforgeError(f"hparams.json lacks {missing}; OpenAI's GPT-2 hparams have {', '.join(HPARAMS)}")
    return {k: int(hparams[k]) for k in HPARAMS}


def expected_shapes(hparams: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every variable name of the release and its shape, from hparams alone (nothing allocated)."""
    h = _checked(hparams)
    V, T, C = h["n_vocab"], h["n_ctx"], h["n_embd"]
    shapes: dict[str, tuple[int, ...]] = {"model/wte": (V, C), "model/wpe": (T, C)}
    for i in range(h["n_layer"]):
        p = f"model/h{i}"
        shapes |= {
            f"{p}/ln_1/g": (C,),
            f"{p}/ln_1/b": (C,),
            f"{p}/attn/c_attn/w": (1, C, 3 * C),
            f"{p}/attn/c_attn/b": (3 * C,),
            f"{p}/attn/c_proj/w": (1, C, C),
            f"{p}/attn/c_proj/b": (C,),
            f"{p}/ln_2/g": (C,),
            f"{p}/ln_2/b": (C,),
            f"{p}/mlp/c_fc/w": (1, C, 4 * C),
            f"{p}/mlp/c_fc/b": (4 * C,),
            f"{p}/mlp/c_proj/w": (1, 4 * C, C),
            f"{p}/mlp/c_proj/b": (C,),
        }
    return shapes | {"model/ln_f/g": (C,), "model/ln_f/b": (C,)}


def hf_config_from_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The release's hyper-parameters as a Hugging Face GPT-2 config (gelu_new, eps 1e-5, tied head)."""
    h = _checked(hparams)
    return {
        "model_type": "gpt2",
        "vocab_size": h["n_vocab"],
        "n_positions": h["n_ctx"],
        "n_embd": h["n_embd"],
        "n_head": h["n_head"],
        "n_layer": h["n_layer"],
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    }


def hf_name(name: str) -> str:
    """model/h3/attn/c_attn/w -> transformer.h.3.attn.c_attn.weight (g, b: LayerNorm weight, bias)."""
    parts = name.removeprefix("model/").split("/")
    if parts[0].startswith("h") and parts[0][1:].isdigit():
        parts[0:1] = ["h", parts[0][1:]]
    leaf = {"w": "weight", "g": "weight", "b": "bias"}.get(parts[-1])
    parts[-1:] = [leaf] if leaf else [parts[-1], "weight"]  # wte, wpe are embeddings
    return "transformer." + ".".join(parts)


def from_openai_tensors(
    tensors: Mapping[str, Array], hparams: Mapping[str, Any], device: str | torch.device = "cpu", source: str = "the tensors"
) -> GPT:
    """Our GPT (eval mode) from the release's variables, after checking every name and shape."""
    check_tensors(tensors, expected_shapes(hparams), source)
    hf = {}
    for name, value in tensors.items():
        t = torch.as_tensor(np.asarray(value)) if isinstance(value, np.ndarray) else value
        hf[hf_name(name)] = t[0] if name.endswith("/w") else t  # the (1, in, out) kernel is Conv1D's (in, out)
    return from_hf_state_dict(hf_config_from_hparams(hparams), hf, device=device, source=source)


def load_openai_gpt2(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """A release folder (hparams.json + model.ckpt.*, or one .npz / .safetensors of the same names) -> our GPT.

    The folder's encoder.json + vocab.bpe, when present, become `model.tokenizer`.
    """
    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"{path} is not a folder; OpenAI's GPT-2 release is a folder with hparams.json and model.ckpt.*")
    hparams = read_json(path / "hparams.json")
    tensors, source = _read_tensors(path)
    model = from_openai_tensors(tensors, hparams, device=device, source=source)
    if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        model.tokenizer = from_gpt2_files(path / "encoder.json", path / "vocab.bpe")
    return model


def _read_tensors(path: Path) -> tuple[dict[str, Array], str]:
    files = sorted([*path.glob("*.safetensors"), *path.glob("*.npz")])
    if len(files) > 1:
        raise LmforgeError(f"{path} holds several weight files ({', '.join(f.name for f in files)}); keep exactly one")
    if files:
        return _read_file(files[0]), str(files[0])
    if (path / "checkpoint").is_file() or any(path.glob("*.ckpt.index")):
        return _read_tf_checkpoint(path), str(path)
    raise LmforgeError(f"{path} has no model.ckpt.* (TensorFlow checkpoint), .npz or .safetensors file")


def _read_file(file: Path) -> dict[str, Array]:
    try:
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as npz:  # allow_pickle=False: data only, never code
                return {k: npz[k] for k in npz.files}
        from safetensors.torch import load_file

        return load_file(file)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise LmforgeError(f"{file} is not a readable {file.suffix} file ({type(e).__name__}: {e}); it may be truncated") from None


def _read_tf_checkpoint(path: Path) -> dict[str, Array]:
    try:
        import tensorflow as tf
    except ImportError:
        raise LmforgeError(
            f"{path} is a TensorFlow checkpoint and tensorflow is not installed: `pip install tensorflow`, or save "
            "the variables once (same names, e.g. model/h0/attn/c_attn/w) as a .npz or .safetensors file in the folder"
        ) from None
    ckpt = tf.train.latest_checkpoint(str(path)) or str(next(path.glob("*.ckpt.index")).with_suffix(""))
    reader = tf.train.load_checkpoint(ckpt)
    # the release holds only model/...; anything else (a step counter, optimizer slots) is not weights
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(ckpt) if name.startswith("model/")}
