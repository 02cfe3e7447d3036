"""`load`: any model lmforge reads, from one call. The only module that knows every source.

Our model folder, a training run (its newest intact checkpoint), one checkpoint, a LoRA
adapter (on the base it names), a Hugging Face folder, a llama2.c `.bin`: each source's
reader lives with its format (`weights`, `train.checkpoint`, `finetune.adapter`,
`interop`), and this module, above them all, picks the reader. Nothing below imports it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.adapter import is_adapter_dir, load_adapter, read_adapter_config
from lmforge.finetune.nf4 import quantize_model
from lmforge.interop.hf import HF_INDEX, load_hf
from lmforge.interop.llama2c import load_llama2c
from lmforge.model import GPT
from lmforge.train.checkpoint import CHECKPOINTS, find_resumable, is_checkpoint_folder, verify_checkpoint
from lmforge.weights import WEIGHTS, load_pretrained, load_tokenizer, with_labels


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """A model from our folder, a Hugging Face folder, a llama2.c `.bin`, a training run
    folder (its newest intact checkpoint), one checkpoint folder, or a LoRA adapter folder
    (on the base it names), with `.tokenizer` set."""
    path = Path(path)
    path = _checkpoint_model_dir(path) or path
    if is_adapter_dir(path):  # a LoRA adapter (or a LoRA run's checkpoint): its base + the adapter
        return load_adapted(path, device=device)
    if path.is_file() and path.suffix == ".bin":
        return load_llama2c(path, device=device)
    if not path.is_dir():
        raise LmforgeError(f"{path} is neither a model folder nor a llama2.c .bin file")
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path / 'config.json'} is truncated or not JSON ({e})") from None
        if "model_type" in config or "architectures" in config:
            return load_hf(path, device=device)  # also explains sharded or pickle-only folders
        if (path / WEIGHTS).is_file():
            return load_pretrained(path, device=device)
    if (path / HF_INDEX).is_file():
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
    if (path / CHECKPOINTS).is_dir() or (path.name == CHECKPOINTS and not (path / "config.json").exists()):
        found = find_resumable(path, say=lambda m: print(m, file=sys.stderr))
        if found is None:
            raise LmforgeError(f"{path} is a training run with no intact checkpoint in {path / CHECKPOINTS}; train it (longer) first")
        return found / "model"
    if is_checkpoint_folder(path) and not (path / "config.json").is_file():
        verify_checkpoint(path)
        return path / "model"
    return None


def load_adapted(
    adapter: str | os.PathLike,
    base: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dense_base: bool = False,
) -> GPT:
    """Base model + adapter folder -> the adapted model (with the base's tokenizer), in eval mode.

    `base` defaults to the one recorded in the adapter; it is loaded with `lmforge.load`
    (our folder, Hugging Face, llama2.c, a training run). An adapter trained over
    an NF4 base (QLoRA) gets the base quantized the same way (the adapter's `quantize`
    records how), which reproduces the model it was trained and evaluated as;
    `dense_base` keeps the base in full precision instead (what merging wants). A
    classifier's adapter gets its classification head back.
    """
    meta = read_adapter_config(adapter)
    if base is None:
        base = meta.get("base")
        if base is None:
            raise LmforgeError(f"adapter {adapter} does not record its base model; name it (--base DIR)")
        if not Path(base).exists():
            raise LmforgeError(f"adapter {adapter} was made on {base}, which is not here; name the base (--base DIR)")
    model = load(base, device=device)
    labels = (meta.get("base_config") or {}).get("labels")
    if labels and getattr(model.config, "labels", None) != labels:
        if "score.weight" not in meta.get("trainable", []):
            raise LmforgeError(f"adapter {adapter} classifies into {labels} but holds no trained classification head (score.weight)")
        model = with_labels(model, labels)
    scheme = meta.get("quantize")
    if scheme and not dense_base:
        if scheme != "nf4":
            raise LmforgeError(f"adapter {adapter} was trained over a {scheme!r} base, which this lmforge cannot rebuild (it knows nf4)")
        quantize_model(model)
    load_adapter(model, adapter)
    tokenizer = load_tokenizer(Path(adapter))  # a training run's adapter carries its tokenizer (and chat template)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model.eval()
