"""Scores from log-likelihoods, and their standard errors, as lm-evaluation-harness computes them.

- acc: the choice with the highest log-likelihood is the gold one (the first on a tie);
- acc_norm: the same after dividing each log-likelihood by its choice's length in
  characters (the choice as doc_to_choice gives it, without the leading space), so that a
  long answer is not penalised for having more tokens to pay for;
- perplexity (LAMBADA): exp(-mean log-likelihood of the target word);
- a mean's standard error is the sample standard deviation (n - 1) over sqrt(n);
- perplexity's is a bootstrap, as lm-eval's: `iters` resamples (default 100,000) in chunks
  of 1,000, chunk i drawn by a Mersenne Twister seeded with i exactly as Python's
  `random.Random(i).choices` draws (numpy's RandomState seeded with [i] yields the same
  doubles), so the figure equals lm-eval's to rounding, not merely in distribution;
- bits per byte of a text: -log2 p(text) / its UTF-8 bytes, which compares models whose
  tokenizers cut text differently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_ITERS = 100_000  # lm-eval's default
_CHUNK = 1000


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def mean_stderr(xs: Sequence[float]) -> float | None:
    """Sample standard deviation over sqrt(n); None for fewer than two items (lm-eval: N/A)."""
    n = len(xs)
    if n < 2:
        return None
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def perplexity(loglikelihoods: Sequence[float]) -> float:
    return math.exp(-mean(loglikelihoods))


def perplexity_stderr(loglikelihoods: Sequence[float], iters: int = BOOTSTRAP_ITERS) -> float | None:
    """lm-eval's bootstrap standard error of the perplexity (see the module docstring);
    None with iters 0 or fewer than two items."""
    xs = np.asarray(loglikelihoods, dtype=np.float64)
    n = len(xs)
    if iters <= 0 or n < 2:
        return None
    chunk = min(_CHUNK, iters)
    replicates = []
    for i in range(iters // chunk):
        u = np.random.RandomState([i]).random_sample((chunk, n))
        replicates.append(np.exp(-xs[np.floor(u * n).astype(np.int64)].mean(axis=1)))
    return float(np.std(np.concatenate(replicates), ddof=1))


def choice_scores(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> tuple[float, float]:
    """(acc, acc_norm) of one multiple-choice item."""
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    acc = float(int(np.argmax(lls)) == gold)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_norm = float(int(np.argmax(lls / lengths)) == gold)
    return acc, acc_norm


def bits_per_byte(loglikelihood: float, n_bytes: int) -> float:
    return -loglikelihood / math.log(2) / n_bytes
