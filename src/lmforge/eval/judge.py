"""Judges: is one model's answer to a prompt better than another's, and how good is one model's
answer next to a reference?

A loss says how well a model predicts text; a user asks whether the aligned model answers
better than the SFT one. Pairwise judging reads two `responses.jsonl` files for the same
prompts (what `finetune instruct`, `align dpo/orpo/ppo` write) and asks a judge which answer
of each pair is better, twice: once with A shown first and once with B first. A judge that
prefers whatever it is shown first (LLM judges do) then contradicts itself, and a row whose
two verdicts disagree counts as a tie: a win needs both orders (MT-Bench's rule). A reward
model sees no order, so its two verdicts always agree.

The win rate counts a tie as half a win. Its interval is Wilson's score interval for a
proportion, with wins + ties/2 successes in n rows: closed form, sane near 0 and 1 and for
few rows. A tie varies less than a coin flip (its value is always 1/2), so treating the
outcomes as Bernoulli overstates the variance: the interval is conservative, never too narrow.

The judges themselves are callables: this package cannot load models (the CLI wires a
reward model's `score_rendered`) and `endpoint.py` holds the HTTP client for a chat model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

from lmforge.errors import LmforgeError
from lmforge.io import read_jsonl_objects
from lmforge.text import plural
from lmforge.tokenizer.templates import format_alpaca

Verdict = Literal["first", "second", "tie"]
Outcome = Literal["win", "tie", "loss"]
REFERENCE_FIELDS = ("output", "chosen")  # what a row's reference answer is called, in the order tried
ALPACA_REPLY = "\n\n### Response:\n"  # the reply header a rendered Alpaca prompt ends with; a judge reads the input without it
CONFIDENCE = 0.95
# A's outcome from one verdict, by the order the judge saw: A first, or B first
A_SHOWN_FIRST: dict[str, Outcome] = {"first": "win", "second": "loss", "tie": "tie"}
B_SHOWN_FIRST: dict[str, Outcome] = {"first": "loss", "second": "win", "tie": "tie"}


@dataclass(frozen=True)
class Row:
    """One answered prompt of a responses file. `line` is its line in the file (1-based), so
    errors and reports point where a user can look; `response` is None when the model gave
    none (the prompt left no room in its context)."""

    line: int
    prompt: str
    response: str | None
    reference: str | None

    @property
    def judge_input(self) -> str:
        """The prompt as a judge reads it: the book's `format_input`, the Alpaca text without
        the reply header the model continued from."""
        return self.prompt.removesuffix(ALPACA_REPLY)


@dataclass(frozen=True)
class Pair:
    """A prompt and two answers in the order a judge is shown them."""

    row: Row
    first: str
    second: str
    order: str = ""  # which file's answer is shown first, for messages ("A first")


PairJudge = Callable[[Sequence[Pair]], list[Verdict]]
Scorer = Callable[[Sequence[Row]], list[float]]
RewardScore = Callable[[Sequence[str], Sequence[str]], list[float]]


# --- reading responses --------------------------------------------------------------------------------


def read_responses(path: str | os.PathLike, field: str, reference_field: str | None = None) -> list[Row]:
    """The rows of a responses.jsonl, each with its prompt, its `field` answer and its reference.

    A row's prompt is its "prompt" (the rendered text preference and RLHF runs write) or, for
    an instruction-tuning run's rows, the Alpaca prompt of its "instruction" and "input"
    (the same text the preference runs render), so the two kinds of file pair up."""
    p = Path(path)
    if not field:
        raise LmforgeError("the response field is empty: name the field holding each row's answer (--field after)")
    if not p.is_file():
        what = "a folder" if p.is_dir() else "not a regular file" if p.exists() else "missing"
        raise LmforgeError(f"responses file {p} is {what}: give a responses.jsonl (one JSON object a line)")
    rows = []
    for n, record in read_jsonl_objects(p, "a responses.jsonl"):
        rows.append(Row(n, _prompt(record, p, n), _text(record, field, p, n, required=True), _reference(record, reference_field, p, n)))
    if not rows:
        raise LmforgeError(f"{p} holds no rows: give a responses.jsonl with one JSON object a line")
    return rows


def _prompt(record: dict[str, Any], path: Path, line: int) -> str:
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    if isinstance(record.get("instruction"), str):
        return format_alpaca(record)[0]
    raise LmforgeError(f"{path} line {line} has no \"prompt\" (nor an Alpaca \"instruction\"); its fields: {_fields(record)}")


def _text(record: dict[str, Any], key: str, path: Path, line: int, required: bool) -> str | None:
    if key not in record:
        if not required:
            return None
        raise LmforgeError(f"{path} line {line} has no field {key!r} to judge; its fields: {_fields(record)} "
                           "(choose one with --field, or --field-a/--field-b for one file)")
    value = record[key]
    if value is not None and not isinstance(value, str):
        raise LmforgeError(f"{path} line {line}: field {key!r} is a {type(value).__name__}, not text")
    return value


def _reference(record: dict[str, Any], reference_field: str | None, path: Path, line: int) -> str | None:
    if reference_field:
        return _text(record, reference_field, path, line, required=False)
    for key in REFERENCE_FIELDS:
        if isinstance(record.get(key), str):
            return record[key]
    return None


def _fields(record: dict[str, Any]) -> str:
    return ", ".join(sorted(record)) or "none"


def match_rows(a: Sequence[Row], b: Sequence[Row], names: tuple[str, str] = ("A", "B")) -> None:
    """Pairwise judging compares answers to the same prompts, row by row: anything else is
    a mistake (files of different runs' test splits, a file cut short) and is named."""
    if len(a) != len(b):
        raise LmforgeError(f"{names[0]} has {plural(len(a), 'row')} and {names[1]} {plural(len(b), 'row')}: "
                           "pairwise judging needs answers to the same prompts, in the same order")
    for k, (x, y) in enumerate(zip(a, b), 1):
        if x.prompt != y.prompt:
            raise LmforgeError(f"row {k} asks different prompts: {names[0]} line {x.line} {_short(x.prompt)} vs "
                               f"{names[1]} line {y.line} {_short(y.prompt)}; the files must answer the same prompts in the same order")


def _short(text: str, limit: int = 80) -> str:
    shown = text.strip().replace("\n", " ")
    return repr(shown if len(shown) <= limit else shown[: limit - 3] + "...")


# --- pairwise ----------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval for a proportion of `successes` in `n` trials."""
    if n <= 0:
        raise LmforgeError("no rows to judge: a confidence interval needs at least one")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def combine(shown_a_first: Verdict, shown_b_first: Verdict) -> Outcome:
    """A's outcome from the verdicts of the two orders: a win or a loss needs both."""
    a, b = A_SHOWN_FIRST[shown_a_first], B_SHOWN_FIRST[shown_b_first]
    return a if a == b else "tie"


@dataclass
class PairwiseResult:
    """A against B: wins, ties and losses of A, the win rate (ties as half) with its Wilson
    interval, and how often the judge contradicted itself when the order was swapped."""

    wins: int
    ties: int
    losses: int
    inconsistent: int  # rows whose two orders disagreed (counted as ties)
    first_shown_preferred: int  # verdicts (of 2 per row) that picked the answer shown first: position bias
    skipped: int  # rows without an answer in A or B
    confidence: float = CONFIDENCE
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        return (self.wins + self.ties / 2) / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.wins + self.ties / 2, self.n, self.confidence)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "rows": self.n, "skipped": self.skipped,
                "win_rate": self.win_rate, "interval": {"method": "wilson", "ties": "half a win", "confidence": self.confidence,
                                                        "low": low, "high": high},
                "inconsistent": self.inconsistent, "first_shown_preferred": self.first_shown_preferred, "per_row": self.rows}


def judge_pairs(a: Sequence[Row], b: Sequence[Row], judge: PairJudge, names: tuple[str, str] = ("A", "B")) -> PairwiseResult:
    """A's wins, ties and losses against B, each row judged in both orders."""
    match_rows(a, b, names)
    kept = [(x, y) for x, y in zip(a, b) if x.response is not None and y.response is not None]
    if not kept:
        raise LmforgeError(f"no row has an answer in both {names[0]} and {names[1]}: nothing to judge")
    a_first = judge([Pair(x, x.response, y.response, f"{names[0]} shown first") for x, y in kept])  # type: ignore[arg-type]
    b_first = judge([Pair(x, y.response, x.response, f"{names[1]} shown first") for x, y in kept])  # type: ignore[arg-type]
    if len(a_first) != len(kept) or len(b_first) != len(kept):
        raise LmforgeError(f"the judge gave {len(a_first)} and {len(b_first)} verdicts for {plural(len(kept), 'pair')}")
    counts = {"win": 0, "tie": 0, "loss": 0}
    rows, inconsistent, first = [], 0, 0
    for (x, y), v1, v2 in zip(kept, a_first, b_first):
        outcome = combine(v1, v2)
        counts[outcome] += 1
        inconsistent += A_SHOWN_FIRST[v1] != B_SHOWN_FIRST[v2]
        first += (v1 == "first") + (v2 == "first")
        rows.append({"line_a": x.line, "line_b": y.line, "a_shown_first": v1, "b_shown_first": v2, "outcome": outcome})
    return PairwiseResult(counts["win"], counts["tie"], counts["loss"], inconsistent, first, len(a) - len(kept), rows=rows)


def reward_judge(score: RewardScore) -> PairJudge:
    """A judge from a reward model's scoring function (rendered prompts, responses -> scores):
    the higher score wins, equal scores tie. Scores are kept, so the swapped order (the same
    pairs the other way round) costs nothing."""
    cache: dict[tuple[str, str], float] = {}

    def judge(pairs: Sequence[Pair]) -> list[Verdict]:
        wanted = list(dict.fromkeys((p.row.prompt, r) for p in pairs for r in (p.first, p.second) if (p.row.prompt, r) not in cache))
        if wanted:
            cache.update(zip(wanted, score([q for q, _ in wanted], [r for _, r in wanted])))
        out: list[Verdict] = []
        for p in pairs:
            s1, s2 = cache[(p.row.prompt, p.first)], cache[(p.row.prompt, p.second)]
            out.append("first" if s1 > s2 else "second" if s2 > s1 else "tie")
        return out

    return judge


# --- pointwise ---------------------------------------------------------------------------------------


@dataclass
class PointwiseResult:
    """The mean 0-100 score of one file's answers, with its standard error and a normal interval."""

    scores: list[float]
    lines: list[int]
    skipped: int
    confidence: float = CONFIDENCE

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores)

    @property
    def stderr(self) -> float:
        n = len(self.scores)
        if n < 2:
            return math.nan
        var = sum((s - self.mean) ** 2 for s in self.scores) / (n - 1)
        return math.sqrt(var / n)

    @property
    def interval(self) -> tuple[float, float]:
        z = NormalDist().inv_cdf(0.5 + self.confidence / 2)
        return self.mean - z * self.stderr, self.mean + z * self.stderr

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"mean": self.mean, "stderr": self.stderr, "rows": len(self.scores), "skipped": self.skipped,
                "interval": {"method": "normal", "confidence": self.confidence, "low": low, "high": high},
                "per_row": [{"line": n, "score": s} for n, s in zip(self.lines, self.scores)]}


def score_rows(rows: Sequence[Row], scorer: Scorer) -> PointwiseResult:
    """Each answered row scored against its reference; every row needs a reference."""
    missing = [r.line for r in rows if r.reference is None]
    if missing:
        raise LmforgeError(f"line {missing[0]} has no reference answer (a field {' or '.join(map(repr, REFERENCE_FIELDS))}; "
                           f"{plural(len(missing), 'row')} lack one): scoring needs one (--reference-field names another field)")
    kept = [r for r in rows if r.response is not None]
    if not kept:
        raise LmforgeError("no row has an answer to score")
    scores = scorer(kept)
    if len(scores) != len(kept):
        raise LmforgeError(f"the judge gave {len(scores)} scores for {plural(len(kept), 'answer')}")
    return PointwiseResult(list(scores), [r.line for r in kept], len(rows) - len(kept))
