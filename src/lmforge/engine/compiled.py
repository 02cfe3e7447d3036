"""The one-row decode step compiled by TorchInductor, for fp32 or int8 weights that stay fixed.

Why compile: oneDNN's and BLAS's matrix-vector kernels stream a weight matrix at about
20-30 GB/s here; Inductor's C++ GEMM template, given the weights as constants
("freezing") and static shapes, packs them for its own vectorised micro-kernel and reads
them at 30-42 GB/s (gpt2's and a Llama shape's layers, `benchmarks/bench_decode.py`),
which is what decode speed is made of. Two conditions, both measured: every shape must
be static (one symbolic size, such as a growing cache length, turns the weight packing
off, and the matmuls fall back to BLAS at half the speed), and freezing must be set in
Inductor's config (it is not read from `torch.compile(options=...)`).

So the step attends over the whole preallocated cache under a mask (the cache length is
a static bucket, `cache_length`), takes its position as a tensor, writes its key and
value with `index_copy_`, and returns the logits. Weights are read through the model's
own parameters (q, k, v and gate, up concatenated inside the graph, which freezing folds
into one constant), so the model is unchanged; Inductor keeps one packed copy. The
compiled step is rebuilt when a weight changes in place: Dynamo's guards check the
parameters' identity, not their values, and would otherwise run the stale constants
(tested). Each step compiles a copy of `DecodeStep.forward` with a code object of its
own, and Dynamo keeps compiled graphs per code object: a step's graphs (one per cache
length) are never mixed up with another model's, count against Dynamo's recompile limit
of 8 on their own, and go when the step goes. Compiling takes 20-100 s, so the compiled
step is for serving fixed weights, not for decoding between training steps.

int8 weights (`lmforge.engine.quantize`) keep the engine's int8 kernel, called as an
operator from the graph (`int8_one_row`); what compiling gives them is everything
around the matmuls (norms, RoPE, attention, the residual stream) as a few fused loops
instead of some 40 eager operators a layer: on the Llama shape (an AVX2 machine), the
8 ms or so a token spent outside the int8 matmuls became 3.5-5 (timed with them stubbed
out).
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.engine.cache import KVCache
from lmforge.engine.hugepages import move_to_huge_pages
from lmforge.engine.quantize import Int8Linear, int8_one_row
from lmforge.model import GPT, SwiGLU, apply_rope, rope_cos_sin

MIN_BUCKET = 256  # the smallest cache the compiled step is built for (each bucket compiles once)
INDUCTOR_SETTINGS = {
    "freezing": True,  # weights as constants: what lets Inductor pack them for its own GEMM kernel
    "max_autotune": True,  # try that kernel against BLAS per matrix shape, keep the faster
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,  # and say nothing about it on stderr
    "max_autotune_report_choices_stats": False,
}


def cache_length(needed: int, context_length: int) -> int:
    """The cache length the compiled step runs at: `needed` rounded up to a power of two
    (at least MIN_BUCKET, at most the context), so a few compiled shapes serve every
    request. Attention then reads up to twice the slots in use (more below MIN_BUCKET),
    a few MB a token against hundreds for the weights."""
    bucket = MIN_BUCKET
    while bucket < needed:
        bucket *= 2
    return max(min(bucket, context_length), needed)


Reads = Sequence[nn.Module]  # linear layers that read the same input, read as one


def _linear(x: torch.Tensor, layers: Reads) -> torch.Tensor:
    """x through `layers`, their outputs side by side. fp32 layers are concatenated here,
    inside the graph (freezing folds the result into one constant); an int8 layer (already
    one, concatenated by the decoder) goes through its operator, not traced into."""
    if isinstance(layers[0], Int8Linear):
        (layer,) = layers
        return int8_one_row(x, layer.weight_int8, layer.weight_scale, layer.bias)
    weight = torch.cat([m.weight for m in layers])
    bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
    return F.linear(x, weight, bias)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One query row per head (1, nh, 1, hd) over the whole cache (1, nkv, L, hd), the
    slots past the position masked out. Spelled out as products and sums, which Inductor
    turns into loops reading the cache where it lies. Two other ways were measured on the
    Llama shape: CPU's fused kernel with a mask took 385 us a layer for this single row;
    as two batched matmuls, Inductor's GEMM template first copied the whole key cache into
    its own layout, twice, 184 us a layer (2.2 ms of a token)."""
    nkv, hd = keys.size(1), keys.size(3)
    group = q.size(1) // nkv  # query heads sharing a KV head (GQA; 1 is plain multi-head)
    scores = (q.view(1, nkv, group, 1, hd) * keys.unsqueeze(2)).sum(-1) * hd**-0.5  # (1, nkv, group, L)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return (weights.unsqueeze(-1) * values.unsqueeze(2)).sum(-2)  # (1, nkv, group, hd): the heads in q's order


class DecodeStep(nn.Module):
    """One token of one row through every block and the head, in static shapes: token
    (1, 1), pos (1,), each layer's keys and values (1, nkv, L, hd), written at `pos` in
    place; returns the next-token logits (1, V). The same arithmetic as `CpuDecoder.step`.

    `reads`: each block's (q k v, o, gate up or fc, down) and the head, as the layers
    read for each (`CpuDecoder` gives the model's own fp32 layers, or its concatenated
    int8 ones); the norms, embeddings and RoPE are the model's."""

    def __init__(self, model: GPT, reads: Sequence[Sequence[Reads]], head: Reads) -> None:
        super().__init__()
        self.model = model
        self.reads = nn.ModuleList(nn.ModuleList(nn.ModuleList(layers) for layers in block) for block in reads)
        self.head = nn.ModuleList(head)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        model, config = self.model, self.model.config
        nh, nkv, hd = config.n_head, config.n_kv_head, config.head_dim
        x = model.tok_emb(token)  # (1, 1, C)
        visible = (torch.arange(keys[0].size(2), device=pos.device) <= pos).view(1, 1, 1, -1)
        rope = None
        if model.pos_emb is not None:
            x = x + model.pos_emb(pos.view(1, 1))
        else:
            rope = rope_cos_sin(model.inv_freq, pos.view(1, 1), x.dtype)
        for i, (block, (qkv_in, o, up, down)) in enumerate(zip(model.blocks, self.reads)):
            qkv = _linear(block.norm1(x), qkv_in).view(1, nh + 2 * nkv, 1, hd)
            if rope is not None:
                qk = apply_rope(qkv[:, : nh + nkv], *rope)
                q, k = qk[:, :nh], qk[:, nh:]
            else:
                q, k = qkv[:, :nh], qkv[:, nh : nh + nkv]
            keys[i].index_copy_(2, pos, k)
            values[i].index_copy_(2, pos, qkv[:, nh + nkv :])
            y = _attend(q, keys[i], values[i], visible)
            x = x + _linear(y.view(1, 1, nh * hd), o)
            h = _linear(block.norm2(x), up)
            if isinstance(block.mlp, SwiGLU):
                gate, up_h = h.chunk(2, dim=-1)
                h = F.silu(gate) * up_h
            else:
                h = F.gelu(h, approximate=block.mlp.approximate)
            x = x + _linear(h, down)
        return _linear(model.norm_f(x)[:, -1], self.head).float()


class CompiledStep:
    """`DecodeStep` compiled for the model's current weights; `__call__(token, cache)` gives
    the next-token logits and advances the cache by one slot.

    Two things around the compiled function, each measured on the Llama shape beside
    llama.cpp: the weights Inductor froze into its own constants move to 2 MB pages once
    compiled (`lmforge.engine.hugepages`: 0-8% faster over three runs); and once a cache
    length has run, later calls at that length skip Dynamo's guards
    (`skip_guard_eval_unsafe`; the profiler put them at 0.85 ms of a 28 ms token, checking
    some 150 tensors it already knows: what could change them, a weight written in place,
    builds a new step instead; 42.2 against 38.5 tokens/s, the same graph both ways, in
    one run beside llama.cpp's 44.1)."""

    def __init__(self, model: GPT, reads: Sequence[Sequence[Reads]], head: Reads) -> None:
        """`reads`, `head`: as `DecodeStep` takes them."""
        step = DecodeStep(model, reads, head)
        forward = DecodeStep.forward
        own = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__)  # see the module's docstring
        self._fn: Callable[..., torch.Tensor] = torch.compile(types.MethodType(own, step), dynamic=False, fullgraph=True)
        self._model = model
        self._ran: set[int] = set()  # cache lengths this step has run at, its guards checked
        self._modules: list[object] = []  # Inductor's modules for this step's graphs, which hold their constants
        weakref.finalize(self, _forget, self._modules)

    def __call__(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        pos = torch.tensor([cache.length], device=token.device)
        length = cache.keys[0].size(2)
        if length in self._ran:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                logits = self._fn(token, pos, cache.keys, cache.values)
        else:
            logits = self._first_call(token, pos, cache)
            self._ran.add(length)
        cache.length += 1
        return logits

    def _first_call(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A call at a cache length not run yet: guards checked, compiling if needed, and the
        constants of any graph compiled moved onto huge pages."""
        import torch._inductor.config as inductor_config  # Inductor loads only when a step is compiled
        from torch._inductor.codecache import PyCodeCache

        loaded = len(PyCodeCache.modules)  # Inductor's compiled graphs, each a module holding its constants
        with inductor_config.patch(INDUCTOR_SETTINGS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # Inductor's own, while compiling
            logits = self._fn(token, pos, cache.keys, cache.values)
        compiled = PyCodeCache.modules[loaded:]
        self._modules += compiled
        self._move_constants(compiled)
        return logits

    def _move_constants(self, modules: Sequence[object]) -> None:
        """The fp32 weights a newly compiled graph froze (its own packed copies) onto huge
        pages. Not the model's tensors (their storage is how a change is noticed), nor
        int8 ones (their kernel reads a prepacked copy of its own), nor oneDNN's packed
        weights (opaque tensors, with no storage to swap)."""
        model_storages = {t.untyped_storage().data_ptr() for t in (*self._model.parameters(), *self._model.buffers())}
        move_to_huge_pages(
            value for module in modules for value in vars(module).values()
            if isinstance(value, torch.Tensor) and value.layout == torch.strided and value.is_floating_point()
            and value.untyped_storage().data_ptr() not in model_storages
        )


def _forget(modules: list[object]) -> None:
    """Drop a finished step's modules from Inductor's list of every module it loaded, which
    would otherwise keep their constants, a copy of the weights, for the process's life."""
    from torch._inductor.codecache import PyCodeCache

    mine = set(map(id, modules))
    PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if id(m) not in mine]
