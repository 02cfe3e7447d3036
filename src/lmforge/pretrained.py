"""A model folder: `model.safetensors` + `config.json` + the tokenizer, and `load` for any source.

Weights are safetensors (no pickle: loading runs no code). A tied output head is
stored once, as the embedding. `load` also accepts a Hugging Face folder and a
llama2.c `.bin`, converting on the fly (see `lmforge.interop`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.io import atomic_file
from lmforge.model import GPT
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
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / WEIGHTS) as f:
        f.write(save(state_dict_for_saving(model), metadata={"format": "pt"}))
    model.config.save(path)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def load_weights(model: GPT, file: Path) -> None:
    """Load a safetensors file into `model`, strictly: a missing or extra key is an error."""
    try:
        sd = load_file(file)
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{file} is not a readable safetensors file ({e}); it may be truncated") from None
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        expected = set(model.state_dict()) - {"lm_head.weight"}
    else:
        expected = set(model.state_dict())
    missing, extra = expected - set(sd), set(sd) - expected
    if missing or extra:
        raise LmforgeError(f"{file} does not match config.json: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    for name, tensor in model.state_dict().items():
        if name in sd and sd[name].shape != tensor.shape:
            raise LmforgeError(f"{file}: {name} has shape {tuple(sd[name].shape)}, config.json implies {tuple(tensor.shape)}")
    model.load_state_dict(sd, strict=False)


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
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device)
    if config.positions == "rope":  # non-persistent buffers are not in the file: rebuild
        from lmforge.model import rope_inv_freq

        model.inv_freq = rope_inv_freq(config).to(device)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    load_weights(model, path / WEIGHTS)
    model.tokenizer = load_tokenizer(path)
    return model.eval()


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """A model from our folder, a Hugging Face folder, or a llama2.c `.bin` (with `.tokenizer` set)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".bin":
        from lmforge.interop.llama2c import load_llama2c

        return load_llama2c(path, device=device)
    if not path.is_dir():
        raise LmforgeError(f"{path} is neither a model folder nor a llama2.c .bin file")
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if "model_type" in config or "architectures" in config:
            from lmforge.interop.hf import load_hf

            return load_hf(path, device=device)  # also explains sharded or pickle-only folders
        if (path / WEIGHTS).is_file():
            return load_pretrained(path, device=device)
    if (path / "model.safetensors.index.json").is_file():
        from lmforge.interop.hf import load_hf

        return load_hf(path, device=device)
    raise LmforgeError(f"{path} holds no model: expected config.json with {WEIGHTS} (ours or Hugging Face's)")
