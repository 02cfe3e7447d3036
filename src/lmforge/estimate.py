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
  plus the transient buffers that set the real peak of a step;
- the same for every setup the trainer offers (`Setup`, `training_plan`): 8-bit AdamW
  moments (`AdamW8bit`: its state to the byte, and its step's chunk buffers), moments
  paged to memory-mapped files (reported apart: disk, not memory), and LoRA / QLoRA
  (a frozen base, fp32 or NF4, with trainable adapters), and whether it fits.

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
from dataclasses import asdict, dataclass, replace

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


def param_tensors(config: Config) -> list[int]:
    """The size of every parameter tensor, each once (a tied head is the token table):
    what the optimizer steps, and keeps moments for, tensor by tensor."""
    C, L = config.n_embd, config.n_layer
    tables = [config.vocab_size * C] + ([config.context_length * C] if config.positions == "learned" else [])
    norm = [C, C] if config.norm == "layernorm" and config.bias else [C]
    linears = [n for o, i in block_linears(config) for n in ((o * i, o) if config.bias else (o * i,))]
    head = [] if config.tie_embeddings else [config.vocab_size * C]
    return tables + L * (2 * norm + linears) + norm + head


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
    first_block: int  # what the first block saves: `block`, unless its input needs no gradient (LoRA)

    @property
    def saved(self) -> int:
        """Without checkpointing: everything, held from forward until its backward."""
        return self.outside + self.first_block + (self.n_layer - 1) * self.block

    @property
    def kept(self) -> int:
        """With checkpointing, at the end of forward: each block's input (and CPU RNG state) and the outside."""
        return self.outside + self.n_layer * (self.block_input + CHECKPOINT_RNG_STATE)

    @property
    def checkpointed(self) -> int:
        """With checkpointing, in backward: the kept tensors plus one recomputed block
        (whose input is the kept one, counted once)."""
        return self.kept + max(self.block, self.first_block) - self.block_input


def _norm_saved(config: Config, N: int) -> int:
    """What a norm saves besides its input (which the caller counts once)."""
    C = config.n_embd
    if config.norm == "layernorm":
        return N * C * ACT + 2 * N * STAT  # output (the next Linear's input), mean, rstd
    return 2 * N * C * ACT + N * STAT  # x * rsqrt (for weight's grad), output, rsqrt


def _attention_saved(config: Config, batch: int, context: int,
                     q: bool = True, k: bool = True, v: bool = True, o: bool = True) -> int:
    """q, k, v and what the attention kernel keeps, up to and including o's input.

    `q`, `k`, `v`: whether each needs a gradient (in full training all do; in LoRA's first
    block, whose input needs none, only the adapted ones); `o`: whether o's input is
    saved (o's weight, or an adapter on it, trains).
    """
    N, nh, hd = batch * context, config.n_head, config.head_dim
    qd, kvd = nh * hd, config.n_kv_head * hd
    fused = config.attention == "sdpa" and config.dropout == 0
    if fused:
        # CPU flash attention keeps q, k, v (GQA natively, no repeat), its output (which is
        # o's input after a free transpose) and the fp32 logsumexp per query and head,
        # all of them as soon as one of q, k, v needs a gradient
        if q or k or v:
            return N * (qd + 2 * kvd) * ACT + N * qd * ACT + N * nh * STAT
        return N * qd * ACT if o else 0
    # math path: q (for k's gradient) and k, v repeated to all heads (for q's and for the
    # weights' gradients), the (T, T) matrices, and o's input (a copy: the output's
    # transpose is not contiguous)
    scores = batch * nh * context * context * ACT
    weighted = q or k  # the attention weights need a gradient
    saved = (N * qd * ACT if k else 0) + (N * qd * ACT if q else 0) + (N * qd * ACT if weighted else 0)
    if weighted:  # the softmax's output; with dropout its mask, and the dropped-out weights if v needs a gradient
        saved += (3 if config.dropout > 0 and v else 2 if config.dropout > 0 else 1) * scores
        saved += context * context if config.attention == "reference" and context > 1 else 0  # bool causal mask
    elif v:  # v's gradient alone: the weights v was multiplied by
        saved += scores
    return saved + (N * qd * ACT if o else 0)


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
    return Activations(block=block, block_input=N * C * ACT, outside=outside, n_layer=config.n_layer, first_block=block)


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
    plain, ckpt = (training_plan(config, batch, context, Setup(checkpointing=c)) for c in (False, True))
    return Training(
        weights=plain.weights,
        gradients=plain.gradients,
        adamw=plain.moments,
        activations=plain.activations,
        activations_checkpointed=ckpt.activations,
        loss_blocks=loss_block_bytes(batch * context, config.vocab_size),
        peak=plain.peak,
        peak_checkpointed=ckpt.peak,
        peak_phase=plain.peak_phase,
        peak_phase_checkpointed=ckpt.peak_phase,
    )


# --- the optimizer ------------------------------------------------------------------------------
OPTIMIZERS = ("adamw", "adamw8bit")  # `TrainConfig.optimizer`
# `lmforge.train.adamw8bit` (which imports torch, so the numbers are repeated here; the tests hold them equal)
ADAMW8BIT_BLOCK = 256  # values per fp32 absmax
ADAMW8BIT_CHUNK = 256 * 1024  # values per pass of the step
ADAMW8BIT_MIN_SIZE = 4096  # tensors with fewer values keep fp32 moments
# the two 8-bit codes (256 fp32 values each, m's signed, v's unsigned) and their
# nearest-code tables (65,536 uint8 each), made at the first step and kept
ADAMW8BIT_CODES = 2 * (256 * 4 + 65536)


def quantized_moments(numel: int, optimizer: str) -> bool:
    """Whether a tensor of `numel` values gets 8-bit moments (`AdamW8bit.quantized`)."""
    return optimizer == "adamw8bit" and numel >= ADAMW8BIT_MIN_SIZE


def moment_bytes(numel: int, optimizer: str) -> int:
    """Bytes of one tensor's two moments, as `AdamW8bit.state_bytes` counts them: fp32 m
    and v (8 a value; torch's AdamW too), or one byte code each per value plus one fp32
    absmax each per block of 256 values (2.03 bytes a value)."""
    if quantized_moments(numel, optimizer):
        return 2 * numel + 2 * 4 * math.ceil(numel / ADAMW8BIT_BLOCK)
    return 8 * numel


def step_buffers(numel: int, optimizer: str, paged: bool) -> int:
    """Peak bytes one tensor's optimizer step allocates beyond the state (a scalar or two aside).

    Torch's fused AdamW (in memory) updates in place: none. `AdamW8bit` walks the tensor
    CHUNK values at a time; for n = min(numel, CHUNK) values (nb blocks) of an 8-bit
    tensor its peak is in the quantization of v, which holds the dequantized m and v and
    the update's denominator (3 x 4n), m's new codes and absmaxes (n + 4nb), and of its
    own v's absmaxes and their reciprocals (2 x 4nb), the scaled values (4n), their
    int32 grid indices (4n) and the codes those pick (n): 22n + 12nb. Its fp32 path
    (small tensors, and every tensor of a paged 32-bit AdamW) updates m and v in place
    and makes sqrt(v) and the denominator: 8n. Paged moments are dequantized where they
    lie (the same CPU memory), so paging changes none of this.
    """
    if optimizer == "adamw" and not paged:
        return 0
    n = min(numel, ADAMW8BIT_CHUNK)
    if quantized_moments(numel, optimizer):
        return 22 * n + 12 * math.ceil(n / ADAMW8BIT_BLOCK)
    return 8 * n


# --- LoRA and QLoRA ------------------------------------------------------------------------------
# `lmforge.finetune.lora` (which imports torch; the tests hold these equal)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "fc", "proj")
LORA_ALL_LINEAR = "all-linear"
_LORA_ALIASES = {"up": ("up", "fc"), "fc": ("up", "fc"), "down": ("down", "proj"), "proj": ("down", "proj")}
NF4_OFFSET_BYTES = 4  # double quantization's fp32 absmax offset, one per quantized weight


def named_block_linears(config: Config) -> dict[str, tuple[int, int]]:
    """`block_linears` by the layers' names in `lmforge.model` (what LoRA targets)."""
    names = ("q", "k", "v", "o", *(("gate", "up", "down") if config.mlp == "swiglu" else ("fc", "proj")))
    return dict(zip(names, block_linears(config), strict=True))


def lora_targets(config: Config, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(out, in) of each block Linear that `targets` selects, by name, as
    `lmforge.finetune.lora.resolve_targets` selects them (`up` and `fc` are one target,
    as are `down` and `proj`); a target that selects nothing is refused the same way."""
    linears = named_block_linears(config)
    chosen: set[str] = set()
    for target in targets:
        if target == LORA_ALL_LINEAR:
            found = set(linears)
        elif target in LORA_TARGETS:
            found = set(_LORA_ALIASES.get(target, (target,))) & set(linears)
        else:
            raise LmforgeError(f"unknown LoRA target {target!r}; choose among {', '.join(LORA_TARGETS)} or {LORA_ALL_LINEAR}")
        if not found:
            raise LmforgeError(f"LoRA target {target!r} matches no linear layer in this model; its layers are named "
                               f"{', '.join(linears)} (or use {LORA_ALL_LINEAR})")
        chosen |= found
    return {name: shape for name, shape in linears.items() if name in chosen}


def adapter_tensors(config: Config, r: int, targets: tuple[str, ...]) -> list[int]:
    """The size of every adapter matrix, A (r, in) and B (out, r), in every block."""
    chosen = lora_targets(config, targets)
    narrowest = min(chosen, key=lambda name: min(chosen[name]))
    if r > min(chosen[narrowest]):  # as `lmforge.finetune.lora.check_rank` refuses it
        out, inp = chosen[narrowest]
        raise LmforgeError(f"LoRA rank r={r} is larger than the layer {narrowest} ({inp} inputs, {out} outputs): its update "
                           f"B A can have rank at most {min(out, inp)}: lower r (--lora-r) to at most {min(out, inp)}")
    return config.n_layer * [n for out, inp in chosen.values() for n in (r * inp, out * r)]


def base_weight_bytes(config: Config, quantize: str = "") -> int:
    """The frozen base of a LoRA run as the recipes hold it: fp32, or with `quantize`
    "nf4" (QLoRA, `lmforge.finetune.nf4.quantize_model`) every block Linear weight in NF4
    with double quantization and everything else (embeddings, norms, biases, head) fp32."""
    total = count_params(config).total * 4
    if not quantize:
        return total
    linears = block_linears(config)
    dense = config.n_layer * sum(o * i * 4 for o, i in linears)
    packed = config.n_layer * sum(quantized_bytes(o, i, "nf4") + NF4_OFFSET_BYTES for o, i in linears)
    return total - dense + packed


def _norm_stats(config: Config, N: int) -> int:
    """A norm's saved statistics: LayerNorm's mean and rstd, RMSNorm's rsqrt."""
    return (2 if config.norm == "layernorm" else 1) * N * STAT


def _lora_block_saved(config: Config, batch: int, context: int, r: int, adapted: set[str], first: bool) -> int:
    """What one block saves for backward when only adapters on the `adapted` Linears train.

    A frozen Linear saves nothing (its input serves only its weight's gradient); an
    adapter saves its input (for A's gradient) and A x (N, r; for B's). A norm's input
    and statistics, the attention kernel's tensors and the activation functions' inputs
    are saved as in full training, but only where a gradient flows: the first block's
    input comes from the frozen embeddings and needs none, so there autograd records
    only from the first adapter on.
    """
    N, C, H = batch * context, config.n_embd, config.mlp_hidden
    stream = not first  # the block's input needs a gradient
    saved = len(adapted) * N * r * ACT
    if stream:  # the first norm's input and statistics
        saved += N * C * ACT + _norm_stats(config, N)
    if adapted & {"q", "k", "v"}:  # its output, the adapters' input
        saved += N * C * ACT
    q, k, v = (stream or name in adapted for name in ("q", "k", "v"))
    saved += _attention_saved(config, batch, context, q, k, v, o="o" in adapted)
    attention_flows = q or k or v or "o" in adapted
    residual = stream or attention_flows  # the mid-block residual needs a gradient
    if config.dropout > 0 and attention_flows:
        saved += N * C * ACT  # the attention output's dropout mask
    if residual:  # the second norm's input and statistics
        saved += N * C * ACT + _norm_stats(config, N)
    if adapted & {"fc", "gate", "up"}:  # its output, the adapters' input
        saved += N * C * ACT
    if config.mlp == "swiglu":
        gate, up = residual or "gate" in adapted, residual or "up" in adapted
        # silu's input, silu(gate) (for up's gradient), up (for silu(gate)'s), down's input
        saved += sum((gate, up, gate, "down" in adapted)) * N * H * ACT
        mlp_flows = gate or up or "down" in adapted
    else:
        fc = residual or "fc" in adapted
        saved += sum((fc, "proj" in adapted)) * N * H * ACT  # GELU's input; proj's input
        mlp_flows = fc or "proj" in adapted
    if config.dropout > 0 and mlp_flows:
        saved += N * C * ACT  # the MLP output's dropout mask
    return saved


def lora_activations(config: Config, batch: int, context: int, r: int, targets: tuple[str, ...]) -> Activations:
    """Saved-for-backward bytes of a LoRA (or QLoRA: the 4-bit layers save only their
    own buffers) training forward and the loss, the base and its head frozen.

    Outside the blocks: RoPE's tables, the final norm's input and statistics, and the
    loss's gradient of h (a frozen head has none); the frozen embeddings keep no ids and
    their dropout no mask.
    """
    N, C = batch * context, config.n_embd
    adapted = set(lora_targets(config, targets))
    rope = config.positions == "rope" and (config.n_layer > 1 or bool(adapted & {"q", "k"}))
    outside = (2 * context * config.head_dim * ACT if rope else 0) + 2 * N * C * ACT + _norm_stats(config, N)
    return Activations(
        block=_lora_block_saved(config, batch, context, r, adapted, first=False),
        block_input=N * C * ACT,
        outside=outside,
        n_layer=config.n_layer,
        first_block=_lora_block_saved(config, batch, context, r, adapted, first=True),
    )


def _frozen_matmul(n_weight: int, out: int, quantize: str) -> int:
    """Bytes a frozen Linear's matmul holds: its output; for an NF4 weight of `n_weight`
    values also its dense fp32 copy (4 bytes a value), made from the packed codes widened
    to int32 (2 bytes a value) and gathered from the level table."""
    return max(6 * n_weight, 4 * n_weight + out) if quantize else out


def _lora_mlp_phases(config: Config, N: int, r: int, adapted: set[str], quantize: str) -> dict[str, int]:
    """What the top block's MLP holds beyond the saved tensors, in its forward (the
    output projection's) and in its backward (the output projection's, then the
    activation function's): the candidates of its peak. An adapted Linear's backward
    runs the adapter's path first (its gradient of the input, then A's saved input is
    freed), then the frozen base's, then sums the two."""
    C, H = config.n_embd, config.mlp_hidden
    R, Hh, n = N * C * ACT, N * H * ACT, C * H
    out = "down" if config.mlp == "swiglu" else "proj"
    mask = R if config.dropout > 0 else 0  # the MLP output's dropout mask, saved (freed as its gradient, as big, is made)
    norm2_out = 0 if adapted & {"fc", "gate", "up"} else R  # alive as the MLP's argument, saved only for an adapter
    hidden = 0 if out in adapted else Hh  # the output projection's input, saved only for its adapter
    if out in adapted:  # the base's matmul after the adapter's path, then the sum (the incoming gradient freed)
        projection = max(_frozen_matmul(n, Hh, quantize), 2 * Hh - mask)
    else:
        projection = _frozen_matmul(n, Hh, quantize)
    # then the gradients into and out of silu(gate) * up, or GELU, with the output projection's input freed
    activation = (3 if config.mlp == "swiglu" else 2) * Hh - (Hh - hidden) - mask
    return {
        # the output projection's forward: what the block saved before it (not the MLP
        # output's dropout mask, nor the adapter's A x), its argument and input, the matmul
        "forward": norm2_out + hidden - mask - (N * r * ACT if out in adapted else 0) + _frozen_matmul(n, R, quantize),
        "backward": max(projection, activation),
    }


def lora_phases(config: Config, batch: int, context: int, r: int, targets: tuple[str, ...], checkpointing: bool,
                quantize: str = "") -> dict[str, int]:
    """`backward_phases` of a LoRA (QLoRA) step: bytes beyond the weights and moments at
    each candidate peak. The frozen head makes no gradient, so the loss keeps only the
    gradient of h and computes fewer rows at a time; the frozen norms make no weight
    gradients; an NF4 Linear dequantizes its weight for each matmul, forward and backward."""
    acts = lora_activations(config, batch, context, r, targets)
    adapted = set(lora_targets(config, targets))
    N, V, C = batch * context, config.vocab_size, config.n_embd
    inputs = 2 * N * INDEX  # the batch's ids and labels, held by the caller all step
    stored = acts.kept if checkpointing else acts.saved
    # the top block: its activations recomputed (checkpointing) or still stored
    top = acts.checkpointed if checkpointing else acts.saved
    loss_and_final_norm = 2 * N * C * ACT + _norm_stats(config, N)
    # LayerNorm's backward makes its input's gradient; RMSNorm's (autograd through its
    # ops) has freed the loss's gradient of h and its rsqrt when it holds, at pow's
    # backward, the gradients through h * rsqrt and the mean, pow's x ** 1 and its product with 2
    final_norm = N * C * ACT if config.norm == "layernorm" else 4 * N * C * ACT - N * STAT
    mlp = _lora_mlp_phases(config, N, r, adapted, quantize)
    # the residual-stream gradient reaching the top block (and, with checkpointing, its recomputation)
    incoming = N * C * ACT
    return {
        "loss": stored + inputs + loss_buffers(N, C, V, head_trains=False),
        "final norm": stored + inputs + final_norm,
        "top block (forward)": top - loss_and_final_norm + (incoming if checkpointing else 0) + mlp["forward"] + inputs,
        "top block": top - loss_and_final_norm + incoming + mlp["backward"] + inputs,
    }


# --- a training setup: will it fit ------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """What a training run chooses that changes its memory, as the trainer's flags name it."""

    optimizer: str = "adamw"  # --optimizer: adamw (fp32 moments) | adamw8bit (8-bit blockwise moments)
    paged: bool = False  # --optimizer-states paged: the moments in memory-mapped files, which the OS pages out
    checkpointing: bool = False  # --gradient-checkpointing
    lora_r: int = 0  # --lora-r: adapters of this rank over a frozen base; 0: every weight trains
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o")  # --lora-targets
    quantize: str = ""  # --quantize nf4: the frozen base's block Linears in 4 bits (QLoRA)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise LmforgeError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise LmforgeError(f"--lora-r must be a positive integer (0: no LoRA), got {self.lora_r!r}")
        if self.quantize not in ("", "nf4"):
            raise LmforgeError(f"--quantize takes nf4, got {self.quantize!r}")
        if self.quantize and not self.lora_r:
            raise LmforgeError("--quantize nf4 freezes the base in 4 bits: train adapters with --lora-r (e.g. --lora-r 8)")
        bad = [t for t in self.lora_targets if t not in (*LORA_TARGETS, LORA_ALL_LINEAR)]
        if bad or not self.lora_targets:
            choices = f"{', '.join(LORA_TARGETS)} or {LORA_ALL_LINEAR}"
            raise LmforgeError(f"--lora-targets takes {choices}, got {list(self.lora_targets)}")

    @property
    def lora(self) -> bool:
        return self.lora_r > 0

    def describe(self) -> str:
        """"adamw8bit, paged moments, checkpointing, QLoRA r=8 on q,k,v,o": the setup in a few words."""
        words = [self.optimizer, *(["paged moments"] if self.paged else []), *(["checkpointing"] if self.checkpointing else [])]
        if self.lora:
            words.append(f"{'QLoRA' if self.quantize else 'LoRA'} r={self.lora_r} on {','.join(self.lora_targets)}")
        return ", ".join(words)


@dataclass(frozen=True)
class Plan:
    """Memory of a steady-state training step of `setup` at (batch, context).

    The moments of paged states live in memory-mapped files (`paged`): the OS writes
    them out and reads them back as the step walks the tensors, so they count against
    disk, not against the RAM a run needs. `peak` is what must be resident: the
    weights, the in-memory moments, AdamW8bit's code tables and the largest of the
    step's phases (`training_phases`).
    """

    setup: Setup
    batch: int
    context: int
    trainable: int  # parameters that learn: all, or the adapters
    weights: int  # every weight: the model's fp32 tensors, or the frozen base (NF4 blocks with QLoRA) and the adapters
    gradients: int  # fp32, one per trainable parameter
    moments: int  # the optimizer's state, resident or paged
    paged: int  # the part of `moments` in memory-mapped files (not resident)
    code_tables: int  # AdamW8bit's codes and nearest-code tables
    step_buffers: int  # the optimizer step's transient working set (AdamW8bit's chunk buffers)
    activations: int  # saved for backward (with checkpointing: the kept block inputs + one recomputed block)
    peak: int  # resident bytes at the step's peak (modeled)
    peak_phase: str  # the phase of `training_phases` that sets it

    @property
    def resident_moments(self) -> int:
        return self.moments - self.paged

    @property
    def total(self) -> int:
        """The rule of thumb, what stays resident: weights + gradients + moments + activations."""
        return self.weights + self.gradients + self.resident_moments + self.code_tables + self.activations

    def fits(self, available: int) -> bool:
        return self.peak <= available


def trainable_tensors(config: Config, setup: Setup) -> list[int]:
    """The size of every tensor the optimizer steps: every parameter, or the adapters."""
    if setup.lora:
        return adapter_tensors(config, setup.lora_r, setup.lora_targets)
    return param_tensors(config)


def _step_buffers(tensors: list[int], setup: Setup) -> int:
    """The optimizer step's working set: that of its largest tensor (one tensor at a time)."""
    return max(step_buffers(n, setup.optimizer, setup.paged) for n in tensors)


def training_phases(config: Config, batch: int, context: int, setup: Setup) -> dict[str, int]:
    """Bytes beyond the resident weights and moments at each candidate peak of a step:
    backward's phases (`backward_phases`, `lora_phases`), then the optimizer's step with
    every gradient made, the batch, and the step's buffers."""
    N = batch * context
    tensors = trainable_tensors(config, setup)
    if setup.lora:
        phases = lora_phases(config, batch, context, setup.lora_r, setup.lora_targets, setup.checkpointing, setup.quantize)
    else:
        phases = backward_phases(config, batch, context, setup.checkpointing)
    return {**phases, "optimizer step": 4 * sum(tensors) + 2 * N * INDEX + _step_buffers(tensors, setup)}


def training_plan(config: Config, batch: int, context: int, setup: Setup = Setup()) -> Plan:
    """Weights, gradients, moments, activations and the modeled peak of `setup`'s step."""
    tensors = trainable_tensors(config, setup)
    moments = sum(moment_bytes(n, setup.optimizer) for n in tensors)
    if setup.lora:
        weights = base_weight_bytes(config, setup.quantize) + 4 * sum(tensors)
        acts = lora_activations(config, batch, context, setup.lora_r, setup.lora_targets)
    else:
        weights = count_params(config).total * 4
        acts = activations(config, batch, context)
    code_tables = ADAMW8BIT_CODES if any(quantized_moments(n, setup.optimizer) for n in tensors) else 0
    phases = training_phases(config, batch, context, setup)
    phase = max(phases, key=phases.__getitem__)
    paged = moments if setup.paged else 0
    return Plan(
        setup=setup,
        batch=batch,
        context=context,
        trainable=sum(tensors),
        weights=weights,
        gradients=4 * sum(tensors),
        moments=moments,
        paged=paged,
        code_tables=code_tables,
        step_buffers=_step_buffers(tensors, setup),
        activations=acts.checkpointed if setup.checkpointing else acts.saved,
        peak=weights + moments - paged + code_tables + phases[phase],
        peak_phase=phase,
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _size(n: int) -> str:
    """5.8 GiB, 406.6 MiB: bytes in the largest binary unit that keeps a digit before the point."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 2**shift:
            return f"{n / 2**shift:,.1f} {unit}"
    return f"{n} B"


ALL_SWITCHES = "all of them"
SWITCHES = {  # the trainer's flags that lower a step's memory, and the setup each gives
    "--optimizer adamw8bit": {"optimizer": "adamw8bit"},
    "--optimizer-states paged": {"paged": True},
    "--gradient-checkpointing": {"checkpointing": True},
}


def remedies(config: Config, batch: int, context: int, setup: Setup) -> dict[str, int]:
    """The switches of `SWITCHES` this setup does not use that would lower its peak, each
    with the peak it gives alone, and `ALL_SWITCHES` with theirs together when more than one helps."""
    need = training_plan(config, batch, context, setup).peak
    unused = {flag: change for flag, change in SWITCHES.items() if any(getattr(setup, k) != v for k, v in change.items())}
    peaks = {flag: training_plan(config, batch, context, replace(setup, **change)).peak for flag, change in unused.items()}
    helps = {flag: peak for flag, peak in peaks.items() if peak < need}
    if len(helps) > 1:
        every = {k: v for flag in helps for k, v in SWITCHES[flag].items()}
        helps[ALL_SWITCHES] = training_plan(config, batch, context, replace(setup, **every)).peak
    return helps


def describe_remedies(helps: dict[str, int], available: int | None = None) -> str:
    """"--optimizer adamw8bit (9.8 GiB, fits), --optimizer-states paged (20.1 GiB) or
    --gradient-checkpointing (23.5 GiB); all of them: 7.9 GiB, fits"."""

    def need(peak: int) -> str:
        return _size(peak) + (", fits" if available is not None and peak <= available else "")

    singles = [f"{flag} ({need(peak)})" for flag, peak in helps.items() if flag != ALL_SWITCHES]
    text = ", ".join(singles[:-1]) + " or " + singles[-1] if len(singles) > 1 else "".join(singles)
    return text + (f"; {ALL_SWITCHES}: {need(helps[ALL_SWITCHES])}" if ALL_SWITCHES in helps else "")


def check_training_fits(config: Config, batch: int, context: int, checkpointing: bool, available: int | None,
                        optimizer: str = "adamw", paged: bool = False) -> None:
    """Refuse, with the numbers, a training run whose modeled peak exceeds the `available`
    bytes (None: unknown, nothing checked), before anything is allocated: an absurd size
    (`--set n_layer=100000`) must fail in milliseconds, not swap for a quarter of an hour.
    The message breaks the need down and names the switches that would lower it."""
    if available is None:
        return
    setup = Setup(optimizer=optimizer, paged=paged, checkpointing=checkpointing)
    plan = training_plan(config, batch, context, setup)
    if plan.fits(available):
        return
    helps = remedies(config, batch, context, setup)
    millions = count_params(config).total / 1e6
    raise LmforgeError(
        f"this run needs about {_gib(plan.peak)} to train ({millions:,.1f}M parameters at batch {batch} x context {context}, "
        f"{setup.describe()}: {breakdown(plan)}), but only {_gib(available)} are available; "
        "choose a smaller model (--preset, --set n_layer=... / n_embd=...), a smaller --batch-size or --context-length"
        + (f", or lower the need with {describe_remedies(helps, available)}" if helps else "")
    )


def breakdown(plan: Plan) -> str:
    """"weights 5.8 GiB, gradients 5.8 GiB, moments 2.9 GiB, activations 406.6 MiB, peak at embeddings"."""
    paged = f" (+ {_size(plan.paged)} paged to disk)" if plan.paged else ""
    return (f"weights {_size(plan.weights)}, gradients {_size(plan.gradients)}, moments {_size(plan.resident_moments)}{paged}, "
            f"activations {_size(plan.activations)}, peak at {plan.peak_phase}")


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
    plan: Plan | None = None  # the training step of a given `Setup` (`lmforge estimate --train`)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["params"]["total"] = self.params.total
        d["training"]["total"] = self.training.total
        if self.plan is not None:
            d["plan"]["total"] = self.plan.total
            d["plan"]["resident_moments"] = self.plan.resident_moments
        return d


def estimate(config: Config, dtype: str = "fp32", context: int | None = None, batch: int = 1,
             setup: Setup | None = None) -> Estimate:
    """Parameters, weights in every dtype, KV cache in `dtype`, fp32 AdamW training
    memory, and with `setup` the plan of that training step."""
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
        plan=None if setup is None else training_plan(config, batch, context, setup),
    )
