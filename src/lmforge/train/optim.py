"""AdamW (fp32 or 8-bit moments, in memory or paged) with decay only where it regularises, and the warmup + cosine schedule."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lmforge.train.adamw8bit import AdamW8bit, PagedStore


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices of Linear layers only.

    Weight decay pulls weights toward zero; that regularises the projections but only
    distorts norm gains (their natural value is 1), biases and embedding rows (a rare
    token's row would shrink every step it is not seen). A tied head is the embedding,
    so it is not decayed either. Parameters of a module with an `lr_scale` attribute get
    a group of their own, which the trainer steps at that multiple of the scheduled rate.
    """
    # matrices owned by a Linear: its weight, and a LoRA layer's A and B (a Linear subclass)
    linear_weights = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False) if p.dim() >= 2}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # a module may learn at a multiple of the run's rate (`module.lr_scale`: PPO's value head)
    scales = {id(p): float(m.lr_scale) for m in model.modules() if hasattr(m, "lr_scale") for p in m.parameters()}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for p in model.parameters():  # each shared Parameter once
        if not p.requires_grad:
            continue
        decayed = id(p) in linear_weights and id(p) not in embeddings
        groups.setdefault((decayed, scales.get(id(p), 1.0)), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, **({"lr_scale": scale} if scale != 1.0 else {})}
            for (decayed, scale), params in groups.items()]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], kind: str = "adamw",
                    paged: Path | None = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups`.

    `kind` "adamw" in memory is torch's AdamW with the fused kernel where it exists (CPU
    and CUDA): one pass over each tensor instead of several; measured 3-4x faster than
    foreach for the optimizer step on this CPU (gpt2: 63 ms against 256 ms). "adamw8bit"
    keeps the moments in 8 bits (`AdamW8bit`). `paged` (a folder) puts the moments in
    memory-mapped files there (`PagedStore`), 32-bit ones through AdamW8bit's fp32 path.
    """
    groups = param_groups(model, weight_decay)
    if kind == "adamw" and paged is None:
        device = next(model.parameters()).device.type
        kernel = {"fused": True} if device in ("cpu", "cuda") else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **kernel)
    store = PagedStore(paged) if paged is not None else None
    return AdamW8bit(groups, lr=lr, betas=betas, eps=1e-8, bits=8 if kind == "adamw8bit" else 32, store=store)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_steps`, then cosine down to `min_lr`
    at `max_steps` (and `min_lr` after). A pure function of the step, so a resumed run
    needs no scheduler state to continue exactly."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
