"""Smaller weights for inference: int8 (a quarter of fp32's bytes) or float16 (half).

Decode speed on a CPU is the speed of reading the weights, so storing them in fewer
bits is the largest single gain there is. `Int8Linear` keeps each output row's weights
as int8 with one fp32 scale (symmetric, absmax / 127: per-channel), the bias as it was.
`Float16Linear` keeps them in float16; everything around the matmuls (norms, attention,
the residual stream, the logits) stays in float32 either way.

Its matmul quantizes the input too, each row by its own range (as llama.cpp's q8_0
quantizes the activations it multiplies), so that the product runs in integers and a
row's result never depends on the values of the other rows in its batch:

- one row on a CPU with PyTorch's x86 quantized engine: the weight is prepacked once and
  `quantized.linear_dynamic` quantizes the row to uint8 (7 bits of it where the CPU has no
  VNNI, `_seven_bit_rows`) and multiplies (VNNI where the CPU
  has it) in one call: 3.5-4.0 ms per token for gpt2's 85M block weights at batch 1,
  against 13-15 ms in fp32;
- several rows on a CPU (a prompt, a batch): each row to int8, `torch._int_mm`, and the
  row and channel scales applied to the int32 result (18% slower than the above at one row,
  which is why one row takes the other path). The two paths round a row differently
  (uint8 with a zero point there, symmetric int8 here), so a row decoded alone and the
  same row in a batch can differ in the last bits; neither depends on the other rows' values;
- elsewhere (CUDA): the weight is dequantized to the input's dtype for the matmul, which
  is exact to the stored int8 values and runs anywhere.

`Float16Linear` multiplies one row by PyTorch's float16 matrix-vector kernel (fp32
accumulation; the input row is rounded to float16, as llama.cpp's f16 path does): 4.7 ms
per token for gpt2's block weights against 13-15 ms in fp32. Several rows (prefill, a
batch) dequantize the weight to fp32 for the matmul, since this CPU has no fast float16
matrix-matrix kernel (512 rows: 13 ms against 60 ms in float16, per 768 x 3072 layer).

`quantize(model, "int8" | "float16")` swaps every block linear layer and the output head
(untied from the embedding table, which stays fp32 for lookups) in place; the model then
serves generation, chat and the API as before. The layers are frozen: these formats are
for inference, training goes through the full-precision weights.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import GPT


@functools.cache
def _x86_engine() -> bool:
    return "x86" in torch.backends.quantized.supported_engines


@functools.cache
def _seven_bit_rows() -> bool:
    """Whether the engine must quantize a row to 7 bits, not 8: without VNNI, its kernel
    adds pairs of uint8 x int8 products in int16 (AVX2's vpmaddubsw), which saturates on
    full-range rows (a row with one loud value came out 31% wrong on such a CPU); 7 bits
    cannot overflow. With VNNI the products accumulate in int32, and 8 bits are safe."""
    caps = torch.cpu.get_capabilities()
    return not (caps.get("avx512_vnni") or caps.get("avx_vnni"))


class Int8Linear(nn.Linear):
    """A frozen linear layer with int8 weights and per-output-channel fp32 scales.

    Buffers `weight_int8` (out, in) and `weight_scale` (out,); `weight` is None, so code
    that reads dense weights (LoRA, the packed decoder, exports) sees that it is not a
    plain layer and leaves it alone.
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the dense weight
        self.out_features, self.in_features = weight_int8.shape
        self.register_parameter("weight", None)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False))
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)
        self._packed: object | None = None  # the x86 engine's prepacked weight, built on first use on CPU
        _BY_STORAGE[weight_int8.data_ptr()] = self

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        """Quantize an (out, in) weight: each row by its absolute maximum over 127, rounded."""
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale, bias)

    @classmethod
    def concat(cls, layers: list[Int8Linear]) -> Int8Linear:
        """One layer computing all of `layers` side by side (q, k, v as one read)."""
        biases = [layer.bias for layer in layers]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        return cls(torch.cat([layer.weight_int8 for layer in layers]), torch.cat([layer.weight_scale for layer in layers]), bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the int8 values stand for."""
        return (self.weight_int8.to(dtype) * self.weight_scale[:, None].to(dtype))

    def _prepacked(self) -> object:
        if self._packed is None:
            with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the engine's kernel is not
                warnings.simplefilter("ignore")
                zero = torch.zeros(self.out_features, dtype=torch.long)
                q = torch._make_per_channel_quantized_tensor(self.weight_int8, self.weight_scale.double(), zero, 0)
                bias = None if self.bias is None else self.bias.detach().float()
                self._packed = torch.ops.quantized.linear_prepack(q, bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if x.numel() == x.size(-1) and _x86_engine():  # one row: the engine's quantization is this row's own
            return self.one_row(x)
        rows = x.reshape(-1, self.in_features)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny) / 127  # (M, 1)
        y = torch._int_mm(torch.round(rows / scale).to(torch.int8), self.weight_int8.t()) * (scale * self.weight_scale)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def one_row(self, x: torch.Tensor) -> torch.Tensor:
        """The product for one fp32 row on CPU, without the checks `forward` makes: what
        the one-row decoder (`lmforge.engine.cpu_decode`) calls, 49 times a token for gpt2."""
        if _x86_engine():
            return torch.ops.quantized.linear_dynamic(x, self._prepacked(), _seven_bit_rows())
        return self(x)

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        self._packed = None  # moved or cast: pack again from the buffers
        module = super()._apply(fn, recurse)
        _BY_STORAGE[self.weight_int8.data_ptr()] = self
        return module

    def reset_parameters(self) -> None:
        raise LmforgeError("an int8 layer is frozen: re-initialise the dense layer, then quantize it again")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 per-channel"


# Each int8 layer by its weight's storage: how the compiled decode step, which can pass
# tensors only, finds a layer's prepacked weight (entries go when their layer does).
_BY_STORAGE: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()


def _int8_one_row(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    layer = _BY_STORAGE.get(weight_int8.data_ptr())
    if layer is None or layer.weight_int8.shape != weight_int8.shape:
        layer = Int8Linear(weight_int8, weight_scale, bias)
    return layer.one_row(x)


# `Int8Linear.one_row` as an operator TorchInductor can call from a compiled graph (the
# engine's prepacked weight is an opaque object a graph cannot hold). The layer is found
# by its weight's storage; a weight no layer owns is packed on the spot. Registered on
# the dispatcher directly: `torch.library.custom_op`'s wrapper cost 32 us a call here,
# against 14 us, and a Llama token makes 49 of them.
_LIBRARY = torch.library.Library("lmforge", "DEF")
_LIBRARY.define("int8_one_row(Tensor x, Tensor weight_int8, Tensor weight_scale, Tensor? bias) -> Tensor")
_LIBRARY.impl("int8_one_row", _int8_one_row, "CPU")


@torch.library.register_fake("lmforge::int8_one_row", lib=_LIBRARY)
def _(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight_int8.size(0))


int8_one_row = torch.ops.lmforge.int8_one_row


class Float16Linear(nn.Linear):
    """A frozen linear layer whose weight and bias are stored in float16 (buffers
    `weight_fp16`, `bias_fp16`); input and output keep their dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the dense weight
        self.out_features, self.in_features = weight.shape
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self.register_buffer("weight_fp16", weight.detach().to(torch.float16))
        self.register_buffer("bias_fp16", None if bias is None else bias.detach().to(torch.float16))

    def one_row(self, x: torch.Tensor) -> torch.Tensor:
        """The product for one fp32 row on CPU (the float16 kernel), without `forward`'s checks."""
        return F.linear(x.to(torch.float16), self.weight_fp16, self.bias_fp16).float()

    @classmethod
    def concat(cls, layers: list[Float16Linear]) -> Float16Linear:
        """One layer computing all of `layers` side by side (q, k, v as one read)."""
        biases = [layer.bias_fp16 for layer in layers]
        bias = None if biases[0] is None else torch.cat(biases)
        return cls(torch.cat([layer.weight_fp16 for layer in layers]), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() == x.size(-1):  # one row on CPU (or any GPU): the float16 kernel
            return F.linear(x.to(torch.float16), self.weight_fp16, self.bias_fp16).to(x.dtype)
        bias = None if self.bias_fp16 is None else self.bias_fp16.to(x.dtype)
        return F.linear(x, self.weight_fp16.to(x.dtype), bias)

    def reset_parameters(self) -> None:
        raise LmforgeError("a float16 layer is frozen: re-initialise the dense layer, then convert it again")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias_fp16 is not None}, float16"


FORMATS = {"int8": Int8Linear.from_weight, "float16": Float16Linear}


def quantize(model: GPT, dtype: str) -> GPT:
    """Store the blocks' linear layers and the output head as `dtype` ("int8" or "float16"), in place.

    Only plain fp32 nn.Linear layers are converted: merge a LoRA adapter first
    (`lmforge lora merge`); a 4-bit model is already quantized. A tied head gets its own
    copy, and the embedding table stays as it is (a lookup reads one row).
    """
    if dtype not in FORMATS:
        raise LmforgeError(f"weight format {dtype!r} is not one of {', '.join(FORMATS)}")
    layers = [*model.named_linears(), ("lm_head", model.lm_head)]
    for name, layer in layers:
        if type(layer) is not nn.Linear or layer.weight.dtype != torch.float32:
            kind = type(layer).__name__ if type(layer) is not nn.Linear else f"{layer.weight.dtype} layer"
            raise LmforgeError(
                f"{name} is a {kind}, not a plain fp32 linear layer: --dtype {dtype} converts dense fp32 weights only; "
                "merge LoRA adapters first (lmforge lora merge), and load 4-bit models without --dtype"
            )
    for name, layer in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FORMATS[dtype](layer.weight, layer.bias))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
