"""The RL equations of `lmforge.align.rl` on hand-computed numbers and as properties:
GAE, whitening, the KL estimators and per-token rewards, PPO's clipped losses, RLOO and
GRPO advantages, the adaptive KL coefficient and the running reward statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.align.rl import (
    AdaptiveKL,
    RunningMoments,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
    whiten,
)

T = torch.tensor


def test_gae_on_a_hand_computed_three_token_response_and_a_padded_row():
    # row 0: three tokens, reward 1 at the end; gamma 1, lambda 0.9
    #   t=2: delta = 1 + 0 - 0.1 = 0.9                   A = 0.9
    #   t=1: delta = 0 + 0.1 - 0.2 = -0.1                A = -0.1 + 0.9 * 0.9 = 0.71
    #   t=0: delta = 0 + 0.2 - 0.5 = -0.3                A = -0.3 + 0.9 * 0.71 = 0.339
    rewards = T([[0.0, 0.0, 1.0]])
    values = T([[0.5, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.9)
    torch.testing.assert_close(adv, T([[0.339, 0.71, 0.9]]))
    torch.testing.assert_close(ret, T([[0.839, 0.91, 1.0]]))
    # row 1 ends after two tokens: the padding's value (9) is never read; gamma 0.5, lambda 1
    #   t=1 (last): delta = 2 - 0.5 = 1.5                 A = 1.5
    #   t=0: delta = 0 + 0.5 * 0.5 - 1 = -0.75            A = -0.75 + 0.5 * 1.5 = 0
    adv, ret = gae(T([[0.0, 2.0, 0.0]]), T([[1.0, 0.5, 9.0]]), T([[1.0, 1.0, 0.0]]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, T([[0.0, 1.5, 0.0]]))
    torch.testing.assert_close(ret, T([[1.0, 2.0, 0.0]]))


@settings(deadline=None, max_examples=50)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 10_000))
def test_gae_with_lambda_1_gives_the_reward_to_go_and_with_lambda_0_one_step_td(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    R = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    rewards, values = torch.randn(len(lengths), R, generator=g) * mask, torch.randn(len(lengths), R, generator=g)
    gamma = 0.9
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            to_go = sum(gamma ** (k - t) * float(rewards[b, k]) for k in range(t, n))
            assert float(ret[b, t]) == pytest.approx(to_go, abs=1e-5)
        assert bool((adv[b, n:] == 0).all() and (ret[b, n:] == 0).all())
    adv0, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            nxt = float(values[b, t + 1]) if t + 1 < n else 0.0
            assert float(adv0[b, t]) == pytest.approx(float(rewards[b, t]) + gamma * nxt - float(values[b, t]), abs=1e-5)


def test_whitening_over_the_mask_only():
    x = T([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = whiten(x, mask)
    kept = np.array([1.0, 2.0, 3.0, 4.0])
    expected = (kept - kept.mean()) / math.sqrt(kept.var(ddof=1) + 1e-8)
    torch.testing.assert_close(out[mask.bool()], torch.tensor(expected, dtype=torch.float32))
    assert bool((out[~mask.bool()] == 0).all())  # padding (100, -50) neither read nor written
    assert float(masked_mean(out, mask)) == pytest.approx(0.0, abs=1e-6)
    unshifted = whiten(x, mask, shift_mean=False)
    assert float(masked_mean(unshifted, mask)) == pytest.approx(kept.mean(), abs=1e-5)


def test_kl_estimators_and_per_token_rewards():
    logps, ref = T([[-1.0, -2.0, -0.5]]), T([[-1.5, -1.0, -0.5]])
    torch.testing.assert_close(kl_penalty(logps, ref, "k1"), T([[0.5, -1.0, 0.0]]))
    k3 = kl_penalty(logps, ref, "k3")  # (r - 1) - log r with r = ref / pi
    torch.testing.assert_close(k3, T([[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]]))
    assert bool((k3 >= 0).all())
    assert bool((kl_penalty(ref, ref, "k1") == 0).all() and (kl_penalty(ref, ref, "k3") == 0).all())  # the policy is the reference
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logps, ref, "k2")
    # -coef x KL everywhere on the response, the score added at its last token only
    kl = T([[0.5, -1.0, 0.0], [2.0, 1.0, 7.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = token_rewards(T([3.0, -1.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, T([[-0.05, 0.1, 3.0], [-0.2, -0.1 - 1.0, 0.0]]))


def test_policy_loss_ratio_one_clipping_and_approx_kl():
    adv = T([[1.0, -2.0, 0.5]])
    mask = T([[1.0, 1.0, 0.0]])
    old = T([[-1.0, -2.0, -3.0]])
    same = policy_loss(old.clone(), old, adv, mask, clip=0.2)
    assert float(same.ratio) == 1.0 and float(same.clip_fraction) == 0.0 and float(same.approx_kl) == 0.0
    assert float(same.loss) == pytest.approx(-(1.0 - 2.0) / 2)
    # token 0: ratio e^0.5 = 1.65 with A > 0 -> clipped at 1.2; token 1: ratio e^-0.5 = 0.61 with A < 0 -> clipped at 0.8
    moved = policy_loss(old + T([[0.5, -0.5, 4.0]]), old, adv, mask, clip=0.2)
    assert float(moved.loss) == pytest.approx(-(1.2 * 1.0 + 0.8 * -2.0) / 2, abs=1e-6)
    assert float(moved.clip_fraction) == 1.0
    assert float(moved.ratio) == pytest.approx((math.exp(0.5) + math.exp(-0.5)) / 2, abs=1e-6)
    assert float(moved.approx_kl) == pytest.approx(((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.5) - 1 + 0.5)) / 2, abs=1e-6)
    # a ratio inside the range, or on the side that does not clip, is used as is
    inside = policy_loss(old + T([[0.1, 0.5, 0.0]]), old, adv, mask, clip=0.2)
    assert float(inside.clip_fraction) == 0.0
    assert float(inside.loss) == pytest.approx(-(math.exp(0.1) * 1.0 + math.exp(0.5) * -2.0) / 2, abs=1e-6)


def test_value_loss_clips_moves_beyond_the_range():
    old, returns, mask = T([[1.0, 1.0]]), T([[3.0, 1.0]]), T([[1.0, 1.0]])
    # token 0: V moved 1 -> 2, clipped to 1.2: max((2-3)^2, (1.2-3)^2) = 3.24; token 1: V = 1.1 within: 0.01
    loss, fraction = value_loss(T([[2.0, 1.1]]), old, returns, mask, clip=0.2)
    assert float(loss) == pytest.approx(0.5 * (3.24 + 0.01) / 2, abs=1e-6)
    assert float(fraction) == 0.5


def test_explained_variance():
    returns, mask = T([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4)
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)


def test_rloo_and_grpo_advantages():
    rewards = T([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    torch.testing.assert_close(rloo_advantages(rewards), T([[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(grpo_advantages(rewards), T([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) / (1 + 1e-4))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(T([[1.0]]))


def test_adaptive_kl_moves_towards_the_target_at_most_20_percent_per_horizon():
    fixed = AdaptiveKL(0.1)
    fixed.update(50.0, 64)
    assert fixed.coef == 0.1  # no target: a fixed coefficient
    ctl = AdaptiveKL(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)  # twice the target: the error is clipped to +0.2
    assert ctl.coef == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ctl.update(4.5, 100)  # 25% under: -0.25 clipped to -0.2
    assert ctl.coef == pytest.approx(0.1 * 1.02 * (1 - 0.02))
    ctl.update(6.6, 100)  # 10% over
    assert ctl.coef == pytest.approx(0.1 * 1.02 * 0.98 * 1.01)
    again = AdaptiveKL(1.0, target=6.0, horizon=1000)
    again.load_state_dict(ctl.state_dict())
    assert again.coef == ctl.coef


@settings(deadline=None, max_examples=30)
@given(chunks=st.lists(st.lists(st.floats(-100, 100), min_size=1, max_size=8), min_size=1, max_size=6))
def test_running_moments_equal_numpy_over_everything_seen(chunks):
    m = RunningMoments()
    for c in chunks:
        m.update(torch.tensor(c, dtype=torch.float64))
    seen = np.concatenate([np.array(c) for c in chunks])
    assert m.count == len(seen)
    assert m.mean == pytest.approx(seen.mean(), abs=1e-6)
    if len(seen) > 1:
        assert m.std == pytest.approx(seen.std(ddof=1), rel=1e-6, abs=1e-6)
    copy = RunningMoments()
    copy.load_state_dict(m.state_dict())
    assert (copy.mean, copy.var, copy.count) == (m.mean, m.var, m.count)
