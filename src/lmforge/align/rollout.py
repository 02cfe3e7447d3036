"""One iteration's samples in the layout RL learns from, kept whole so a resumed run
learns from exactly the rollout it checkpointed mid-iteration.

`ids` (N, P + R) holds each prompt left-padded to P columns and its response right-padded
to R; the per-token tensors (N, R) follow `align.rl`'s layout, column j being token j of
the response. Left-padding the prompts puts every response's first token in the same
column, so one slice `[:, P - 1:]` of a forward pass reads all the responses at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmforge.ops.loss import IGNORE_INDEX

ROLLOUT_FILE = "rollout.safetensors"  # in a checkpoint's model folder: the rollout of the iteration it was taken in


def pad_rollout(prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, mask) of prompts and their responses in the rollout layout. The
    pad id is 0 and never read: the attention mask hides it and `mask` keeps it out of
    every loss, so no real token (end-of-text above all) is ever mistaken for padding."""
    if len(prompt_ids) != len(responses):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(responses)} responses")
    P, R = max(len(p) for p in prompt_ids), max(len(r) for r in responses)
    N = len(prompt_ids)
    ids = torch.zeros((N, P + R), dtype=torch.long)
    attention = torch.zeros((N, P + R), dtype=torch.long)
    mask = torch.zeros((N, R), dtype=torch.float32)
    for b, (p, r) in enumerate(zip(prompt_ids, responses)):
        ids[b, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        ids[b, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention[b, P - len(p) : P + len(r)] = 1
        mask[b, : len(r)] = 1
    return ids.to(device), attention.to(device), mask.to(device)


@dataclass
class Rollout:
    """Responses sampled in iteration `iteration` and what the learner reads of them."""

    iteration: int
    ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def prompt_columns(self) -> int:
        return self.ids.size(1) - self.mask.size(1)

    def __post_init__(self) -> None:
        # the next-token targets of the input columns (N, P + R - 1): made once, read by every minibatch
        P = self.prompt_columns
        self._targets = torch.full((self.ids.size(0), self.ids.size(1) - 1), IGNORE_INDEX, dtype=torch.long,
                                   device=self.ids.device)
        self._targets[:, P - 1 :] = self.ids[:, P:].masked_fill(self.mask == 0, IGNORE_INDEX)

    def targets(self) -> torch.Tensor:
        """Next-token targets of the input columns (N, P + R - 1): the response tokens, IGNORE elsewhere."""
        return self._targets

    def save(self, path: Path) -> None:
        tensors = {f.name: getattr(self, f.name).contiguous().cpu() for f in dataclasses.fields(self) if f.name != "iteration"}
        save_file(tensors, path, metadata={"iteration": str(self.iteration)})

    @classmethod
    def read(cls, path: Path, device: torch.device) -> Rollout:
        with safe_open(str(path), "pt") as f:
            iteration = int((f.metadata() or {})["iteration"])
        return cls(iteration=iteration, **{k: v.to(device) for k, v in load_file(str(path)).items()})
