"""The reward-model recipe: a scalar head learns which of two responses people prefer.

The head (`GPT.score` with one output, the classification head's machinery) reads the
last real token of prompt + response + <|endoftext|>, the one position that has seen the
whole exchange. Pairs train it with the Bradley-Terry loss (`align.losses.reward_loss`):
only the difference of the two scores is learned, so a score means something only next
to another score for the same prompt (`--center-rewards` keeps them near 0). The model
it writes ranks iterative DPO's samples, judges win rates and is PPO's reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lmforge.align.losses import PreferenceLoss, reward_loss
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.recipes.config import AlignConfig
from lmforge.recipes.preference import AlignResult, Objective, Reference, fit_pairs
from lmforge.tokenizer.templates import template_for

REWARD_LABELS = ["reward"]  # a reward model is a GPT whose classification head has this one output
SCORE_BATCH = 8


def is_reward_model(model: GPT) -> bool:
    return model.score is not None and list(model.config.labels) == REWARD_LABELS


def pair_scores(model: torch.nn.Module, x: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(B, 2) scores of each pair's chosen and rejected sequence, in one forward pass.

    A batch of pairs holds next-token inputs, which stop one token short of the sequence
    (the final <|endoftext|> is only a label); each row gets its last label back, so the
    head reads the <|endoftext|> it reads when scoring (`score_rendered`)."""
    B = labels.size(0)
    ids, mask, last = x["input_ids"].flatten(0, 1), x["attention_mask"].flatten(0, 1), labels.flatten(0, 1)
    ids, mask = F.pad(ids, (0, 1), value=0), F.pad(mask, (0, 1))
    rows, n = torch.arange(ids.size(0), device=ids.device), mask.sum(1)  # each row's inputs end before position n
    ids[rows, n], mask[rows, n] = last[rows, n - 1], 1
    return model(ids, attention_mask=mask).view(B, 2)


def objective(cfg: AlignConfig) -> Callable[[GPT, Reference | None], Objective]:
    def make(policy: GPT, reference: Reference | None) -> Objective:
        def loss(model: torch.nn.Module, x: dict, labels: torch.Tensor) -> PreferenceLoss:
            scores = pair_scores(model, x, labels)
            return reward_loss(scores[:, 0], scores[:, 1], margin=cfg.reward_margin, center=cfg.center_rewards)

        return loss

    return make


def run(cfg: AlignConfig, say: Callable[[str], None] = print, progress: bool = True) -> AlignResult:
    return fit_pairs(cfg, "reward", objective(cfg), say=say, progress=progress, labels=REWARD_LABELS, reference=None, reserve=1,
                     respond_after=False, extra={"margin": cfg.reward_margin, "center_rewards": cfg.center_rewards})


@torch.no_grad()
def score_rendered(model: GPT, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The reward of each (rendered prompt, response): the text as training saw it, prompt
    and response encoded apart and <|endoftext|> appended; cut from the prompt's start
    when it is longer than the context."""
    if not is_reward_model(model):
        raise LmforgeError("this model has no reward head; train one with `lmforge align reward`")
    tok = model.tokenizer
    if tok is None or tok.eot_id is None:
        raise LmforgeError("a reward model needs its tokenizer (with <|endoftext|>) beside its weights")
    ctx = model.config.context_length
    rows = []
    for p, r in zip(prompts, responses, strict=True):
        ids = tok.encode(p) + tok.encode(r) + [tok.eot_id]
        rows.append(ids[-ctx:])
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(rows), SCORE_BATCH):
        chunk = rows[start : start + SCORE_BATCH]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), tok.eot_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
        out += model(ids.to(model.device), attention_mask=mask.to(model.device))[:, 0].tolist()
    model.train(was_training)
    return out


def score(model: GPT, prompt: str, responses: Sequence[str]) -> list[float]:
    """The reward of each response to one user message, the prompt rendered in the template
    the reward model was trained with (its tokenizer's chat template)."""
    template = template_for(model.tokenizer)
    rendered = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return score_rendered(model, [rendered] * len(responses), responses)
