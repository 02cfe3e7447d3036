"""The blockwise linear + cross-entropy against the plain logits route."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.ops import loss as loss_module
from lmforge.ops.loss import IGNORE_INDEX, linear_cross_entropy


@pytest.mark.parametrize("rows_per_block", [3, 512])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_matches_plain_cross_entropy_in_value_and_gradients(monkeypatch, rows_per_block, frozen_head):
    monkeypatch.setattr(loss_module, "BLOCK_ROWS", rows_per_block)
    monkeypatch.setattr(loss_module, "FROZEN_HEAD_BLOCK_ROWS", rows_per_block)
    torch.manual_seed(0)
    h = torch.randn(37, 24, requires_grad=True)
    w = torch.randn(101, 24, requires_grad=not frozen_head)
    y = torch.randint(0, 101, (37,))
    y[[0, 5, 36]] = IGNORE_INDEX
    ours = linear_cross_entropy(h, w, y)
    ours.backward()
    gh, gw = h.grad.clone(), None if frozen_head else w.grad.clone()
    h.grad = None
    if not frozen_head:
        w.grad = None
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=IGNORE_INDEX)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(gh, h.grad, rtol=1e-5, atol=1e-7)
    if not frozen_head:
        assert torch.allclose(gw, w.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert linear_cross_entropy(h, w, y).item() == pytest.approx(ref.item(), rel=1e-6)
