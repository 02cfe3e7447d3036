"""A model folder: `model.safetensors` + `config.json` + the tokenizer, and `load` for any source.

Weights are safetensors (no pickle: loading runs no code). A tied output head is
stored once, as the embedding. `load` also accepts a Hugging Face folder and a
llama2.c `.bin`, converting on the fly (see `lmforge.interop`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.io import atomic_file
from lmforge.model import GPT, rope_inv_freq
from lmforge.tokenizer import Tokenizer

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
    with torch.device("meta"):
        return GPT(config).state_dict()


def check_tensors(tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
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
        raise LmforgeError(f"{source} does not match its config: {' | '.join(problems)}")


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Our names and shapes for `config`, a tied head left out (as saved)."""
    sd = meta_state_dict(config)
    if config.tie_embeddings:
        sd.pop("lm_head.weight")
    return {k: tuple(v.shape) for k, v in sd.items()}


def empty_model(config: Config, device: str | torch.device = "cpu") -> GPT:
    """A GPT with allocated, uninitialised weights, for loaders that fill every one of them
    (no time spent on a random init that would be overwritten)."""
    with torch.device("meta"):
        model = GPT(config)
    return _finish(model.to_empty(device=device), device)


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
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, strict=False, assign=True)
    return _finish(model, device).eval()


def _finish(model: GPT, device: str | torch.device) -> GPT:
    """Tie the head again (`to_empty`/`assign` untie it) and rebuild RoPE's buffer (never saved)."""
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if model.config.positions == "rope":
        model.inv_freq = rope_inv_freq(model.config).to(device)
    return model


def load_tokenizer(path: Path) -> object | None:
    """The tokenizer saved in a model folder, of whichever kind it is, or None."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    fmt = json.loads(file.read_text(encoding="utf-8")).get("format")
    if fmt == "lmforge.sentencepiece":
        from lmforge.interop.llama2c import Llama2cTokenizer

        return Llama2cTokenizer.load(path)
    return Tokenizer.load(path)


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


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """A model from our folder, a Hugging Face folder, a llama2.c `.bin`, a training run
    folder (its newest intact checkpoint), one checkpoint folder, or a LoRA adapter folder
    (on the base it names), with `.tokenizer` set."""
    path = Path(path)
    path = _checkpoint_model_dir(path) or path
    from lmforge.finetune.lora import is_adapter_dir, load_adapted

    if is_adapter_dir(path):  # a LoRA adapter (or a LoRA run's checkpoint): its base + the adapter
        return load_adapted(path, device=device)
    if path.is_file() and path.suffix == ".bin":
        from lmforge.interop.llama2c import load_llama2c

        return load_llama2c(path, device=device)
    if not path.is_dir():
        raise LmforgeError(f"{path} is neither a model folder nor a llama2.c .bin file")
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path / 'config.json'} is truncated or not JSON ({e})") from None
        if "model_type" in config or "architectures" in config:
            from lmforge.interop.hf import load_hf

            return load_hf(path, device=device)  # also explains sharded or pickle-only folders
        if (path / WEIGHTS).is_file():
            return load_pretrained(path, device=device)
    if (path / "model.safetensors.index.json").is_file():
        from lmforge.interop.hf import load_hf

        return load_hf(path, device=device)
    raise LmforgeError(f"{path} holds no model: expected config.json with {WEIGHTS} (ours or Hugging Face's)")


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The folder (or file) `load` reads for `path`: a training run resolves to its
    newest intact checkpoint's model folder, which stays put when the run trains on."""
    path = Path(path)
    return _checkpoint_model_dir(path) or path


def _checkpoint_model_dir(path: Path) -> Path | None:
    """The `model/` folder to load when `path` is a training run or a checkpoint, else None.

    A run folder (with `checkpoints/`) gives its newest intact checkpoint, saying on
    stderr which damaged newer ones it skipped; a checkpoint folder is verified first,
    so a damaged one is an error rather than a model with silently wrong weights.
    """
    if not path.is_dir():
        return None
    from lmforge.train.checkpoint import (
        CHECKPOINTS,
        find_resumable,
        is_checkpoint_folder,
        verify_checkpoint,
    )

    if (path / CHECKPOINTS).is_dir() or (path.name == CHECKPOINTS and not (path / "config.json").exists()):
        found = find_resumable(path, say=lambda m: print(m, file=sys.stderr))
        if found is None:
            raise LmforgeError(f"{path} is a training run with no intact checkpoint in {path / CHECKPOINTS}; train it (longer) first")
        return found / "model"
    if is_checkpoint_folder(path) and not (path / "config.json").is_file():
        verify_checkpoint(path)
        return path / "model"
    return None
