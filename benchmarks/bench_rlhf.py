"""RLHF on two CPU cores: PPO (and RLOO, GRPO) writing positive movie reviews, an
independent judge watching for reward hacking, the polite assistant, and rollout speed.

Parts (--only; each reuses what an earlier run left in --out):

  pipeline   the classic sentiment demonstration, timed end to end: our base pretrained
             further on the review texts of the IMDB sample's training split (1,400
             reviews; `pretrain --init-from`), a sentiment classifier trained on the same
             split (`finetune classify`; its probability of "1" = positive is the score),
             then PPO from the review model on prompts = the first 8 words of the 400
             held-out reviews (360 sampled, 40 held out), the scores standardised by their
             running statistics (--reward-norm: without it, 20 iterations reached 0.9 on one
             seed of two; with it, on five of five), measuring the held-out prompts every
             --held-out-every iterations
  judge      a second classifier trained only on the UCI sentiment sentences (Amazon,
             IMDB and Yelp one-liners: other sources, never seen by the reward model)
             scores the same held-out answers at every measure: proxy and judge against KL
  algos      RLOO and GRPO on the pipeline's policy, reward and prompts, with PPO's budget
             (iterations x responses sampled per iteration): score, judge score, KL, time
  polite     PPO from the SFT model of the alignment figures with the polite/impolite
             reward model, against the SFT model on the 110 held-out prompts (win rate,
             judged by that reward model), beside DPO's run on the same prompts
  speed      rollout generation (temperature 1, 48 new tokens, 16 prompts of 8 words)
             with our engine vs `transformers` `generate` on the same weights, and the
             time of a PPO iteration split into generation, scoring and training

    python benchmarks/bench_rlhf.py --base runs/base --out runs/rlhf \\
        [--sft runs/sft --polite-reward runs/align/reward-polite --dpo runs/align/dpo-beta0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import torch
from _common import SHARED, best_of, print_table

from lmforge.cli import main as lmforge
from lmforge.data.labeled import balanced_split, read_labeled
from lmforge.engine import Engine, SamplingParams
from lmforge.interop.hf import config_to_hf, state_dict_to_hf
from lmforge.loading import load, resolve_model_path
from lmforge.recipes import ppo
from lmforge.recipes.classify import label_probabilities
from lmforge.recipes.config import RLConfig
from lmforge.recipes.reward import score_rendered
from lmforge.train.metrics import read_metrics
from lmforge.weights import state_dict_for_saving

IMDB = SHARED / "sentiment" / "imdb_small.csv"
SENTENCES = SHARED / "sentiment" / "sentiment_labelled_sentences"
POLITE = SHARED / "llms-from-scratch" / "instruction-data-with-preference.json"
PROMPT_WORDS = 8


def run_cli(*args: object) -> None:
    """`lmforge ARGS` in this process, its output kept quiet unless it fails."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = lmforge([str(a) for a in args])
    if code:
        raise SystemExit(f"lmforge {' '.join(map(str, args))} failed:\n{err.getvalue()}")


def clean(text: str) -> str:
    return text.replace("<br /><br />", "\n").replace("<br />", " ")


def write_inputs(out: Path) -> None:
    """The reviews' training split as JSONL (continued pretraining), the first words of the
    held-out split as prompts, and the judge's sentences as JSONL: the classifier's own
    split of the IMDB sample, so no held-out review is seen by the policy or the reward."""
    examples, labels = read_labeled(IMDB)
    split = balanced_split(examples, label_names=labels)
    (out / "reviews.jsonl").write_text("".join(json.dumps({"text": clean(e.text)}) + "\n" for e in split["train"]))
    (out / "prompts.txt").write_text("".join(" ".join(clean(e.text).split()[:PROMPT_WORDS]) + "\n" for e in split["test"]))
    rows = []
    for file in sorted(SENTENCES.glob("*_labelled.txt")):
        for line in file.read_text(encoding="utf-8").splitlines():
            text, _, label = line.rstrip().rpartition("\t")
            if text.strip() and label in ("0", "1"):
                rows.append({"text": text.strip(), "label": "positive" if label == "1" else "negative"})
    (out / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def timed(seconds: dict[str, float], name: str, done: Path, fn) -> None:  # noqa: ANN001
    """Run `fn` unless `done` exists, recording its seconds under `name` (kept in seconds.json)."""
    if done.exists():
        return
    start = time.monotonic()
    fn()
    seconds[name] = time.monotonic() - start
    (done.parent / "seconds.json").write_text(json.dumps(seconds, indent=1) + "\n")


def rl(args: argparse.Namespace, name: str, **kw) -> dict:  # noqa: ANN003
    folder = Path(args.out) / name
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())
    settings = dict(base=str(Path(args.out) / "reviews-base"), reward=str(Path(args.out) / "sentiment-rm"), reward_label="1",
                    prompts=str(Path(args.out) / "prompts.txt"), out=str(folder), iterations=args.iterations, rollout_batch=32,
                    rollout_tokens=args.rollout_tokens, rollout_temperature=args.temperature, batch_size=8, ppo_epochs=2, lr=args.lr, min_lr=args.lr,
                    kl_coef=args.kl_coef, reward_norm=args.reward_norm, eval_examples=0, held_out_every=args.held_out_every,
                    seed=args.seed)
    started = time.monotonic()
    metrics = ppo.run(RLConfig(**{**settings, **kw}), say=lambda m: print(f"  [{name}] {m}", flush=True), progress=False).metrics
    metrics["seconds"] = time.monotonic() - started
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def judged(folder: Path, judge) -> list[dict]:  # noqa: ANN001
    """Each held-out measure of a run: iteration, proxy score, judge score, KL, length."""
    kl = {0: 0.0}
    for r in read_metrics(folder / "metrics.jsonl"):
        if "held_out_score" in r:
            kl[r["iteration"] - 1] = r["held_out_kl_to_reference"]
    last = json.loads((folder / "metrics.json").read_text())
    kl[last["iterations"]] = last["held_out"]["after"]["kl_to_reference"]
    rows = []
    for file in sorted((folder / "held_out").glob("iteration-*.jsonl"), key=lambda p: int(p.stem.split("-")[1])):
        k = int(file.stem.split("-")[1])
        answers = [json.loads(line) for line in file.read_text().splitlines() if line]
        judge_scores = label_probabilities(judge, [a["prompt"] + a["response"] for a in answers], "positive")
        rows.append({"iteration": k, "proxy": sum(a["score"] for a in answers) / len(answers),
                     "judge": sum(judge_scores) / len(answers), "kl": kl.get(k, float("nan")),
                     "proxy_positive": sum(a["score"] > 0.5 for a in answers) / len(answers),
                     "judge_positive": sum(s > 0.5 for s in judge_scores) / len(answers)})
    return rows


def plot_hacking(rows_by_run: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for (name, rows), color in zip(rows_by_run.items(), ("tab:blue", "tab:green", "tab:red")):
        ax.plot([r["kl"] for r in rows], [r["proxy"] for r in rows], "o-", color=color, label=f"{name}: reward model (proxy)")
        ax.plot([r["kl"] for r in rows], [r["judge"] for r in rows], "s--", color=color, alpha=0.7, label=f"{name}: judge")
    ax.set_xlabel("KL to the reference per response (nats)")
    ax.set_ylabel("mean P(positive) on held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def win_rate(judge, responses: list[dict], key: str = "after") -> float:  # noqa: ANN001
    rows = [(r["prompt"], r[key], r["before"]) for r in responses if r.get(key) is not None and r.get("before") is not None]
    ours = score_rendered(judge, [p for p, _, _ in rows], [a for _, a, _ in rows])
    theirs = score_rendered(judge, [p for p, _, _ in rows], [b for _, _, b in rows])
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(ours, theirs)) / max(len(rows), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the pretrained base (run folder) the review model continues")
    parser.add_argument("--out", required=True, help="where the runs go (reused when finished)")
    parser.add_argument("--only", nargs="+", default=["pipeline", "judge", "algos", "polite", "speed"])
    parser.add_argument("--continue-steps", type=int, default=150, help="steps of pretraining on the reviews (x 16 x 256 tokens)")
    parser.add_argument("--rm-steps", type=int, default=450, help="sentiment classifier steps (x 16 reviews, 128 tokens)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rollout-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--reward-norm", action=argparse.BooleanOptionalAction, default=True,
                        help="standardise the sentiment scores by their running mean and std (the polite run keeps raw scores)")
    parser.add_argument("--held-out-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the RL runs' seed (prompt order, rollouts, minibatches; the held-out prompts stay the same)")
    parser.add_argument("--sft", default="", help="the SFT model of the alignment figures (polite)")
    parser.add_argument("--polite-reward", default="", help="the polite/impolite reward model (polite)")
    parser.add_argument("--dpo", default="", help="a DPO run from the same SFT model, for its win rate (polite)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds_file = out / "seconds.json"
    seconds: dict[str, float] = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    if not (out / "prompts.txt").is_file():
        write_inputs(out)
    threads = torch.get_num_threads()
    print(f"# RLHF, {threads} threads; runs in {out}\n")

    if "pipeline" in args.only:
        timed(seconds, "prepare the reviews", out / "reviews-data", lambda: run_cli(
            "data", "prepare", "--input", out / "reviews.jsonl", "--tokenizer", resolve_model_path(args.base),
            "--out", out / "reviews-data"))
        timed(seconds, "pretrain further on the reviews", out / "reviews-base", lambda: run_cli(
            "pretrain", "--init-from", args.base, "--data", out / "reviews-data", "--max-steps", args.continue_steps,
            "--batch-size", 16, "--lr", 5e-4, "--min-lr", 5e-5, "--warmup-steps", 10, "--eval-every", 0, "--save-every", 0,
            "--sample-tokens", 0, "--out", out / "reviews-base"))
        timed(seconds, "sentiment reward model", out / "sentiment-rm", lambda: run_cli(
            "finetune", "classify", "--base", out / "reviews-base", "--data", IMDB, "--max-steps", args.rm_steps,
            "--batch-size", 16, "--max-length", 128, "--lr", 1e-4, "--eval-every", 0, "--eval-examples", 0,
            "--out", out / "sentiment-rm"))
        m = rl(args, "ppo")
        seconds.setdefault("PPO", m["seconds"])
        seconds_file.write_text(json.dumps(seconds, indent=1) + "\n")
        rm = json.loads((out / "sentiment-rm" / "metrics.json").read_text())["splits"]["test"]["after"]["accuracy"]
        print(f"sentiment reward model: test accuracy {rm:.3f}")
        rows = [[k, f"{v:.0f}"] for k, v in seconds.items() if k != "judge"]
        rows.append(["total", f"{sum(v for k, v in seconds.items() if k != 'judge'):.0f}"])
        print_table(["pipeline step", "seconds"], rows)
        before, after = m["held_out"]["before"], m["held_out"]["after"]
        print(f"\nPPO held-out: P(positive) {before['score']:.3f} -> {after['score']:.3f}, KL {after['kl_to_reference']:.2f} "
              f"nats/response, {before['response_tokens']:.1f} -> {after['response_tokens']:.1f} tokens")

    runs = {"ppo": out / "ppo"}
    if "algos" in args.only:
        for algo in ("rloo", "grpo"):
            rl(args, algo, algo=algo, rollout_batch=8, samples=4)
            runs[algo] = out / algo
    if "judge" in args.only or "algos" in args.only:
        timed(seconds, "judge", out / "judge", lambda: run_cli(
            "finetune", "classify", "--base", out / "reviews-base", "--data", out / "judge.jsonl", "--max-steps", 300,
            "--batch-size", 16, "--max-length", 64, "--lr", 1e-4, "--eval-every", 0, "--eval-examples", 0,
            "--out", out / "judge"))
        judge = load(out / "judge")
        acc = json.loads((out / "judge" / "metrics.json").read_text())["splits"]["test"]["after"]["accuracy"]
        print(f"\njudge (UCI sentences only): test accuracy {acc:.3f}")
        by_run = {name: judged(folder, judge) for name, folder in runs.items() if (folder / "metrics.json").is_file()}
        for name, rows in by_run.items():
            print(f"\n{name}: held-out answers through training (mean P(positive); share above 0.5)")
            print_table(["iteration", "KL (nats)", "reward model", "judge", "RM > 0.5", "judge > 0.5"],
                        [[r["iteration"], f"{r['kl']:.2f}", f"{r['proxy']:.3f}", f"{r['judge']:.3f}",
                          f"{r['proxy_positive']:.2f}", f"{r['judge_positive']:.2f}"] for r in rows])
        plot_hacking(by_run, out / "proxy_vs_judge.png")
        if len(by_run) > 1:
            print("\nthe same budget (iterations x responses per iteration):")
            table = []
            for name, rows in by_run.items():
                m = json.loads((runs[name] / "metrics.json").read_text())
                table.append([name, f"{rows[0]['proxy']:.3f} -> {rows[-1]['proxy']:.3f}", f"{rows[0]['judge']:.3f} -> "
                              f"{rows[-1]['judge']:.3f}", f"{rows[-1]['kl']:.2f}", f"{m['held_out']['after']['response_tokens']:.1f}",
                              f"{m['seconds']:.0f}"])
            print_table(["algorithm", "reward model", "judge", "KL", "answer tokens", "seconds"], table)
        examples = [json.loads(line) for line in (out / "ppo" / "responses.jsonl").read_text().splitlines()][:4]
        print("\nexample held-out answers (PPO, before -> after):")
        for e in examples:
            print(json.dumps({"prompt": e["prompt"], "before": e["before"], "after": e["after"]}, ensure_ascii=False)[:500])

    if "polite" in args.only and args.sft and args.polite_reward:
        m = rl(args, "polite-ppo", base=args.sft, reward=args.polite_reward, reward_label="", prompts=str(POLITE),
               rollout_tokens=64, kl_coef=0.05, reward_norm=False, held_out_every=0)
        judge = load(args.polite_reward)
        ours = [json.loads(line) for line in (out / "polite-ppo" / "responses.jsonl").read_text().splitlines()]
        rows = [["PPO", f"{m['held_out']['before']['score']:.3f} -> {m['held_out']['after']['score']:.3f}",
                 f"{win_rate(judge, ours):.3f}", f"{m['held_out']['after']['kl_to_reference']:.2f}",
                 f"{m['held_out']['before']['response_tokens']:.1f} -> {m['held_out']['after']['response_tokens']:.1f}"]]
        if args.dpo:
            theirs = [json.loads(line) for line in (Path(args.dpo) / "responses.jsonl").read_text().splitlines()]
            dm = json.loads((Path(args.dpo) / "metrics.json").read_text())["held_out"]
            after = score_rendered(judge, [r["prompt"] for r in theirs], [r["after"] for r in theirs])
            before = score_rendered(judge, [r["prompt"] for r in theirs], [r["before"] for r in theirs])
            rows.append([f"DPO ({Path(args.dpo).name})", f"{sum(before) / len(before):.3f} -> {sum(after) / len(after):.3f}",
                         f"{win_rate(judge, theirs):.3f}", f"{dm['after']['kl_to_reference']:.2f}",
                         f"{dm['before']['response_tokens']:.1f} -> {dm['after']['response_tokens']:.1f}"])
        print("\npolite assistant (110 held-out prompts; reward model score; win rate over the SFT model):")
        print_table(["run", "reward", "win rate", "KL", "answer tokens"], rows)

    if "speed" in args.only:
        speed(out)


def speed(out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    policy = load(out / "reviews-base").eval()
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_to_hf(policy.config)), attn_implementation="sdpa").eval()
    hf.load_state_dict(state_dict_to_hf(state_dict_for_saving(policy), policy.config), strict=False)
    hf.tie_weights()
    tok = policy.tokenizer
    prompts = [tok.encode(line) for line in (out / "prompts.txt").read_text().splitlines()[:16]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    new = 48
    engine = Engine(policy, tok, packed=False)  # as PPO's rollouts run it: the weights are trained
    sampling = SamplingParams(temperature=1.0)
    with torch.inference_mode():
        t = best_of({"ours": lambda: engine.generate(prompts, max_new_tokens=new, sampling=sampling, seed=0),
                     "hf": lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                                               temperature=1.0, top_k=0, pad_token_id=0)}, 5)
    n = len(prompts) * new
    print(f"\nrollout generation: {len(prompts)} prompts x {new} new tokens, temperature 1, "
          f"{policy.num_params() / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    print_table(["generator", "tokens/s", "seconds"], [["lmforge Engine (KV cache)", n / t["ours"], t["ours"]],
                                                       ["transformers generate", n / t["hf"], t["hf"]],
                                                       ["lmforge / transformers", t["hf"] / t["ours"], ""]])
    if (out / "ppo" / "metrics.jsonl").is_file():
        rows = [r for r in read_metrics(out / "ppo" / "metrics.jsonl") if r.get("split") == "train"]
        parts = {k: sum(r[k] for r in rows) / len(rows) for k in ("generate_s", "score_s", "train_s")}
        total = sum(parts.values())
        print(f"\nPPO iteration ({len(rows)} iterations, mean): " + ", ".join(
            f"{k[:-2]} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in parts.items()) + f"; {total:.2f} s in all")


if __name__ == "__main__":
    main()
