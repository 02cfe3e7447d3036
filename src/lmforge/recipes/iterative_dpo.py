"""Iterative (online) DPO: the policy makes its own pairs, a reward model ranks them.

Offline DPO learns from responses some other model wrote. Here each round samples two
responses per training prompt from the current policy (the `Engine`: batched, KV cache,
temperature sampling), lets the reward model (`lmforge align reward`) choose the better
one, and trains DPO on those pairs with the previous round's policy as the reference
(Xiong et al. 2024, arXiv 2312.11456; Yuan et al. 2024, Self-Rewarding LMs). Round k is
a DPO run of its own in OUT/round-k, its pairs in OUT/pairs-k.jsonl: a resumed run
skips finished rounds, reuses the sampled pairs and resumes the round's checkpoint.

Each round is judged on the held-out prompts: its greedy responses against the starting
(SFT) model's, by the reward model, as a win rate; with their length beside it, since a
longer answer is the reward model's classic weakness.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from lmforge.engine import SamplingParams
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text
from lmforge.loading import load, resolve_model_path
from lmforge.model import GPT
from lmforge.recipes import dpo
from lmforge.recipes.common import check_run_folder, eval_rows, own_run_folder, start_run, write_metrics
from lmforge.recipes.config import AlignConfig
from lmforge.recipes.instruct import respond
from lmforge.recipes.preference import AlignResult, Pairs, check_same_tokenizer, read_pairs
from lmforge.recipes.reward import is_reward_model, score_rendered
from lmforge.text import plural
from lmforge.tokenizer.templates import template_named
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.distributed import init_distributed

BASELINE_FILE = "baseline.json"  # the starting model's greedy held-out answers
ROUND_PROMPTS = 256  # training prompts sampled per round, at most (spread over the split; --eval-examples for held-out)


def run(cfg: AlignConfig, say: Callable[[str], None] = print, progress: bool = True) -> AlignResult:
    if not cfg.reward:
        raise LmforgeError("iterative DPO ranks its samples with a reward model: pass --reward DIR (from `lmforge align reward`)")
    if not cfg.prompts:
        raise LmforgeError("pass --prompts FILE: preference pairs whose training prompts are sampled and held-out pairs measured")
    cfg.validate()  # after the checks above: without --prompts it would ask for --data, which this command does not take
    if cfg.resume not in ("", "latest"):  # a checkpoint path was ignored: each round resumes its own newest checkpoint
        raise LmforgeError(f"iterative DPO resumes its rounds from --out: pass --resume alone, not a checkpoint ({cfg.resume})")
    info = init_distributed(cfg.device or None)
    if info.enabled:
        raise LmforgeError("iterative DPO samples and ranks on one process: run it without torchrun")
    out = Path(cfg.out)
    with own_run_folder(cfg, info):
        check_run_folder(cfg, info)
        pairs = read_pairs(cfg.prompts, cfg.template, say)
        judge = load(cfg.reward, device=info.device)
        if not is_reward_model(judge):
            raise LmforgeError(f"--reward {cfg.reward} is not a reward model (no one-output reward head); "
                               "train one with `lmforge align reward`")
        check_same_tokenizer({"policy": load(cfg.base), "reward model": judge})
        start_run(cfg, info, say)  # once the inputs are known good: a refused run leaves no run.json behind
        stops = template_named(pairs.template).stop_strings
        asked = [pairs.texts["train"][i][0] for i in eval_rows(len(pairs.texts["train"]), ROUND_PROMPTS)]
        rounds: list[dict] = []
        baseline_file = out / BASELINE_FILE
        base: str | Path = cfg.base
        result: AlignResult | None = None
        for k in range(1, cfg.rounds + 1):
            folder = out / f"round-{k}"
            if (folder / "metrics.json").is_file():  # finished by an earlier run: its results are read, never redone
                say(f"round {k}/{cfg.rounds}: finished, reading its results in {folder}")
                n_pairs = len(json.loads((out / f"pairs-{k}.jsonl").read_text()))
                metrics = json.loads((folder / "metrics.json").read_text())
                result = None
            else:
                policy = load(base, device=info.device)
                round_pairs = _round_pairs(out / f"pairs-{k}.jsonl", policy, judge, asked, stops, cfg, k, say, progress)
                if not round_pairs:
                    raise LmforgeError(f"round {k}: every sampled pair was a tie (the same text or the same reward); "
                                       "raise --rollout-temperature")
                del policy
                texts = {"train": round_pairs, "val": pairs.texts["val"], "test": pairs.texts["test"]}
                items = {"train": [{} for _ in round_pairs], "val": pairs.items["val"], "test": pairs.items["test"]}
                round_cfg = dataclasses.replace(cfg, out=str(folder), base=str(base), data=cfg.prompts, overwrite=False,
                                                resume="latest" if list_checkpoints(folder) else "")
                say(f"round {k}/{cfg.rounds}: DPO on {plural(len(round_pairs), 'sampled pair')}, reference {base}")
                result = dpo.run(round_cfg, say=say, progress=progress, pairs=Pairs(pairs.data, pairs.template, items, texts),
                                 task="iterative-dpo")
                n_pairs, metrics = len(round_pairs), result.metrics
            responses = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines() if line]
            if not baseline_file.is_file():  # the starting model's greedy answers: what every round is judged against
                atomic_write_text(baseline_file, json.dumps([r.get("before") for r in responses], ensure_ascii=False) + "\n")
            baseline = json.loads(baseline_file.read_text())
            rounds.append(_judge_round(k, n_pairs, judge, responses, baseline, metrics))
            win = rounds[-1]["win_rate"]
            say(f"round {k}: win rate {'n/a' if win is None else f'{win:.3f}'} over the starting model, "
                f"mean response {rounds[-1]['response_tokens']:.1f} tokens")
            base = folder
        metrics = {"task": "iterative-dpo", "base": cfg.base, "reward": cfg.reward, "prompts": cfg.prompts, "beta": cfg.beta,
                   "rounds": rounds}
        write_metrics(cfg, info, metrics)
        last = out / f"round-{cfg.rounds}"
        if result is None:  # every round was finished before: the last one's model, as saved
            return AlignResult(out, resolve_model_path(last), metrics, last / "responses.jsonl", "done", load(last))
        return AlignResult(out, result.checkpoint, metrics, result.responses, result.stopped, result.model)


def _round_pairs(path: Path, policy: GPT, judge: GPT, prompts: list[str], stops: tuple[str, ...], cfg: AlignConfig, k: int,
                 say: Callable[[str], None], progress: bool) -> list[tuple[str, str, str]]:
    """Two sampled responses per prompt, ranked by the reward model: (prompt, better, worse);
    read back from `path` when this round sampled them already (a resumed run)."""
    if path.is_file():
        return [tuple(row) for row in json.loads(path.read_text())]  # type: ignore[misc]
    say(f"round {k}: sampling 2 responses to each of {plural(len(prompts), 'prompt')} and ranking them")
    sampling = SamplingParams(temperature=cfg.rollout_temperature)
    a, b = (respond(policy, prompts, stop_strings=stops, max_new_tokens=cfg.rollout_tokens, sampling=sampling,
                    seed=cfg.seed + 1000 * k + j, progress=progress, desc=f"round {k}: samples {j + 1}/2") for j in range(2))
    kept = [(p, x.text, y.text) for p, x, y in zip(prompts, a, b) if x is not None and y is not None and x.text != y.text]
    ra = score_rendered(judge, [p for p, _, _ in kept], [x for _, x, _ in kept])
    rb = score_rendered(judge, [p for p, _, _ in kept], [y for _, _, y in kept])
    pairs = [(p, x, y) if sa > sb else (p, y, x) for (p, x, y), sa, sb in zip(kept, ra, rb) if sa != sb]
    atomic_write_text(path, json.dumps(pairs, ensure_ascii=False) + "\n")
    return pairs


def _judge_round(k: int, n_pairs: int, judge: GPT, responses: list[dict], baseline: list[str | None], metrics: dict) -> dict:
    """The round's held-out greedy responses against the starting model's, by the reward model."""
    rows = [(r["prompt"], r.get("after"), b) for r, b in zip(responses, baseline) if r.get("after") is not None and b is not None]
    ours = score_rendered(judge, [p for p, _, _ in rows], [a for _, a, _ in rows])
    theirs = score_rendered(judge, [p for p, _, _ in rows], [b for _, _, b in rows])
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(ours, theirs))
    held = metrics.get("held_out", {}).get("after", {})
    return {
        "round": k,
        "pairs": n_pairs,
        "win_rate": wins / len(rows) if rows else None,
        "reward": sum(ours) / max(len(ours), 1),
        "start_reward": sum(theirs) / max(len(theirs), 1),
        "response_tokens": held.get("response_tokens"),
        "kl_to_reference": held.get("kl_to_reference"),
        "sft_loss": held.get("sft_loss"),
        "test_accuracy": metrics["splits"]["test"]["after"]["accuracy"],
        "test_margin": metrics["splits"]["test"]["after"]["margin"],
    }

