"""`load`: any model lmforge reads, from one call. The only module that knows every source.

Our model folder, a training run (its newest intact checkpoint), one checkpoint, a
quickstart's folder (its one run), a LoRA adapter (on the base it names), a Hugging Face
folder, a llama2.c `.bin`: each source's reader lives with its format (`weights`,
`train.checkpoint`, `finetune.adapter`, `interop`), and this module, above them all, picks
the reader (`resolve_model_path`), or says what the path is instead of a model and which
paths are. Nothing below imports it.

`load_quantized` reads the same sources into QLoRA's frozen base: the model `load` gives
with its blocks' linear layers in NF4, each quantized as its weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from lmforge.config import Config
from lmforge.data.tokens import FORMAT as TOKENS_FORMAT
from lmforge.data.tokens import META_FILE
from lmforge.errors import LmforgeError
from lmforge.finetune.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_base_config,
    is_adapter_dir,
    load_adapter,
    read_adapter_config,
    same_weights,
    weights_fingerprint,
)
from lmforge.finetune.nf4 import build_quantized, quantize_model
from lmforge.interop.hf import HF_INDEX, config_from_hf, hf_stream, load_hf
from lmforge.interop.llama2c import llama2c_stream, load_llama2c, read_header
from lmforge.model import GPT
from lmforge.tokenizer.tokenizer import TOKENIZER_FILE
from lmforge.train.checkpoint import (
    CHECKPOINTS,
    MANIFEST,
    MODEL_DIR,
    RUN_CONFIG,
    TRAINER_JSON,
    CheckpointError,
    find_resumable,
    is_checkpoint_folder,
    is_run_folder,
    list_checkpoints,
    verify_checkpoint,
)
from lmforge.weights import WEIGHTS, TensorStream, load_pretrained, load_tokenizer, pretrained_stream, with_labels

MODEL_PATHS = (  # every path a user may name a model by, as errors list them
    f"a model folder (config.json + {WEIGHTS}, ours or Hugging Face's)",
    f"a training run folder ({RUN_CONFIG}, {CHECKPOINTS}/)",
    f"a checkpoint folder ({CHECKPOINTS}/step-NNNNNNNN)",
    "a quickstart's folder (holding its run folder model/)",
    f"a LoRA adapter folder ({ADAPTER_CONFIG})",
    "a llama2.c .bin file",
)
ACCEPTED = "A model is " + ", ".join(MODEL_PATHS[:-1]) + " or " + MODEL_PATHS[-1]


class ModelPathError(LmforgeError):
    """A path that holds no model: `what` says what it is instead; the message adds the
    paths that do hold one."""

    def __init__(self, path: Path, what: str, hint: str = "") -> None:
        self.path, self.what = Path(path), what
        super().__init__(f"{path} holds no model: it is {what}{hint}. {ACCEPTED}")


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """A model from any path `resolve_model_path` accepts (our folder, Hugging Face's, a
    llama2.c `.bin`, a training run, a checkpoint, a quickstart's folder, a LoRA adapter on
    the base it names), with `.tokenizer` set."""
    source = resolve_model_path(path)
    kind = _format_of(source)
    if kind == "adapter":  # a LoRA adapter (or a LoRA run's checkpoint): its base + the adapter
        return load_adapted(source, device=device)
    if kind == "llama2c":
        return load_llama2c(source, device=device)
    if kind == "hf":
        return load_hf(source, device=device)  # also explains sharded or pickle-only folders
    return load_pretrained(source, device=device)


def _format_of(source: Path) -> str:
    """Which reader a resolved model path takes: "adapter", "llama2c", "hf" or "ours"."""
    if is_adapter_dir(source):
        return "adapter"
    if source.is_file():
        return "llama2c"
    if (source / "config.json").is_file():
        if _is_hf_config(source):
            return "hf"
        if (source / WEIGHTS).is_file():
            return "ours"
    if (source / HF_INDEX).is_file():
        return "hf"
    raise ModelPathError(source, f"a model folder without its weights (config.json but no {WEIGHTS})")


STREAMS: dict[str, Callable[[Path], TensorStream]] = {"llama2c": llama2c_stream, "hf": hf_stream, "ours": pretrained_stream}


def load_quantized(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    skip: Callable[[str], bool] | Collection[str] = (),
    block_size: int = 64,
    double_quant: bool = True,
) -> GPT:
    """What `load(path)` then `quantize_model(model, skip, block_size, double_quant)` give, bit for
    bit (the same NF4 codes and statistics, the same logits), without the dense model ever
    whole in memory: QLoRA's frozen base.

    Each block's linear weight is quantized as soon as it is read and let go
    (`finetune.nf4.build_quantized`), so the peak is the 4-bit model plus one dense
    tensor, where loading first holds the dense model (gpt2: half the peak RSS from our
    folder, a third from a Hugging Face one; benchmarks/bench_finetune_memory.py --only load).
    Every path `load` reads streams: our model folder, a training run or checkpoint, a
    quickstart's folder, a Hugging Face folder (sharded or not), a llama2.c `.bin`.
    `dtype` casts every tensor before quantizing (None keeps the file's). A LoRA adapter
    folder is refused: its adapters sit on the dense layers; `load` gives it, over an NF4
    base when it was trained over one.
    """
    source = resolve_model_path(path)
    kind = _format_of(source)
    if kind == "adapter":
        raise LmforgeError(
            f"{source} is a LoRA adapter folder, whose adapters sit on its base's dense layers: lmforge.load gives the adapted "
            "model (over an NF4 base when it was trained over one); to quantize it, merge_lora it first, then quantize_model"
        )
    stream = STREAMS[kind](source)
    if dtype is not None:
        stream = dataclasses.replace(stream, dtype=dtype)
    model = build_quantized(stream, device, skip, block_size, double_quant)
    model.tokenizer = stream.tokenizer
    return model


def load_config(path: str | os.PathLike) -> Config:
    """The config of the model at `path` (any path `load` reads, or a config.json), without
    reading its weights: what `lmforge estimate --config` sizes."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return _config_of(path.parent, path)
    source = resolve_model_path(path)
    if is_adapter_dir(source):
        base = read_adapter_config(source).get("base_config")
        if not isinstance(base, dict):
            raise LmforgeError(f"adapter {source} does not record its base's config; give the base model instead")
        return Config.from_dict(base, source=str(source / ADAPTER_CONFIG))
    if source.is_file():
        return read_header(source).config(source.stem)
    return _config_of(source, source / "config.json")


def _config_of(folder: Path, file: Path) -> Config:
    """Ours or Hugging Face's config.json, read as our Config."""
    if file.is_file() and _is_hf_config(folder, file):
        return config_from_hf(json.loads(file.read_text(encoding="utf-8")))
    return Config.load(file)


def _is_hf_config(folder: Path, file: Path | None = None) -> bool:
    file = file or folder / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{file} is truncated or not JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot read {file}: {e}") from None
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The folder or file `load` reads for `path`, which a user may name several ways.

    Read as they are: a model folder (ours or Hugging Face's), a LoRA adapter folder, a
    llama2.c `.bin`. Resolved: a training run (its folder or its `checkpoints/`) to its
    newest intact checkpoint's model folder (saying on stderr which damaged newer ones it
    skips), which stays put when the run trains on; a checkpoint folder to its model
    folder, verified first (a damaged one is an error, not silently wrong weights); a
    folder holding exactly one training run, such as a quickstart's (tokenizer/, data/,
    model/), to that run's. Anything else is a `ModelPathError` saying what the path is
    (a prepared data folder, a tokenizer folder, a run with no checkpoint yet...) and
    which paths hold a model.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".bin" and not _is_data_folder(path.parent):
            return path  # a llama2.c checkpoint; its reader says so if the header is not one
        raise ModelPathError(path, *_describe_file(path))
    if not path.is_dir():
        if os.path.lexists(path):
            raise ModelPathError(path, "neither a regular file nor a folder (a FIFO, a device or a broken link)")
        raise LmforgeError(f"{path} does not exist, so it is neither a model folder nor a llama2.c .bin file. {ACCEPTED}")
    if is_adapter_dir(path) or (path / "config.json").is_file() or (path / HF_INDEX).is_file():
        return path
    if _is_run_folder(path):
        return _newest_checkpoint(path) / MODEL_DIR
    if is_checkpoint_folder(path):
        verify_checkpoint(path)
        return path / MODEL_DIR
    children = _subfolders(path)
    models = [c for c in children if _is_run_folder(c) or _holds_model(c)]
    if len(models) == 1 and _is_run_folder(models[0]):  # a quickstart's folder: tokenizer/, data/ and its one run, model/
        try:
            return resolve_model_path(models[0])
        except ModelPathError as e:
            raise ModelPathError(path, f"a folder whose one training run, {models[0].name}/, is {e.what}") from None
    raise ModelPathError(path, *_describe_folder(path, children, models))


def _is_run_folder(path: Path) -> bool:
    """A training run's folder (or its checkpoints/ folder), as recipes write it."""
    return is_run_folder(path) or (path.name == CHECKPOINTS and path.is_dir())


def _newest_checkpoint(run: Path) -> Path:
    found = find_resumable(run, say=lambda m: print(m, file=sys.stderr))
    if found is not None:
        return found
    saved = list_checkpoints(run)
    where = run if run.name == CHECKPOINTS else run / CHECKPOINTS
    if saved:
        raise ModelPathError(run, f"a training run whose {len(saved)} checkpoint(s) are all damaged (no intact checkpoint in {where}; "
                                  "the reasons are above)", "; train it again")
    raise ModelPathError(run, f"an empty run folder with no checkpoint yet (no intact checkpoint in {where})",
                         "; train it (longer) first, or wait for its first save (--save-every)")


def _subfolders(path: Path) -> list[Path]:
    try:
        return sorted(c for c in path.iterdir() if c.is_dir() and not c.name.startswith("."))
    except OSError:
        return []


def _is_data_folder(path: Path) -> bool:
    try:
        return json.loads((path / META_FILE).read_text(encoding="utf-8")).get("format") == TOKENS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _tokenizer_kind(path: Path) -> str | None:
    """"" for our tokenizer.json in `path`, "Hugging Face's " for theirs, None for none."""
    try:
        doc = json.loads((path / TOKENIZER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    return "Hugging Face's " if "model" in doc and "format" not in doc else ""


def _holds_model(path: Path) -> bool:
    return is_adapter_dir(path) or (path / "config.json").is_file() or (path / HF_INDEX).is_file() or is_checkpoint_folder(path)


def _describe_folder(path: Path, children: list[Path], models: list[Path]) -> tuple[str, str]:
    """(what the folder is, a hint) for a folder that holds no model."""
    if _is_data_folder(path):
        return "a prepared data folder (meta.json, train.bin, val.bin)", "; it is what --data takes"
    kind = _tokenizer_kind(path)
    if kind is not None:
        return f"a tokenizer folder ({kind}{TOKENIZER_FILE}, no weights)", "; it is what --tokenizer takes"
    if {"tokenizer", "data", "model"} <= {c.name for c in children}:
        return "a quickstart's folder whose model/ holds no training run yet", "; run the quickstart (again) to train it"
    if models:
        names = ", ".join(m.name + "/" for m in models[:6]) + (f" and {len(models) - 6} more" if len(models) > 6 else "")
        return f"a folder of {len(models)} models and runs ({names})", "; name one of them"
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError as e:
        return f"a folder that cannot be read ({e.strerror or e})", ""
    if not entries:
        return "an empty folder", ""
    listed = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
    return f"a folder holding {listed}, none of them a model", ""


def _describe_file(path: Path) -> tuple[str, str]:
    """(what the file is, a hint) for a file that is no model."""
    folder = path.parent
    if _is_data_folder(folder):
        return f"a file of the prepared data folder {folder}", "; it is what --data takes"
    if path.name in ("config.json", WEIGHTS, TOKENIZER_FILE) and (folder / "config.json").is_file():
        return f"a file of the model folder {folder}", f"; give the folder: {folder}"
    if path.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) and is_adapter_dir(folder):
        return f"a file of the LoRA adapter folder {folder}", f"; give the folder: {folder}"
    if path.name in (MANIFEST, TRAINER_JSON) and is_checkpoint_folder(folder):
        return f"a file of the checkpoint {folder}", f"; give the folder: {folder}"
    if path.name == RUN_CONFIG:
        return f"the config of the training run {folder}", f"; give the folder: {folder}"
    if path.name == TOKENIZER_FILE:
        return "a tokenizer file", "; it is what --tokenizer takes"
    return f"a {path.suffix or 'extension-less'} file, not a llama2.c .bin", ""


def load_adapted(
    adapter: str | os.PathLike,
    base: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dense_base: bool = False,
) -> GPT:
    """Base model + adapter folder -> the adapted model (with the base's tokenizer), in eval mode.

    `base` defaults to the one recorded in the adapter, found as `find_adapter_base`
    says (a moved or deleted base is looked for, and its absence explained); given, it
    is any path `lmforge.load` reads, and is refused when its weights are not the ones
    the adapter records (their sha256) or its architecture differs. An adapter trained
    over an NF4 base (QLoRA) gets the base quantized the same way (the adapter's
    `quantize` records how), which reproduces the model it was trained and evaluated as
    (`load_quantized` builds it as it reads the base: the dense base is never whole);
    `dense_base` keeps the base in full precision instead (what merging wants). A
    classifier's adapter gets its classification head back.
    """
    meta = read_adapter_config(adapter)
    source = find_adapter_base(adapter, base)
    scheme = meta.get("quantize")
    if scheme == "nf4" and not dense_base and _format_of(source) != "adapter":
        model = load_quantized(source, device=device)
    else:
        model = load(source, device=device)
    labels = (meta.get("base_config") or {}).get("labels")
    if labels and getattr(model.config, "labels", None) != labels:
        if "score.weight" not in meta.get("trainable", []):
            raise LmforgeError(f"adapter {adapter} classifies into {labels} but holds no trained classification head (score.weight)")
        model = with_labels(model, labels)
    if base is not None:  # given by hand: the architecture first (its message names each field), then the weights
        check_base_config(meta, model, str(adapter))
        _check_base_weights(adapter, meta, base, source)
    if scheme and not dense_base:
        if scheme != "nf4":
            raise LmforgeError(f"adapter {adapter} was trained over a {scheme!r} base, which this lmforge cannot rebuild (it knows nf4)")
        quantize_model(model)  # nothing left to do for a base `load_quantized` read
    load_adapter(model, adapter)
    tokenizer = load_tokenizer(Path(adapter))  # a training run's adapter carries its tokenizer (and chat template)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model.eval()


def find_adapter_base(adapter: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The model folder (or file) the adapter's base is loaded from.

    `base` given: it, resolved (`resolve_model_path`); `load_adapted` checks its weights.
    Else where the adapter recorded it (`finetune.adapter.base_record`), the first place
    that holds the recorded weights (sha256): its absolute path, its path relative to
    the adapter (a moved folder), then the newest checkpoint of its training run with
    those weights (the recorded one deleted by --keep-last). An adapter that records no
    hash (written before lmforge kept one) takes its absolute path as it is. Nothing
    found: an error naming the base, what became of it and how to give a copy.
    """
    if base is not None:
        return resolve_model_path(base)
    adapter = Path(adapter)
    meta = read_adapter_config(adapter)
    recorded, want = meta.get("base"), meta.get("base_sha256")
    if recorded is None:
        raise LmforgeError(f"adapter {adapter} does not record its base model; name it (base= in load_adapted, --base in lmforge lora merge)")
    places = [Path(recorded)] + ([adapter / meta["base_relative"]] if meta.get("base_relative") else [])
    if not want:  # an adapter from before hashes: its path is all there is
        if Path(recorded).exists():
            return Path(recorded)
        raise LmforgeError(f"adapter {adapter} was made on {recorded}, which is not there any more; {_give_a_copy(adapter)}")
    others = []
    for place in dict.fromkeys(p.resolve() for p in places if p.exists()):
        try:
            found = resolve_model_path(place)
        except LmforgeError as e:
            others.append(f"{place} holds no usable model ({e})")
            continue
        fingerprint = weights_fingerprint(found)
        if same_weights(fingerprint, want):
            return found
        others.append(f"{place} holds other weights (sha256 {_short(fingerprint)})")
    run = meta.get("base_run")
    for checkpoint in reversed(list_checkpoints(run) if run else []):
        if not same_weights(weights_fingerprint(checkpoint / MODEL_DIR, trust_manifest=True), want):
            continue
        try:
            verify_checkpoint(checkpoint)  # the manifest says so; the files must agree
        except CheckpointError as e:
            others.append(f"{checkpoint} lists those weights but is damaged ({e.problem})")
            continue
        print(f"adapter {adapter}: its base {recorded} is gone; {checkpoint} holds the same weights", file=sys.stderr)
        return checkpoint / MODEL_DIR
    gone = "is there but " + "; ".join(others) if others else "is not there any more (a run's --keep-last deletes its older checkpoints)"
    if run:
        gone += f", and no intact checkpoint left in {run} holds those weights"
    raise LmforgeError(f"adapter {adapter} was made on {recorded} (weights sha256 {_short(want)}), which {gone}; {_give_a_copy(adapter)}")


def _check_base_weights(adapter: str | os.PathLike, meta: dict, base: str | os.PathLike, source: Path) -> None:
    """Refuse a base given by hand whose weights are not the ones the adapter records (if it records them)."""
    want = meta.get("base_sha256")
    if not want:
        return
    have = weights_fingerprint(source)
    if not same_weights(have, want):
        raise LmforgeError(
            f"base {base} has the architecture adapter {adapter} was made for but other weights (sha256 {_short(have)}; the adapter "
            f"was made on {meta.get('base')}, sha256 {_short(want)}): an adapter fits only the weights it was trained on. "
            "Give that base, or a copy of it"
        )


def _short(fingerprint: dict[str, str] | None) -> str:
    """A fingerprint in a few characters: the first 12 hex digits of each file's sha256."""
    return ", ".join(h[:12] for h in sorted((fingerprint or {}).values())) or "none"


def _give_a_copy(adapter: Path | str) -> str:
    return (f"give a copy of that base: lmforge.load_adapted({str(adapter)!r}, base=COPY), or lmforge lora merge --adapter {adapter} "
            "--base COPY --out MERGED (a copy with other weights is refused)")
