"""The next-token loss of whatever model the trainer holds, wrapped or not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model import GPT
from lmforge.ops.loss import IGNORE_INDEX
from lmforge.train.distributed import unwrap


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting y (B, T) from x (B, T), over labels != IGNORE_INDEX.

    `model` is a GPT or a wrapper around one (DDP, torch.compile): a GPT computes the loss
    inside its forward (`model(x, y)`, so the wrappers' hooks run) without holding the
    logits. Any other module is taken to return logits.
    """
    if isinstance(unwrap(model), GPT):
        return model(x, y)
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=IGNORE_INDEX)
