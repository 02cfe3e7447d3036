"""AdamW with 8-bit moments (a quarter of the optimizer's memory), and paged moments.

AdamW keeps two fp32 numbers per weight (the moments m and v): 8 bytes per parameter,
twice the weights themselves. `AdamW8bit` stores each moment as one byte per value plus
one fp32 scale per block of 256 values (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization"): a byte is an index into a 256-entry "dynamic" code whose
values are spread over many orders of magnitude (signed for m, unsigned for v), and the
block's largest magnitude scales it: 2.03 bytes per parameter instead of 8.

The step walks each tensor CHUNK values at a time: dequantize the chunk's moments to
fp32, update them and the weights, re-quantize (each block's new absmax, then the
nearest code). No full-size fp32 copy of a moment is ever held, only one chunk's.

Numerics follow bitsandbytes' CPU kernels (its `AdamW8bit`, 0.50) operation for
operation, and the tests hold the two to bit equality over hundreds of steps:
- the codes are bitsandbytes' `create_dynamic_map` (signed for m, unsigned for v);
- a value is scaled by its block's 1 / absmax, rounded to a grid of 65,536 steps on
  [-1, 1], and given the code nearest that grid point (`nearest_table`);
- tensors with fewer than `min_8bit_size` (4096) values keep fp32 moments and bitsandbytes'
  32-bit update (`m / (sqrt(v) + eps * c2)` stepped by `lr * c2 / c1`): a norm's gains or a
  bias cost nothing to keep exact. Embeddings are quantized like any other matrix (as
  bitsandbytes' `AdamW8bit` does unless told otherwise): the token table is the largest
  tensor of a small model, and keeping it in 32 bits would give back most of the saving.
`bits=32` keeps every tensor's moments in fp32 (bitsandbytes' 32-bit AdamW): what a
paged 32-bit run uses.

Paged moments (`store=PagedStore(folder)`): every moment lives in a memory-mapped file
instead of anonymous memory, so the operating system writes cold pages out and reads
them back as the step walks the parameters, instead of the process being killed when
RAM runs out. On CUDA the same files are host memory, and each chunk's moments are moved
to the device for its update and back.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

BLOCK = 256  # values per scale
CHUNK = BLOCK * 1024  # values per pass of the step (262,144): a few 1 MiB fp32 buffers, in cache
MIN_8BIT_SIZE = 4096


# --- the 8-bit code -------------------------------------------------------------------------
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 code values of the dynamic 8-bit type, ascending (bitsandbytes'
    `create_dynamic_map(signed)` with its defaults: 7 exponent bits, 8 bits in all).

    Exponent e (0..6) covers magnitudes 10^(e-6) .. 10^(e-5) with 2^e (signed) or 2^(e+1)
    (unsigned) linearly spaced values, the midpoints of a 0.1..1 grid; then 0 and 1.
    """
    data: list[float] = []
    for e in range(7):
        items = 2**e + 1 if signed else 2 ** (e + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (e - 6)) * means).tolist()  # in fp32, as bitsandbytes computes it
        if signed:
            data += (-(10 ** (e - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def nearest_table(code: torch.Tensor) -> torch.Tensor:
    """For each of 65,536 evenly spaced values r = u / 32767.5 - 1 on [-1, 1], the index of
    the nearest code (uint8). Quantizing a value rounds it to that grid first, then looks
    the code up: bitsandbytes' CPU quantizer (0.50) does exactly this, so the codes agree
    with it value for value; it is also one gather per value instead of a search."""
    grid = torch.arange(65536, dtype=torch.float32) / 32767.5 - 1
    return torch.searchsorted((code[:-1] + code[1:]) / 2, grid, right=True).to(torch.uint8)


def _blockwise(x: torch.Tensor, per_block: torch.Tensor) -> torch.Tensor:
    """x (flat) times its block's factor, without spelling the factors out per value."""
    n = x.numel()
    full = n - n % BLOCK
    out = torch.empty_like(x)
    if full:
        torch.mul(x[:full].view(-1, BLOCK), per_block[: full // BLOCK, None], out=out[:full].view(-1, BLOCK))
    if full < n:
        torch.mul(x[full:], per_block[-1], out=out[full:])
    return out


def quantize(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit codes (uint8) and per-block absmax (fp32) of a flat fp32 `x`: each
    value scaled by its block's 1 / largest magnitude, then its nearest code by `table`
    (`nearest_table`). An all-zero block has absmax 0 and codes for 0."""
    n = x.numel()
    full = n - n % BLOCK
    absmax = torch.empty(-(-n // BLOCK), dtype=torch.float32, device=x.device)
    if full:
        torch.amax(x[:full].view(-1, BLOCK).abs(), dim=1, out=absmax[: full // BLOCK])
    if full < n:
        absmax[-1] = x[full:].abs().max()
    inverse = 1 / absmax  # times the reciprocal, as bitsandbytes (not x / absmax)
    inverse[absmax == 0] = 0  # an all-zero block: its values stay 0
    u = _blockwise(x, inverse).add_(1).mul_(32767.5).add_(0.5).floor_().clamp_(0, 65535)
    return table.index_select(0, u.int()), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The fp32 values of blockwise codes (flat)."""
    return _blockwise(code.index_select(0, codes.reshape(-1).int()), absmax)


class Codes(NamedTuple):
    signed: torch.Tensor  # m's 256 values
    signed_table: torch.Tensor  # and its nearest-code table
    unsigned: torch.Tensor  # v's
    unsigned_table: torch.Tensor


# --- where the moments live ----------------------------------------------------------------------
class PagedStore:
    """Moments in memory-mapped files of `folder` (one per tensor, made sparse and zero):
    the operating system pages them in and out. The files are scratch space, not a
    checkpoint (checkpoints hold the moments as safetensors); `close` removes them."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._count = 0

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self._count == 0:
            shutil.rmtree(self.folder, ignore_errors=True)  # a crashed run's scratch files
            self.folder.mkdir(parents=True)
        path = self.folder / f"{self._count:06d}.bin"
        self._count += 1
        n = math.prod(shape)
        return torch.from_file(str(path), shared=True, size=n, dtype=dtype).view(shape)

    def close(self) -> None:
        if self._count:
            shutil.rmtree(self.folder, ignore_errors=True)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored in 8 bits (see the module docstring).

    State per parameter: `step` (a float tensor, as torch's AdamW), and either `m_codes`/`v_codes` (uint8, the parameter's
    shape) with `m_absmax`/`v_absmax` (one fp32 per block), or `exp_avg`/`exp_avg_sq` (fp32,
    small tensors, or every tensor with bits=32): plain tensors and numbers, so a
    checkpoint holds them as safetensors + JSON and a resumed run continues bit for bit.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, bits: int = 8, min_8bit_size: int = MIN_8BIT_SIZE,
                 store: PagedStore | None = None) -> None:
        if bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {bits}")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size if bits == 8 else math.inf
        self.store = store
        self._codes: dict[torch.device, Codes] = {}

    def quantized(self, p: torch.Tensor) -> bool:
        """Whether `p`'s moments are 8-bit (else fp32)."""
        return p.numel() >= self.min_8bit_size

    def state_shapes(self, p: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """The shape of each state tensor of `p` (what a checkpoint must hold)."""
        if not self.quantized(p):
            return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
        blocks = (-(-p.numel() // BLOCK),)
        return {"m_codes": tuple(p.shape), "m_absmax": blocks, "v_codes": tuple(p.shape), "v_absmax": blocks}

    def state_bytes(self, p: torch.Tensor) -> int:
        return sum(math.prod(shape) * (1 if key.endswith("codes") else 4) for key, shape in self.state_shapes(p).items())

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.store is not None:
            return self.store.zeros(shape, dtype)  # host memory, even for a CUDA parameter
        return torch.zeros(shape, dtype=dtype, device=device)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)  # a float tensor, as torch's AdamW keeps it: a 32-bit run's checkpoint moves between the two
        for key, shape in self.state_shapes(p).items():
            state[key] = self._zeros(shape, torch.uint8 if key.endswith("codes") else torch.float32, p.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, then the moments go back where this optimizer keeps them (a paged
        store's files: torch's loading puts them in fresh anonymous memory)."""
        super().load_state_dict(state_dict)
        if self.store is None:
            return
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    paged = self.store.zeros(tuple(value.shape), value.dtype)
                    paged.copy_(value)
                    state[key] = paged

    def _maps(self, device: torch.device) -> Codes:
        if device not in self._codes:
            signed, unsigned = dynamic_map(signed=True), dynamic_map(signed=False)
            self._codes[device] = Codes(*(t.to(device) for t in (signed, nearest_table(signed), unsigned, nearest_table(unsigned))))
        return self._codes[device]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step of every parameter with a gradient (`closure` re-evaluates the loss, as torch's optimizers take it)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not take sparse gradients")
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                t = int(state["step"])
                hyper = Hyper(beta1, beta2, 1.0 - beta1**t, math.sqrt(1.0 - beta2**t), group["lr"], group["eps"], group["weight_decay"])
                weight, grad = p.data.view(-1), p.grad.reshape(-1)
                if self.quantized(p):
                    _step8(weight, grad, state, self._maps(p.device), hyper)
                else:
                    _step32(weight, grad, state, hyper)
        return loss


class Hyper(NamedTuple):
    beta1: float
    beta2: float
    c1: float  # 1 - beta1^t
    c2: float  # sqrt(1 - beta2^t)
    lr: float
    eps: float
    wd: float


def _step32(w: torch.Tensor, g: torch.Tensor, state: dict, h: Hyper) -> None:
    """bitsandbytes' 32-bit Adam update (its CPU kernel's operations, in its order), CHUNK values at a time."""
    m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
    for start in range(0, w.numel(), CHUNK):
        end = min(start + CHUNK, w.numel())
        m, v = m_all[start:end].to(w.device), v_all[start:end].to(w.device)  # the moments themselves unless paged off-device
        gc = g[start:end].float()
        wc = w[start:end].float()  # the weights themselves when they are fp32
        m.mul_(h.beta1).add_(gc, alpha=1.0 - h.beta1)
        v.mul_(h.beta2).addcmul_(gc, gc, value=1.0 - h.beta2)
        if h.wd > 0.0:
            wc.mul_(1.0 - h.lr * h.wd)
        wc.add_(m / (v.sqrt() + h.eps * h.c2), alpha=-h.lr * h.c2 / h.c1)
        _write_back(w, start, end, wc)
        _write_back(m_all, start, end, m)
        _write_back(v_all, start, end, v)


def _step8(w: torch.Tensor, g: torch.Tensor, state: dict, maps: Codes, h: Hyper) -> None:
    """bitsandbytes' 8-bit blockwise Adam update, CHUNK values at a time (block-aligned)."""
    m_codes, v_codes = state["m_codes"].view(-1), state["v_codes"].view(-1)
    for start in range(0, w.numel(), CHUNK):
        end = min(start + CHUNK, w.numel())
        b0, b1 = start // BLOCK, -(-end // BLOCK)
        dev = w.device
        m = dequantize(m_codes[start:end].to(dev), state["m_absmax"][b0:b1].to(dev), maps.signed)
        v = dequantize(v_codes[start:end].to(dev), state["v_absmax"][b0:b1].to(dev), maps.unsigned)
        gc = g[start:end].float()
        m.mul_(h.beta1).add_(gc, alpha=1.0 - h.beta1)
        v.mul_(h.beta2).addcmul_(gc, gc, value=1.0 - h.beta2)
        denom = (v.sqrt() / h.c2).add_(h.eps)
        wc = w[start:end].float()  # the weights themselves when they are fp32
        if h.wd > 0.0:
            wc.mul_(1.0 - h.lr * h.wd)
        wc.addcdiv_(m, denom, value=-h.lr / h.c1)
        _write_back(w, start, end, wc)
        codes, absmax = quantize(m, maps.signed_table)
        m_codes[start:end], state["m_absmax"][b0:b1] = codes, absmax  # copies back to host memory if paged
        codes, absmax = quantize(v, maps.unsigned_table)
        v_codes[start:end], state["v_absmax"][b0:b1] = codes, absmax


def _write_back(dst: torch.Tensor, start: int, end: int, chunk: torch.Tensor) -> None:
    """Store an updated chunk, unless it was updated in place (same memory)."""
    if chunk.data_ptr() != dst[start:end].data_ptr():
        dst[start:end] = chunk
