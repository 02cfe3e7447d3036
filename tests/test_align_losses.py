"""The preference losses: hand-computed values, finite-difference gradients, and parity with trl's own code."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lmforge.align.losses import dpo_loss, orpo_loss, reward_loss, sequence_logprobs
from lmforge.errors import LmforgeError
from lmforge.ops.logprobs import token_logprobs
from lmforge.ops.loss import IGNORE_INDEX

LN2 = math.log(2)
SOFTPLUS_MINUS_1 = math.log1p(math.exp(-1))  # -log sigma(1) = 0.31326169


def t(*xs: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype)


# --- hand-computed values


def test_dpo_is_ln2_with_zero_margins_when_the_policy_is_the_reference():
    pc, pr = t(-3.0, -10.0, -0.5), t(-4.0, -1.0, -7.0)
    for kind_loss in (dpo_loss(pc, pr, pc, pr), dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.7, label_smoothing=0.3)):
        # logits 0: -log sigma(0) = ln 2, and with smoothing (1 - eps) ln 2 + eps ln 2 = ln 2
        assert torch.allclose(kind_loss.loss, torch.full((3,), LN2, dtype=torch.float64))
        assert torch.equal(kind_loss.margins, torch.zeros(3, dtype=torch.float64))
        assert torch.equal(kind_loss.accuracy, torch.zeros(3))  # a tie is not a win


def test_dpo_sigmoid_by_hand():
    # chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2) = -1, logits 2, beta * logits = 1: loss -log sigma(1) = log(1 + e^-1)
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert out.loss.item() == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.3132616875, abs=1e-9)
    assert out.chosen_rewards.item() == 0.5 and out.rejected_rewards.item() == -0.5  # beta * log-ratios
    assert out.margins.item() == 1.0 and out.accuracy.item() == 1.0


def test_conservative_dpo_label_smoothing_by_hand():
    # beta * logits = 1 as above, eps = 0.25: 0.75 log(1 + e^-1) + 0.25 log(1 + e) = log(1 + e^-1) + 0.25, since
    # log(1 + e) - log(1 + e^-1) = 1: 0.3132617 + 0.25 = 0.5632617
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.25)
    assert out.loss.item() == pytest.approx(SOFTPLUS_MINUS_1 + 0.25, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.5632616875, abs=1e-9)


def test_ipo_by_hand():
    # logits 2 as above; beta 0.5: target 1 / (2 * 0.5) = 1, (2 - 1)^2 = 1; beta 0.1: target 5, (2 - 5)^2 = 9
    assert dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, kind="ipo").loss.item() == pytest.approx(1.0, abs=1e-12)
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.1, kind="ipo")
    assert out.loss.item() == pytest.approx(9.0, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)


def test_reward_loss_with_margin_and_centring_by_hand():
    chosen, rejected = t(2.0, 0.0), t(1.0, 0.5)
    # pair 0: 2 - 1 = 1, -log sigma(1) = 0.3132617; pair 1: 0 - 0.5 = -0.5, -log sigma(-0.5) = log(1 + e^0.5) = 0.9740770
    plain = reward_loss(chosen, rejected)
    assert plain.loss.tolist() == pytest.approx([SOFTPLUS_MINUS_1, math.log1p(math.exp(0.5))], abs=1e-12)
    assert plain.loss[1].item() == pytest.approx(0.9740769842, abs=1e-9)
    assert plain.accuracy.tolist() == [1.0, 0.0] and plain.margins.tolist() == [1.0, -0.5]
    # margin 1: pair 0 becomes -log sigma(0) = ln 2; centring 0.01 adds 0.01 * (2 + 1)^2 = 0.09: 0.6931472 + 0.09 = 0.7831472
    out = reward_loss(t(2.0), t(1.0), margin=1.0, center=0.01)
    assert out.loss.item() == pytest.approx(LN2 + 0.09, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.7831471806, abs=1e-9)
    # a per-pair margin tensor; the rewards are the scores themselves
    out = reward_loss(chosen, rejected, margin=t(1.0, -0.5))
    assert out.loss.tolist() == pytest.approx([LN2, LN2], abs=1e-12)
    assert torch.equal(out.chosen_rewards, chosen) and torch.equal(out.rejected_rewards, rejected)


def test_orpo_by_hand():
    # P(y_w) = 0.5: odds 1; P(y_l) = 0.2: odds 0.25; log odds ratio ln 4; log sigma(ln 4) = log(4/5) = -0.2231436
    # lam 0.1, nll 1.5: 1.5 + 0.1 * 0.2231436 = 1.5223144
    out = orpo_loss(t(1.5), t(math.log(0.5)), t(math.log(0.2)), lam=0.1)
    assert out.loss.item() == pytest.approx(1.5 - 0.1 * math.log(0.8), abs=1e-12)
    assert out.loss.item() == pytest.approx(1.5223143551, abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * math.log(0.5)) and out.accuracy.item() == 1.0
    # P(y_w) = 0.9: odds 9 (log P above -ln 2, the expm1 branch); P(y_l) = 0.1: odds 1/9; ratio 81: -log sigma(ln 81) = log(82/81)
    # = 0.0122700; lam 1 and a per-pair nll 0: 0.0122700
    out = orpo_loss(t(0.0), t(math.log(0.9)), t(math.log(0.1)), lam=1.0)
    assert out.loss.item() == pytest.approx(math.log(82 / 81), abs=1e-12)
    assert out.loss.item() == pytest.approx(0.0122700925, abs=1e-9)


def test_rewards_are_detached_and_losses_keep_their_graph():
    x = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    for out in (reward_loss(x[0], x[1]), dpo_loss(*x), dpo_loss(*x, kind="ipo"), orpo_loss(x[0].sum(), -x[1].exp(), -x[2].exp())):
        assert out.loss.requires_grad and out.loss.shape == (3,)
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_dpo_rejects_bad_settings():
    x = t(-1.0)
    with pytest.raises(LmforgeError, match="unknown DPO loss kind 'hinge'"):
        dpo_loss(x, x, x, x, kind="hinge")
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(LmforgeError, match="beta must be positive"):
            dpo_loss(x, x, x, x, beta=beta)
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(LmforgeError, match=r"label_smoothing must lie in \[0, 0.5\)"):
            dpo_loss(x, x, x, x, label_smoothing=eps)
    with pytest.raises(LmforgeError, match="'sigmoid' DPO loss only"):
        dpo_loss(x, x, x, x, kind="ipo", label_smoothing=0.1)


# --- sequence log-probabilities


def padded_pair() -> tuple[torch.Tensor, torch.Tensor]:
    # row 0 (chosen): prompt, 3 response tokens, padding; row 1 (rejected): 2 prompt tokens, 2 response tokens, padding.
    # The padding holds NaN and inf: masked positions must be skipped, not multiplied by 0.
    logps = t(-9.0, -1.0, -2.0, -3.0, math.nan, -7.0, -8.0, -0.5, -1.5, -math.inf)
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    return logps.reshape(2, 5), mask


def test_sequence_logprobs_sum_and_mean_on_a_padded_pair():
    logps, mask = padded_pair()
    # sums: -1 - 2 - 3 = -6 and -0.5 - 1.5 = -2; means: -6 / 3 = -2 and -2 / 2 = -1
    assert sequence_logprobs(logps, mask, average=False).tolist() == [-6.0, -2.0]
    assert sequence_logprobs(logps, mask, average=True).tolist() == [-2.0, -1.0]
    assert sequence_logprobs(logps, mask.long(), average=True).tolist() == [-2.0, -1.0]  # 0/1 masks as trl keeps them


def test_sequence_logprobs_refuses_rows_without_response_tokens():
    logps, mask = padded_pair()
    mask[1] = False
    for average in (True, False):
        with pytest.raises(LmforgeError, match="1 of 2 sequences have no response tokens"):
            sequence_logprobs(logps, mask, average=average)
    with pytest.raises(LmforgeError, match="2 of 2 sequences"):
        sequence_logprobs(logps, torch.zeros_like(mask), average=True)


# --- gradients against finite differences (float64)


def test_gradients_match_finite_differences():
    torch.manual_seed(0)

    def leaf(*shape: int, lo: float = -3.0, hi: float = -0.05) -> torch.Tensor:
        return (torch.rand(*shape, dtype=torch.float64) * (hi - lo) + lo).requires_grad_()

    a, b, c, d = (leaf(4) for _ in range(4))
    margin = leaf(4, lo=0.0, hi=1.0)
    checks = {
        "reward": (lambda a, b, m: reward_loss(a, b, margin=m, center=0.05).loss, (a, b, margin)),
        "dpo": (lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3).loss, (a, b, c, d)),
        "cdpo": (lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3, label_smoothing=0.2).loss, (a, b, c, d)),
        "ipo": (lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3, kind="ipo").loss, (a, b, c, d)),
        # length-averaged log-probs on both sides of ORPO's -ln 2 branch point
        "orpo": (lambda n, w, l: orpo_loss(n, w, l, lam=0.4).loss, (leaf(4, lo=0.5, hi=2.0), leaf(4, lo=-1.5, hi=-0.1), b)),
    }
    for name, (fn, inputs) in checks.items():
        assert torch.autograd.gradcheck(fn, inputs), name
    logps, mask = padded_pair()
    logps = torch.where(mask, logps, 0.0).requires_grad_()
    for average in (True, False):
        assert torch.autograd.gradcheck(lambda x, average=average: sequence_logprobs(x, mask, average=average), (logps,))


# --- parity with trl's own code (trl 1.16)


def trl_dpo(loss_type: str, beta: float, label_smoothing: float, token_logps, completion_mask, ref_chosen, ref_rejected):
    """trl's `DPOTrainer._compute_loss` run on a stand-in `self` and a stand-in model.

    The loss is computed inline in `_compute_loss` (no standalone function), which calls the model for per-token
    log-probs; with `precompute_ref_logps` it reads the reference's sequence log-probs from the batch, so a model that
    returns given log-probs and an accelerator that gathers nothing are all it needs. The batch is [chosen; rejected].
    """
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    n, width = token_logps.shape
    zeros = torch.zeros(n, width)
    outputs = SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    metrics = {"train": defaultdict(list)}
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    # completion_mask covers input_ids (T + 1 positions); the log-probs are of the T shifted targets
    inputs = {
        "input_ids": torch.zeros(n, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, width + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(stand_in, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, metrics["train"]["rewards/chosen"][0], metrics["train"]["rewards/rejected"][0]


def random_pairs(pairs: int, width: int, seed: int):
    """Per-token log-probs (2B, T) of [chosen; rejected] with prompt and padding masked (0.0 there, as trl's fused head
    gives), trl's completion mask (2B, T + 1), and reference sequence log-probs (B,) each."""
    g = torch.Generator().manual_seed(seed)
    shift_mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row in range(2 * pairs):
        start = int(torch.randint(0, width // 2, (1,), generator=g))
        stop = int(torch.randint(start + 1, width + 1, (1,), generator=g))
        shift_mask[row, start:stop] = 1
    token_logps = torch.where(shift_mask.bool(), -torch.rand(2 * pairs, width, generator=g) * 3, 0.0)
    completion_mask = torch.cat([torch.zeros(2 * pairs, 1, dtype=torch.long), shift_mask], dim=1)
    ref = token_logps.sum(1) - torch.randn(2 * pairs, generator=g)
    return token_logps, shift_mask, completion_mask, ref[:pairs], ref[pairs:]


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.1), ("ipo", 1.0)])
def test_dpo_and_ipo_match_trl(loss_type, beta):
    pairs = 6
    token_logps, mask, completion_mask, ref_chosen, ref_rejected = random_pairs(pairs, 9, seed=7)
    # trl's IPO divides each log-ratio by its response length: the same as the loss of per-token means
    logps = sequence_logprobs(token_logps, mask, average=loss_type == "ipo")
    lengths = mask.sum(1)
    if loss_type == "ipo":
        ref_c, ref_r = ref_chosen / lengths[:pairs], ref_rejected / lengths[pairs:]
    else:
        ref_c, ref_r = ref_chosen, ref_rejected
    ours = dpo_loss(logps[:pairs], logps[pairs:], ref_c, ref_r, beta=beta, kind=loss_type)
    for i in range(pairs):  # one pair per call: trl returns only the batch mean
        rows = [i, pairs + i]
        loss, chosen_reward, rejected_reward = trl_dpo(
            loss_type, beta, 0.0, token_logps[rows], completion_mask[rows], ref_chosen[i : i + 1], ref_rejected[i : i + 1]
        )
        assert torch.allclose(ours.loss[i], loss, rtol=1e-6, atol=1e-6)
        if loss_type == "sigmoid":  # trl logs beta * summed log-ratios; ours are of what they were given
            assert ours.chosen_rewards[i].item() == pytest.approx(chosen_reward, rel=1e-6, abs=1e-6)
            assert ours.rejected_rewards[i].item() == pytest.approx(rejected_reward, rel=1e-6, abs=1e-6)


def test_label_smoothed_dpo_matches_trl():
    # trl 1.16's "sigmoid" ignores label_smoothing (checked below); the smoothed expression
    # -logsigmoid(beta * delta) * (1 - eps) - logsigmoid(-beta * delta) * eps lives on in its "aot" loss, which first
    # sorts the pairs' log-ratios across the batch: with one pair per call the sort is the identity.
    token_logps, mask, completion_mask, ref_chosen, ref_rejected = random_pairs(5, 8, seed=3)
    logps = sequence_logprobs(token_logps, mask, average=False)
    for eps in (0.1, 0.3):
        ours = dpo_loss(logps[:5], logps[5:], ref_chosen, ref_rejected, beta=0.5, label_smoothing=eps)
        for i in range(5):
            rows = [i, 5 + i]
            args = (token_logps[rows], completion_mask[rows], ref_chosen[i : i + 1], ref_rejected[i : i + 1])
            loss, _, _ = trl_dpo("aot", 0.5, eps, *args)
            assert torch.allclose(ours.loss[i], loss, rtol=1e-6, atol=1e-6)
            unsmoothed, _, _ = trl_dpo("sigmoid", 0.5, eps, *args)
            assert torch.equal(unsmoothed, dpo_loss(logps[i], logps[5 + i], ref_chosen[i], ref_rejected[i], beta=0.5).loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orpo_matches_trl_odds_ratio_loss(dtype):
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(1)
    chosen = (-torch.rand(16, generator=g) * 2.5 - 1e-3).to(dtype)  # either side of -ln 2
    rejected = (-torch.rand(16, generator=g) * 2.5 - 1e-3).to(dtype)
    nll = torch.tensor(1.25)  # trl's SFT term is one batch-mean scalar
    for lam in (0.1, 1.0):
        # `odds_ratio_loss` reads only self.beta and self.accelerator.device
        stand_in = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
        losses, chosen_rewards, rejected_rewards, _, _ = orpo_trainer.ORPOTrainer.odds_ratio_loss(stand_in, chosen, rejected)
        ours = orpo_loss(nll, chosen, rejected, lam=lam)
        assert torch.allclose(ours.loss, nll - losses, rtol=1e-6, atol=1e-6)  # trl: loss = nll - losses.mean()
        assert torch.allclose(ours.loss.mean(), nll - losses.mean(), rtol=1e-6, atol=1e-6)
        assert torch.equal(ours.chosen_rewards, chosen_rewards) and torch.equal(ours.rejected_rewards, rejected_rewards)


@pytest.mark.parametrize("average", [True, False])
def test_token_and_sequence_logprobs_match_trl_get_batch_logps(average):
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 10, 33, generator=g) * 3
    labels = torch.randint(0, 33, (4, 10), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 7:] = IGNORE_INDEX  # padding, in a chosen and a rejected row
    labels[3, 6:] = IGNORE_INDEX
    # the logits themselves as hidden states, through an identity head (no out_features: the vocabulary is probed)
    targets = labels[:, 1:]
    tok = token_logprobs(nn.Identity(), logits[:, :-1], targets)
    ours = sequence_logprobs(tok, targets != IGNORE_INDEX, average=average)
    theirs = orpo_trainer.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)
