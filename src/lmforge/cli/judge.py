"""`lmforge eval judge`: two responses files judged pairwise, or one scored 0-100.

`lmforge.cli.eval` adds it under `eval` with `add_judge_parser`. The judge is a reward model
of ours (loaded here: the eval package cannot load models) or a chat model behind an
OpenAI-compatible endpoint (`lmforge.eval.endpoint`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.cli.common import add_command, check_out_file, progress_enabled
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text
from lmforge.text import plural

FORMAT = "lmforge-judge"  # marks the file this command writes, the only kind --out replaces


def add_judge_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "judge", "judge two models' answers pairwise, or score one model's answers 0-100", _run,
        examples="""
        lmforge eval judge runs/dpo/responses.jsonl runs/dpo/responses.jsonl --field-a after --field-b before --reward-model runs/rm
        lmforge eval judge runs/dpo/responses.jsonl runs/sft/responses.jsonl --field-b response \\
          --judge-url http://localhost:11434/v1 --judge-model llama3
        lmforge eval judge runs/sft/responses.jsonl --field response --judge-url http://localhost:11434/v1 --judge-model llama3
        """,
        description="""
        Two FILEs (A, B): responses.jsonl files answering the same prompts in the same order (what
        `finetune instruct` and `align dpo/orpo/ppo` write; a mismatched row is an error). Each pair
        is judged twice, A shown first and B shown first; a row is A's win or loss only when both
        verdicts agree, else a tie (a judge that favours the first answer it reads cancels out).
        Prints wins, ties and losses of A and its win rate (ties count half) with a 95% Wilson
        score interval.

        One FILE: each answer scored 0-100 against the row's reference answer ("output", else
        "chosen"; --reference-field) by the endpoint's model, as in "Build a Large Language Model
        (From Scratch)" chapter 7; prints the mean with its standard error.

        Judges: --reward-model (an `align reward` run: the higher reward wins; pairwise only) or
        --judge-url with --judge-model (any OpenAI-compatible chat endpoint: Ollama, vLLM, llama.cpp,
        OpenAI; the API key, if any, from the variable --api-key-env names). Writes every verdict to
        --out.""",
    )
    p.add_argument("responses", nargs="+", metavar="FILE", help="one responses.jsonl to score, or two (A B) to judge pairwise")
    judge = p.add_mutually_exclusive_group(required=True)
    judge.add_argument("--reward-model", metavar="DIR", help="a reward model (an `align reward` run or its model folder)")
    judge.add_argument("--judge-url", metavar="URL", help="an OpenAI-compatible endpoint's base URL, e.g. http://localhost:11434/v1")
    p.add_argument("--judge-model", metavar="NAME", help="the model the endpoint serves (with --judge-url)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the endpoint's API key, sent when set (default: OPENAI_API_KEY)")
    p.add_argument("--field", default="after", help="the field holding each row's answer (default: after; `finetune instruct` "
                   "writes response)")
    p.add_argument("--field-a", metavar="FIELD", help="A's answer field (default: --field)")
    p.add_argument("--field-b", metavar="FIELD", help="B's answer field (default: --field)")
    p.add_argument("--reference-field", metavar="FIELD", help="the field holding the reference answer (default: output, else chosen)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="judge the first N rows only")
    p.add_argument("--timeout", type=_positive_seconds, default=60.0, metavar="SECONDS", help="per request (default: 60)")
    p.add_argument("--retries", type=_retries, default=3, metavar="N",
                   help="times to ask again after a 5xx, 429, timeout or dropped connection (default: 3)")
    p.add_argument("--device", default="auto", help="for --reward-model: cpu, cuda, mps or auto")
    p.add_argument("--out", default="judge.json", metavar="PATH", help="the verdicts as JSON (default: judge.json)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _retries(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive integer"  # argparse names the type in its message
_retries.__name__ = "integer >= 0"
_positive_seconds.__name__ = "positive number of seconds"


def _run(args: argparse.Namespace) -> int:
    from lmforge.eval.judge import judge_pairs, read_responses, score_rows

    files = args.responses
    if len(files) > 2:
        raise LmforgeError(f"give one responses file (scored) or two (judged pairwise), not {len(files)}")
    if args.judge_model is not None and args.judge_url is None:
        raise LmforgeError("--judge-model names the model at --judge-url; give --judge-url too (or drop it for --reward-model)")
    if not args.api_key_env:
        raise LmforgeError("--api-key-env is empty: name the environment variable holding the API key (e.g. OPENAI_API_KEY)")
    if args.reference_field == "":
        raise LmforgeError("--reference-field is empty: name the field holding each row's reference answer (e.g. output)")
    out = _check_out(args.out)
    fields = [args.field_a if args.field_a is not None else args.field, args.field_b if args.field_b is not None else args.field]
    rows = [read_responses(f, field, args.reference_field)[: args.limit] for f, field in zip(files, fields)]
    names = ("A", "B")
    sources = [{"file": str(f), "field": field} for f, field in zip(files, fields)]
    report: dict[str, Any] = {"format": FORMAT, "mode": "pairwise" if len(files) == 2 else "pointwise"}
    if len(files) == 1:
        if args.reward_model is not None:
            raise LmforgeError("a reward model's scores mean something only next to another answer's: give two files to judge "
                               "pairwise, or score one file with --judge-url and --judge-model")
        client = _client(args)
        with _bar(len(rows[0]), "scoring") as step:
            from lmforge.eval.endpoint import endpoint_scorer

            result = score_rows(rows[0], endpoint_scorer(client, step))
        report.update(judge=_judge_identity(args), responses=sources[0], result=result.to_dict())
        _print_pointwise(result, files[0], fields[0])
    else:
        judge, total = _pair_judge(args, 2 * min(len(r) for r in rows))
        with total as step:
            result = judge_pairs(rows[0], rows[1], judge(step), names)
        report.update(judge=_judge_identity(args), a=sources[0], b=sources[1], result=result.to_dict())
        _print_pairwise(result, sources)
    atomic_write_text(out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"verdicts:  {out}")
    return 0


def _check_out(path: str) -> Path:
    """--out, refused before any judging if writing it would replace something not ours."""
    return check_out_file(path, "judge.json", _is_verdicts, "an earlier `eval judge` result")


def _is_verdicts(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, AttributeError, OSError):
        return False


def _client(args: argparse.Namespace) -> Any:
    from lmforge.eval.endpoint import ChatEndpoint

    if args.judge_model is None:
        raise LmforgeError("--judge-url needs --judge-model: the name of the model the endpoint serves (e.g. llama3)")
    return ChatEndpoint(args.judge_url, args.judge_model, api_key=os.environ.get(args.api_key_env) or None, timeout=args.timeout,
                        retries=args.retries)


def _pair_judge(args: argparse.Namespace, requests: int) -> tuple[Callable[[Callable[[int], None] | None], Any], Any]:
    """(the judge given a progress callback, a progress context): a reward model scores in
    batches (no bar), an endpoint is asked once per pair and order."""
    import contextlib

    if args.judge_url is not None:
        from lmforge.eval.endpoint import endpoint_pair_judge

        client = _client(args)
        return (lambda step: endpoint_pair_judge(client, step)), _bar(requests, "judging")
    from lmforge.device import pick_device
    from lmforge.eval.judge import reward_judge
    from lmforge.loading import load
    from lmforge.recipes.reward import is_reward_model, score_rendered

    model = load(args.reward_model, device=pick_device(args.device))
    if not is_reward_model(model):
        raise LmforgeError(f"--reward-model {args.reward_model} is not a reward model (no one-output reward head); "
                           "train one with `lmforge align reward`")
    judge = reward_judge(lambda prompts, responses: score_rendered(model, prompts, responses))
    return (lambda step: judge), contextlib.nullcontext(None)


class _bar:
    """A progress bar on a terminal (a judge at an endpoint answers one request at a time)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.tqdm = total, desc, None

    def __enter__(self) -> Callable[[int], None] | None:
        if not progress_enabled():
            return None
        from tqdm.auto import tqdm

        self.tqdm = tqdm(total=self.total, desc=self.desc, unit="request", leave=False)
        return self.tqdm.update

    def __exit__(self, *exc: object) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def _judge_identity(args: argparse.Namespace) -> dict[str, Any]:
    if args.judge_url is not None:
        return {"kind": "endpoint", "url": args.judge_url, "model": args.judge_model}
    return {"kind": "reward-model", "model": args.reward_model}


def _print_pairwise(result: Any, sources: list[dict[str, str]]) -> None:
    for name, s in zip("AB", sources):
        print(f"{name}: {s['file']} ({s['field']})")
    low, high = result.interval
    skipped = f"; {plural(result.skipped, 'row')} without an answer in A or B left out" if result.skipped else ""
    print(f"A vs B on {plural(result.n, 'prompt')}, each judged in both orders{skipped}:")
    print(f"  A wins {result.wins}, ties {result.ties}, loses {result.losses}")
    print(f"  win rate {result.win_rate:.3f} (ties count half); {result.confidence:.0%} Wilson interval {low:.3f}-{high:.3f}")
    print(f"  order: the verdict changed with the order on {plural(result.inconsistent, 'row')} (counted as ties); "
          f"the answer shown first was picked in {result.first_shown_preferred} of {2 * result.n} verdicts")


def _print_pointwise(result: Any, file: str, field: str) -> None:
    low, high = result.interval
    skipped = f" ({plural(result.skipped, 'row')} without an answer left out)" if result.skipped else ""
    spread = f"; standard error {result.stderr:.2f}, {result.confidence:.0%} interval {low:.1f}-{high:.1f}" \
        if math.isfinite(result.stderr) else ""
    print(f"{file} ({field}): mean score {result.mean:.2f} / 100 over {plural(len(result.scores), 'answer')}{spread}{skipped}",
          file=sys.stdout)
