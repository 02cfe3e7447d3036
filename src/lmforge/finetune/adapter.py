"""Adapter folders: a LoRA run's product, small enough to mail, never applied to the wrong base.

A folder holds `adapter.safetensors` (A, B and any extra trained tensors, such as the
classification head) and `adapter_config.json` (the LoRA settings, the base it was made on
and that base's config). `save_adapter` writes one all or nothing; `load_adapter`
checks the base and every tensor's name and shape before it changes the model.

The base is recorded so that it can be found again and recognised (`base_record`): its
absolute path, its path relative to the adapter (which survives moving a tree that holds
both), the training run it is a checkpoint of (whose `--keep-last` may delete it later),
and the sha256 of its weight files, which tells the base from another model of the same
shape wherever it is found. Finding and loading the base is `lmforge.loading`'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.finetune.lora import LoRAConfig, adapter_state_dict, apply_lora, lora_layers, resolve_targets
from lmforge.io import atomic_output_dir
from lmforge.weights import check_tensors

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "lmforge.lora"
FORMAT_VERSION = 1
# Config fields that do not change what the weights compute: an adapter made on a
# base with other values here still fits it.
_BASE_FIELDS_IGNORED = ("name", "dropout", "attention")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a folder `save_adapter` wrote (so `lmforge.load` can load base + adapter)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and (p / ADAPTER_WEIGHTS).is_file()


def _base_config_dict(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None and hasattr(config, "to_dict") else None


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    base: str | os.PathLike | None,
    cfg: LoRAConfig,
    *,
    quantize: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapter folder: adapter.safetensors + adapter_config.json, all or nothing.

    `base` names the model the adapter belongs on: a folder or file (recorded as
    `base_record` says: where it is and the sha256 of its weights; give the model folder
    itself, as `lmforge.loading.resolve_model_path` names it, for the hash) or a name;
    `lmforge.load_adapted` and `lmforge lora merge` find it again when no base is given
    and refuse one with other weights. `quantize` ("nf4")
    records that the adapter was trained over a quantized base, so `load_adapted`
    rebuilds that same model. An existing adapter folder (or an empty one) is replaced;
    any other existing folder only with `overwrite`.
    """
    layers = lora_layers(model)
    if not layers:
        raise LmforgeError("the model has no LoRA adapters to save; call apply_lora (or load_adapter) first")
    expected = resolve_targets(model, cfg.targets)
    have = [name for name, _ in layers]
    if expected != have or any(layer.r != cfg.r or layer.scale != cfg.scale for _, layer in layers):
        raise LmforgeError(
            f"the LoRA settings given (r={cfg.r}, alpha={cfg.alpha}, targets={list(cfg.targets)}) are not the ones the "
            f"model's adapters were made with (r={layers[0][1].r}, {len(have)} layers); pass the LoRAConfig given to apply_lora"
        )
    tensors = {k: t.to("cpu").contiguous() for k, t in adapter_state_dict(model).items()}
    lora_keys = {f"{n}.lora_{ab}" for n in have for ab in "ab"}
    path = Path(path)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **cfg.to_dict(),
        **base_record(base, path),
        "base_config": _base_config_dict(model),
        "quantize": quantize,
        "trainable": sorted(k for k in tensors if k not in lora_keys),
        "lmforge_version": __version__,
    }
    replace = overwrite or is_adapter_dir(path) or (path.is_dir() and not any(path.iterdir()))
    with atomic_output_dir(path, overwrite=replace) as tmp:
        (tmp / ADAPTER_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def base_record(base: str | os.PathLike | None, adapter: str | os.PathLike) -> dict[str, Any]:
    """What an adapter at `adapter` records about `base` to find and recognise it later.

    - "base": its absolute path (or the name given, if no such path exists): what old
      adapters record, and still the first place looked;
    - "base_relative": its path from the adapter folder, when the two share a folder
      below the file system's root: found again after that folder is moved or copied;
    - "base_run": the training run, when the base is one of its checkpoints
      (RUN/checkpoints/step-N/model), whose `--keep-last` may delete that checkpoint as the
      run trains on: a checkpoint of it left with the same weights (the best one kept, a
      re-save) is found by hash;
    - "base_sha256": file name -> sha256 of each weight file (`weights_fingerprint`),
      which is what makes a base found anywhere (or given by hand) the right one.
    """
    if base is None:
        return {"base": None}
    found = Path(base)
    if not found.exists():
        return {"base": str(base)}
    found = found.resolve()
    record: dict[str, Any] = {"base": str(found)}
    here = Path(adapter).resolve()
    if os.path.commonpath([found, here]) != found.anchor:
        record["base_relative"] = Path(os.path.relpath(found, here)).as_posix()
    if found.name == _MODEL_DIR and found.parent.parent.name == _CHECKPOINTS and (found.parent / _MANIFEST).is_file():
        record["base_run"] = str(found.parent.parent.parent)
    fingerprint = weights_fingerprint(found, trust_manifest=True)
    if fingerprint:
        record["base_sha256"] = fingerprint
    return record


# A checkpoint's layout (lmforge.train.checkpoint, a sibling this module may not import):
# RUN/checkpoints/step-N/{manifest.json, model/}, the manifest listing each file's sha256.
_CHECKPOINTS, _MANIFEST, _MODEL_DIR = "checkpoints", "manifest.json", "model"
_hashes: dict[tuple[str, int, int], str] = {}  # (file, size, mtime) -> sha256: each file is read once per process


def weights_fingerprint(path: str | os.PathLike, trust_manifest: bool = False) -> dict[str, str] | None:
    """File name -> sha256 of the weights at `path`: the file itself (a llama2.c .bin), or a
    folder's *.safetensors (ours, Hugging Face's shards, an adapter's); None when it has
    none (a run folder: resolve it first).

    With `trust_manifest`, the hashes a checkpoint's manifest lists for its model/ files
    are taken as they are (where the sizes agree): a base that was just loaded (and so
    verified) is not read again, and every save of a LoRA run's adapter stays cheap.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    listed = _manifest_hashes(path) if trust_manifest else {}
    out = {}
    for file in files:
        entry = listed.get(file.name)
        out[file.name] = entry[1] if entry and entry[0] == file.stat().st_size else _sha256(file)
    return out


def same_weights(a: dict[str, str] | None, b: dict[str, str] | None) -> bool:
    """Whether two fingerprints are of the same weights (file names aside: a copy may be renamed)."""
    return bool(a) and bool(b) and sorted(a.values()) == sorted(b.values())


def _manifest_hashes(model_dir: Path) -> dict[str, tuple[int, str]]:
    """name -> (size, sha256) of model/'s files as a checkpoint's manifest lists them ({} if it is not one)."""
    if model_dir.name != _MODEL_DIR:
        return {}
    try:
        files = json.loads((model_dir.parent / _MANIFEST).read_text(encoding="utf-8"))["files"]
        return {name.removeprefix(f"{_MODEL_DIR}/"): (int(e["size"]), str(e["sha256"]))
                for name, e in files.items() if name.startswith(f"{_MODEL_DIR}/")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _sha256(file: Path) -> str:
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of an adapter folder, checked to be ours."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise LmforgeError(f"{path} is not a LoRA adapter folder: no {ADAPTER_CONFIG} (save_adapter writes one)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{file} is truncated or not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LmforgeError(f"{file} is not an lmforge LoRA adapter (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise LmforgeError(
            f"{file} has adapter format version {meta['version']}; this lmforge reads up to {FORMAT_VERSION}: upgrade lmforge"
        )
    return meta


def check_base_config(meta: dict[str, Any], model: nn.Module, source: str) -> None:
    """Refuse `model` as the base of the adapter `source` (its config `meta`) when its
    architecture differs from the recorded base's, naming each field that differs."""
    saved, ours = meta.get("base_config"), _base_config_dict(model)
    if saved is None or ours is None:
        return
    diff = [
        f"{k}={saved.get(k)!r} (adapter) vs {ours.get(k)!r} (this model)"
        for k in sorted(set(saved) | set(ours))
        if k not in _BASE_FIELDS_IGNORED and saved.get(k) != ours.get(k)
    ]
    if diff:
        where = f" (recorded base: {meta['base']})" if meta.get("base") else ""
        raise LmforgeError(f"adapter {source} was made for a different base model: {'; '.join(diff[:6])}; load it onto its own base{where}")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> LoRAConfig:
    """Apply the adapter folder `path` to `model` (a base, or a model already adapted the
    same way) and load its tensors. The base's config must match the adapter's, and every
    tensor must be present with its shape: otherwise a clear error and nothing loaded."""
    path = Path(path)
    meta = read_adapter_config(path)
    cfg = LoRAConfig.from_adapter_config(meta)
    check_base_config(meta, model, str(path))
    file = path / ADAPTER_WEIGHTS
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{file} is not a readable safetensors file ({e}); it may be truncated") from None
    extras = list(meta.get("trainable", []))
    params = dict(model.named_parameters(remove_duplicate=False))
    missing_extras = [k for k in extras if k not in params]
    if missing_extras:
        raise LmforgeError(f"adapter {path} holds {missing_extras} which this model lacks (add that head before loading the adapter)")
    # the names and shapes the model expects, checked before anything changes: an adapter
    # made for other targets or another rank fails here
    adapted = lora_layers(model)
    if adapted:
        expected = {f"{n}.lora_{ab}": tuple(getattr(layer, f"lora_{ab}").shape) for n, layer in adapted for ab in "ab"}
    else:
        modules = dict(model.named_modules())
        expected = {}
        for n in resolve_targets(model, cfg.targets):
            expected[f"{n}.lora_a"] = (cfg.r, modules[n].in_features)
            expected[f"{n}.lora_b"] = (modules[n].out_features, cfg.r)
    check_tensors(tensors, expected | {k: tuple(params[k].shape) for k in extras}, f"adapter {file}")
    if not adapted:
        apply_lora(model, cfg, trainable=extras)
    targets = {f"{n}.lora_{ab}": getattr(layer, f"lora_{ab}") for n, layer in lora_layers(model) for ab in "ab"}
    targets |= {k: params[k] for k in extras}
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(tensors[k])
    return cfg
