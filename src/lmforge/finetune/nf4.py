"""NormalFloat4 weights: QLoRA's frozen 4-bit base, byte for byte what bitsandbytes stores.

A weight is cut into blocks of `block_size` consecutive elements (of the flattened
tensor). Each block keeps its absolute maximum (absmax) and each element becomes the
index of the NF4 level nearest to x / absmax. The 16 levels are quantiles of a normal
distribution (trained weights are close to normal), so every code is used about
equally often. Two 4-bit codes share a byte, the first element in the high nibble.

Double quantization (bitsandbytes `compress_statistics=True`) shrinks the fp32 absmax
too: their mean is subtracted (the `offset`) and the rest is stored as 8-bit codes of
the signed dynamic map, in blocks of 256 with one fp32 scale each. That takes the
statistics from 0.5 bits per weight to 0.127, so a weight costs 0.516 bytes instead
of 2 (bf16) or 4 (fp32).

The 4-bit codes, the absmax and the dequantized weights equal bitsandbytes 0.50's bit
for bit (the tests compare them). The 8-bit absmax codes equal its reference PyTorch
kernel's; its CPU C kernel searches the dynamic map approximately and sometimes picks
the farther of two entries, so on CPU about 0.2% of those codes differ (ours is the
nearer one; the tests measure it). Where bitsandbytes makes a choice that looks
arbitrary (ties go to the lower level, whole blocks are multiplied by the reciprocal of
their absmax but the last, partial one is divided by it), the code copies it and says so.

`Linear4bit` is the layer (its weight as buffers, dequantized on the fly in forward
and again in backward so the input still gets its gradient) and `quantize_model`
puts it in place of every linear layer of a GPT's blocks. `build_quantized` builds that
same model while its weights are read, one tensor at a time (`weights.TensorStream`),
so that the dense blocks (in fp32, 7.8 times their 4-bit size) never exist whole.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import GPT, on_meta
from lmforge.weights import TensorStream, retie

# The NF4 levels as bitsandbytes stores them (fp32, ascending): quantiles of N(0, 1),
# 8 for the positive half and 7 for the negative one plus an exact zero, scaled to
# [-1, 1]; QLoRA's `create_normal_map(offset=0.9677083)`. The tests rebuild them from
# the normal quantile function.
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

ABSMAX_BLOCK_SIZE = 256  # bitsandbytes' block for the second (8-bit) quantization
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # weight dtypes, by id in the metadata
_DTYPE_OF = {v: k for k, v in _DTYPES.items()}


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 2**total_bits sorted fp32 values of bitsandbytes' dynamic 8-bit type.

    Dettmers' dynamic tree quantization (arXiv 1511.04561): for each decimal exponent
    10**-6 ... 10**0 (with the defaults), the midpoints of an even split of [0.1, 1],
    with twice as many points per step up, so small magnitudes keep relative
    precision; plus 0 and 1. The arithmetic (all fp32: linspace, midpoints, the scaling
    by the power of ten) is bitsandbytes' own, so the values are equal bit for bit.
    """
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for i in range(max_exponent_bits):
        steps = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        bounds = torch.linspace(0.1, 1, steps + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = 10 ** (-(max_exponent_bits - 1) + i)
        values += (decade * means).tolist()
        if signed:
            values += (-decade * means).tolist()
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # values with no exponent bit at all
    if extra > 0:
        bounds = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += means.tolist()  # the top decade, 10**0
        if signed:
            values += (-means).tolist()
    values += [0.0, 1.0]
    if len(values) > 2**total_bits:
        raise LmforgeError(
            f"a dynamic map with max_exponent_bits={max_exponent_bits} needs {len(values)} values, "
            f"more than total_bits={total_bits} can index; use fewer exponent bits"
        )
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@cache
def _midpoints(code: tuple[float, ...] | None, device: torch.device) -> torch.Tensor:
    """The fp32 decision boundaries between neighbouring levels of NF4 (None) or the dynamic map."""
    levels = torch.tensor(code, dtype=torch.float32) if code is not None else create_dynamic_map(signed=True)
    return ((levels[:-1] + levels[1:]) / 2).to(device)


@cache
def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the two NF4 levels a packed byte stands for (high nibble first)."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1).to(device)


@cache
def _dynamic_map(device: torch.device) -> torch.Tensor:
    return create_dynamic_map(signed=True).to(device)


def _quantize_blocks(flat: torch.Tensor, block_size: int, midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Level indices (int32) and fp32 absmax per block of the 1-D fp32 `flat`: bitsandbytes' blockwise rule.

    Each block is scaled into [-1, 1] by its absolute maximum and each value takes the
    nearest level; `bucketize` puts a value equal to a midpoint in the lower bucket, so
    ties go to the lower level. Two details copy bitsandbytes' reference kernels so the
    codes agree bit for bit: whole blocks are multiplied by the reciprocal of their
    absmax but the last, partial block is divided by it; and that last absmax is stored
    clamped to 1e-38 (an all-zero block elsewhere keeps absmax 0; its values are 0 either way).
    """
    n = flat.numel()
    full = n // block_size * block_size
    whole = flat[:full].view(-1, block_size)
    absmax = whole.abs().amax(dim=1)
    scaled = (whole * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp_(-1, 1)])
    return torch.bucketize(scaled, midpoints, out_int32=True), absmax


def _scale_blocks(x: torch.Tensor, size: int, scales: torch.Tensor) -> torch.Tensor:
    """Multiply each `size`-block of the 1-D `x` by its scale, in place (a last, shorter block too)."""
    full = x.numel() // size * size
    x[:full].view(-1, size).mul_(scales[: full // size, None])
    if full < x.numel():
        x[full:].mul_(scales[-1])
    return x


# --- 8-bit blockwise quantization with the dynamic map (the absmax statistics) ------------
def quantize_blockwise_8bit(values: torch.Tensor, block_size: int = ABSMAX_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes (one per value) and fp32 scales (one per block) of a 1-D tensor, with the dynamic map.

    The rule of `_quantize_blocks`: bitsandbytes' reference (pure PyTorch) kernel, and
    its CUDA one. Its CPU C kernel finds the entry by an approximate search and
    sometimes picks a farther one (mostly for values below 1% of the block's scale);
    the tests measure that and check that ours is never the farther of the two.
    """
    codes, scales = _quantize_blocks(values.reshape(-1).float(), block_size, _midpoints(None, values.device))
    return codes.to(torch.uint8), scales


def dequantize_blockwise_8bit(codes: torch.Tensor, scales: torch.Tensor, block_size: int = ABSMAX_BLOCK_SIZE) -> torch.Tensor:
    """fp32 values of `quantize_blockwise_8bit` codes: map entry times the block's scale."""
    values = _dynamic_map(codes.device).index_select(0, codes.reshape(-1).int())
    return _scale_blocks(values, block_size, scales)


# --- the quantized weight ------------------------------------------------------------------
@dataclass
class NF4Weight:
    """A weight in NF4: packed codes plus per-block absmax, exact or double-quantized.

    `codes` is uint8, ceil(numel / 2) bytes, two 4-bit codes each (the first element in
    the high nibble; an odd count pads with the code of 0). `absmax` is fp32 per block
    of `block_size`, or with double quantization the uint8 codes of (absmax - offset)
    with fp32 `absmax_scale` per `absmax_block_size` codes and fp32 `absmax_offset`.
    `dtype` is the dtype the weight had.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int = 64
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    absmax_block_size: int = ABSMAX_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors that hold the weight (the few integers of metadata aside)."""
        return sum(t.nbytes for t in (self.codes, self.absmax, self.absmax_scale, self.absmax_offset) if t is not None)

    def to(self, device: torch.device | str) -> NF4Weight:
        """The same weight on `device` (the tensors keep their dtypes)."""
        move = lambda t: None if t is None else t.to(device)
        return NF4Weight(
            move(self.codes), move(self.absmax), self.shape, self.dtype, self.block_size,
            move(self.absmax_scale), move(self.absmax_offset), self.absmax_block_size,
        )  # fmt: skip

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block, decoded from the 8-bit codes with double quantization."""
        if not self.double_quant:
            return self.absmax
        absmax = dequantize_blockwise_8bit(self.absmax, self.absmax_scale, self.absmax_block_size)
        return absmax.add_(self.absmax_offset)  # bitsandbytes: code * scale, then + offset, in fp32

    def meta(self) -> torch.Tensor:
        """int64 [block_size, absmax_block_size, dtype id, double_quant, *shape]: what the tensors do not say."""
        dq = int(self.double_quant)
        return torch.tensor([self.block_size, self.absmax_block_size, _DTYPES[self.dtype], dq, *self.shape], dtype=torch.int64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors can store them; `from_state_dict` reads them back)."""
        sd = {"codes": self.codes, "absmax": self.absmax, "meta": self.meta()}
        if self.double_quant:
            sd["absmax_scale"] = self.absmax_scale
            sd["absmax_offset"] = self.absmax_offset
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> NF4Weight:
        """The weight `state_dict` wrote, checked for consistency (a clear error if not)."""
        missing = {"codes", "absmax", "meta"} - set(sd)
        if missing:
            raise LmforgeError(f"an NF4 state dict needs the tensors {sorted(missing)}; it has {sorted(sd)}")
        block_size, absmax_block_size, dtype_id, dq, *shape = (int(v) for v in sd["meta"].tolist())
        if dtype_id not in _DTYPE_OF:
            raise LmforgeError(f"NF4 meta names dtype id {dtype_id}; known ids are {sorted(_DTYPE_OF)}")
        q = cls(
            sd["codes"], sd["absmax"], tuple(shape), _DTYPE_OF[dtype_id], block_size,
            sd.get("absmax_scale") if dq else None, sd.get("absmax_offset") if dq else None, absmax_block_size,
        )  # fmt: skip
        q.check()
        return q

    def check(self) -> None:
        """Raise LmforgeError unless the tensors have the sizes and dtypes the metadata implies."""
        n_blocks = -(self.numel // -self.block_size)
        want = {"codes": (torch.uint8, (self.numel + 1) // 2)}
        if self.double_quant:
            if self.absmax_offset is None:
                raise LmforgeError("a double-quantized NF4 weight needs absmax_offset as well as absmax_scale")
            want["absmax"] = (torch.uint8, n_blocks)
            want["absmax_scale"] = (torch.float32, -(n_blocks // -self.absmax_block_size))
            want["absmax_offset"] = (torch.float32, 1)
        else:
            want["absmax"] = (torch.float32, n_blocks)
        for name, (dtype, size) in want.items():
            t = getattr(self, name)
            if t is None or t.dtype != dtype or t.numel() != size:
                got = "nothing" if t is None else f"{t.dtype} with {t.numel()} elements"
                raise LmforgeError(
                    f"NF4 tensor {name!r} should be {dtype} with {size} elements for shape {self.shape} "
                    f"and block_size {self.block_size}, got {got}: the file does not belong to this layer"
                )


def quantize_nf4(
    weight: torch.Tensor, block_size: int = 64, double_quant: bool = True, absmax_block_size: int = ABSMAX_BLOCK_SIZE
) -> NF4Weight:
    """NF4 codes of `weight` (fp32, fp16 or bf16, any shape), as bitsandbytes' `quantize_4bit(quant_type="nf4")`.

    Blocks run over the flattened weight; the last one may be shorter. Each element
    gets the nearest level of x / absmax, the lower one at an exact tie.
    """
    if weight.dtype not in _DTYPES:
        raise LmforgeError(f"NF4 quantizes fp32, fp16 or bf16 weights, not {weight.dtype}; cast the weight first")
    if weight.numel() == 0:
        raise LmforgeError(f"cannot quantize an empty tensor (shape {tuple(weight.shape)})")
    if block_size < 1 or absmax_block_size < 1:
        raise LmforgeError(f"block sizes must be positive, got block_size={block_size}, absmax_block_size={absmax_block_size}")
    flat = weight.detach().reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise LmforgeError("the weight holds inf or NaN values; NF4 cannot represent them (fix or re-load the weight)")
    codes, absmax = _quantize_blocks(flat, block_size, _midpoints(NF4_LEVELS, flat.device))
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=NF4_LEVELS.index(0.0))  # bitsandbytes pads with the code of 0
    codes = codes.to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    shape, dtype = tuple(weight.shape), weight.dtype
    if not double_quant:
        return NF4Weight(packed, absmax, shape, dtype, block_size)
    offset = absmax.mean()
    q_absmax, scales = quantize_blockwise_8bit(absmax - offset, absmax_block_size)
    return NF4Weight(packed, q_absmax, shape, dtype, block_size, scales, offset, absmax_block_size)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back: level times the block's absmax, computed in fp32, then cast to `dtype`."""
    values = _byte_table(q.device).index_select(0, q.codes.int()).reshape(-1)
    _scale_blocks(values, q.block_size, q.block_absmax())
    out = values[: q.numel].view(q.shape)
    return out if dtype == torch.float32 else out.to(dtype)


# --- the layer ---------------------------------------------------------------------------
class _NF4Matmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward.

    Only the NF4 weight is kept for backward (it is the layer's own buffers), so a
    dense weight exists just while one matmul runs. W is frozen: no gradient for it.
    """

    @staticmethod
    def forward(ctx, x, bias, q, dtype):
        ctx.q, ctx.x_dtype = q, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, dequantize_nf4(q, dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ dequantize_nf4(ctx.q, grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


class Linear4bit(nn.Linear):
    """A frozen linear layer whose weight is NF4 (buffers `weight_codes`, `weight_absmax`, ...).

    There is no dense `weight` (it is None): the memory is the 4-bit one. The bias, if
    any, is kept as it was and frozen. Gradients flow to the input, so LoRA adapters on
    top and the layers below still train. Written to be a cooperative base: a
    `class LoRALinear4bit(LoRALinear, Linear4bit)` gets its base output from
    `super().forward(x)` and is built by `from_linear` through `cls`.
    """

    _FP32_BUFFERS = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        block_size: int = 64,
        double_quant: bool = True,
    ) -> None:
        """An all-zero 4-bit layer of this size: a skeleton to `load_state_dict` a quantized one into."""
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the dense weight
        dtype = dtype or torch.get_default_dtype()
        zeros = torch.zeros(out_features, in_features, device=device, dtype=dtype)
        b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        self._setup(quantize_nf4(zeros, block_size, double_quant), b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> Linear4bit:
        """A 4-bit copy of `linear` (the bias tensor is shared, not copied, and frozen)."""
        if linear.weight is None or linear.weight.dim() != 2:
            raise LmforgeError(f"{type(linear).__name__} has no dense 2-D weight to quantize")
        return cls.from_weight(linear.weight, linear.bias, block_size, double_quant)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, block_size: int = 64, double_quant: bool = True
    ) -> Linear4bit:
        """A 4-bit layer of this (out, in) weight and bias (shared, not copied, and frozen), with no
        nn.Linear around them: what a loader quantizing weights as it reads them builds."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        frozen = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        layer._setup(quantize_nf4(weight.detach(), block_size, double_quant), frozen)
        return layer

    def _setup(self, q: NF4Weight, bias: nn.Parameter | None) -> None:
        """Give a bare module (only nn.Module.__init__ run) the 4-bit weight and the bias."""
        self.out_features, self.in_features = q.shape
        self.register_parameter("weight", None)
        self.register_parameter("bias", bias)
        self.block_size, self.absmax_block_size = q.block_size, q.absmax_block_size
        self.double_quant, self.weight_dtype = q.double_quant, q.dtype
        self.register_buffer("weight_codes", q.codes)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_absmax_scale", q.absmax_scale)
        self.register_buffer("weight_absmax_offset", q.absmax_offset)

    @property
    def quantized(self) -> NF4Weight:
        """The NF4 weight (views of the buffers, no copy)."""
        return NF4Weight(
            self.weight_codes, self.weight_absmax, (self.out_features, self.in_features), self.weight_dtype,
            self.block_size, self.weight_absmax_scale, self.weight_absmax_offset, self.absmax_block_size,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        return self.quantized.nbytes

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight, in `dtype` (default: the dtype it had before quantization)."""
        return dequantize_nf4(self.quantized, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under autocast the matmul runs in the autocast dtype: dequantize straight to it
        on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if on else x.dtype
        return _NF4Matmul.apply(x, self.bias, self.quantized, dtype)

    def reset_parameters(self) -> None:
        raise LmforgeError("a 4-bit layer is frozen: re-initialise the dense layer, then quantize it again")

    def extra_repr(self) -> str:
        dq = f", double_quant (block {self.absmax_block_size})" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 block_size={self.block_size}{dq}, from {str(self.weight_dtype).removeprefix('torch.')}"
        )

    def get_extra_state(self) -> torch.Tensor:
        """The metadata, saved beside the buffers so a load into a differently quantized layer fails loudly."""
        return self.quantized.meta()

    def set_extra_state(self, state: Any) -> None:
        mine = self.quantized.meta()
        if not isinstance(state, torch.Tensor) or state.tolist() != mine.tolist():
            raise LmforgeError(
                f"the saved 4-bit layer (meta {state.tolist() if isinstance(state, torch.Tensor) else state}) differs "
                f"from this one (meta {mine.tolist()} = block_size, absmax block, dtype id, double_quant, shape); "
                "quantize the model with the same settings before loading"
            )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Linear4bit:
        """Moves follow the module; dtype casts (`model.half()`, `.to(torch.bfloat16)`) skip the fp32 statistics.

        Rounding absmax to bf16 would silently change every dequantized weight.
        """
        keep = {k: b for k in self._FP32_BUFFERS if (b := self._buffers.get(k)) is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new.dtype != torch.float32:
                self._buffers[k] = old.to(new.device)
        return self


def quantize_model(
    model: nn.Module,
    skip: Callable[[str], bool] | Collection[str] = (),
    block_size: int = 64,
    double_quant: bool = True,
) -> dict[str, Any]:
    """Replace every nn.Linear in `model.blocks` by a Linear4bit, in place; return what it did.

    `skip` names layers to keep dense: a set of full names ("blocks.0.attn.q") or leaf
    names ("down" skips every one), or a function of the full name. The embeddings and
    the output head (outside the blocks) are never touched. Quantize before adding LoRA.
    The summary: `layers`, `params` (weights quantized), `bytes` (their 4-bit size),
    `dense_bytes` (their size before), `bytes_per_param`, `skipped` (names).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise LmforgeError(f"quantize_model expects an lmforge GPT (a model with .blocks), got {type(model).__name__}")
    skipped_by = _skip_rule(skip)
    layers = params = nbytes = dense = 0
    skipped = []
    for rel, module in list(blocks.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, Linear4bit):
            continue
        name = f"blocks.{rel}"
        if type(module) is not nn.Linear:
            raise LmforgeError(
                f"{name} is a {type(module).__name__}, not a plain nn.Linear; quantize the model before adding adapters"
            )
        if skipped_by(name):
            skipped.append(name)
            continue
        parent, _, leaf = rel.rpartition(".")
        new = Linear4bit.from_linear(module, block_size, double_quant)
        setattr(blocks.get_submodule(parent) if parent else blocks, leaf, new)
        layers += 1
        params += module.weight.numel()
        dense += module.weight.nbytes
        nbytes += new.nbytes
    return {
        "layers": layers,
        "params": params,
        "bytes": nbytes,
        "dense_bytes": dense,
        "bytes_per_param": nbytes / params if params else 0.0,
        "skipped": skipped,
    }


def _skip_rule(skip: Callable[[str], bool] | Collection[str]) -> Callable[[str], bool]:
    """`quantize_model`'s `skip` as a function of a layer's full name."""
    if callable(skip):
        return skip
    names = frozenset(skip)
    return lambda name: name in names or name.rsplit(".", 1)[-1] in names


def quantized_summary(model: nn.Module) -> dict[str, Any]:
    """What `quantize_model` reports, read off a model whose blocks are in 4 bits already
    (`build_quantized` built it so): every Linear4bit of the blocks; the dense ones are `skipped`."""
    quantized, skipped = [], []
    for rel, module in model.blocks.named_modules():
        if isinstance(module, Linear4bit):
            quantized.append(module.quantized)
        elif isinstance(module, nn.Linear):
            skipped.append(f"blocks.{rel}")
    params = sum(q.numel for q in quantized)
    nbytes = sum(q.nbytes for q in quantized)
    return {
        "layers": len(quantized),
        "params": params,
        "bytes": nbytes,
        "dense_bytes": sum(q.numel * q.dtype.itemsize for q in quantized),
        "bytes_per_param": nbytes / params if params else 0.0,
        "skipped": skipped,
    }


def build_quantized(
    stream: TensorStream,
    device: str | torch.device = "cpu",
    skip: Callable[[str], bool] | Collection[str] = (),
    block_size: int = 64,
    double_quant: bool = True,
) -> GPT:
    """The model (eval mode) the whole-model loaders give and `quantize_model` then turns to 4
    bits, bit for bit, built while `stream` is read: the dense model never exists whole.

    The model starts on the meta device (no memory). Each tensor, as it arrives, is cast
    as the whole-model loaders cast it (`stream.dtype`, on `device`); a block's linear
    weight (unless `skip` names it) becomes a `Linear4bit` at once, quantized exactly as
    `quantize_model` would have quantized the loaded weight, and the dense tensor is let
    go; every other tensor (embeddings, norms, biases, the head) is the model's own.
    So the peak is the finished model plus one dense tensor and its quantization's
    temporaries (for gpt2, an MLP weight: 9 MiB) instead of the whole dense model.
    """
    with on_meta():
        model = GPT(stream.config)
    skipped_by = _skip_rule(skip)
    quantize = {f"{name}.weight": name for name, _ in model.named_linears() if not skipped_by(name)}
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in stream.tensors:
        tensor = tensor.to(device=device, dtype=stream.dtype)
        layer = quantize.pop(name, None)
        if layer is None:
            kept[name] = tensor
        else:
            _put_4bit(model, layer, tensor, block_size, double_quant)
        del tensor  # the dense weight goes before the next one is read
    model.load_state_dict(kept, strict=False, assign=True)  # into the 4-bit layers too: their biases
    retie(model, device)
    unread = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unread:
        raise LmforgeError(f"{stream.source} gave no {', '.join(unread[:4])}{' ...' if len(unread) > 4 else ''}")
    return model.eval()


def _put_4bit(model: GPT, name: str, weight: torch.Tensor, block_size: int, double_quant: bool) -> None:
    """Swap the (meta) linear layer `name` for a Linear4bit of `weight`; its bias stays the
    layer's until the loader assigns the real one."""
    parent, _, leaf = name.rpartition(".")
    linear = model.get_submodule(name)
    setattr(model.get_submodule(parent), leaf, Linear4bit.from_weight(weight, linear.bias, block_size, double_quant))
