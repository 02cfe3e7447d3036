"""`lmforge align reward | dpo | orpo | iterative-dpo` and `lmforge reward`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from lmforge.cli.common import add_command, add_group, progress_enabled
from lmforge.cli.finetune import NOT_FOR_FINETUNING, ending, measured_on, resume_hint
from lmforge.cli.flags import add_flags, config_from_args
from lmforge.cli.pretrain import exit_status
from lmforge.recipes.config import AlignConfig, RLConfig
from lmforge.text import plural

# fields of AlignConfig that only one recipe reads, by recipe
DPO_ONLY = ("beta", "dpo_loss", "label_smoothing", "precompute_ref", "rpo_alpha")
ORPO_ONLY = ("orpo_lambda",)
REWARD_ONLY = ("reward_margin", "center_rewards")
ITERATIVE_ONLY = ("reward", "prompts", "rounds", "rollout_tokens", "rollout_temperature")
# what an RLHF run does not take: it samples its own responses to --prompts, for --iterations
NOT_FOR_RL = DPO_ONLY + ORPO_ONLY + REWARD_ONLY + ("data", "rounds", "epochs", "max_steps", "eval_every", "eval_batches",
                                                  "logps", "sample_prompts", "sample_tokens", "replay", "replay_fraction",
                                                  "max_length")
NOT_FOR_PAIRS = NOT_FOR_FINETUNING + ("from_scratch", "text_field", "label_field", "padding_side", "mask_prompt")

PAIRS_HELP = """
The pairs file is Alpaca items with "chosen" and "rejected" (LLMs-from-scratch's
instruction-data-with-preference.json; split 85/5/10 in order as in the book), chat
conversations with chosen and rejected replies (ShareGPT or messages), or HH-RLHF dialogue
text (JSONL, .gz too); the last two are split 85/5/10 with seed 123. Rows with an empty
response or chosen equal to rejected are left out and counted. Prompts are rendered with
the instruction-tuning templates, masked, and <|endoftext|> ends each response."""


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "align", "teach a model what people prefer: reward model, DPO, ORPO, iterative DPO")
    r = add_command(
        group, "reward", "train a reward model (a scalar head) on preference pairs", _align(_reward_run, "reward"),
        examples="""
        lmforge align reward --base runs/instruct --data data/instruction-data-with-preference.json --epochs 2 --out runs/rm
        lmforge reward --model runs/rm --prompt "Name a primary color." --response "Red." --response "Figure it out yourself."
        """,
        description="""
        A head on the last real token learns a score with the Bradley-Terry loss
        -log sigmoid(r_chosen - r_rejected - margin). Writes checkpoints/, metrics.jsonl, loss.png
        and metrics.json (pairwise accuracy, margin, chosen and rejected scores per split, before
        and after) into --out.""" + PAIRS_HELP,
    )
    _flags(r, DPO_ONLY + ORPO_ONLY + ITERATIVE_ONLY + ("logps", "sample_prompts", "sample_tokens"))
    d = add_command(
        group, "dpo", "direct preference optimization of an instruction-tuned model", _align(_dpo_run, "dpo"),
        examples="""
        lmforge align dpo --base runs/instruct --data data/instruction-data-with-preference.json --beta 0.1 --out runs/dpo
        lmforge align dpo --base runs/instruct --data pairs.json --lora-r 16 --lr 5e-5 --out runs/dpo-lora
        lmforge align dpo --base runs/instruct --data pairs.json --precompute-ref --out runs/dpo-fast
        """,
        description="""
        DPO: -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) on sequence log-probabilities
        (--logps sum, the paper's; mean: per token). The reference is the starting model: the
        policy with its adapters off under --lora-r, else a frozen copy; --precompute-ref computes
        its log-probs once (kept in the run folder) and frees it. --dpo-loss ipo and
        --label-smoothing give IPO and conservative DPO; --rpo-alpha adds the chosen response's
        per-token NLL (RPO), which keeps the SFT behaviour and answer length. Writes metrics.json (implicit-reward
        accuracy, margins, KL to the reference, the SFT loss on held-out responses, response
        length) and responses.jsonl (greedy held-out responses before and after).""" + PAIRS_HELP,
    )
    _flags(d, ORPO_ONLY + REWARD_ONLY + ITERATIVE_ONLY)
    o = add_command(
        group, "orpo", "odds-ratio preference optimization: SFT and preferences in one stage from the base",
        _align(_orpo_run, "orpo"),
        examples="""
        lmforge align orpo --base runs/base --data data/instruction-data-with-preference.json --lambda 0.1 --epochs 2 --out runs/orpo
        """,
        description="""
        ORPO: the SFT loss on the chosen response plus lambda x -log sigmoid(log odds(chosen) -
        log odds(rejected)), odds of per-token log-probabilities; no reference model. Start from
        the pretrained base. Writes what `align dpo` writes (the KL measured to the base).""" + PAIRS_HELP,
    )
    _flags(o, DPO_ONLY + REWARD_ONLY + ITERATIVE_ONLY + ("logps",))
    i = add_command(
        group, "iterative-dpo", "online DPO: the policy samples pairs, a reward model ranks them, DPO learns; N rounds",
        _align(_iterative_run, "iterative-dpo"),
        examples="""
        lmforge align iterative-dpo --base runs/instruct --reward runs/rm --prompts data/instruction-data-with-preference.json \\
          --rounds 2 --out runs/online
        """,
        description="""
        Each round samples two responses per training prompt of --prompts (a pairs file; its
        held-out pairs measure each round) from the current policy, ranks them with the reward
        model, and trains DPO on the new pairs with the previous round's policy as reference
        (OUT/round-K). metrics.json holds each round's win rate over the starting model on the
        held-out prompts (judged by the reward model), its reward, KL and response length.""",
    )
    _flags(i, ORPO_ONLY + REWARD_ONLY + ("data",))
    p = add_command(
        group, "ppo", "RLHF: the policy samples, a reward model scores, PPO (or RLOO, GRPO) learns with a KL penalty",
        _align(_ppo_run, "ppo", RLConfig),
        examples="""
        lmforge align ppo --policy runs/instruct --reward runs/rm --prompts data/instruction-data-with-preference.json --out runs/ppo
        lmforge align ppo --policy runs/reviews --reward runs/sentiment --reward-label 1 --prompts prompts.txt \\
          --iterations 20 --rollout-tokens 32 --held-out-every 5 --out runs/ppo-sentiment
        lmforge align ppo --algo rloo --samples 4 --policy runs/instruct --reward runs/rm --prompts pairs.json --out runs/rloo
        """,
        description="""
        Each iteration samples --rollout-batch prompts x --samples responses (KV cache, up to
        --rollout-tokens, at --rollout-temperature), scores them with --reward (a reward model,
        or a classifier's probability of --reward-label), subtracts --kl-coef x KL to the starting
        policy per token (adapted towards --target-kl when set), and takes --ppo-epochs passes of
        clipped updates in minibatches of --batch-size. --algo ppo learns a value head on the
        policy's trunk (GAE); rloo and grpo compare each response with the others sampled for
        its prompt. --prompts is a .txt file (one prompt per line, continued as is), JSON/JSONL
        rows with "prompt", or a preference-pairs file (its prompts, rendered). Writes
        metrics.jsonl (score, KL, reward, entropy, clip fraction, value loss, ... per
        iteration), rl.png, metrics.json (held-out score, KL and length before and after) and
        responses.jsonl (greedy held-out answers before and after).""",
    )
    _flags(p, NOT_FOR_RL, RLConfig)
    s = add_command(
        sub, "reward", "score responses with a reward model", _score,
        examples="""
        lmforge reward --model runs/rm --prompt "Name a primary color." --response "Red." --response "Look it up."
        """,
    )
    s.add_argument("--model", required=True, help="a reward model: an `align reward` run folder or its model folder")
    s.add_argument("--prompt", required=True, help="the user's message (rendered in the template the reward model learned)")
    s.add_argument("--response", required=True, action="append", help="a response to score (repeatable)")
    s.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")


def _flags(parser: argparse.ArgumentParser, skip: tuple[str, ...], cls: type[AlignConfig] = AlignConfig) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with the same keys as these flags")
    add_flags(parser, skip=NOT_FOR_PAIRS + skip, cls=cls)


def _align(recipe: Callable[[], Callable[..., Any]], task: str,
           cls: type[AlignConfig] = AlignConfig) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        cfg = config_from_args(args, args.config, cls=cls)
        result = recipe()(cfg, say=lambda m: print(m, file=sys.stderr), progress=progress_enabled())
        _report(result.metrics)
        print(f"model:     {result.checkpoint}")
        if result.responses is not None:
            print(f"responses: {result.responses}")
        print(f"metrics:   {result.out / 'metrics.json'}")
        if task == "reward":
            print(f'try:       lmforge reward --model {result.out} --prompt "Say hello." --response "Hello!" --response "No."')
        resume_hint(result.stopped, result.out, f"align {task}")
        return exit_status(result.stopped)

    return command


def _reward_run() -> Callable[..., Any]:
    from lmforge.recipes.reward import run

    return run


def _dpo_run() -> Callable[..., Any]:
    from lmforge.recipes.dpo import run

    return run


def _orpo_run() -> Callable[..., Any]:
    from lmforge.recipes.orpo import run

    return run


def _iterative_run() -> Callable[..., Any]:
    from lmforge.recipes.iterative_dpo import run

    return run


def _ppo_run() -> Callable[..., Any]:
    from lmforge.recipes.ppo import run

    return run


def _report(m: dict) -> None:
    if m["task"] in ("ppo", "rloo", "grpo"):
        before, after = m["held_out"]["before"], m["held_out"]["after"]
        print(f"{m['task']}: {plural(m['iterations'], 'iteration')} ({plural(m['steps'], 'step')}), KL coefficient {m['kl_coef']:.4g}")
        print(f"held-out: score {before['score']:.3f} -> {after['score']:.3f}, KL to the reference "
              f"{after['kl_to_reference']:.2f} nats per response, response tokens {before['response_tokens']:.1f} -> "
              f"{after['response_tokens']:.1f}, ended {before['ended']:.2f} -> {after['ended']:.2f} "
              f"({plural(after['responses'], 'prompt')})")
        return
    if m["task"] == "iterative-dpo":
        for r in m["rounds"]:
            win = "n/a" if r["win_rate"] is None else f"{r['win_rate']:.3f}"
            print(f"round {r['round']}: {r['pairs']:,} pairs, win rate over the start {win}, reward "
                  f"{r['start_reward']:.3f} -> {r['reward']:.3f}, response {r['response_tokens']:.1f} tokens, "
                  f"test accuracy {r['test_accuracy']:.3f}")
        return
    print(ending("done", m["steps"]) + (f" ({plural(m['skipped_steps'], 'step')} skipped: non-finite loss)"
                                        if m.get("skipped_steps") else ""))
    for s, v in m["splits"].items():
        was = (lambda k: f"{v['before'][k]:.3f} -> ") if "before" in v else (lambda k: "")
        print(f"{s:5} accuracy {was('accuracy')}{v['after']['accuracy']:.3f}   margin {was('margin')}{v['after']['margin']:.3f}"
              f"   ({measured_on({'examples': v['pairs'], 'evaluated': v['evaluated']}, 'pair')})")
    held = m.get("held_out", {})
    if held.get("after"):
        before, after = held.get("before", {}), held["after"]
        parts = []
        for key, name in (("kl_to_reference", "KL to the reference"), ("sft_loss", "SFT loss"),
                          ("response_tokens", "response tokens"), ("ends_with_eot", "ending with <|endoftext|>"),
                          ("pretraining_loss", "pretraining loss")):
            if key in after:
                parts.append(f"{name} " + (f"{before[key]:.3f} -> " if key in before else "") + f"{after[key]:.3f}")
        print("held-out: " + ", ".join(parts))


def _score(args: argparse.Namespace) -> int:
    from lmforge.device import pick_device
    from lmforge.errors import LmforgeError
    from lmforge.loading import load
    from lmforge.recipes.reward import is_reward_model, score

    model = load(args.model, device=pick_device(args.device))
    if not is_reward_model(model):
        raise LmforgeError(f"--model {args.model} is not a reward model (no one-output reward head); "
                           "train one with `lmforge align reward`")
    for response, value in zip(args.response, score(model, args.prompt, args.response)):
        print(f"{value:+.4f}\t{response}")
    return 0
