"""Blockwise, checkpointed per-token log-probabilities against log_softmax(head(h)).gather."""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lmforge.ops import logprobs as logprobs_module
from lmforge.ops.logprobs import token_logprobs
from lmforge.ops.loss import IGNORE_INDEX


class LoraHead(nn.Module):
    """A frozen linear plus a trainable low-rank update: a head that is not an nn.Linear."""

    def __init__(self, c: int, v: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(c, v, bias=True)
        self.base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, c) * 0.3)
        self.b = nn.Parameter(torch.randn(v, rank) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a.t() @ self.b.t()


def reference(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(head(h).float(), -1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(targets == IGNORE_INDEX, 0.0, picked)


def values_and_grads(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, fn, weights: torch.Tensor):
    params = [p for p in head.parameters() if p.requires_grad]
    out = fn(head, h, targets)
    grads = torch.autograd.grad((out * weights).sum(), [h, *params], allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip([h, *params], grads)]


@st.composite
def cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    c = draw(st.integers(1, 9))
    v = draw(st.integers(2, 23))
    ignored = draw(st.floats(0.0, 1.0))
    block_rows = draw(st.integers(1, 8))
    lora = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return shape, c, v, ignored, block_rows, lora, seed


@settings(max_examples=60)
@given(cases())
def test_matches_log_softmax_gather_in_value_and_gradients(case):
    shape, c, v, ignored, block_rows, lora, seed = case
    g = torch.Generator().manual_seed(seed)
    head = LoraHead(c, v) if lora else nn.Linear(c, v, bias=False)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    h = torch.randn(*shape, c, generator=g, requires_grad=True)
    targets = torch.randint(0, v, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignored] = IGNORE_INDEX
    weights = torch.randn(shape, generator=g)
    with mock.patch.object(logprobs_module, "BLOCK_ROWS", block_rows):
        ours, ours_grads = values_and_grads(head, h, targets, token_logprobs, weights)
        with torch.no_grad():
            no_grad = token_logprobs(head, h, targets)
    ref, ref_grads = values_and_grads(head, h, targets, reference, weights)
    assert ours.dtype == torch.float32 and ours.shape == targets.shape
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(no_grad, ours)
    assert bool((ours[targets == IGNORE_INDEX] == 0).all())
    for a, b in zip(ours_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_blocks_are_split_by_the_float_budget_too():
    torch.manual_seed(0)
    head = nn.Linear(6, 40, bias=False)
    h = torch.randn(3, 7, 6, requires_grad=True)
    targets = torch.randint(0, 40, (3, 7))
    calls = []
    block = logprobs_module._block

    def counting(head, hb, tb, *args):
        calls.append(hb.size(0))
        return block(head, hb, tb, *args)

    with (
        mock.patch.object(logprobs_module, "BLOCK_FLOATS", 40 * 5),
        mock.patch.object(logprobs_module, "_block", counting),
    ):
        ours = token_logprobs(head, h, targets)
        ours.sum().backward()
    assert calls[:5] == [5, 5, 5, 5, 1] and len(calls) == 10  # 21 rows in blocks of 5; each block again in backward
    gh = h.grad.clone()
    h.grad = None
    reference(head, h, targets).sum().backward()
    assert torch.allclose(ours, reference(head, h, targets), rtol=1e-5, atol=1e-6)
    assert torch.allclose(gh, h.grad, rtol=1e-5, atol=1e-6)


def test_only_rows_with_targets_reach_the_head():
    head = nn.Linear(4, 11, bias=False)
    h = torch.randn(2, 9, 4)
    targets = torch.full((2, 9), IGNORE_INDEX)
    targets[0, 6:] = 3
    targets[1, 8] = 5
    seen = []
    head.register_forward_hook(lambda mod, args, out: seen.append(args[0].size(0)))
    token_logprobs(head, h, targets)
    assert seen == [4]


def test_no_rows_times_vocabulary_tensor_is_kept_for_backward():
    torch.manual_seed(0)
    n, c, v = 64, 8, 97
    head = nn.Linear(c, v, bias=False)
    h = torch.randn(n, c, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with mock.patch.object(logprobs_module, "BLOCK_ROWS", 16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ours = token_logprobs(head, h, targets)
        ours.sum().backward()
    assert max(saved) < 16 * v  # the plain route would save (64, 97) log-softmax outputs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference(head, h, targets)
    assert max(saved) >= n * v


def test_all_ignored_targets_give_zeros_and_zero_gradients():
    for head in (nn.Linear(5, 13, bias=False), LoraHead(5, 13)):
        h = torch.randn(2, 3, 5, requires_grad=True)
        targets = torch.full((2, 3), IGNORE_INDEX)
        out = token_logprobs(head, h, targets)
        assert torch.equal(out, torch.zeros(2, 3))
        out.sum().backward()
        assert torch.equal(h.grad, torch.zeros_like(h))
        for p in head.parameters():
            if p.requires_grad:
                assert torch.equal(p.grad, torch.zeros_like(p))


def test_bf16_head_gives_fp32_logprobs():
    torch.manual_seed(0)
    head = nn.Linear(8, 30, bias=False).to(torch.bfloat16)
    h = torch.randn(4, 8, dtype=torch.bfloat16)
    targets = torch.tensor([1, IGNORE_INDEX, 29, 0])
    out = token_logprobs(head, h, targets)
    assert out.dtype == torch.float32
    assert torch.allclose(out, reference(head, h, targets), rtol=1e-6, atol=1e-6)


@settings(deadline=None, max_examples=20)
@given(temperature=st.sampled_from([0.5, 1.0, 1.7]), seed=st.integers(0, 1000))
def test_logprobs_and_entropy_at_a_temperature_match_the_sampled_distribution(temperature, seed):
    """What PPO reads: log softmax(logits / T)[target] and the entropy of softmax(logits / T),
    against torch.distributions.Categorical, in value and gradients; 0 where ignored."""
    torch.manual_seed(seed)
    head = nn.Linear(8, 30, bias=False)
    h = torch.randn(2, 5, 8, requires_grad=True)
    targets = torch.randint(0, 30, (2, 5))
    targets[0, :2] = IGNORE_INDEX
    logps, entropy = logprobs_module.token_logprobs_entropy(head, h, targets, temperature)
    (logps.sum() + 0.3 * entropy.sum()).backward()
    ours = (h.grad.clone(), head.weight.grad.clone())
    h.grad, head.weight.grad = None, None
    dist = torch.distributions.Categorical(logits=head(h).float() / temperature)
    keep = targets != IGNORE_INDEX
    ref_logps = torch.where(keep, dist.log_prob(targets.clamp(min=0)), 0.0)
    ref_entropy = torch.where(keep, dist.entropy(), 0.0)
    (ref_logps.sum() + 0.3 * ref_entropy.sum()).backward()
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    assert float(entropy[keep].min()) > 0 and bool((entropy[~keep] == 0).all())
    torch.testing.assert_close(ours[0], h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], head.weight.grad, rtol=1e-4, atol=1e-5)
    if temperature == 1.0:
        assert torch.equal(logps, token_logprobs(head, h, targets))
