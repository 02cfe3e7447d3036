"""Preference losses as pure functions of tensors: no model, no batch layout, no reduction.

Each takes per-pair scores or sequence log-probabilities (B,) and returns a
`PreferenceLoss` with the loss of every pair and the implicit rewards trainers log, so
the recipes choose the reduction and the tests can check each formula on hand-computed
numbers and against trl's own code (the arithmetic follows trl's order, so float results
agree to rounding, not just to the mathematics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError

DPO_KINDS = ("sigmoid", "ipo")
_MINUS_LN2 = -0.6931471805599453


@dataclass
class PreferenceLoss:
    """Per-pair loss (B,) with graph, and the detached rewards (B,) of the chosen and rejected responses."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    @property
    def margins(self) -> Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> Tensor:
        """1.0 where the chosen response out-scores the rejected one (a tie counts as wrong)."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def reward_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0, center: float = 0.0) -> PreferenceLoss:
    """Bradley-Terry loss of a reward model's scores (B,) for the chosen and rejected responses.

    InstructGPT (Ouyang et al. 2022, arXiv 2203.02155, Eq. 1): loss = -log sigma(r(x, y_w) - r(x, y_l)).
    Llama 2 (Touvron et al. 2023, arXiv 2307.09288, Eq. 2) subtracts a margin m(r) that
    grows with how clearly the annotators preferred y_w: -log sigma(r_c - r_r - m(r)).
    The scores are only defined up to a constant, which the loss cannot see; `center`
    adds center * (r_c + r_r)^2 (Eisenstein et al. 2023, arXiv 2312.09244; trl's
    `center_rewards_coefficient`) to pin their mean near zero so rewards from different
    runs or ensemble members are comparable. The rewards reported are the scores.
    """
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center:
        loss = loss + center * (chosen + rejected) ** 2
    return PreferenceLoss(loss, chosen.detach(), rejected.detach())


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO or IPO loss from sequence log-probabilities (B,) of the policy and the frozen reference.

    With logits = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l):

    - "sigmoid", DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7):
      L = -log sigma(beta * logits), the Bradley-Terry loss of the implicit reward
      beta * log pi/pi_ref, so no reward model is trained. `label_smoothing` eps is
      conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences and
      relationship to IPO"): labels flipped with probability eps, L = (1 - eps) L(y_w, y_l) +
      eps L(y_l, y_w), which stops the loss from driving the margin to infinity.
    - "ipo", IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): L = (logits - 1/(2 beta))^2,
      regressing the margin onto a finite target instead; beta is the paper's tau. trl
      (1.16) divides each log-ratio by its response length first, so pass per-token means
      (`sequence_logprobs(..., average=True)`) to reproduce its IPO, sums for the paper's.

    trl 1.16's "sigmoid" no longer reads `label_smoothing` (only its robust/EXO/AOT losses
    do); the smoothed form here is the one trl 0.x computed for "sigmoid". Rewards are
    beta * (policy - reference) log-probs, detached, as trl logs them.
    """
    if kind not in DPO_KINDS:
        raise LmforgeError(f"unknown DPO loss kind {kind!r}: choose one of {', '.join(DPO_KINDS)}")
    if not beta > 0:
        raise LmforgeError(f"DPO beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise LmforgeError(f"label_smoothing must lie in [0, 0.5) (the probability a label is flipped), got {label_smoothing}")
    if label_smoothing and kind != "sigmoid":
        raise LmforgeError(f"label_smoothing applies to the 'sigmoid' DPO loss only, not {kind!r}: set it to 0")
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    logits = chosen_logratios - rejected_logratios
    if kind == "ipo":
        loss = (logits - 1 / (2 * beta)) ** 2
    elif label_smoothing:
        loss = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    else:
        loss = -F.logsigmoid(beta * logits)
    return PreferenceLoss(loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def orpo_loss(chosen_nll: Tensor, chosen_logps: Tensor, rejected_logps: Tensor, *, lam: float = 0.1) -> PreferenceLoss:
    """ORPO loss (Hong et al. 2024, arXiv 2403.07691, Eqs. 6-7): L = L_SFT + lam * L_OR, no reference model.

    L_OR = -log sigma(log(odds(y_w) / odds(y_l))) with odds(y) = P(y|x) / (1 - P(y|x)) and
    P the length-normalized likelihood, log P = (1/m) sum_t log P(y_t | x, y_<t) (Eq. 3):
    the log-probs given must be per-token means (`sequence_logprobs(..., average=True)`),
    which is also what keeps 1 - P away from 0. `chosen_nll` is the SFT term, a scalar or
    (B,); trl uses the mean cross-entropy over the chosen sequences' prompt and response
    tokens. Rewards are lam * log P, detached, as trl logs them.

    As trl's `odds_ratio_loss`: the log-probs are taken in at least fp32, log(1 - exp(x)) uses
    log1p(-exp(x)) below -ln 2 and log(-expm1(x)) above (each exact where the other cancels),
    and trl's "losses" lam * log sigma(log_odds) are subtracted from the NLL.
    """
    chosen_logps = chosen_logps.to(torch.promote_types(chosen_logps.dtype, torch.float32))
    rejected_logps = rejected_logps.to(torch.promote_types(rejected_logps.dtype, torch.float32))
    log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
    ratio = F.logsigmoid(log_odds)
    loss = chosen_nll - lam * ratio
    return PreferenceLoss(loss, lam * chosen_logps.detach(), lam * rejected_logps.detach())


def sequence_logprobs(token_logps: Tensor, mask: Tensor, *, average: bool) -> Tensor:
    """Per-sequence log-probability (N,) from per-token log-probs (N, T) and a mask (N, T) of response tokens.

    The sum is log pi(y|x), what DPO's ratio needs (trl's choice); the mean over the
    response tokens is the length-normalized score ORPO's odds require and IPO in trl uses
    (the LLMs-from-scratch DPO notebook also averages, for DPO). Masked-out positions are
    ignored, not multiplied by 0, so padding holding inf or NaN cannot leak in. A sequence
    with no response token has no log-probability (its mean is 0/0, and a sum of 0 would
    claim probability 1), so one is an error rather than a silent number.
    """
    if token_logps.shape != mask.shape or token_logps.dim() != 2:
        raise ValueError(f"token log-probs {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must be the same (N, T)")
    mask = mask.bool()
    counts = mask.sum(-1)
    empty = int((counts == 0).sum())
    if empty:
        raise LmforgeError(
            f"{empty} of {mask.size(0)} sequences have no response tokens to score: "
            "check that every chosen and rejected response is non-empty and survives truncation"
        )
    total = torch.where(mask, token_logps, 0.0).sum(-1)
    return total / counts if average else total


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, as trl computes it."""
    return torch.where(x < _MINUS_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
