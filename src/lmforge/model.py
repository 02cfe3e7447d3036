"""The decoder-only transformer, top to bottom: norms, RoPE, attention, MLPs, block, model.

One model, two families chosen by `Config`: GPT-2 (LayerNorm, GELU, learned positions,
tied embeddings, biases) and Llama (RMSNorm, SwiGLU, RoPE, grouped-query attention).
Every numeric choice follows the reference implementations so that imported weights
give the same logits as `transformers` (see `interop/hf.py` and the tests).

Shapes: B batch, T new tokens, S positions attended to (T, or cache + T), C n_embd,
nh query heads, nkv key/value heads, hd head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.ops.logprobs import token_logprobs
from lmforge.ops.loss import head_loss


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 as Llama does (bf16 squares lose too much)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic in one fused kernel (equal to the lines below on fp32; a third of the time per call)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: Config) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


# --- rotary position embedding -------------------------------------------------------
def rope_inv_freq(config: Config) -> torch.Tensor:
    """Per-pair rotation speeds theta^(-2i/hd), with Llama 3's long-context rescaling if set.

    Llama 3 slows the low frequencies (long wavelengths) by `factor`, keeps the high
    ones, and blends smoothly in between, so a model trained on short context reads
    positions far beyond it. Computed on the CPU whatever the default device (on the
    meta device, the arithmetic would run torch's Python meta kernels and import Dynamo).
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_context_length"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for positions `pos` (B, T): each (B, 1, T, hd), halves repeated,
    the first half of sin negated (what `apply_rope` multiplies the swapped halves by)."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1)[:, None].to(dtype), torch.cat((-sin, sin), dim=-1)[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) by position-dependent angles (the "rotate half" layout):
    x * cos + (-x2, x1) * sin, with the sign already in `signed_sin` and the halves swapped by
    one roll (the same values as splitting, negating and concatenating, in fewer kernels)."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * signed_sin


# --- attention -------------------------------------------------------------------------
class Cache(Protocol):
    """What attention needs from a KV cache (`lmforge.engine.KVCache` is the one we have)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    """Causal self-attention; q, k, v are separate layers (LoRA targets them by name)."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.impl = config.attention
        self.dropout = config.dropout
        self.q = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.bias)
        self.k = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.v = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.o = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        visible: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        # visible (B, 1, T, S): the slots each query may attend to; None means plain causal
        # attention over exactly these T positions
        causal = visible is None and T > 1
        dropout = self.dropout if self.training else 0.0
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=visible, is_causal=causal, dropout_p=dropout, enable_gqa=self.n_kv_head != self.n_head
            )
        else:
            y = reference_attention(q, k, v, visible, causal, dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o(y)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, causal: bool, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v, spelled out: the path to read (and to check the fused one)."""
    group = q.size(1) // k.size(1)
    k = k.repeat_interleave(group, dim=1)  # each kv head serves `group` query heads
    v = v.repeat_interleave(group, dim=1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    if causal:
        T, S = att.shape[-2:]
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if visible is not None:
        att = att.masked_fill(~visible, float("-inf"))
    att = F.dropout(F.softmax(att.float(), dim=-1).to(q.dtype), dropout)
    return att @ v  # (B, nh, T, hd)


# --- feed-forward ----------------------------------------------------------------------
class MLP(nn.Module):
    """GPT-2's feed-forward: fc -> GELU -> proj."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.down = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope, visible, cache):  # noqa: ANN001, ANN201 - same arguments as Attention
        x = x + self.drop(self.attn(self.norm1(x), rope, visible, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


# --- the model -------------------------------------------------------------------------
def padding_positions_and_visible(real: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Positions (B, T) and visible slots (B, 1, T, T) for rows with padding (`real` False).

    Right padding needs neither: causal attention never looks ahead at it. Padding before
    a real token (left padding) shifts the row's positions back to 0 at its first real
    token and is hidden from every query; a padding slot sees itself, so no row of the
    softmax is all -inf.
    """
    if bool((real[:, 1:] <= real[:, :-1]).all()):  # every row: real tokens, then padding
        return None, None
    T = real.size(1)
    pos = (real.long().cumsum(1) - 1).clamp(min=0)
    slots = torch.arange(T, device=real.device)
    allowed = (slots[None, :] <= slots[:, None])[None] & real[:, None, :]  # (B, T, T)
    allowed |= torch.eye(T, dtype=torch.bool, device=real.device)
    return pos, allowed[:, None]


def last_real_index(attention_mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
    """Each row's last real token (B,), wherever its padding is; T - 1 without a mask."""
    if attention_mask is None:
        return torch.full((1,), T - 1, device=device)
    real = attention_mask.bool()
    if not bool(real.any(1).all()):
        raise LmforgeError("a row of the batch is all padding: every sequence needs at least one real token")
    return T - 1 - real.flip(1).long().argmax(1)


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size), fp32."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.context_length, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # classification (or reward, with one label) from the last real token's hidden state
        self.score = nn.Linear(config.n_embd, len(config.labels), bias=False) if config.labels else None
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.positions == "rope":
            self.register_buffer("inv_freq", rope_inv_freq(config).to(torch.get_default_device()), persistent=False)
        self.gradient_checkpointing = False
        self.tokenizer = None  # set by the loaders (`lmforge.load`) when the weights come with one
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        logprobs: bool = False,
    ) -> torch.Tensor:
        """The model's prediction for `idx` (B, T), or with `targets` its mean cross-entropy.

        A language model predicts the next token: logits (B, T, vocab_size) in fp32; with
        `targets` (B, T) the loss over labels != IGNORE_INDEX, computed blockwise
        (`lmforge.ops.loss.head_loss`) without ever holding the logits: the training
        step's fast path. A model with a classification head (`config.labels`) is a
        classifier, as its checkpoint says it is: label logits (B, len(labels)) from each
        row's last real token (`classify`), with `targets` (B,) their cross-entropy.
        Training goes through `forward` either way, so DDP's and FSDP's hooks always run.

        `attention_mask` (B, T) is 1 on real tokens and 0 on padding (the Hugging Face
        convention): left-padded rows get their own positions and never attend to the
        padding, so each row's result equals running it alone.

        With `logprobs`, each target's log-probability (B, T) under the language-model head,
        0 where it is IGNORE_INDEX, instead of their mean loss: what preference losses sum
        per sequence (computed for the learned tokens only, a block of rows at a time:
        `ops.logprobs`); a classifier answers it too (replaying pretraining text).
        """
        if logprobs:  # through the language-model head, which a classifier keeps too
            if targets is None:
                raise LmforgeError("logprobs=True needs the targets whose log-probabilities to return")
            return token_logprobs(self.lm_head, self.hidden_states(idx, attention_mask=attention_mask), targets)
        if self.score is not None:
            logits = self.classify(idx, attention_mask)
            return logits if targets is None else F.cross_entropy(logits, targets)
        h = self.hidden_states(idx, attention_mask=attention_mask)
        if targets is None:
            return self.lm_head(h).float()
        return head_loss(self.lm_head, h, targets)

    def classify(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Label logits (B, len(config.labels)), fp32, read at each row's last real token:
        under causal attention only the last token has seen the whole text."""
        if self.score is None:
            raise LmforgeError("this model has no classification head: its config has no labels")
        h = self.hidden_states(idx, attention_mask=attention_mask)  # (B, T, C)
        rows = torch.arange(idx.size(0), device=h.device)
        return self.score(h[rows, last_real_index(attention_mask, idx.size(1), h.device)]).float()

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states (B, T, C): what every head reads.

        Plain use needs only `idx` (and `attention_mask` for padded rows). The engine
        passes instead each row's positions `pos` (B, T), the `visible` slots (B, 1, T, S)
        each new token may attend to, and the `cache` holding earlier keys and values.
        """
        B, T = idx.shape
        if pos is None:
            if T > self.config.context_length:
                raise LmforgeError(
                    f"sequence of {T} tokens is longer than the model's context_length {self.config.context_length}; "
                    "truncate the input or use a shorter window"
                )
            if attention_mask is not None and visible is None:
                pos, visible = padding_positions_and_visible(attention_mask.bool())
        if pos is None:
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x = self.drop(x)
        rope = rope_cos_sin(self.inv_freq, pos, x.dtype) if self.pos_emb is None else None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, visible, cache, use_reentrant=False)
            else:
                x = block(x, rope, visible, cache)
        return self.norm_f(x)

    # --- facts ---------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied head counts once); `non_embedding` leaves out the tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def named_linears(self) -> Iterator[tuple[str, nn.Linear]]:
        """The linear layers inside the blocks, by name (what LoRA and quantization target)."""
        for name, module in self.blocks.named_modules():
            if isinstance(module, nn.Linear):
                yield f"blocks.{name}", module

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device


class _NoDrawsOnMeta(TorchFunctionMode):
    """Skips `normal_` on meta tensors: they hold no values to draw. The skip is for speed:
    torch's meta `normal_` imports Dynamo on first use, 2-3 s of every command that
    builds a model on the meta device to fill it from a file."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        if func is torch.Tensor.normal_ or func is nn.init.normal_:
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextmanager
def on_meta() -> Iterator[None]:
    """Modules built inside have their tensors on the meta device (shapes only, no memory),
    for a loader that then fills or replaces every one of them."""
    with torch.device("meta"), _NoDrawsOnMeta():
        yield
