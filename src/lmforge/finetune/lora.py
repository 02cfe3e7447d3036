"""LoRA: fine-tune a frozen model through small low-rank adapters beside its linear layers.

A LoRA layer computes W x + b + (B A x) * scale, where W (out, in) is the frozen base
weight, A (r, in) and B (out, r) are the only trained matrices, and scale is
alpha / r (or alpha / sqrt(r) with rsLoRA, which keeps the update's size independent
of r). B starts at zero, so an adapted model starts exactly where its base is, and
B A has rank r, so a 16-layer 1B model trains a few million numbers instead of a
billion, and its adapter file is megabytes.

`LoRALinear` *is* an `nn.Linear` (a subclass): `apply_lora` converts the target
layers in place by changing their class and adding A and B, so the base weight is the
same tensor, never copied. The base output comes from `super().forward(x)`, so a
subclass of another linear layer (the 4-bit `Linear4bit`, whose forward dequantizes)
gets LoRA by inheritance: `class LoRALinear4bit(LoRALinear, Linear4bit)`.

Files: an adapter folder holds `adapter.safetensors` (A, B and any extra trained
tensors, such as a classifier head) and `adapter_config.json` (the LoRA settings and
the base's config, so an adapter is never applied to a model it was not made for).
`merge_lora` folds the adapters into plain `nn.Linear` weights, giving a normal model
folder with `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.io import atomic_output_dir

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "lmforge.lora"
FORMAT_VERSION = 1

# Target names are the layers' own names in `lmforge.model`. The GPT-2 family's MLP is
# fc -> proj where Llama's is gate/up -> down: `up` and `fc` are the same target, as
# are `down` and `proj`, so one target list means the same thing in both families.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "fc", "proj")
ALL_LINEAR = "all-linear"
_ALIASES = {"up": ("up", "fc"), "fc": ("up", "fc"), "down": ("down", "proj"), "proj": ("down", "proj")}
# Config fields that do not change what the weights compute: an adapter made on a
# base with other values here still fits it.
_BASE_FIELDS_IGNORED = ("name", "dropout", "attention")


# --- settings --------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """Rank, strength and placement of the adapters.

    `targets` are layer names (`q, k, v, o, gate, up, down`, with `fc`/`proj` the GPT-2
    spellings of up/down) or `all-linear` (every linear layer in the blocks; the output
    head and the embeddings are never adapted). A comma-separated string is accepted.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(dict.fromkeys(self.targets))  # a list from JSON -> tuple, duplicates dropped
        self.validate()

    def validate(self) -> None:
        """Reject settings that cannot work, saying which values can."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LmforgeError(f"LoRA rank r must be a positive integer (typically 4-64), got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LmforgeError(f"LoRA alpha must be a positive number (often 2 * r), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise LmforgeError(f"LoRA needs at least one target: choose among {', '.join(TARGETS)} or {ALL_LINEAR}")
        unknown = [t for t in self.targets if t not in (*TARGETS, ALL_LINEAR)]
        if unknown:
            raise LmforgeError(f"unknown LoRA target(s) {unknown}; choose among {', '.join(TARGETS)} or {ALL_LINEAR}")
        if not isinstance(self.rslora, bool):
            raise LmforgeError(f"rslora must be true or false, got {self.rslora!r}")

    @property
    def scale(self) -> float:
        """What B A x is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LmforgeError(f"unknown LoRA setting(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


# --- the layer ---------------------------------------------------------------------------
class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank adapter: y = base(x) + B(A(dropout(x))) * scale.

    Usually made by `apply_lora` (which converts existing layers, keeping their
    weights); constructing one directly gives a fresh nn.Linear with an adapter.
    `enabled = False` gives the base output exactly; `merge()` folds the adapter into
    the weight (the forward then adds nothing more) and `unmerge()` takes it out again.
    """

    lora_a: nn.Parameter
    lora_b: nn.Parameter

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_adapter(LoRAConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora))

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: LoRAConfig) -> LoRALinear:
        """Turn `linear` itself into a LoRA layer of its own kind (see `lora_class_for`):
        same object, same weight and bias tensors, plus a zero-initialised adapter."""
        if isinstance(linear, LoRALinear):
            raise LmforgeError("this layer already has a LoRA adapter; merge it (merge_lora) or start from the base model")
        linear.__class__ = lora_class_for(type(linear))
        linear._add_adapter(cfg)  # type: ignore[attr-defined]
        return linear  # type: ignore[return-value]

    def _add_adapter(self, cfg: LoRAConfig) -> None:
        dtype, device = self._adapter_dtype_device()
        self.r, self.alpha, self.rslora, self.scale = cfg.r, cfg.alpha, cfg.rslora, cfg.scale
        self.lora_a = nn.Parameter(torch.empty(cfg.r, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, cfg.r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The base weight's dtype and device; a quantized base (packed codes, or no dense
        `weight` at all) gives the dtype its weight had before quantization."""
        weight = self.weight
        if weight is not None and weight.is_floating_point():
            return weight.dtype, weight.device
        dtype = getattr(self, "weight_dtype", None) or getattr(self, "compute_dtype", None) or torch.float32
        tensor = next(iter([*self.parameters(recurse=False), *self.buffers(recurse=False)]), None)
        return dtype, tensor.device if tensor is not None else torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # the base layer's own forward (a 4-bit base dequantizes there)
        if self.merged or not self.enabled:
            return out
        h = self.lora_dropout(x.to(self.lora_a.dtype))
        return out + (F.linear(F.linear(h, self.lora_a), self.lora_b) * self.scale).to(out.dtype)

    # --- folding the adapter into the weight ---------------------------------------
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as a dense (out, in) matrix: dequantized if the base is quantized."""
        dequantize = getattr(self, "dequantized_weight", None)
        if dequantize is not None:
            return dequantize(dtype or self.lora_a.dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """B A * scale, the (out, in) change the adapter makes to the weight, in fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    @torch.no_grad()
    def merge(self, *, warn: bool = True) -> nn.Linear:
        """Fold the adapter into the weight; use the returned layer.

        A dense base is changed in place (and this layer returned, marked merged, so its
        forward adds nothing more). A quantized base cannot hold the sum: its weight is
        dequantized, summed and returned as a new plain nn.Linear, with a warning, since
        that model is not the quantized one the adapter was trained on; this layer is
        left as it was.
        """
        if hasattr(self, "dequantized_weight"):
            dense = self.dense_weight()
            plain = _plain_linear(self, nn.Parameter(dense + self.delta_weight().to(dense.dtype), requires_grad=False))
            if warn:
                warnings.warn(_DEQUANTIZED_WARNING, stacklevel=2)
            return plain
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out of the weight again (the weight comes back within fp32 rounding)."""
        if not self.merged:
            raise LmforgeError("this LoRA layer is not merged; there is nothing to unmerge")
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        state = ", merged" if self.merged else "" if self.enabled else ", disabled"
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}{state}"


_DEQUANTIZED_WARNING = (
    "merging LoRA into a quantized layer gives a dequantized plain nn.Linear: the merged model is not the "
    "quantized one the adapter was trained on (merge onto the full-precision base for the exact result)"
)


def _plain_linear(layer: nn.Linear, weight: nn.Parameter) -> nn.Linear:
    """A plain nn.Linear holding `weight` and `layer`'s bias (the same tensors, no copy)."""
    with torch.device("meta"):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight = weight
    if layer.bias is not None:
        plain.bias = layer.bias
    plain.train(layer.training)
    return plain


_LORA_CLASSES: dict[type[nn.Linear], type[LoRALinear]] = {nn.Linear: LoRALinear}


def register_lora_class(base: type[nn.Linear], lora_cls: type[LoRALinear]) -> None:
    """Use `lora_cls` (e.g. `class LoRALinear4bit(LoRALinear, Linear4bit)`) for layers of type `base`."""
    if not (issubclass(lora_cls, LoRALinear) and issubclass(lora_cls, base)):
        raise TypeError(f"{lora_cls.__name__} must subclass both LoRALinear and {base.__name__}")
    _LORA_CLASSES[base] = lora_cls


def lora_class_for(base: type[nn.Linear]) -> type[LoRALinear]:
    """The LoRA class for layers of type `base`: LoRALinear for nn.Linear, a registered one,
    or `LoRA<Base>(LoRALinear, Base)` made once, so the base's forward still runs first."""
    if not issubclass(base, nn.Linear):
        raise TypeError(f"LoRA adapts nn.Linear layers, not {base.__name__}")
    if base not in _LORA_CLASSES:
        _LORA_CLASSES[base] = type("LoRA" + base.__name__, (LoRALinear, base), {"__module__": __name__})
    return _LORA_CLASSES[base]


# --- a whole model -------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The model's LoRA layers by name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    named = getattr(model, "named_linears", None)
    if named is None:
        raise LmforgeError(f"apply_lora works on an lmforge GPT (it targets the layers of its blocks), not {type(model).__name__}")
    return list(named())


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The names of the block linears that `targets` select, in model order.

    Each target must select something: `gate` on a GPT-2-family model (which has no
    gate) is an error that lists the layer names the model does have.
    """
    linears = _linears(model)
    leaf = {name: name.rsplit(".", 1)[-1] for name, _ in linears}
    chosen: set[str] = set()
    for target in targets:
        if target == ALL_LINEAR:
            found = set(leaf)
        else:
            found = {name for name, short in leaf.items() if short in _ALIASES.get(target, (target,))}
        if not found:
            have = ", ".join(dict.fromkeys(leaf.values()))
            raise LmforgeError(
                f"LoRA target {target!r} matches no linear layer in this model; its layers are named {have} (or use {ALL_LINEAR})"
            )
        chosen |= found
    return [name for name, _ in linears if name in chosen]


@dataclass
class LoRAReport:
    """What `apply_lora` did: the adapted layers and how many parameters will train."""

    trainable: int
    total: int
    layers: list[str]
    r: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        kinds = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in self.layers))
        return (
            f"LoRA r={self.r} on {len(self.layers)} layers ({kinds}): "
            f"{self.trainable:,} trainable of {self.total:,} parameters ({self.percent:.2f}%)"
        )


def apply_lora(model: nn.Module, cfg: LoRAConfig, trainable: Sequence[str] = ()) -> LoRAReport:
    """Add adapters to the layers `cfg.targets` selects, in place, and freeze the rest.

    Only the adapters train, plus the parameters whose names start with one of
    `trainable` (e.g. a classifier head, or "norm_f"); each prefix must name something.
    The base weights stay the same tensors. Returns the counts (print it).
    """
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    already = lora_layers(model)
    if already:
        raise LmforgeError(f"the model already has LoRA adapters ({already[0][0]}, ...); merge them (merge_lora) or load a fresh base")
    names = resolve_targets(model, cfg.targets)
    modules = dict(model.named_modules())
    params = list(model.named_parameters(remove_duplicate=False))  # a tied head answers to both names
    unmatched = [p for p in trainable if not any(name.startswith(p) for name, _ in params)]
    if unmatched:
        tops = ", ".join(dict.fromkeys(name.split(".")[0] for name, _ in params))
        raise LmforgeError(f"trainable prefix(es) {unmatched} match no parameter name; the model's parameters start with {tops}")
    keep = {id(p) for name, p in params if any(name.startswith(t) for t in trainable)}
    for _, p in params:
        p.requires_grad_(id(p) in keep)
    for name in names:
        layer = LoRALinear.from_linear(modules[name], cfg)
        layer.lora_a.requires_grad_(True)
        layer.lora_b.requires_grad_(True)
    trainable_count, total = count_parameters(model)
    return LoRAReport(trainable=trainable_count, total=total, layers=names, r=cfg.r)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) weights, each shared tensor once; a 4-bit layer's packed weight
    (buffers, not parameters) counts as the in x out weights it holds."""
    distinct = list(model.parameters())
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m.weight is None)
    return sum(p.numel() for p in distinct if p.requires_grad), sum(p.numel() for p in distinct) + packed


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off: the model computes exactly its base)."""
    for name, layer in lora_layers(model):
        if layer.merged and not enabled:
            raise LmforgeError(f"{name} is merged: its adapter is inside the weight and cannot be switched off; unmerge first")
        layer.enabled = enabled


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model as its base inside the block (the frozen reference of DPO-style
    recipes, without a second copy of the model); the switches come back afterwards."""
    layers = lora_layers(model)
    before = [layer.enabled for _, layer in layers]
    try:
        set_adapters_enabled(model, False)
        yield model
    finally:
        for (_, layer), flag in zip(layers, before, strict=True):
            layer.enabled = flag


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain nn.Linear whose weight has the adapter folded in.

    The model is changed in place and returned; `save_pretrained` then writes a normal
    model folder (the usual key names, no adapter). Dense bases keep their weight tensor
    (updated in place); quantized ones become dequantized (with one warning).
    """
    modules = dict(model.named_modules())
    dequantized = 0
    for name, layer in lora_layers(model):
        merged = layer.merge(warn=False)
        if merged is layer:
            merged = _plain_linear(layer, layer.weight)
        else:
            dequantized += 1
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, merged)
    if dequantized:
        warnings.warn(f"{dequantized} layer(s): {_DEQUANTIZED_WARNING}", stacklevel=2)
    return model


# --- adapter folders -------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every LoRA A and B, and every other trainable
    parameter (a classifier head, a norm), by its name in the model."""
    lora = {}
    for name, layer in lora_layers(model):
        lora[f"{name}.lora_a"] = layer.lora_a
        lora[f"{name}.lora_b"] = layer.lora_b
    lora_ids = {id(t) for t in lora.values()}
    extra = {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids}
    return {k: t.detach() for k, t in {**lora, **extra}.items()}


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

    `base` names the model the adapter belongs on (a folder, stored as an absolute path,
    or a name); `lmforge lora merge` uses it when --base is omitted. `quantize` ("nf4")
    records that the adapter was trained over a quantized base, so `load_adapted`
    rebuilds that same model. An existing adapter folder (or an empty one) is replaced;
    any other existing folder only with `overwrite`.
    """
    import lmforge

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
    if base is not None and Path(base).exists():
        base = str(Path(base).resolve())
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **cfg.to_dict(),
        "base": None if base is None else str(base),
        "base_config": _base_config_dict(model),
        "quantize": quantize,
        "trainable": sorted(k for k in tensors if k not in lora_keys),
        "lmforge_version": lmforge.__version__,
    }
    path = Path(path)
    replace = overwrite or is_adapter_dir(path) or (path.is_dir() and not any(path.iterdir()))
    with atomic_output_dir(path, overwrite=replace) as tmp:
        (tmp / ADAPTER_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


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


def _check_base(meta: dict[str, Any], model: nn.Module, source: str) -> None:
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
    cfg = LoRAConfig.from_dict({f.name: meta[f.name] for f in dataclasses.fields(LoRAConfig) if f.name in meta})
    _check_base(meta, model, str(path))
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
    from lmforge.pretrained import check_tensors

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


def load_adapted(
    adapter: str | os.PathLike,
    base: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    quantize: bool | None = None,
) -> nn.Module:
    """Base model + adapter folder -> the adapted model (with the base's tokenizer), in eval mode.

    `base` defaults to the one recorded in the adapter; it is loaded with `lmforge.load`
    (our folder, Hugging Face, llama2.c, a training run). `quantize` None follows the
    adapter: one trained over an NF4 base (QLoRA) gets the base quantized the same way,
    which reproduces the model it was trained and evaluated as; False keeps the base
    dense (what merging wants). A classifier's adapter gets its label head back.
    """
    from lmforge.pretrained import load

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
            raise LmforgeError(f"adapter {adapter} classifies into {labels} but holds no trained label head (score.weight)")
        model = _with_labels(model, labels)
    scheme = meta.get("quantize")
    if scheme and quantize is not False:
        if scheme != "nf4":
            raise LmforgeError(f"adapter {adapter} was trained over a {scheme!r} base, which this lmforge cannot rebuild (it knows nf4)")
        from lmforge.finetune.nf4 import quantize_model

        quantize_model(model)
    load_adapter(model, adapter)
    from lmforge.pretrained import load_tokenizer

    tokenizer = load_tokenizer(Path(adapter))  # a training run's adapter carries its tokenizer (and chat template)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model.eval()


def _with_labels(model: nn.Module, labels: list[str]) -> nn.Module:
    """The base rebuilt with a (still empty) classification head for `labels`; the
    adapter file holds the head's trained weights."""
    from lmforge.model import GPT

    tokenizer = getattr(model, "tokenizer", None)
    with torch.device("meta"):
        fresh = GPT(model.config.replace(labels=list(labels)))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(not k.startswith("score.") for k in missing):
        raise LmforgeError(f"could not rebuild the base with a label head: missing {missing}, unexpected {unexpected}")
    fresh.score.to_empty(device=model.tok_emb.weight.device)
    fresh.score.to(model.tok_emb.weight.dtype)
    from lmforge.pretrained import _finish

    fresh = _finish(fresh, model.tok_emb.weight.device)
    fresh.tokenizer = tokenizer
    return fresh.eval()
