"""How big a model is and how much memory it needs, by arithmetic on its `Config` alone.

Nothing here builds a model or imports torch, so `lmforge estimate --preset llama-3.2-1b`
answers in milliseconds for a model that would take 5 GiB to allocate. Every figure
follows what `lmforge.model` really allocates, and the tests hold it to that:

- parameters: the exact count `GPT(config).num_params()` gives (a tied head counts once);
- weight bytes per storage dtype (`DTYPES`), incl. the scales of int8 and NF4;
- KV-cache bytes per token and for `batch` sequences of `context` tokens;
- training memory of the trainer's fp32 step (`model(x, y)`, its blockwise loss, the
  fused AdamW of `build_optimizer`): weights, gradients, the two AdamW moments, and the
  activations autograd saves for backward, with and without gradient checkpointing,
  plus the transient buffers that set the real peak of a step.

The activation count is derived tensor by tensor from what PyTorch (2.x, CPU) saves in
our model, and the tests compare it with the bytes `torch.autograd.graph.saved_tensors_hooks`
sees on small configs. What one block saves in training, for N = batch * context tokens
(fp32, 4 bytes an element; statistics always fp32):

    block input x and the mid-block residual x1          2 * N * C      (each norm saves its input)
    LayerNorm: output + mean + rstd                      N * C + 2 * N  (per norm, two norms)
    RMSNorm: x * rsqrt, output, rsqrt                    2 * N * C + N  (per norm, two norms)
    attention, fused SDPA (CPU flash, dropout 0):        N * (qd + 2 kvd) for q, k, v
                                                         + N * qd output + N * nh logsumexp
    attention, math path (dropout > 0, or "reference"):  4 * N * qd (q, k, v with k, v repeated
                                                         to all heads; o's input) + B*nh*T*T
                                                         per kept T x T matrix (softmax; with
                                                         dropout also its mask and the result)
                                                         + T*T bytes of causal mask ("reference")
    dropout > 0: two residual masks (fp32 on CPU)        2 * N * C
    GELU MLP: fc output, GELU output                     2 * N * H
    SwiGLU: gate, silu(gate), up, their product          4 * N * H

where C = n_embd, qd = n_head * head_dim, kvd = n_kv_head * head_dim, H = mlp_hidden.
Outside the blocks: the token ids (and position ids) the embeddings keep, the final
norm's input and statistics, RoPE's cos/sin tables, an embedding-dropout mask, and what
the loss keeps. The trainer's loss (`GPT.forward(idx, targets)`, i.e.
`lmforge.ops.loss.linear_cross_entropy`) never holds the (N, vocab) logits: it runs the
head and the cross-entropy a block of rows at a time and takes the gradients in its
forward, so it keeps the gradient of the hidden states, N * C, and the head weight's
gradient, vocab * C (counted with the gradients, not here), and for the time of its
forward one block of fp32 logits and their softmax (`loss_buffers`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmforge.config import Config
from lmforge.errors import LmforgeError

DTYPES = ("fp32", "bf16", "fp16", "int8", "nf4")
FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANT_KEEP_BYTES = 2  # int8/nf4 keep everything but the block Linear weights in bf16/fp16
INT8_SCALE_BYTES = 4  # one fp32 absmax scale per output row (LLM.int8-style row-wise)
NF4_BLOCK = 64  # weights per absmax (QLoRA)
NF4_ABSMAX_BLOCK = 256  # double quantization: 8-bit absmaxes in blocks of 256 with an fp32 scale each

ACT = 4  # training activations are fp32
STAT = 4  # norm statistics and SDPA's logsumexp are fp32 whatever the activation dtype
INDEX = 8  # token ids, positions, targets are int64
# torch.utils.checkpoint keeps, per block, the CPU generator's state to replay dropout (torch.get_rng_state())
CHECKPOINT_RNG_STATE = 5056

# `lmforge.ops.loss` (which imports torch, so the numbers are repeated here; the tests hold them equal)
LOSS_BLOCK_ROWS = 512  # rows of logits per block when the head trains
LOSS_FROZEN_HEAD_BLOCK_ROWS = 128  # ... when it does not
LOSS_BLOCK_FLOATS = 1 << 25  # and floats per block, at most
LOSS_ROW_ALIGN = 16  # a block's rows are padded to a multiple of 16 floats


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise LmforgeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


# --- parameters -------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    """Parameter counts by part of the model; `total` equals `GPT(config).num_params()`."""

    embeddings: int  # token table (+ learned position table)
    attention: int  # q, k, v, o weights and biases, all layers
    mlp: int  # fc/proj or gate/up/down, all layers
    norms: int  # two per block and the final one
    head: int  # lm_head; 0 when tied to the token table (counted once, in embeddings)

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.mlp + self.norms + self.head


def block_linears(config: Config) -> list[tuple[int, int]]:
    """(out_features, in_features) of each Linear in one block: what int8/NF4 quantize."""
    C, H = config.n_embd, config.mlp_hidden
    qd, kvd = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    attention = [(qd, C), (kvd, C), (kvd, C), (C, qd)]
    mlp = [(H, C), (H, C), (C, H)] if config.mlp == "swiglu" else [(H, C), (C, H)]
    return attention + mlp


def count_params(config: Config) -> Params:
    """Exact parameter counts, layer by layer as `lmforge.model` builds them."""
    C, L = config.n_embd, config.n_layer
    linears = block_linears(config)
    bias = (lambda out: out) if config.bias else (lambda out: 0)
    attention = sum(o * i + bias(o) for o, i in linears[:4])
    mlp = sum(o * i + bias(o) for o, i in linears[4:])
    # RMSNorm has a weight only; LayerNorm a weight and, with bias=True, a bias
    norm = C * (2 if config.norm == "layernorm" and config.bias else 1)
    embeddings = config.vocab_size * C + (config.context_length * C if config.positions == "learned" else 0)
    head = 0 if config.tie_embeddings else config.vocab_size * C  # lm_head has no bias
    return Params(embeddings=embeddings, attention=L * attention, mlp=L * mlp, norms=(2 * L + 1) * norm, head=head)


# --- weights and KV cache -----------------------------------------------------------------
def quantized_bytes(rows: int, cols: int, dtype: str) -> int:
    """Bytes of one (rows, cols) weight stored as int8 or NF4, scales included.

    int8: 1 byte a weight + one fp32 scale per row (1 + 4/cols bytes a weight).
    NF4: 4-bit codes, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmaxes
    (0.5 + 1/64 + 4/16384 = 0.5159 bytes, 4.127 bits a weight). The per-tensor constants
    (the 16-entry NF4 code book, the absmax offset) are a few dozen bytes and left out.
    """
    n = rows * cols
    if dtype == "int8":
        return n + rows * INT8_SCALE_BYTES
    if dtype == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        return math.ceil(n / 2) + blocks + math.ceil(blocks / NF4_ABSMAX_BLOCK) * 4
    raise LmforgeError(f"{dtype!r} is not a quantized dtype (int8, nf4)")


def weight_bytes(config: Config, dtype: str) -> int:
    """Bytes of all parameters stored as `dtype`.

    int8 and NF4 quantize only the Linear weights inside the blocks (what
    `GPT.named_linears` yields); embeddings, norms, biases and the head stay 16-bit,
    because they are small or (the embeddings and head) too sensitive to quantize.
    """
    _check_dtype(dtype)
    total = count_params(config).total
    if dtype in FLOAT_BYTES:
        return total * FLOAT_BYTES[dtype]
    linears = block_linears(config)
    quantized = config.n_layer * sum(o * i for o, i in linears)
    packed = config.n_layer * sum(quantized_bytes(o, i, dtype) for o, i in linears)
    return packed + (total - quantized) * QUANT_KEEP_BYTES


def kv_dtype_bytes(dtype: str) -> int:
    """The KV cache holds activations: 16-bit when the weights are int8/NF4."""
    _check_dtype(dtype)
    return FLOAT_BYTES.get(dtype, QUANT_KEEP_BYTES)


def kv_cache_bytes_per_token(config: Config, dtype: str) -> int:
    """2 (k and v) * n_layer * n_kv_head * head_dim * bytes: GQA/MQA shrink it by n_head/n_kv_head."""
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * kv_dtype_bytes(dtype)


def kv_cache_bytes(config: Config, dtype: str, context: int, batch: int = 1) -> int:
    return kv_cache_bytes_per_token(config, dtype) * context * batch


# --- training activations --------------------------------------------------------------------
@dataclass(frozen=True)
class Activations:
    """Bytes autograd saves for backward in one forward of (batch, context), fp32."""

    block: int  # what one block saves, its input included
    block_input: int  # one block's input: what checkpointing keeps of a block (with the RNG state)
    outside: int  # embeddings' ids, RoPE tables, final norm, the loss's gradient of h
    n_layer: int

    @property
    def saved(self) -> int:
        """Without checkpointing: everything, held from forward until its backward."""
        return self.outside + self.n_layer * self.block

    @property
    def kept(self) -> int:
        """With checkpointing, at the end of forward: each block's input (and CPU RNG state) and the outside."""
        return self.outside + self.n_layer * (self.block_input + CHECKPOINT_RNG_STATE)

    @property
    def checkpointed(self) -> int:
        """With checkpointing, in backward: the kept tensors plus one recomputed block
        (whose input is the kept one, counted once)."""
        return self.kept + self.block - self.block_input


def _norm_saved(config: Config, N: int) -> int:
    """What a norm saves besides its input (which the caller counts once)."""
    C = config.n_embd
    if config.norm == "layernorm":
        return N * C * ACT + 2 * N * STAT  # output (the next Linear's input), mean, rstd
    return 2 * N * C * ACT + N * STAT  # x * rsqrt (for weight's grad), output, rsqrt


def _attention_saved(config: Config, batch: int, context: int) -> int:
    """q, k, v and what the attention kernel keeps, up to and including o's input."""
    N, nh, hd = batch * context, config.n_head, config.head_dim
    qd, kvd = nh * hd, config.n_kv_head * hd
    fused = config.attention == "sdpa" and config.dropout == 0
    if fused:
        # CPU flash attention keeps q, k, v (GQA natively, no repeat), its output (which is
        # o's input after a free transpose) and the fp32 logsumexp per query and head
        return N * (qd + 2 * kvd) * ACT + N * qd * ACT + N * nh * STAT
    # math path: scaled q and k, v repeated to all heads, the (T, T) matrices, and o's
    # input (a copy: the output's transpose is not contiguous)
    scores = batch * nh * context * context * ACT
    matrices = 3 if config.dropout > 0 else 1  # softmax; with dropout also the mask and the result
    mask = context * context if config.attention == "reference" and context > 1 else 0  # bool causal mask
    return 3 * N * qd * ACT + matrices * scores + mask + N * qd * ACT


def _final_norm_saved(config: Config, N: int) -> int:
    """The final norm's saved tensors besides its input: its output feeds the blockwise
    loss, which keeps no input (only gradients), so nothing saves that output."""
    return _norm_saved(config, N) - N * config.n_embd * ACT


def _mlp_saved(config: Config, N: int) -> int:
    H = config.mlp_hidden
    return (4 if config.mlp == "swiglu" else 2) * N * H * ACT


def loss_block_rows(tokens: int, vocab: int, head_trains: bool = True) -> int:
    """Rows of logits `linear_cross_entropy` computes at a time (its `rows`)."""
    return max(1, min(tokens, LOSS_BLOCK_ROWS if head_trains else LOSS_FROZEN_HEAD_BLOCK_ROWS, LOSS_BLOCK_FLOATS // vocab))


def loss_block_bytes(tokens: int, vocab: int, head_trains: bool = True) -> int:
    """One block of fp32 logits and its softmax, rows padded to a multiple of 16 floats."""
    width = -(-vocab // LOSS_ROW_ALIGN) * LOSS_ROW_ALIGN
    return 2 * loss_block_rows(tokens, vocab, head_trains) * width * ACT


def loss_buffers(tokens: int, n_embd: int, vocab: int, head_trains: bool = True) -> int:
    """Peak bytes `linear_cross_entropy` allocates in its forward for `tokens` rows of h
    (fp32, h needing a gradient): the two gradients it keeps for backward (of h, (N, C);
    of the head weight, (vocab, C), when the head trains), the per-row bookkeeping, one
    block of logits and its softmax, and the block's largest temporary."""
    N, C, V = tokens, n_embd, vocab
    rows = loss_block_rows(N, V, head_trains)
    kept = N * C * ACT + (V * C * 4 if head_trains else 0)
    # valid (bool), scale (fp32), the targets with ignored labels zeroed (int64), the
    # row losses (fp32), and the label count (an int64 scalar)
    bookkeeping = N * (1 + ACT + INDEX + ACT) + INDEX
    blocks = loss_block_bytes(N, V, head_trains)  # logits, softmax
    # in the loop: a block's h * scale for the head's gradient (else three (rows,)
    # reductions); after it, the masked row losses (and a wrapped 0.0)
    transient = max(rows * C * ACT if head_trains else 3 * rows * ACT, N * ACT + ACT)
    return kept + bookkeeping + blocks + transient


def activations(config: Config, batch: int, context: int) -> Activations:
    """Saved-for-backward bytes of a training forward and the loss, tensor by tensor."""
    N, C = batch * context, config.n_embd
    dropout_masks = 2 * N * C * ACT if config.dropout > 0 else 0
    block = (
        2 * N * C * ACT  # the block input and the mid-block residual (the norms' inputs)
        + 2 * _norm_saved(config, N)
        + _attention_saved(config, batch, context)
        + _mlp_saved(config, N)
        + dropout_masks
    )
    outside = (
        N * INDEX  # token ids (the embedding's backward scatters by them)
        + (context * INDEX if config.positions == "learned" else 0)  # position ids (1, T)
        + (2 * context * config.head_dim * ACT if config.positions == "rope" else 0)  # cos, sin
        + (N * C * ACT if config.dropout > 0 else 0)  # embedding dropout mask
        + N * C * ACT  # the final norm's input (the last block's output)
        + _final_norm_saved(config, N)
        + N * C * ACT  # the loss's gradient of the hidden states, taken in its forward
    )
    return Activations(block=block, block_input=N * C * ACT, outside=outside, n_layer=config.n_layer)


# --- training memory --------------------------------------------------------------------------
@dataclass(frozen=True)
class Training:
    """Memory of an fp32 AdamW step at (batch, context), with and without checkpointing.

    `total` is the usual rule of thumb, weights + gradients + AdamW moments + saved
    activations. The peaks are what a step really reaches (see `backward_phases`):
    gradients appear only as activations are freed (the head's first: the blockwise loss
    takes it in the forward), but the loss's blocks of logits and each block's backward
    make short-lived buffers the sum leaves out. Everything is fp32, as lmforge trains,
    with the trainer's fused AdamW; bf16 autocast would change the activations and is
    not modeled.
    """

    weights: int
    gradients: int
    adamw: int  # exp_avg and exp_avg_sq, fp32
    activations: int  # saved for backward, no checkpointing
    activations_checkpointed: int  # kept block inputs + one recomputed block
    loss_blocks: int  # the loss's transient block of fp32 logits and its softmax (rows x vocab, padded)
    peak: int  # a steady-state step, modeled phase by phase
    peak_checkpointed: int
    peak_phase: str  # the phase of backward_phases that sets the peak
    peak_phase_checkpointed: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.adamw + self.activations


def _block_param_bytes(config: Config) -> int:
    p = count_params(config)
    return ((p.attention + p.mlp) // config.n_layer + 2 * (p.norms // (2 * config.n_layer + 1))) * 4


def backward_phases(config: Config, batch: int, context: int, checkpointing: bool) -> dict[str, int]:
    """Bytes beyond weights and AdamW moments at each candidate peak of a steady-state step.

    Steady state: the moments exist and zero_grad(set_to_none=True) left no gradients,
    so gradients appear only as backward frees activations (the head's sooner, in the
    loss's forward); a step's peak is at one of these moments (found with the PyTorch
    profiler's allocation events on CPU; the tests hold each to the allocator's peak).
    """
    params = count_params(config)
    P = params.total * 4
    acts = activations(config, batch, context)
    N, V, C, H = batch * context, config.vocab_size, config.n_embd, config.mlp_hidden
    head_gradient = V * C * 4
    # the batch's labels: an input of the step, held throughout (its token ids are among the saved tensors)
    targets = N * INDEX
    # freed once the loss and the final norm are through backward: the loss's gradient
    # of h, the final norm's input and statistics
    loss_and_final_norm = 2 * N * C * ACT + _final_norm_saved(config, N)
    # inside a block's backward, at the MLP's output projection: the residual-stream
    # gradient, the hidden activations' gradient(s) (SwiGLU: of silu(gate) and of up),
    # and that projection's weight gradient
    in_flight = N * C * ACT + (2 if config.mlp == "swiglu" else 1) * N * H * ACT + C * H * 4
    # gradients not yet made when the first block runs backward: its own and the
    # embedding tables' (a tied token table already has its head half)
    untouched_tables = params.embeddings - (V * C if config.tie_embeddings else 0)
    untied_token_table = 0 if config.tie_embeddings else V * C * 4
    pending = _block_param_bytes(config) + untouched_tables * 4
    stored = acts.kept if checkpointing else acts.saved
    # the final norm's backward beyond what forward stored (see "final norm" below)
    if config.norm == "layernorm":
        final_norm_backward = N * C * ACT  # its input's gradient
    else:  # five (N, C) made; the loss's gradient of h, x * rsqrt and rsqrt freed
        final_norm_backward = 5 * N * C * ACT - 2 * N * C * ACT - N * STAT
    top = acts.checkpointed if checkpointing else acts.saved
    # what stays of the outside until the embeddings' backward: ids, positions, RoPE
    # tables, the dropout mask (and the first block's RNG state, with checkpointing)
    below = acts.outside - loss_and_final_norm + (CHECKPOINT_RNG_STATE if checkpointing else 0)
    return {
        # the loss's forward, at the end of its first block: what forward stored, the
        # final norm's output h (saved by nothing, alive while the loss runs) and the
        # loss's buffers (the gradients of h and of the head weight it takes there and
        # then, a block of logits and its softmax). The gradient of h counts in both
        # `stored` and the buffers, and h is the same size: the two cancel.
        "loss": stored + targets + loss_buffers(N, C, V),
        # the final norm's backward, the blocks' activations still stored and the head's
        # gradient made: LayerNorm's makes its input's gradient, the loss's gradient of h
        # its grad_output; RMSNorm (autograd through its ops) has freed that and its saved
        # x * rsqrt and rsqrt when it holds five (N, C) at pow's backward: the gradients
        # through weight * h, h * rsqrt and the mean, pow's x ** 1 and its product with 2
        "final norm": stored + head_gradient + targets + final_norm_backward,
        # the top block (recomputed, with checkpointing), with the head's gradient made
        "top block": top - loss_and_final_norm + head_gradient + in_flight + targets,
        # the first block: nearly all gradients, that block's activations, and what is
        # left of the outside (ids, positions, RoPE tables, ...)
        "first block": P - pending + acts.block + in_flight + below + targets,
        # the end of backward, the token embedding's: every other gradient made (a tied
        # table's head half waiting to be added to it; a learned position table's goes
        # first), the table's dense gradient, the embeddings' output gradient, the ids.
        # The trainer's fused AdamW then steps with no temporaries (the for-loop AdamW
        # would add two of the largest parameter's size; foreach, on other devices, more).
        "embeddings": P - untied_token_table + V * C * 4 + N * C * ACT + N * INDEX + targets,
    }


def training_memory(config: Config, batch: int, context: int) -> Training:
    """fp32 AdamW training memory: the components, their sum, and the modeled peaks.

    A peak is the weights and AdamW moments (resident all step) plus the largest of
    `backward_phases`; `peak_phase` names it ("loss" when the vocabulary and the
    activations dominate, "embeddings" when the weights do).
    """
    P = count_params(config).total * 4
    acts = activations(config, batch, context)
    plain = backward_phases(config, batch, context, checkpointing=False)
    ckpt = backward_phases(config, batch, context, checkpointing=True)
    resident = P + 2 * P  # weights and AdamW moments
    return Training(
        weights=P,
        gradients=P,
        adamw=2 * P,
        activations=acts.saved,
        activations_checkpointed=acts.checkpointed,
        loss_blocks=loss_block_bytes(batch * context, config.vocab_size),
        peak=resident + max(plain.values()),
        peak_checkpointed=resident + max(ckpt.values()),
        peak_phase=max(plain, key=plain.__getitem__),
        peak_phase_checkpointed=max(ckpt, key=ckpt.__getitem__),
    )


def check_training_fits(config: Config, batch: int, context: int, checkpointing: bool, available: int | None) -> None:
    """Refuse, with the numbers, a training run whose modeled peak exceeds the `available`
    bytes (None: unknown, nothing checked), before anything is allocated: an absurd size
    (`--set n_layer=100000`) must fail in milliseconds, not swap for a quarter of an hour."""
    if available is None:
        return
    t = training_memory(config, batch, context)
    need = t.peak_checkpointed if checkpointing else t.peak
    if need > available:
        gib = 2**30
        raise LmforgeError(
            f"this run needs about {need / gib:,.1f} GiB to train ({count_params(config).total / 1e6:,.1f}M parameters: "
            f"weights, gradients and AdamW moments {(t.weights + t.gradients + t.adamw) / gib:,.1f} GiB, at batch {batch} x "
            f"context {context}), but only {available / gib:,.1f} GiB are available; choose a smaller model (--preset, "
            "--set n_layer=... / n_embd=...), a smaller --batch-size or --context-length"
            + ("" if checkpointing else ", or --gradient-checkpointing")
        )


# --- everything at once ----------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """What `lmforge estimate` prints (and `--json` dumps)."""

    config: str
    dtype: str
    context: int
    batch: int
    params: Params
    weight_bytes: dict[str, int]  # every dtype in DTYPES
    kv_bytes_per_token: int
    kv_bytes: int  # batch * context tokens
    training: Training

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["params"]["total"] = self.params.total
        d["training"]["total"] = self.training.total
        return d


def estimate(config: Config, dtype: str = "fp32", context: int | None = None, batch: int = 1) -> Estimate:
    """Parameters, weights in every dtype, KV cache in `dtype`, fp32 AdamW training memory."""
    _check_dtype(dtype)
    context = config.context_length if context is None else context
    if not 1 <= context <= config.context_length:
        raise LmforgeError(
            f"context {context} is outside 1..{config.context_length} (the model's context_length); "
            "pass a shorter --context or a config with a longer context_length"
        )
    if batch < 1:
        raise LmforgeError(f"batch must be at least 1, got {batch}")
    return Estimate(
        config=config.name,
        dtype=dtype,
        context=context,
        batch=batch,
        params=count_params(config),
        weight_bytes={d: weight_bytes(config, d) for d in DTYPES},
        kv_bytes_per_token=kv_cache_bytes_per_token(config, dtype),
        kv_bytes=kv_cache_bytes(config, dtype, context, batch),
        training=training_memory(config, batch, context),
    )
