"""Preference alignment end to end on tiny models: a reward model and `lmforge reward`, DPO on
the three shapes of pairs file, ORPO under LoRA, iterative DPO with a reward model trained
here; batch x accumulation invariance (trl's); exact resume with a precomputed or an
adapters-off reference; the reference's three forms agreeing; a non-finite step skipped;
refusals; and replay of pretraining data while fine-tuning or aligning."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import shared
from safetensors.torch import load_file

import lmforge
from lmforge.cli import main
from lmforge.config import Config
from lmforge.data.batches import EpochSampler
from lmforge.data.preference import PreferenceBatches
from lmforge.finetune.lora import LoRALinear
from lmforge.model import GPT
from lmforge.recipes import dpo
from lmforge.recipes.common import eval_rows, load_base, set_trainable
from lmforge.recipes.config import AlignConfig
from lmforge.recipes.preference import REFERENCE_FILE, Pairs, Reference, pair_batches, pair_logps, read_pairs
from lmforge.recipes.reward import is_reward_model, pair_scores, score, score_rendered
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import list_checkpoints, read_checkpoint_state
from lmforge.train.distributed import init_distributed
from lmforge.weights import save_pretrained

ALPACA = shared("llms-from-scratch/instruction-data-with-preference.json")  # 1,100 rows, 6 with chosen == rejected
CHAT = shared("llama-factory/dpo_en_demo.json")
HH = shared("hh-rlhf/harmless-base_test.jsonl.gz")
INSTRUCTIONS = shared("llms-from-scratch/instruction-data.json")
VERDICT = shared("llms-from-scratch/the-verdict.txt")

LN2 = float(-torch.nn.functional.logsigmoid(torch.zeros(())))  # DPO's loss at logits 0, in float32
PAIR_MEASURES = {"loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "pairs"}
QUICK = ("--max-steps", "2", "--batch-size", "2", "--eval-examples", "4", "--eval-batches", "1", "--lr", "1e-3")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random "SFT" model (2 layers x 64, context 256) with a 320-id BPE, and a reward
    model of the same shape whose tokenizer is another BPE."""
    root = tmp_path_factory.mktemp("align-bases")
    tok = train_bpe([INSTRUCTIONS.read_text(encoding="utf-8")[:60_000]], 320, progress=False)
    other = train_bpe([VERDICT.read_text(encoding="utf-8")], 300, progress=False)
    torch.manual_seed(0)
    config = Config.from_name("nano", vocab_size=tok.vocab_size, context_length=256, n_layer=2, n_head=4, n_kv_head=2,
                              n_embd=64, mlp_hidden=128)
    out = {"sft": save_pretrained(GPT(config), root / "sft", tokenizer=tok)}
    out["other-rm"] = save_pretrained(GPT(config.replace(vocab_size=other.vocab_size, labels=["reward"])), root / "other-rm",
                                      tokenizer=other)
    return out


def cli(*args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lmforge ARGS` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_ok(*args: object) -> tuple[str, str]:
    code, out, err = cli(*args)
    assert code == 0, err
    return out, err


def refused(*args: object) -> str:
    """The one error line of a command that must refuse (exit 2)."""
    code, _, err = cli(*args)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lmforge: error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def responses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "responses.jsonl").read_text().splitlines() if line]


def train_records(run: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if r.get("split") == split]


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint's model folder (full weights, or a LoRA run's adapter)."""
    folder = list_checkpoints(run)[-1] / "model"
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    assert out, f"no weights in {folder}"
    return out


def alpaca_subset(path: Path, rows: int = 100) -> Path:
    """The first `rows` rows of the book's preference file (split 85/10/5 in order, as the whole)."""
    path.write_text(json.dumps(json.loads(ALPACA.read_text(encoding="utf-8"))[:rows], indent=1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reward_model(bases, tmp_path_factory) -> tuple[Path, str, str]:
    """`lmforge align reward` on the book's pairs: (run folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    printed, said = run_ok("align", "reward", "--base", bases["sft"], "--data", ALPACA, *QUICK, "--out", out)
    return out, printed, said


# --- each command end to end ----------------------------------------------------------------


def test_reward_model_end_to_end_and_scoring(reward_model):
    out, printed, said = reward_model
    m = metrics(out)
    assert set(m) == {"task", "base", "data", "template", "margin", "center_rewards", "trainable", "steps", "skipped_steps",
                      "dropped_rows", "truncated_pairs", "splits"}  # no held-out answers: a reward model does not answer
    assert (m["task"], m["template"], m["steps"], m["dropped_rows"]) == ("reward", "alpaca", 2, 6)
    assert "left out 6 rows (chosen equals rejected: 122, 226, 400, 566, 628, 676)" in said
    assert {s: (v["pairs"], v["evaluated"]) for s, v in m["splits"].items()} == {
        "train": (929, 4), "val": (55, 4), "test": (110, 4)}
    for split in m["splits"].values():
        for when in ("before", "after"):
            v = split[when]
            assert set(v) == PAIR_MEASURES and v["pairs"] == 4 and v["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
            assert v["margin"] == pytest.approx(v["chosen_reward"] - v["rejected_reward"], abs=1e-6)
        assert split["after"] != split["before"]  # two steps moved the scores
    assert not (out / "responses.jsonl").exists()
    model = lmforge.load(out)
    assert is_reward_model(model) and model.tokenizer.chat_template == "alpaca"
    assert f'try:       lmforge reward --model {out} --prompt "Say hello." --response "Hello!" --response "No."' in printed

    prompt, answers = "Name a primary color.", ["Red.", "Figure it out yourself, it is not hard at all.", "Blue"]
    args = ["reward", "--model", out, "--prompt", prompt, "--device", "cpu"] + [a for r in answers for a in ("--response", r)]
    lines = run_ok(*args)[0].splitlines()
    expected = score(model, prompt, answers)
    assert lines == [f"{value:+.4f}\t{text}" for value, text in zip(expected, answers)]
    assert len(set(expected)) == 3
    # a response's score does not depend on what it was batched (padded) with
    for value, text in zip(expected, answers):
        assert score(model, prompt, [text])[0] == pytest.approx(value, abs=1e-5)
    # training scored a pair where `lmforge reward` scores a response: at the <|endoftext|> after it
    tok, context = model.tokenizer, model.config.context_length
    rows = [t for t in read_pairs(str(ALPACA), "auto", lambda _: None).texts["test"]
            if len(tok.encode(t[0])) + max(len(tok.encode(t[1])), len(tok.encode(t[2]))) + 1 <= context][:6]  # uncut
    pairs = PreferenceBatches(rows, tok, batch_size=6, drop_last=False, max_length=context - 1)  # as the run cut them
    assert pairs.truncated == 0
    batch = next(pairs.iter_eval(6))
    with torch.no_grad():
        trained = pair_scores(model.eval(), batch, batch["labels"])
    for k in (0, 1):  # chosen, rejected
        scored = score_rendered(model, [r[0] for r in rows], [r[1 + k] for r in rows])
        torch.testing.assert_close(trained[:, k], torch.tensor(scored), rtol=0, atol=1e-5)


DPO_FILES = {
    # file, extra flags, template, dropped rows, pairs per split, held-out prompts measured
    "alpaca": (ALPACA, (), "alpaca", 6, {"train": 929, "val": 55, "test": 110}, 4),
    # the chat test prompts are 1,000+ tokens but for a few: 3 held-out prompts include one that fits the context
    "chat": (CHAT, ("--max-length", "128", "--eval-examples", "3"), "chat", 0, {"train": 255, "val": 15, "test": 30}, 3),
    "hh": (HH, ("--max-length", "128"), "dialogue", 8, {"train": 1958, "val": 116, "test": 230}, 4),
}


@pytest.mark.parametrize("shape", list(DPO_FILES))
def test_dpo_end_to_end(bases, tmp_path, shape):
    data, extra, template, dropped, sizes, held = DPO_FILES[shape]
    out = tmp_path / "dpo"
    printed, said = run_ok("align", "dpo", "--base", bases["sft"], "--data", data, *QUICK, *extra, "--out", out)
    m = metrics(out)
    assert set(m) == {"task", "base", "data", "template", "logps", "beta", "loss", "label_smoothing", "precompute_ref", "rpo_alpha",
                      "trainable", "steps", "skipped_steps", "dropped_rows", "truncated_pairs", "splits", "held_out"}
    assert (m["task"], m["template"], m["steps"], m["dropped_rows"]) == ("dpo", template, 2, dropped)
    assert (m["beta"], m["loss"], m["label_smoothing"], m["logps"]) == (0.1, "sigmoid", 0.0, "sum")
    assert {s: v["pairs"] for s, v in m["splits"].items()} == sizes
    assert all(v["evaluated"] == held for v in m["splits"].values())
    for name, split in m["splits"].items():
        # at step 0 the policy is the reference: every implicit reward is 0, the loss ln 2
        assert split["before"] == {"loss": LN2, "accuracy": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0,
                                   "pairs": held}, name
        assert set(split["after"]) == PAIR_MEASURES and split["after"]["loss"] != LN2
        assert split["after"]["chosen_reward"] != 0.0 and split["after"]["rejected_reward"] != 0.0
    before, after = m["held_out"]["before"], m["held_out"]["after"]
    assert set(before) == set(after) == {"sft_loss", "response_tokens", "ends_with_eot", "responses", "kl_to_reference"}
    assert before["kl_to_reference"] == 0.0 and math.isfinite(after["kl_to_reference"])
    assert after["sft_loss"] != before["sft_loss"]
    assert "before: train accuracy 0.000 margin 0.000, val accuracy 0.000 margin 0.000, test accuracy 0.000 margin 0.000" in said
    assert printed.startswith("trained 2 steps\n") and f"responses: {out / 'responses.jsonl'}" in printed
    # responses.jsonl: every held-out prompt, its pair, and the policy's greedy answer before and after
    pairs = read_pairs(str(data), "auto", lambda _: None)
    test = pairs.texts["test"]
    rows = responses(out)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [test[i] for i in eval_rows(len(test), held)]
    assert all(set(r) == {"prompt", "chosen", "rejected", "before", "after"} for r in rows)
    answered = [r for r in rows if r["before"] is not None]
    assert len(answered) == before["responses"] == after["responses"] >= 1
    assert all(isinstance(r["after"], str) for r in answered)
    # training changed the weights; the tokenizer saved with them names the template the policy learned
    tuned, base = lmforge.load(out).state_dict(), lmforge.load(bases["sft"]).state_dict()
    assert tuned.keys() == base.keys() and any(not torch.equal(tuned[k], base[k]) for k in base)
    assert lmforge.load(out).tokenizer.chat_template == template


def test_orpo_with_lora_end_to_end(bases, tmp_path):
    out = tmp_path / "orpo"
    run_ok("align", "orpo", "--base", bases["sft"], "--data", ALPACA, *QUICK, "--lr", "3e-3", "--lora-r", "4", "--out", out)
    m = metrics(out)
    assert (m["task"], m["lambda"], m["steps"], m["dropped_rows"]) == ("orpo", 0.1, 2, 6)
    assert m["trainable"]["how"] == "LoRA r=4 alpha=16 on q,k,v,o" and m["trainable"]["parameters"] < m["trainable"]["total"]
    assert {s: v["pairs"] for s, v in m["splits"].items()} == {"train": 929, "val": 55, "test": 110}
    for split in m["splits"].values():
        for when in ("before", "after"):
            v = split[when]
            # the rewards are lambda x the mean log-prob, the loss the chosen NLL (-10 x the chosen reward) plus
            # lambda x the odds-ratio term, which is positive
            assert v["chosen_reward"] < 0 and v["rejected_reward"] < 0
            assert 0 < v["loss"] + v["chosen_reward"] / 0.1 < 0.1 * 50
        assert split["after"]["loss"] != split["before"]["loss"]
    held = m["held_out"]
    assert held["before"]["kl_to_reference"] == 0.0 and math.isfinite(held["after"]["kl_to_reference"])
    assert held["after"]["sft_loss"] != held["before"]["sft_loss"]
    rows = responses(out)
    assert len(rows) == 4 and all(isinstance(r["before"], str) and isinstance(r["after"], str) for r in rows)
    # the checkpoint is the adapter; the base stays as it was, the adapters learned
    model_dir = list_checkpoints(out)[-1] / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["adapter.safetensors", "adapter_config.json", "tokenizer.json"]
    tuned, base = lmforge.load(out), lmforge.load(bases["sft"]).state_dict()
    assert any(isinstance(layer, LoRALinear) for layer in tuned.modules())
    for name, value in tuned.state_dict().items():
        if "lora_" in name:
            assert name.endswith("lora_a") or value.abs().max() > 0, name  # lora_b starts at 0
        else:
            assert torch.equal(value, base[name]), name


def test_iterative_dpo_two_rounds_ranked_by_a_trained_reward_model(bases, reward_model, tmp_path):
    rm, prompt_file = reward_model[0], alpaca_subset(tmp_path / "prompts.json", 120)  # 102 training prompts per round
    out = tmp_path / "online"
    printed, said = run_ok("align", "iterative-dpo", "--base", bases["sft"], "--reward", rm, "--prompts", prompt_file,
                           "--rounds", "2", "--rollout-tokens", "8", *QUICK, "--out", out)
    m = metrics(out)
    assert (m["task"], m["base"], m["reward"], m["prompts"], m["beta"]) == ("iterative-dpo", str(bases["sft"]), str(rm),
                                                                            str(prompt_file), 0.1)
    assert [r["round"] for r in m["rounds"]] == [1, 2]
    judge = lmforge.load(rm)
    train_prompts = {t[0] for t in read_pairs(str(prompt_file), "auto", lambda _: None).texts["train"]}
    assert "round 1: sampling 2 responses to each of 102 prompts and ranking them" in said
    start = responses(out / "round-1")
    prompts, start = [r["prompt"] for r in start], [r["before"] for r in start]  # the starting model's greedy answers
    sampled = []
    for k, summary in enumerate(m["rounds"], start=1):
        assert set(summary) == {"round", "pairs", "win_rate", "reward", "start_reward", "response_tokens", "kl_to_reference",
                                "sft_loss", "test_accuracy", "test_margin"}
        pairs = json.loads((out / f"pairs-{k}.jsonl").read_text())
        sampled.append(pairs)
        assert summary["pairs"] == len(pairs) > 0 and f"round {k}/2: DPO on {len(pairs)} sampled pairs" in said
        assert all(p in train_prompts and better != worse for p, better, worse in pairs)
        # the reward model put the better response first
        better = score_rendered(judge, [p for p, _, _ in pairs], [b for _, b, _ in pairs])
        worse = score_rendered(judge, [p for p, _, _ in pairs], [w for _, _, w in pairs])
        assert all(b > w for b, w in zip(better, worse))
        # each round is a DPO run from the previous round's policy, which is also its reference
        round_metrics = metrics(out / f"round-{k}")
        assert round_metrics["task"] == "iterative-dpo" and round_metrics["steps"] == 2
        assert round_metrics["base"] == (str(bases["sft"]) if k == 1 else str(out / "round-1"))
        assert round_metrics["splits"]["train"]["pairs"] == len(pairs)
        assert round_metrics["splits"]["test"]["before"]["loss"] == LN2
        assert summary["test_accuracy"] == round_metrics["splits"]["test"]["after"]["accuracy"]
        assert summary["kl_to_reference"] == round_metrics["held_out"]["after"]["kl_to_reference"]
        # the win rate is the round's greedy answers against the starting model's, by the reward model
        after = [r["after"] for r in responses(out / f"round-{k}")]
        ours, theirs = score_rendered(judge, prompts, after), score_rendered(judge, prompts, start)
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs))
        assert summary["win_rate"] == pytest.approx(wins / len(ours))
        assert summary["reward"] == pytest.approx(sum(ours) / len(ours), abs=1e-6)
        assert summary["start_reward"] == pytest.approx(sum(theirs) / len(theirs), abs=1e-6)
    assert sampled[0] != sampled[1]  # round 2 sampled from round 1's policy, with its own seed
    assert f"round 2/2: DPO on {len(sampled[1])} sampled pairs, reference {out / 'round-1'}" in said
    assert printed.startswith("round 1: ") and f"model:     {list_checkpoints(out / 'round-2')[-1]}" in printed
    # --resume of a finished run reads every round's results (redoing none) and judges them the same
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in ("metrics.json", "run.json", ".lock")}
    printed_again, said_again = run_ok("align", "iterative-dpo", "--base", bases["sft"], "--reward", rm, "--prompts", prompt_file,
                                       "--rounds", "2", "--rollout-tokens", "8", *QUICK, "--out", out, "--resume")
    assert "round 1/2: finished, reading its results" in said_again and "round 2/2: finished" in said_again
    assert metrics(out)["rounds"] == m["rounds"] and printed_again.splitlines()[:2] == printed.splitlines()[:2]
    assert {p: p.read_bytes() for p in files} == files  # nothing sampled, trained or answered again


# --- batch 1 x accumulation 8 == batch 8 x accumulation 1 -----------------------------------------


@pytest.mark.parametrize("command, extra", [("dpo", ()), ("orpo", ()), ("reward", ()), ("dpo", ("--lora-r", "4"))],
                         ids=["dpo", "orpo", "reward", "dpo-lora"])
def test_accumulation_gives_the_same_update_as_one_big_batch(bases, tmp_path, command, extra):
    """trl's invariant: 8 micro-batches of one pair accumulate to the gradient of one batch of 8.
    Both draw the same 8 pairs in step 0 (epoch 0's shuffle, sliced by 1 or by 8); each pair's
    loss weighs 1/8 either way, whatever its length and the padding around it."""
    n, seed = len(read_pairs(str(ALPACA), "auto", lambda _: None).texts["train"]), AlignConfig().seed
    one, eight = EpochSampler(n, 1, seed), EpochSampler(n, 8, seed)
    assert [one.indices(k)[0] for k in range(8)] == eight.indices(0)
    runs = {}
    for batch, accum in ((1, 8), (8, 1)):
        out = tmp_path / f"b{batch}"
        run_ok("align", command, "--base", bases["sft"], "--data", ALPACA, "--max-steps", "1", "--batch-size", batch,
               "--grad-accum", accum, "--lr", "1e-4", "--eval-examples", "1", "--eval-batches", "1", "--max-length", "192",
               *extra, "--out", out)
        runs[batch] = (train_records(out), final_tensors(out))
    (log1, w1), (log8, w8) = runs[1], runs[8]
    assert len(log1) == len(log8) == 1
    assert log1[0]["loss"] == pytest.approx(log8[0]["loss"], rel=1e-6)
    assert log1[0]["grad_norm"] == pytest.approx(log8[0]["grad_norm"], rel=1e-5)  # the same gradient, not 8x it
    assert w1.keys() == w8.keys()
    base = lmforge.load(bases["sft"]).state_dict()
    if extra:  # an adapter: lora_b starts at 0
        moved = max(float(w1[k].abs().max()) for k in w1 if k.endswith("lora_b"))
    else:
        moved = max(float((w1[k] - base[k]).abs().max()) for k in w1 if k in base)
    assert moved > 5e-5  # one AdamW step of lr 1e-4 moved the weights...
    for k in w1:  # ...and by the same amount in both runs
        torch.testing.assert_close(w1[k], w8[k], rtol=0, atol=2e-6, msg=k)  # 2% of a step: AdamW's g / (|g| + eps)


# --- exact resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [("--precompute-ref",), ("--lora-r", "4", "--lr", "3e-3")], ids=["precompute-ref", "lora"])
def test_dpo_resumes_exactly_and_reuses_the_reference_cache(bases, tmp_path, extra):
    data = alpaca_subset(tmp_path / "pairs.json")
    base = shutil.copytree(bases["sft"], tmp_path / "base")
    common = ["align", "dpo", "--base", base, "--data", data, "--max-steps", "4", "--batch-size", "2", "--save-every", "2",
              "--eval-examples", "2", "--eval-batches", "1", "--max-length", "128", "--lr", "1e-3", *extra]
    precompute = "--precompute-ref" in extra
    _, said = run_ok(*common, "--out", tmp_path / "whole")
    assert ("reference log-probs: computing them once for 100 pairs" in said) == precompute
    run_ok(*common, "--out", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000004")
    _, said = run_ok(*common, "--out", tmp_path / "cut", "--resume")
    assert "resumed from" in said and "step-00000002 at step 2" in said
    cache = tmp_path / "cut" / REFERENCE_FILE
    assert (f"reference log-probs: reusing {cache}" in said) == precompute and "computing them once" not in said
    assert cache.is_file() == precompute
    whole, resumed = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "cut")
    assert whole.keys() == resumed.keys() and any("lora_" in k for k in whole) == (not precompute)
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    if not precompute:
        return
    # the cache is keyed by what it depends on: another data file, or other base weights, compute it again
    rows = json.loads(data.read_text(encoding="utf-8"))
    rows[0]["chosen"] += " Indeed."
    data.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    _, said = run_ok(*common, "--out", tmp_path / "cut", "--resume")
    assert "reference log-probs: computing them once" in said and "reusing" not in said
    _, said = run_ok(*common, "--out", tmp_path / "cut", "--resume")
    assert f"reference log-probs: reusing {cache}" in said  # the new data's cache replaced the old one
    torch.manual_seed(1)
    model = lmforge.load(base)
    save_pretrained(GPT(model.config), base, tokenizer=model.tokenizer)  # other weights, same shape, same place
    _, said = run_ok(*common, "--out", tmp_path / "cut", "--resume")
    assert "reference log-probs: computing them once" in said and "reusing" not in said


# --- the reference's three forms ---------------------------------------------------------------------


def test_reference_forms_agree(bases, tmp_path):
    cfg = AlignConfig(base=str(bases["sft"]), data=str(ALPACA), out=str(tmp_path / "run"), max_steps=1, batch_size=4,
                      lora_r=4, max_length=128)
    policy = load_base(cfg)
    set_trainable(policy, cfg, lambda _: None)
    torch.manual_seed(0)
    for layer in policy.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_b, std=0.2)  # adapters that change what the policy says
    policy.eval()
    full = read_pairs(str(ALPACA), "auto", lambda _: None)
    texts = {"train": full.texts["train"][:12], "val": full.texts["val"][:4], "test": full.texts["test"][:4]}
    pairs = Pairs(full.data, full.template, {s: full.items[s][: len(t)] for s, t in texts.items()}, texts)
    batches = pair_batches(pairs, policy.tokenizer, cfg, init_distributed(), 128, lambda _: None)
    adapters_off, copy = Reference(policy), Reference(policy, lmforge.load(bases["sft"]))
    samples = [batches["train"].batch(0), batches["train"].batch(1), next(batches["val"].iter_eval(4)),
               next(batches["test"].iter_eval(3))]
    for b in samples:
        x, y = {k: b[k] for k in ("input_ids", "attention_mask", "index")}, b["labels"]
        off, frozen = adapters_off.logps(x, y), copy.logps(x, y)
        torch.testing.assert_close(off.sum, frozen.sum, rtol=0, atol=1e-5)
        assert torch.equal(off.count, frozen.count)
        with torch.no_grad():
            own = pair_logps(policy, x, y)
        assert (own.sum - off.sum).abs().min() > 1e-3  # the adapters are on again after the reference's block
    with pytest.raises(lmforge.LmforgeError, match="needs a frozen model unless the policy trains LoRA"):
        Reference(lmforge.load(bases["sft"]))

    # log-probs precomputed once give the same DPO loss as the live reference, on every split's batches
    said: list[str] = []
    cached = Reference(policy, lmforge.load(bases["sft"]))
    key = {"test": 1}
    cached.precompute(batches, key, tmp_path, said.append)
    assert said == ["reference log-probs: computing them once for 20 pairs"] and cached.frozen is None
    live_loss, cached_loss = dpo.objective(cfg)(policy, copy), dpo.objective(cfg)(policy, cached)
    for b in samples:
        x, y = {k: b[k] for k in ("input_ids", "attention_mask", "index")}, b["labels"]
        with torch.no_grad():
            a, c = live_loss(policy, x, y), cached_loss(policy, x, y)
        torch.testing.assert_close(c.loss, a.loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(c.chosen_rewards, a.chosen_rewards, rtol=0, atol=1e-6)
        assert float(a.loss.mean()) != pytest.approx(LN2, abs=1e-4)  # the policy is not the reference
    # --rpo-alpha adds alpha x the chosen response's NLL per token, pair by pair
    rpo = dpo.objective(dataclasses.replace(cfg, rpo_alpha=0.5))(policy, copy)
    for b in samples:
        x, y = {k: b[k] for k in ("input_ids", "attention_mask", "index")}, b["labels"]
        with torch.no_grad():
            plain, with_nll, own = live_loss(policy, x, y), rpo(policy, x, y), pair_logps(policy, x, y)
        nll = -own.sum[:, 0] / own.count[:, 0]
        assert float(nll.min()) > 0
        torch.testing.assert_close(with_nll.loss, plain.loss + 0.5 * nll, rtol=0, atol=1e-5)
        assert torch.equal(with_nll.chosen_rewards, plain.chosen_rewards)  # the rewards are DPO's alone
    # written once, read back only for the same key
    cached.write_cache(tmp_path)
    again = Reference(policy)
    said.clear()
    again.precompute(batches, key, tmp_path, said.append)
    assert said == [f"reference log-probs: reusing {tmp_path / REFERENCE_FILE}"]
    assert torch.equal(again.cache["sum"], cached.cache["sum"])
    said.clear()
    Reference(policy).precompute(batches, {"test": 2}, tmp_path, said.append)
    assert said == ["reference log-probs: computing them once for 20 pairs"]


# --- a non-finite step -------------------------------------------------------------------------------


def test_a_non_finite_dpo_step_is_skipped_and_counted(bases, tmp_path, monkeypatch):
    real, calls = dpo.dpo_loss, {"n": 0}

    def nan_on_the_second_training_step(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps only (the measures run without gradients)
            calls["n"] += 1
            if calls["n"] == 2:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(dpo, "dpo_loss", nan_on_the_second_training_step)
    out = tmp_path / "dpo"
    printed, said = run_ok("align", "dpo", "--base", bases["sft"], "--data", ALPACA, "--max-steps", "3", "--batch-size", "2",
                           "--eval-examples", "2", "--eval-batches", "1", "--log-every", "1", "--lr", "1e-3", "--out", out)
    assert calls["n"] == 4  # 3 steps and the skipped one
    assert "step 1: non-finite loss or gradient, step skipped (1 in a row)" in said
    assert printed.startswith("trained 3 steps (1 step skipped: non-finite loss)\n")
    assert (metrics(out)["steps"], metrics(out)["skipped_steps"]) == (3, 1)
    assert train_records(out, "skipped") == [{"step": 1, "split": "skipped", "loss": None, "grad_norm": None}]
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]
    state, _ = read_checkpoint_state(list_checkpoints(out)[-1])
    assert (state["step"], state["draws"], state["skipped_steps"]) == (3, 4, 1)  # the skipped step moved on to fresh pairs
    assert all(torch.isfinite(w).all() for w in final_tensors(out).values())
    assert all(math.isfinite(v) for s in metrics(out)["splits"].values() for v in s["after"].values())


# --- refusals ---------------------------------------------------------------------------------------


def test_refusals_name_the_culprit(bases, reward_model, tmp_path):
    rm = reward_model[0]
    common = ["--base", bases["sft"], "--max-steps", "1", "--batch-size", "2", "--eval-examples", "1"]
    online = ["align", "iterative-dpo", *common, "--rollout-tokens", "2"]
    error = refused(*online, "--prompts", ALPACA, "--reward", bases["other-rm"], "--out", tmp_path / "a")
    assert "the policy and the reward model use different tokenizers" in error and "Train the reward model from the same base" in error
    error = refused(*online, "--prompts", ALPACA, "--reward", bases["sft"], "--out", tmp_path / "b")
    assert f"--reward {bases['sft']} is not a reward model (no one-output reward head)" in error
    assert not (tmp_path / "b").exists()  # refused before anything was written
    assert "pass --reward DIR" in refused(*online, "--prompts", ALPACA, "--out", tmp_path / "c")
    error = refused(*online, "--reward", rm, "--out", tmp_path / "d")
    assert "pass --prompts FILE" in error and "--data" not in error  # the command has no --data
    error = refused(*online, "--prompts", ALPACA, "--reward", rm, "--resume", tmp_path / "nowhere", "--out", tmp_path / "h")
    assert f"pass --resume alone, not a checkpoint ({tmp_path / 'nowhere'})" in error  # each round resumes its own
    dpo_run = ["align", "dpo", *common, "--data", ALPACA]
    assert "--dpo-loss must be sigmoid or ipo, got 'foo'" in refused(*dpo_run, "--dpo-loss", "foo", "--out", tmp_path / "e")
    error = refused(*dpo_run, "--label-smoothing", "0.7", "--out", tmp_path / "f")
    assert "--label-smoothing must be in [0, 0.5)" in error and "0.7" in error
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:20]
    del rows[7]["rejected"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows), encoding="utf-8")
    error = refused("align", "dpo", *common, "--data", bad, "--out", tmp_path / "g")
    assert f"{bad}, row 7: missing key 'rejected'" in error
    assert f"--model {bases['sft']} is not a reward model" in refused("reward", "--model", bases["sft"], "--prompt", "Hi.",
                                                                       "--response", "Hello.")
    for name in "bdefgh":
        assert not (tmp_path / name).exists(), name


# --- replay: keeping what the base knew --------------------------------------------------------------


def test_replay_while_fine_tuning_and_aligning(bases, tmp_path):
    data = tmp_path / "verdict"
    run_ok("data", "prepare", "--input", VERDICT, "--tokenizer", bases["sft"], "--workers", "1", "--val-fraction", "0.1",
           "--out", data)
    _, said = run_ok("finetune", "instruct", "--base", bases["sft"], "--data", INSTRUCTIONS, *QUICK, "--replay", data,
                     "--replay-fraction", "0.2", "--out", tmp_path / "sft")
    assert f"from {data} per micro-batch, 20% of the loss" in said
    held = metrics(tmp_path / "sft")["held_out"]
    assert held["before"]["pretraining_loss"] != held["after"]["pretraining_loss"]
    assert all(0 < held[w]["pretraining_loss"] < 10 for w in ("before", "after"))

    dpo_args = ["align", "dpo", "--base", bases["sft"], "--data", ALPACA, *QUICK]
    _, said = run_ok(*dpo_args, "--replay", data, "--out", tmp_path / "mixed")
    assert f"from {data} per micro-batch, 10% of the loss" in said
    held = metrics(tmp_path / "mixed")["held_out"]
    assert {"pretraining_loss", "kl_to_reference", "sft_loss"} <= set(held["before"]) & set(held["after"])
    _, said = run_ok(*dpo_args, "--replay", data, "--replay-fraction", "0", "--out", tmp_path / "measured")
    assert "replay:" not in said  # nothing mixed in...
    held = metrics(tmp_path / "measured")["held_out"]
    assert all(math.isfinite(held[w]["pretraining_loss"]) for w in ("before", "after"))  # ...only measured
    run_ok(*dpo_args, "--out", tmp_path / "plain")
    assert "pretraining_loss" not in metrics(tmp_path / "plain")["held_out"]["after"]
    plain, measured, mixed = (final_tensors(tmp_path / n) for n in ("plain", "measured", "mixed"))
    assert all(torch.equal(plain[k], measured[k]) for k in plain)  # --replay-fraction 0 trains exactly as no --replay
    assert any(not torch.equal(plain[k], mixed[k]) for k in plain)  # the replayed windows changed the update
    assert metrics(tmp_path / "plain")["splits"] == metrics(tmp_path / "measured")["splits"]
