"""The DPO recipe: the policy learns from preference pairs directly, no reward model.

DPO (Rafailov et al. 2023) trains on `align.losses.dpo_loss`: how much more the policy
than the reference prefers the chosen response to the rejected one, scaled by beta. The
reference is the model training started from: under LoRA the policy with its adapters
switched off (no second model), else a frozen copy; with --precompute-ref its
log-probabilities are computed once, kept in the run folder, and the copy is freed.
IPO and conservative (label-smoothed) DPO are `--dpo-loss ipo` / `--label-smoothing`.

DPO only sees differences of log-probabilities, so it can raise the margin by lowering
both responses, which on a small model drifts away from the SFT answers (longer ones, the
end-of-text forgotten). `--rpo-alpha` adds alpha times the chosen response's negative
log-likelihood per token (RPO: Pang et al. 2024, arXiv 2404.19733, Eq. 2; trl's
`loss_type=["sigmoid", "sft"]` takes the batch's token mean instead of each pair's), which
keeps it there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.align.losses import PreferenceLoss, dpo_loss
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.recipes.config import AlignConfig
from lmforge.recipes.preference import AlignResult, Objective, Pairs, Reference, fit_pairs, pair_logps


def objective(cfg: AlignConfig) -> Callable[[GPT, Reference | None], Objective]:
    average = cfg.logps == "mean"

    def make(policy: GPT, reference: Reference | None) -> Objective:
        if reference is None:
            raise LmforgeError("DPO needs a reference model")

        def loss(model: torch.nn.Module, x: dict, labels: torch.Tensor) -> PreferenceLoss:
            logps = pair_logps(model, x, labels)
            pi, ref = logps.value(average), reference.logps(x, labels).value(average)
            out = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta=cfg.beta, kind=cfg.dpo_loss,
                           label_smoothing=cfg.label_smoothing)
            if cfg.rpo_alpha:
                out.loss = out.loss - cfg.rpo_alpha * logps.value(average=True)[:, 0]
            return out

        return loss

    return make


def run(cfg: AlignConfig, say: Callable[[str], None] = print, progress: bool = True, pairs: Pairs | None = None,
        task: str = "dpo") -> AlignResult:
    settings = {"logps": cfg.logps, "beta": cfg.beta, "loss": cfg.dpo_loss, "label_smoothing": cfg.label_smoothing, "precompute_ref": cfg.precompute_ref,
                "rpo_alpha": cfg.rpo_alpha}
    return fit_pairs(cfg, task, objective(cfg), say=say, progress=progress, pairs=pairs, extra=settings)
