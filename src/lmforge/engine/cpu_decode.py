"""CPU decode: make one-row decoding run at memory speed without changing a token.

Decoding one sequence is a chain of matrix-vector products, each bound by reading a
weight matrix from memory, plus a few dozen small operations per layer. While
`CpuDecoder.decoding(1)` is active on a CPU with oneDNN, the engine runs `CpuDecoder.step`:
the blocks' arithmetic over copies of their weights in oneDNN's blocked layout
(`PackedLinear`), which its matrix-vector kernel streams at 19-30 GB/s per matrix against
12-18 GB/s for nn.Linear's weights through BLAS (gpt2's and a Llama shape's matrices
here). Layers that read the same input are packed as one matrix (q, k, v; gate and up),
GELU runs inside fc's matmul and RoPE turns q and k in one pass, so each block makes
fewer, larger calls. int8 and float16 layers (`lmforge.engine.quantize`) are fused the
same way. The model's own parameters are left exactly as they are (LoRA and training
see separate q, k, v); the packed copies cost one more copy of the weights, and are
rebuilt when a weight changes.

With `compile=True` the step is Inductor's instead (`lmforge.engine.compiled`): the same
arithmetic over frozen fp32 weights, 1.4-1.6x faster again, after a compile of 25-60 s.

Off CPU, without oneDNN, for several rows, and for a model with a layer the step cannot
read as one (a LoRA adapter, 4-bit weights), the model runs through its own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.engine.cache import KVCache
from lmforge.engine.compiled import CompiledStep, cache_length
from lmforge.engine.quantize import Float16Linear, Int8Linear
from lmforge.model import GPT, Block, SwiGLU, apply_rope, rope_cos_sin


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 and Arm CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _weights_key(tensors: Iterable[torch.Tensor]) -> tuple:
    """What a copy of these tensors was taken from: each one's storage and version (an
    in-place change bumps the version; inference tensors keep none)."""
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)


class PackedLinear:
    """Linear layers that read the same input, read as one: what the one-row decoder calls.

    Called with x (..., in) it returns the layers' outputs side by side (..., sum of
    outs); `split` returns them one by one (views of one result). fp32 layers become one
    matrix in oneDNN's blocked layout, with `post` (a oneDNN post-op: ("gelu", "tanh")
    fuses GELU) applied in the same pass; int8 and float16 layers become one layer of
    their kind (`lmforge.engine.quantize`), with GELU applied after. `refresh` rebuilds
    the copy when any source tensor has changed (its version or storage), so an
    optimizer step between generations is seen.
    """

    def __init__(self, linears: Sequence[nn.Module], post: tuple[str, str] = ("none", "")) -> None:
        self.linears = list(linears)
        self.sizes = [linear.out_features for linear in self.linears]
        self.post = post
        self.weight: torch.Tensor | None = None  # fp32: the packed matrix
        self.bias: torch.Tensor | None = None
        self.layer: Int8Linear | Float16Linear | None = None  # int8 / float16: the concatenated layer
        self._key: tuple | None = None

    def refresh(self) -> None:
        key = _weights_key(t for linear in self.linears for t in (*linear.parameters(), *linear.buffers()))
        if key == self._key:
            return
        with torch.no_grad():
            if type(self.linears[0]) is nn.Linear:
                weight = torch.cat([linear.weight.detach() for linear in self.linears])
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
                biases = [linear.bias for linear in self.linears]
                self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
            elif len(self.linears) == 1:
                self.layer = self.linears[0]  # an int8 / float16 layer alone is already what it should be
            else:
                self.layer = type(self.linears[0]).concat(self.linears)
        self._key = key

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.post[0], [], self.post[1])
        y = self.layer.one_row(x)
        return y if self.post[0] == "none" else F.gelu(y, approximate=self.post[1])

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each layer's output (views of one result)."""
        return self(x).split(self.sizes, dim=-1)


def _plain(*linears: nn.Module) -> bool:
    """fp32 nn.Linear layers exactly (not a subclass: LoRA and 4-bit layers keep their forward)."""
    return all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)


def _compilable(linears: Sequence[nn.Module]) -> bool:
    """Layers the compiled step reads: plain fp32 ones, or int8 ones (through their operator)."""
    return _plain(*linears) or all(type(m) is Int8Linear for m in linears)


def _fusable(*linears: nn.Module) -> bool:
    """Layers the decoder can read as one: all plain fp32, or all int8, or all float16 (on CPU)."""
    kind = type(linears[0])
    if kind is nn.Linear:
        return _plain(*linears)
    return kind in (Int8Linear, Float16Linear) and all(type(m) is kind for m in linears)


@dataclass
class _Layer:
    """One block as the decoder reads it: its norms (the model's own modules) and its
    weights packed into four calls."""

    block: Block
    qkv: PackedLinear  # q, k, v as one read
    o: PackedLinear
    up: PackedLinear  # gate and up (SwiGLU) as one read, or fc with GELU fused in
    down: PackedLinear
    swiglu: bool

    def packed(self) -> tuple[PackedLinear, ...]:
        return self.qkv, self.o, self.up, self.down


class CpuDecoder:
    """One-row decoding on CPU: the decode step over packed weights, and the output head.

    `step` is the block arithmetic of `lmforge.model` for one token of one row, spelled
    out with fewer calls: q, k, v from one matmul, RoPE applied to q and k together,
    attention through the fused kernel, gate and up from one matmul (or fc with GELU
    fused in), no masks or positions tensors (one row has no padding). Each step is
    checked against the model's own path and the uncached reference in the tests.

    The packed copies are built on the first one-row decode and kept for the engine's life
    (refreshed when a weight changes, rebuilt when a layer is swapped). A model with
    a layer the decoder cannot read as one (a LoRA adapter, 4-bit weights) decodes
    through its own forward.
    """

    def __init__(self, model: GPT, packed: bool = True, compile: bool = False) -> None:
        """`packed=False` decodes with the model's own layers (no extra copy of the weights);
        `compile=True` decodes fp32 weights through the compiled step."""
        self.model = model
        self.packed = packed
        self.compile = compile
        self._compiled: CompiledStep | None = None
        self._compiled_key: tuple = ()  # the weights the compiled step froze (`_weights_key`)
        self.active = False
        self._layers: list[_Layer] | None = None
        self._head: PackedLinear | None = None
        self._structure: tuple[int, ...] = ()

    def _build(self) -> list[_Layer] | None:
        """Each block's packed weights, or None when one cannot be read this way."""
        layers = []
        for block in self.model.blocks:
            attn, mlp = block.attn, block.mlp
            swiglu = isinstance(mlp, SwiGLU)
            ins, post, out = ([mlp.gate, mlp.up], ("none", ""), mlp.down) if swiglu else ([mlp.fc], ("gelu", mlp.approximate), mlp.proj)
            if not (_fusable(attn.q, attn.k, attn.v) and _fusable(*ins) and _fusable(attn.o) and _fusable(out)):
                return None
            qkv = PackedLinear([attn.q, attn.k, attn.v])
            layers.append(_Layer(block, qkv, PackedLinear([attn.o]), PackedLinear(ins, post), PackedLinear([out]), swiglu))
        return layers

    def _on_cpu(self) -> bool:
        return self.model.tok_emb.weight.device.type == "cpu"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the last hidden state (B, C) -> (B, V), fp32.

        Several rows on CPU run 2-4x faster as W @ hidden^T on the weight as stored (made
        contiguous again: a row-wise max or softmax over the transposed result ran 3-60x
        slower, measured on (16, 8192)) than through nn.Linear.
        """
        if self.active and self._head is not None and hidden.size(0) == 1:
            return self._head(hidden).float()
        head = self.model.lm_head
        if hidden.size(0) > 1 and type(head) is nn.Linear and head.weight.device.type == "cpu":
            return (head.weight @ hidden.t()).t().contiguous().float()
        return head(hidden).float()

    def cache_length(self, needed: int, batch: int) -> int:
        """The KV cache's length for a request that needs `needed` slots: a static bucket for
        the compiled step (one compile serves many requests), else exactly `needed`."""
        if self.compile and self._can_decode(batch):
            return cache_length(needed, self.model.config.context_length)
        return needed

    def next_logits(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Next-token logits (1, V) after token (1, 1), the cache advanced by one slot."""
        if self._compiled is not None:
            return self._compiled(token, cache)
        return self.logits(self.step(token, cache))

    def step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The final normed hidden state (1, C) after token (1, 1) at the cache's next slot."""
        model, config = self.model, self.model.config
        nh, nkv, hd = config.n_head, config.n_kv_head, config.head_dim
        pos = cache.length  # one row: no padding, its position is its slot
        x = model.tok_emb(token)  # (1, 1, C)
        rope = None
        if model.pos_emb is not None:
            x = x + model.pos_emb.weight[pos]
        else:
            rope = rope_cos_sin(model.inv_freq, torch.full((1, 1), pos), x.dtype)  # each (1, 1, 1, hd)
        for i, layer in enumerate(self._layers):
            block = layer.block
            qkv = layer.qkv(block.norm1(x)).view(1, nh + 2 * nkv, 1, hd)  # heads of q, then k, then v
            if rope is not None:
                qk = apply_rope(qkv[:, : nh + nkv], *rope)  # q and k rotate alike: one pass
                q, k = qk[:, :nh], qk[:, nh:]
            else:
                q, k = qkv[:, :nh], qkv[:, nh : nh + nkv]
            keys, values = cache.update(i, k, qkv[:, nh + nkv :])
            y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=nkv != nh)  # (1, nh, 1, hd)
            x = x + layer.o(y.view(1, 1, nh * hd))
            h = block.norm2(x)
            if layer.swiglu:
                gate, up = layer.up.split(h)
                x = x + layer.down(F.silu(gate) * up)
            else:
                x = x + layer.down(layer.up(h))
        return model.norm_f(x)[:, -1]

    def _compile(self, layers: list[_Layer]) -> None:
        """The compiled step for the current weights: the model's own fp32 layers (the step
        concatenates them), or the packed int8 layers; rebuilt when any weight changed."""
        key = _weights_key([*self.model.parameters(), *self.model.buffers()])
        if self._compiled is not None and key == self._compiled_key:
            return
        reads = []
        for layer in layers:
            groups = []
            for packed in layer.packed():
                if not _plain(*packed.linears):
                    packed.refresh()  # int8: concatenated once, read through its operator
                groups.append(packed.linears if packed.layer is None else [packed.layer])
            reads.append(groups)
        self._compiled = CompiledStep(self.model, reads, [self.model.lm_head])
        self._compiled_key = key

    def _can_decode(self, batch: int) -> bool:
        return self.packed and batch == 1 and self._on_cpu() and onednn_available()

    def decoding(self, batch: int) -> contextlib.AbstractContextManager:
        """While active (one row, CPU, oneDNN, `packed`, every block readable), `active` is
        True: the engine decodes through `next_logits`: the packed step and head, or the
        compiled step when `compile` is set and every weight is a plain fp32 or an int8 matrix."""
        if not self._can_decode(batch):
            return contextlib.nullcontext()
        structure = tuple(map(id, self.model.modules()))  # a layer swapped since (LoRA, quantization): a new plan
        if structure != self._structure:
            self._layers, self._structure = self._build(), structure
            self._head = PackedLinear([self.model.lm_head]) if _plain(self.model.lm_head) else None
        if self._layers is None:
            self._compiled = None
            return contextlib.nullcontext()
        if self.compile and _compilable([self.model.lm_head]) and all(_compilable(p.linears) for layer in self._layers for p in layer.packed()):
            self._compile(self._layers)
        else:
            self._compiled = None
            for layer in self._layers:
                for packed in layer.packed():
                    packed.refresh()
            if self._head is not None:
                self._head.refresh()

        @contextlib.contextmanager
        def active() -> Iterator[None]:
            self.active = True
            try:
                yield
            finally:
                self.active = False

        return active()
