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

`merge_lora` folds the adapters into plain `nn.Linear` weights, giving a normal model
folder with `save_pretrained`; adapter folders (save, load) are `lmforge.finetune.adapter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.fields import dataclass_from_dict, field_names

# Target names are the layers' own names in `lmforge.model`. The GPT-2 family's MLP is
# fc -> proj where Llama's is gate/up -> down: `up` and `fc` are the same target, as
# are `down` and `proj`, so one target list means the same thing in both families.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "fc", "proj")
ALL_LINEAR = "all-linear"
_ALIASES = {"up": ("up", "fc"), "fc": ("up", "fc"), "down": ("down", "proj"), "proj": ("down", "proj")}


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
        return dataclass_from_dict(cls, d, "LoRA config", key="LoRA setting")

    @classmethod
    def from_adapter_config(cls, meta: dict[str, Any]) -> LoRAConfig:
        """The LoRA settings of an adapter folder's adapter_config.json (`save_adapter`
        writes them as top-level keys beside the base, its config and the format); its
        other keys are not settings, and a setting it lacks takes its default."""
        return cls.from_dict({k: meta[k] for k in field_names(cls) if k in meta})


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
        check_rank(cfg.r, linear, "this layer")
        linear.__class__ = lora_class_for(type(linear))
        linear._add_adapter(cfg)  # type: ignore[attr-defined]
        return linear  # type: ignore[return-value]

    def _add_adapter(self, cfg: LoRAConfig) -> None:
        check_rank(cfg.r, self, "this layer")
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


def check_rank(r: int, layer: nn.Linear, name: str, note: str = "") -> None:
    """Refuse a rank above min(in_features, out_features): B A can have no higher rank than
    that, so the extra rank only adds parameters (and changes alpha / r), never capacity."""
    most = min(layer.in_features, layer.out_features)
    if r > most:
        raise LmforgeError(
            f"LoRA rank r={r} is larger than {name} ({layer.in_features} inputs, {layer.out_features} outputs){note}: "
            f"its update B A can have rank at most {most}, so a larger r only adds parameters: lower r (--lora-r) to at most {most}"
        )


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
    `trainable` (e.g. the classification head "score", or "norm_f"); each prefix must name something.
    The base weights stay the same tensors. Returns the counts (print it).
    """
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    already = lora_layers(model)
    if already:
        raise LmforgeError(f"the model already has LoRA adapters ({already[0][0]}, ...); merge them (merge_lora) or load a fresh base")
    names = resolve_targets(model, cfg.targets)
    modules = dict(model.named_modules())
    # the narrowest target bounds r for them all; checked before anything changes, so a refusal leaves the model as it was
    narrowest = min(names, key=lambda n: min(modules[n].in_features, modules[n].out_features))
    check_rank(cfg.r, modules[narrowest], f"the layer {narrowest}", f", the narrowest of the {len(names)} target layers" if len(names) > 1 else "")
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


# --- the adapters' tensors ---------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every LoRA A and B, and every other trainable
    parameter (the classification head, a norm), by its name in the model."""
    lora = {}
    for name, layer in lora_layers(model):
        lora[f"{name}.lora_a"] = layer.lora_a
        lora[f"{name}.lora_b"] = layer.lora_b
    lora_ids = {id(t) for t in lora.values()}
    extra = {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids}
    return {k: t.detach() for k, t in {**lora, **extra}.items()}
