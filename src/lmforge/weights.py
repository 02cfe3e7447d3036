"""Our model folder: `model.safetensors` + `config.json` + the tokenizer, and the tensor checks
every loader shares.

Weights are safetensors (no pickle: loading runs no code). A tied output head is
stored once, as the embedding. This module sits just above the model and imports
nothing higher: the converters (`lmforge.interop`), adapters (`lmforge.finetune`) and
checkpoints (`lmforge.train`) build on it, and `lmforge.loading.load` dispatches to
all of them.

A loader that must not hold the whole model at once (QLoRA's, which quantizes each
layer as it arrives) reads a `TensorStream`: the config, then the tensors one at a
time, each read from the file only when it is reached (`StoredTensor.read`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.io import atomic_file
from lmforge.model import GPT, on_meta, rope_inv_freq
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer, read_tokenizer_json
from lmforge.tokenizer.llama2c import FORMAT as SENTENCEPIECE_FORMAT
from lmforge.tokenizer.llama2c import Llama2cTokenizer

WEIGHTS = "model.safetensors"


def state_dict_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """The weights, contiguous, with a tied head left out (it is the embedding)."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_pretrained(model: GPT, path: str | os.PathLike, tokenizer: object | None = None) -> Path:
    """Write the model folder; the tokenizer (if any) goes beside it as its own file."""
    path = Path(path)
    state = state_dict_for_saving(model)
    extra = sorted(set(state) - set(expected_shapes(model.config)))
    if extra:
        raise LmforgeError(
            f"the model carries tensors a model folder has no place for ({', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}): "
            "LoRA adapters or 4-bit weights. Merge them first (lmforge.finetune.lora.merge_lora, `lmforge lora merge`) "
            "or save the adapters alone (lmforge.finetune.lora.save_adapter)"
        )
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / WEIGHTS) as f:
        f.write(save(state, metadata={"format": "pt"}))
    model.config.save(path)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def meta_state_dict(config: Config) -> dict[str, torch.Tensor]:
    """The model's tensors on the meta device: names and shapes, no memory."""
    with on_meta():
        return GPT(config).state_dict()


def check_tensors(
    tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str, against: str = "its config"
) -> None:
    """Every expected name present with its shape, nothing else: one error listing all that is wrong."""
    missing = [k for k in expected if k not in tensors]
    extra = sorted(k for k in tensors if k not in expected)
    wrong = [f"{k} is {tuple(tensors[k].shape)}, expected {expected[k]}" for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shape: {'; '.join(wrong[:8])}")
    if problems:
        raise LmforgeError(f"{source} does not match {against}: {' | '.join(problems)}")


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Our names and shapes for `config`, a tied head left out (as saved)."""
    sd = meta_state_dict(config)
    if config.tie_embeddings:
        sd.pop("lm_head.weight")
    return {k: tuple(v.shape) for k, v in sd.items()}


def empty_model(config: Config, device: str | torch.device = "cpu") -> GPT:
    """A GPT with allocated, uninitialised weights, for loaders that fill every one of them
    (no time spent on a random init that would be overwritten)."""
    with on_meta():
        model = GPT(config)
    return retie(model.to_empty(device=device), device)


def model_from_state_dict(
    config: Config,
    state_dict: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "the checkpoint",
) -> GPT:
    """A GPT (eval mode) whose parameters *are* these tensors (moved to device/dtype): no
    second copy of the weights. Names and shapes are checked first, all problems at once."""
    check_tensors(state_dict, expected_shapes(config), source)
    dtype = dtype or state_dict["tok_emb.weight"].dtype
    with on_meta():
        model = GPT(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, strict=False, assign=True)
    return retie(model, device).eval()


def retie(model: GPT, device: str | torch.device) -> GPT:
    """Tie the head again (`to_empty`/`assign` untie it) and rebuild RoPE's buffer (never saved)."""
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if model.config.positions == "rope":
        model.inv_freq = rope_inv_freq(model.config).to(device)
    return model


def load_tokenizer(path: Path) -> object | None:
    """The tokenizer saved in a model folder, of whichever kind it is, or None if it has no tokenizer.json.

    A tokenizer.json that is there but unreadable, truncated, not JSON or not a tokenizer is an
    LmforgeError naming the file (never silently None).
    """
    file = path / TOKENIZER_FILE
    if not (file.exists() or file.is_symlink()):
        return None
    file, doc = read_tokenizer_json(file)
    if isinstance(doc, dict) and doc.get("format") == SENTENCEPIECE_FORMAT:
        return Llama2cTokenizer.from_dict(doc, source=str(file))
    return Tokenizer.from_dict(doc, source=str(file))


# --- reading one tensor at a time ------------------------------------------------------------
# safetensors' dtype names (the ones a model's weights use)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file as its header places it: found, not read."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int

    @property
    def meta(self) -> torch.Tensor:
        """A stand-in with its shape and dtype and no memory, for the name and shape checks."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def read(self) -> torch.Tensor:
        """The tensor, read into memory of its own with read(2).

        Not through a memory map: a mapped file's pages stay resident (and count in
        the process's RSS) for as long as any tensor viewing the map lives, so a
        loader that keeps the embedding would keep the whole file; nor through a
        second copy: the bytes land in the tensor's own storage.
        """
        tensor = torch.empty(self.shape, dtype=self.dtype)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            got = f.readinto(tensor.reshape(-1).view(torch.uint8).numpy())
        if got != self.end - self.start:
            raise LmforgeError(f"{self.file} ends inside the bytes of a tensor its header lists (was it changed while being read?)")
        return tensor


def stored_tensors(file: Path, hint: str = "it may be truncated") -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file by name, located from its header, none read yet.

    safetensors checks the file first (a bad header, offsets past the end: the
    LmforgeError `load_file` would give, with `hint`); the header is then only the
    format's own: a little-endian u64 length, then JSON {name: {dtype, shape,
    data_offsets}} with offsets counted from the end of the header.
    """
    try:
        with safe_open(file, framework="numpy"):  # not "pt": that maps the file as one torch storage
            pass
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{file} is not a readable safetensors file ({e}); {hint}") from None
    header.pop("__metadata__", None)
    start = 8 + length
    unknown = sorted({e["dtype"] for e in header.values()} - set(SAFETENSORS_DTYPES))
    if unknown:
        raise LmforgeError(f"{file} holds tensors of dtype {', '.join(unknown)}, which no lmforge model has")
    return {
        name: StoredTensor(file, SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), start + e["data_offsets"][0], start + e["data_offsets"][1])
        for name, e in header.items()
    }


@dataclass
class TensorStream:
    """A model's weights as a loader reads them one at a time (what builds QLoRA's 4-bit base).

    The names and shapes were checked against `config` before the first tensor is
    read, as the whole-model loaders check them. `tensors` yields our names (a tied
    head left out), each tensor read from the file only when reached, so whoever
    consumes it and lets each one go holds one at a time. `dtype` is what every
    tensor becomes, as `model_from_state_dict` casts them: the embedding's.
    """

    config: Config
    dtype: torch.dtype
    tensors: Iterator[tuple[str, torch.Tensor]]
    source: str  # the file or folder, for messages
    tokenizer: object | None = None


def pretrained_stream(path: str | os.PathLike) -> TensorStream:
    """Our model folder's weights one tensor at a time (what `load_pretrained` reads whole)."""
    path = Path(path)
    config = Config.load(path)
    file = path / WEIGHTS
    stored = stored_tensors(file)
    check_tensors({k: s.meta for k, s in stored.items()}, expected_shapes(config), str(file))
    tensors = ((name, s.read()) for name, s in stored.items())
    return TensorStream(config, stored["tok_emb.weight"].dtype, tensors, str(file), load_tokenizer(path))


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """Our model folder -> a GPT in eval mode, with `.tokenizer` set (None if the folder has none)."""
    path = Path(path)
    config = Config.load(path)
    file = path / WEIGHTS
    try:
        state_dict = load_file(file)
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{file} is not a readable safetensors file ({e}); it may be truncated") from None
    model = model_from_state_dict(config, state_dict, device=device, source=str(file))
    model.tokenizer = load_tokenizer(path)
    return model


def carry_trunk(source: GPT, target: GPT, *, assign: bool = False) -> None:
    """Give `target` every weight of `source` but the classification head (`score`), which
    one of them has for other labels or not at all; `assign` shares the tensors, no copy."""
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("score.")}
    missing, unexpected = target.load_state_dict(state, strict=False, assign=assign)
    if unexpected or any(not k.startswith("score.") for k in missing):
        raise LmforgeError(f"could not carry the base's weights over: missing {missing}, unexpected {unexpected}")


def with_labels(model: GPT, labels: list[str]) -> GPT:
    """The same model (its very modules, no copy) rebuilt with an empty classification head for
    `labels`, for a loader about to fill it (an adapter file holds its weights).

    The modules move over whatever their layers hold, so a model whose blocks are in 4
    bits (`lmforge.finetune.nf4`) keeps them: a state dict would not fit a dense GPT's.
    """
    device, dtype = model.tok_emb.weight.device, model.tok_emb.weight.dtype
    with on_meta():
        fresh = GPT(model.config.replace(labels=list(labels)))
    for name, module in model.named_children():
        if name != "score":
            setattr(fresh, name, module)
    fresh.score.to_empty(device=device)
    fresh.score.to(dtype)
    fresh = retie(fresh, device)
    fresh.tokenizer = getattr(model, "tokenizer", None)
    return fresh.eval()
