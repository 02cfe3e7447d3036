"""The ORPO recipe: instruction tuning and preference learning in one stage, no reference.

ORPO (Hong et al. 2024) adds to the SFT loss on the chosen response lambda times a term
that raises the odds of the chosen response against the rejected one
(`align.losses.orpo_loss`), the odds taken on per-token (length-averaged)
log-probabilities. It starts from the pretrained base: the SFT stage is inside it. The
held-out KL is measured against that base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.align.losses import PreferenceLoss, orpo_loss
from lmforge.model import GPT
from lmforge.recipes.config import AlignConfig
from lmforge.recipes.preference import AlignResult, Objective, Reference, fit_pairs, pair_logps


def objective(cfg: AlignConfig) -> Callable[[GPT, Reference | None], Objective]:
    def make(policy: GPT, reference: Reference | None) -> Objective:
        def loss(model: torch.nn.Module, x: dict, labels: torch.Tensor) -> PreferenceLoss:
            mean = pair_logps(model, x, labels).value(average=True)
            return orpo_loss(-mean[:, 0], mean[:, 0], mean[:, 1], lam=cfg.orpo_lambda)

        return loss

    return make


def run(cfg: AlignConfig, say: Callable[[str], None] = print, progress: bool = True) -> AlignResult:
    # the reference exists only to measure the KL to the base after training (never in the loss)
    return fit_pairs(cfg, "orpo", objective(cfg), say=say, progress=progress, reference="kl", extra={"lambda": cfg.orpo_lambda})
