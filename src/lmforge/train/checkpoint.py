"""Training checkpoints that lose nothing, and never one that is half written.

A run folder holds `checkpoints/step-00000120/` (the step, 8 digits) with:

- `model/`: an ordinary lmforge model folder (`model.safetensors` with a tied head
  left out, `config.json`, the tokenizer), so `lmforge.load(".../model")` works on it;
- `optimizer.safetensors` + `optimizer.json`: the optimizer state dict, tensors in
  safetensors (bit-exact, dtype kept) and everything else as JSON: nothing is pickled,
  so reading a checkpoint runs no code from it;
- `rng.safetensors` + the rest of the random state in `trainer.json`;
- `trainer.json`: the caller's state (step, data cursor, counters, run config, the
  tokenizer's fingerprint), which a resume checks against the run it continues;
- `manifest.json`, written last: the step, the validation loss and every other file's
  size and sha256, so a truncated or altered file is found before it is used.

Why a folder is written whole or not at all: it is written with `lmforge.io.atomic_dir`,
built in a hidden temporary folder beside the final one, every file and folder fsynced,
then renamed into place. A crash mid-write leaves only a hidden `.step-*.tmp-*` folder,
which `list_checkpoints` never returns and the next save removes. Re-saving a step swaps
the folders atomically (or, where the system cannot, moves the old one aside as
`.step-*.old-*` first, which the next save puts back if the new one never landed).
Retention hides a folder (`.step-*.del-*`) before deleting it.

A save that fails (a full disk, any OS error) raises `CheckpointWriteError`, naming the
folder and the cause; its temporary folder is gone and the checkpoints before it are
untouched.

One writer per run folder (rank 0): a save repairs or removes hidden leftovers it finds
there.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import math
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.io import atomic_dir, fsync_dir, recover_leftovers, remove_dir
from lmforge.weights import WEIGHTS, check_tensors, expected_shapes

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
RUN_CONFIG = "run.json"  # what every recipe writes first into its run folder (recipes.common.start_run)
TRAINER_JSON = "trainer.json"
FORMAT = "lmforge.checkpoint"
FORMAT_VERSION = 1
# Files every checkpoint has: a manifest that does not list them is not ours. The model
# folder holds the full weights (model.safetensors + config.json) or, for a run that
# trains adapters over a frozen base, only what it trains (the recipe's `write_model`).
REQUIRED = (TRAINER_JSON,)

_STEP_DIR = re.compile(r"step-(\d{8,})")


class CheckpointError(LmforgeError):
    """A checkpoint that is incomplete or damaged; `problem` is the short reason."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path} is unusable: {problem}; {_older_hint(self.path)}")


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, read back exactly as it was saved."""

    path: Path
    step: int
    val_loss: float | None
    model_state: dict[str, torch.Tensor]  # tied head omitted, as saved
    optimizer_state: dict | None
    trainer_state: dict
    rng: dict | None  # as `capture_rng` returns it; give it to `restore_rng`
    config: Config | None = None  # the model's config (model/config.json)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` lives in `run_dir`."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


# --- random state ---------------------------------------------------------------------
def capture_rng() -> dict:
    """The state of every random generator a training step may draw from: Python's
    `random`, NumPy's global generator, torch's CPU generator and (when CUDA is
    available) every CUDA device's. Copies: drawing on does not change them."""
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return rng


def restore_rng(rng: dict) -> None:
    """Put back a `capture_rng` state: the next draws repeat those made right after it.
    Parts missing from `rng` are left alone; CUDA states are restored on the devices
    that exist here (a checkpoint from a GPU machine still restores on a CPU)."""
    if "python" in rng:
        version, internal, gauss_next = rng["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        for device, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def _rng_to_disk(rng: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a random state into tensors (for safetensors) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    if "python" in rng:
        version, internal, gauss_next = rng["python"]
        meta["python"] = {"version": version, "state": list(internal), "gauss_next": gauss_next}
    if "numpy" in rng:
        algorithm, keys, pos, has_gauss, cached = rng["numpy"][:5]
        tensors["numpy/keys"] = torch.from_numpy(np.asarray(keys).astype(np.int64))  # uint32 -> int64, exact
        meta["numpy"] = {"algorithm": algorithm, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if "torch" in rng:
        tensors["torch"] = rng["torch"]
    if "cuda" in rng:
        for i, state in enumerate(rng["cuda"]):
            tensors[f"cuda/{i}"] = state
        meta["cuda_devices"] = len(rng["cuda"])
    return tensors, meta


def _rng_from_disk(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    rng: dict[str, Any] = {}
    if "python" in meta:
        p = meta["python"]
        rng["python"] = (p["version"], tuple(p["state"]), p["gauss_next"])
    if "numpy" in meta:
        n = meta["numpy"]
        keys = tensors["numpy/keys"].numpy().astype(np.uint32)
        rng["numpy"] = (n["algorithm"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"])
    if "torch" in tensors:
        rng["torch"] = tensors["torch"]
    if "cuda_devices" in meta:
        rng["cuda"] = [tensors[f"cuda/{i}"] for i in range(meta["cuda_devices"])]
    return rng


# --- optimizer state without pickle ---------------------------------------------------
def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for `obj`, its tensors moved into `tensors` under path-like names
    ("state/0/exp_avg"). Tuples, non-string dict keys (the int parameter ids of
    `optimizer.state_dict()`) and tensors are tagged so they come back as they were."""
    if isinstance(obj, torch.Tensor):
        key, n = name, 1
        while key in tensors:  # only if a key itself holds "/"
            key, n = f"{name}~{n}", n + 1
        tensors[key] = obj
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        sub = (lambda k: f"{name}/{k}" if name else str(k))
        if all(isinstance(k, str) and not (k.startswith("__") and k.endswith("__")) for k in obj):
            return {k: _encode(v, sub(k), tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, "", {}), _encode(v, sub(k), tensors)] for k, v in obj.items()]}
    raise TypeError(
        f"optimizer state holds a {type(obj).__name__} at {name or 'the top'}: only tensors, numbers, strings, "
        "None, lists, tuples and dicts can be saved without pickle"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


# --- writing --------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    config: Config,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None = None,
    trainer_state: dict | None = None,
    rng: dict | None = None,
    tokenizer: object | None = None,
    val_loss: float | None = None,
    keep_last: int = 3,
    write_model: Callable[[Path], object] | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step-NNNNNNNN/` atomically and apply retention.

    `model_state` uses the plain GPT names; a tied head in it is dropped (it is the
    embedding). Retention keeps the newest `keep_last` checkpoints (0: all), the best
    by validation loss, and always the one just written. A non-finite `val_loss` is
    recorded as None (it can never be the best). Returns the checkpoint folder.

    `write_model(folder)`, when given, writes the model folder instead of `model_state`
    (a LoRA run saves its adapters there: the frozen base is not copied every time).
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise LmforgeError(f"checkpoint step must be a non-negative int, got {step!r}")
    if keep_last < 0:
        raise LmforgeError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    model_state = dict(model_state)
    if config.tie_embeddings:
        model_state.pop("lm_head.weight", None)
    if write_model is None:
        check_tensors(model_state, expected_shapes(config), "the model state to checkpoint")
    val = float(val_loss) if val_loss is not None and math.isfinite(val_loss) else None
    # everything JSON first: a state that cannot be saved fails before any file is written
    rng_tensors, rng_meta = _rng_to_disk(rng) if rng is not None else ({}, None)
    trainer_json = json.dumps({"trainer_state": trainer_state or {}, "rng": rng_meta}, indent=1)
    optim_tensors: dict[str, torch.Tensor] = {}
    optim_json = None
    if optimizer_state is not None:
        optim_json = json.dumps(_encode(optimizer_state, "", optim_tensors), indent=1)

    ckdir = Path(run_dir) / CHECKPOINTS
    final = ckdir / f"step-{step:08d}"
    try:
        _write(final, config, model_state, optim_tensors, optim_json, rng, rng_tensors, trainer_json, tokenizer, val,
               write_model)
    except (OSError, SafetensorError) as e:  # a full disk, a lost mount, no permission: atomic_dir left nothing behind
        raise CheckpointWriteError(final, e) from e
    if keep_last:
        _retain(ckdir, keep_last, final)  # deletes as far as it can, never raises for a folder it cannot remove
    return final


class CheckpointWriteError(LmforgeError):
    """A checkpoint could not be written (`cause` says why: a full disk, permissions...).
    Nothing of it is left behind; the checkpoints written before are intact."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        self.path, self.cause = Path(path), cause
        fix = ("free space on that disk (or give another --out)" if _disk_full(cause)
               else "fix the cause (or give another --out)")
        super().__init__(
            f"could not save checkpoint {path.name} in {path.parent}: {_cause(cause)}. Nothing of it was left behind "
            f"and the checkpoints saved before are intact; {fix}, then continue with --resume"
        )


def _cause(e: BaseException) -> str:
    """An OS error in a few words: "No space left on device (writing /x/y)"."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" (writing {e.filename})" if e.filename else "")
    m = re.search(r'message: "([^"]+)"', str(e))  # safetensors: `IoError(Os { code: 28, ..., message: "No space..." })`
    return m.group(1) if m else str(e) or type(e).__name__


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    return "code: 28," in str(e) or "No space left" in str(e) or "StorageFull" in str(e)


def _write(final: Path, config: Config, model_state: dict[str, torch.Tensor], optim_tensors: dict[str, torch.Tensor],
           optim_json: str | None, rng: dict | None, rng_tensors: dict[str, torch.Tensor], trainer_json: str,
           tokenizer: object | None, val: float | None, write_model: Callable[[Path], object] | None) -> None:
    """The checkpoint folder `final`, whole or not at all (`atomic_dir`)."""
    step = _step_of(final)
    # every step's leftovers, not only this one's: a killed save of another step, or an
    # older checkpoint a crash left moved aside mid-replace (put back before retention)
    recover_leftovers(final.parent, _is_step_name)
    with atomic_dir(final) as tmp:
        model_dir = tmp / MODEL_DIR
        model_dir.mkdir()
        if write_model is not None:
            write_model(model_dir)
        else:
            save_file(_storable(model_state), model_dir / WEIGHTS, metadata={"format": "pt"})
            config.save(model_dir)
        if tokenizer is not None:
            tokenizer.save(model_dir)
        if optim_json is not None:
            save_file(_storable(optim_tensors), tmp / OPTIMIZER_TENSORS)
            (tmp / OPTIMIZER_JSON).write_text(optim_json + "\n", encoding="utf-8")
        if rng is not None:
            save_file(_storable(rng_tensors), tmp / RNG_TENSORS)
        (tmp / TRAINER_JSON).write_text(trainer_json + "\n", encoding="utf-8")
        files = {
            f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(tmp.rglob("*")) if f.is_file()
        }
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "val_loss": val,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _is_step_name(name: str) -> bool:
    return _STEP_DIR.fullmatch(name) is not None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _retain(ckdir: Path, keep_last: int, just_saved: Path) -> None:
    ckpts = list_checkpoints(ckdir)
    keep = set(ckpts[-keep_last:]) | {just_saved}
    scored = [(v, _step_of(p), p) for p in ckpts if (v := _manifest_val_loss(p)) is not None]
    if scored:
        keep.add(min(scored, key=lambda s: (s[0], s[1]))[2])
    for p in ckpts:
        if p not in keep:
            remove_dir(p)  # hidden first: a crash mid-delete leaves nothing list_checkpoints returns
    fsync_dir(ckdir)


def _manifest_val_loss(path: Path) -> float | None:
    try:
        v = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("val_loss")
    except (OSError, ValueError, AttributeError):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# --- finding and reading --------------------------------------------------------------
def _step_of(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))


def _checkpoints_folder(run_dir: Path) -> Path:
    """`run_dir/checkpoints`, or `run_dir` itself if it is that folder."""
    if (run_dir / CHECKPOINTS).is_dir() or run_dir.name != CHECKPOINTS:
        return run_dir / CHECKPOINTS
    return run_dir


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint folders of a run (or of its `checkpoints/` folder), oldest step
    first. Hidden temporary folders of unfinished saves are never listed; whether a
    listed one is intact is `verify_checkpoint`'s question."""
    ckdir = _checkpoints_folder(Path(run_dir))
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=_step_of)


def _older_hint(path: Path) -> str:
    """How to go on: name the newest older checkpoint of the same run, if there is one."""
    if path.parent.name == CHECKPOINTS and _STEP_DIR.fullmatch(path.name):
        older = [p for p in list_checkpoints(path.parent) if _step_of(p) < _step_of(path)]
        if older:
            return f"resume from an older checkpoint instead, e.g. --resume {older[-1]}"
        return f"there is no older checkpoint in {path.parent}: start the run again without --resume"
    return "resume from an older checkpoint instead (--resume CHECKPOINT_FOLDER)"


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(path, "the folder does not exist")
    if not file.is_file():
        raise CheckpointError(path, f"{MANIFEST} is missing (the save never finished, or the file was deleted)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"{MANIFEST} is truncated or not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(path, f"{MANIFEST} is not an lmforge checkpoint manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > FORMAT_VERSION:
        raise LmforgeError(
            f"checkpoint {path} has format version {manifest.get('version')!r}; this lmforge reads up to {FORMAT_VERSION}: upgrade lmforge"
        )
    return manifest


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every file against the manifest (presence, size, sha256); raise
    `CheckpointError` naming the first file that is missing, truncated or altered."""
    path = Path(path)
    manifest = _read_manifest(path)
    files = manifest["files"]
    for name in REQUIRED:
        if name not in files:
            raise CheckpointError(path, f"{MANIFEST} does not list {name}")
    if not any(name.startswith(f"{MODEL_DIR}/") and name.endswith(".safetensors") for name in files):
        raise CheckpointError(path, f"{MANIFEST} lists no weights in {MODEL_DIR}/")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(path, f"{name} is missing")
        size, expected = file.stat().st_size, entry.get("size")
        if size != expected:
            how = "truncated" if isinstance(expected, int) and size < expected else "of the wrong size"
            raise CheckpointError(path, f"{name} is {how}: {size} bytes, the manifest says {expected}")
        if _sha256(file) != entry.get("sha256"):
            raise CheckpointError(path, f"{name} does not match its sha256 in the manifest (its content changed on disk)")


def _load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"{name} is not a readable safetensors file ({e})") from None


def _load_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"{name} is not readable JSON ({e})") from None


def read_checkpoint_state(path: str | os.PathLike) -> tuple[dict, Config | None]:
    """(the trainer state, the model's config or None for an adapter checkpoint) of a
    checkpoint, without its tensors: what a resume checks before it loads anything.
    Not verified: give it a folder `verify_checkpoint` (or `find_resumable`) passed."""
    path = Path(path)
    files = _read_manifest(path)["files"]
    trainer = _load_json(path, TRAINER_JSON)
    state = trainer.get("trainer_state") if isinstance(trainer, dict) else None
    config = Config.load(path / MODEL_DIR) if f"{MODEL_DIR}/config.json" in files else None
    return (state if isinstance(state, dict) else {}), config


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Verify (unless the caller just did: `verify=False`), then read everything back
    (tensors on CPU). Only safetensors and JSON are parsed: reading a checkpoint never
    unpickles, so it runs no code from it."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    manifest = _read_manifest(path)
    files = manifest["files"]
    full = f"{MODEL_DIR}/{WEIGHTS}" in files  # else the run saved adapters (see save_checkpoint's write_model)
    model_state = _load_tensors(path / MODEL_DIR, WEIGHTS) if full else {}
    config = Config.load(path / MODEL_DIR) if f"{MODEL_DIR}/config.json" in files else None
    optimizer_state = None
    if OPTIMIZER_JSON in files:
        tensors = _load_tensors(path, OPTIMIZER_TENSORS) if OPTIMIZER_TENSORS in files else {}
        optimizer_state = _decode(_load_json(path, OPTIMIZER_JSON), tensors)
    trainer = _load_json(path, TRAINER_JSON)
    rng = None
    if trainer.get("rng") is not None:
        rng = _rng_from_disk(_load_tensors(path, RNG_TENSORS) if RNG_TENSORS in files else {}, trainer["rng"])
    return Checkpoint(
        path=path,
        step=int(manifest["step"]),
        val_loss=manifest.get("val_loss"),
        model_state=model_state,
        optimizer_state=optimizer_state,
        trainer_state=trainer.get("trainer_state") or {},
        rng=rng,
        config=config,
    )


def is_checkpoint_folder(path: Path) -> bool:
    """A checkpoint folder (intact or not), as opposed to a run folder: it has a manifest
    or trainer state, or is a step-N folder of a run (a folder holding model/ alone is not
    one: a quickstart's folder is like that)."""
    return path.is_dir() and ((path / MANIFEST).is_file() or (path / TRAINER_JSON).is_file() or bool(_STEP_DIR.fullmatch(path.name)))


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` holds a training run: the `run.json` every recipe writes first, or
    its checkpoints/."""
    path = Path(path)
    return (path / RUN_CONFIG).is_file() or (path / CHECKPOINTS).is_dir()


def find_resumable(path: str | os.PathLike, say: Callable[[str], object] = print) -> Path | None:
    """The checkpoint to resume from.

    `path` is a run folder: its newest intact checkpoint, saying for each newer damaged
    one that it is skipped (None if there is no checkpoint or none is intact). `path`
    is a checkpoint folder: that one, verified (a damaged one is an error: the user
    asked for it by name).
    """
    path = Path(path)
    if not path.exists():
        raise LmforgeError(
            f"{path} does not exist: give a run folder (with {CHECKPOINTS}/) or a checkpoint folder ({CHECKPOINTS}/step-NNNNNNNN)"
        )
    if is_checkpoint_folder(path):
        verify_checkpoint(path)
        return path
    ckpts = list_checkpoints(path)
    for i in range(len(ckpts) - 1, -1, -1):
        try:
            verify_checkpoint(ckpts[i])
            return ckpts[i]
        except CheckpointError as e:
            fallback = str(ckpts[i - 1]) if i else "nothing: no older checkpoint is left"
            say(f"checkpoint {ckpts[i]} is damaged ({e.problem}); falling back to {fallback}")
    return None
