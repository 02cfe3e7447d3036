"""What preference alignment buys a small model: reward models, DPO at three betas, ORPO,
iterative DPO and replay, on LLMs-from-scratch's 1,100 polite/impolite pairs.

Starts from our own instruction-tuned (SFT) model: the GPT-2-family `small` base of the
fine-tuning figures, instruction-tuned on the 935 training items of the same file
(README, "Fine-tuning"). Every run is a recipe of `lmforge align` called as the CLI
calls it; the runs land in --out and are reused when their metrics.json is there.

  reward       reward model on the polite/impolite pairs (held-out pairwise accuracy),
               and one on the HH-RLHF sample (real human preferences; chance is 0.5)
  dpo-B        DPO from the SFT model at beta B (0.1, 0.3, 0.5)
  dpo-B-rpoA   DPO plus A x the chosen response's NLL per token (RPO; --rpo-alpha), at beta 0.3, 4 epochs
  orpo         ORPO from the pretrained base (no SFT stage), the same data and epochs
  iterative    iterative DPO from the SFT model, the polite reward model ranking samples
  replay       DPO at beta 0.1 with 10% replay of the base's pretraining data

Each row: held-out (test) implicit-reward accuracy and margin before -> after, the KL to
the reference, the win rate of the run's greedy answers over the SFT model's (judged by
the polite reward model; a tie counts a half), the mean answer length in tokens before
-> after (a win bought by length shows here), the SFT loss on the held-out outputs
before -> after, and the held-out pretraining loss where replay data is given.

    python benchmarks/bench_align_outcomes.py --sft runs/sft --base runs/base --replay runs/prose8k --out runs/align
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import SHARED, print_table

from lmforge.loading import load
from lmforge.recipes import dpo, iterative_dpo, orpo, reward
from lmforge.recipes.config import AlignConfig
from lmforge.recipes.reward import score_rendered

POLITE = SHARED / "llms-from-scratch" / "instruction-data-with-preference.json"
HH = SHARED / "hh-rlhf" / "harmless-base_test.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", required=True, help="the instruction-tuned model (run folder) DPO starts from")
    parser.add_argument("--base", required=True, help="the pretrained base ORPO starts from")
    parser.add_argument("--replay", default="", help="the base's prepared pretraining data (for the replay row and its loss)")
    parser.add_argument("--out", required=True, help="where the runs go (reused when finished)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4, help="DPO and ORPO learning rate (full weights)")
    parser.add_argument("--reward-lr", type=float, default=2e-4)
    parser.add_argument("--reward-epochs", type=float, default=3.0)
    parser.add_argument("--hh-steps", type=int, default=150, help="reward-model steps on HH-RLHF (1,965 training pairs)")
    parser.add_argument("--hh-max-length", type=int, default=192, help="tokens per HH-RLHF sequence (prompts cut from the start)")
    parser.add_argument("--hh-eval", type=int, default=231, help="HH-RLHF pairs measured per split (231: the whole test split)")
    parser.add_argument("--judge", default="reward-polite", help="the run (under --out) whose reward model judges win rates")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--rpo-betas", type=float, nargs="*", default=[0.3], help="DPO + the chosen NLL (--rpo-alpha) at these betas")
    parser.add_argument("--rpo-alpha", type=float, default=1.0)
    parser.add_argument("--rpo-epochs", type=float, default=4.0, help="epochs of the RPO rows (the NLL term lets it train longer)")
    parser.add_argument("--orpo-lambda", type=float, default=0.1)
    parser.add_argument("--orpo-epochs", type=float, default=0.0, help="ORPO epochs (0: those of SFT + DPO: 2 + --epochs)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=["reward", "dpo", "orpo", "iterative", "replay"])
    parser.add_argument("--logps", default="sum", choices=["sum", "mean"])
    args = parser.parse_args()
    out = Path(args.out)
    common = dict(batch_size=8, eval_examples=0, seed=123, logps=args.logps)
    rows, reward_rows = [], []
    said = lambda m: print(m, flush=True)  # noqa: E731

    def fit(recipe, name: str, **kw) -> dict:  # noqa: ANN001
        folder = out / name
        if (folder / "metrics.json").is_file():
            return json.loads((folder / "metrics.json").read_text())
        cfg = AlignConfig(out=str(folder), **{**common, **kw})
        started = time.monotonic()
        metrics = recipe.run(cfg, say=said, progress=False).metrics
        metrics["seconds"] = time.monotonic() - started
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics

    rm_polite = fit(reward, "reward-polite", base=args.sft, data=str(POLITE), epochs=args.reward_epochs, lr=args.reward_lr)
    reward_rows.append(["polite/impolite (1,100 pairs)", *_accuracy(rm_polite), f"{rm_polite['seconds']:.0f}"])
    judge = load(out / args.judge)
    baseline: list[dict] | None = None

    def row(name: str, metrics: dict, folder: Path) -> None:
        nonlocal baseline
        responses = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines() if line]
        if baseline is None:
            baseline = responses
        win = _win_rate(judge, responses, baseline)
        t = metrics["splits"]["test"]
        held = metrics.get("held_out", {})
        b, a = held.get("before", {}), held.get("after", {})
        pre = f"{b['pretraining_loss']:.3f} -> {a['pretraining_loss']:.3f}" if "pretraining_loss" in a else ""
        rows.append([name, f"{t['before']['accuracy']:.3f} -> {t['after']['accuracy']:.3f}",
                     f"{t['before']['margin']:.2f} -> {t['after']['margin']:.2f}", f"{a.get('kl_to_reference', 0):.2f}",
                     f"{win:.3f}", f"{b['response_tokens']:.1f} -> {a['response_tokens']:.1f}",
                     f"{b['sft_loss']:.3f} -> {a['sft_loss']:.3f}", pre, f"{metrics.get('seconds', 0):.0f}"])

    if "dpo" in args.only:
        for beta in args.betas:
            name = f"dpo-beta{beta:g}"
            row(name, fit(dpo, name, base=args.sft, data=str(POLITE), beta=beta, epochs=args.epochs, lr=args.lr,
                          precompute_ref=True, replay=args.replay, replay_fraction=0.0), out / name)
        for beta in args.rpo_betas:
            name = f"dpo-beta{beta:g}-rpo{args.rpo_alpha:g}-{args.rpo_epochs:g}ep"
            row(f"{name} (+ chosen NLL)", fit(dpo, name, base=args.sft, data=str(POLITE), beta=beta, epochs=args.rpo_epochs,
                                              lr=args.lr, precompute_ref=True, replay=args.replay, replay_fraction=0.0,
                                              rpo_alpha=args.rpo_alpha), out / name)
    if "replay" in args.only and args.replay:
        name = "dpo-beta0.1-replay"
        row(name + " (10%)", fit(dpo, name, base=args.sft, data=str(POLITE), beta=0.1, epochs=args.epochs, lr=args.lr,
                                 precompute_ref=True, replay=args.replay, replay_fraction=0.1), out / name)
    if "orpo" in args.only:
        epochs = args.orpo_epochs or 2 + args.epochs
        row(f"orpo from the base ({epochs:g} epochs)", fit(orpo, "orpo", base=args.base, data=str(POLITE), epochs=epochs,
                                                         lr=args.lr, orpo_lambda=args.orpo_lambda, replay=args.replay,
                                                         replay_fraction=0.0), out / "orpo")
    if "iterative" in args.only:
        m = fit(iterative_dpo, "iterative", base=args.sft, reward=str(out / args.judge), prompts=str(POLITE),
                rounds=args.rounds, epochs=args.epochs, lr=args.lr, beta=0.1)
        for r in m["rounds"]:
            folder = out / "iterative" / f"round-{r['round']}"
            row(f"iterative DPO round {r['round']} ({r['pairs']} sampled pairs)",
                json.loads((folder / "metrics.json").read_text()), folder)
    if "reward" in args.only:  # last: the longest run (2,312 long dialogues), cut to --hh-steps
        rm_hh = fit(reward, "reward-hh", base=args.sft, data=str(HH), max_steps=args.hh_steps, lr=args.reward_lr,
                    max_length=args.hh_max_length, eval_examples=args.hh_eval)
        reward_rows.append([f"HH-RLHF harmless-base (2,312 pairs; {args.hh_steps} steps x 8, {args.hh_max_length} tokens)",
                            *_accuracy(rm_hh), f"{rm_hh['seconds']:.0f}"])
    print("\nreward models (held-out test pairs; chance 0.5):")
    print_table(["data", "accuracy before", "accuracy after", "margin after", "seconds"], reward_rows)
    print("\npolicies (held-out test split of the polite/impolite pairs; win rate over the SFT model, judged by the reward model):")
    print_table(["run", "accuracy", "margin", "KL to ref", "win rate", "answer tokens", "SFT loss", "pretraining loss", "s"], rows)
    for name in ("dpo-beta0.1", "orpo"):
        if (out / name / "responses.jsonl").is_file():
            print(f"\nexample answers ({name}):")
            for r in [json.loads(line) for line in (out / name / "responses.jsonl").read_text().splitlines()][:3]:
                print(json.dumps({k: r.get(k) for k in ("prompt", "before", "after")}, ensure_ascii=False)[:600])


def _accuracy(m: dict) -> list[str]:
    t = m["splits"]["test"]
    return [f"{t['before']['accuracy']:.3f}", f"{t['after']['accuracy']:.3f}", f"{t['after']['margin']:.2f}"]


def _win_rate(judge, responses: list[dict], baseline: list[dict]) -> float:  # noqa: ANN001
    """How often the judge scores a run's greedy answer above the SFT model's to the same prompt."""
    pairs = [(r["prompt"], r["after"], b["before"]) for r, b in zip(responses, baseline, strict=True)
             if r.get("after") is not None and b.get("before") is not None]
    ours = score_rendered(judge, [p for p, _, _ in pairs], [a for _, a, _ in pairs])
    theirs = score_rendered(judge, [p for p, _, _ in pairs], [b for _, _, b in pairs])
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(ours, theirs)) / max(len(pairs), 1)


if __name__ == "__main__":
    main()
