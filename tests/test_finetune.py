"""Fine-tuning recipes end to end on tiny models: classification (head on the last real
token), instruction tuning with masked prompts, LoRA and QLoRA runs, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import shared
from safetensors.torch import load_file

import lmforge
from lmforge.cli import main
from lmforge.config import Config
from lmforge.data.instruct import book_split, read_instructions
from lmforge.finetune.lora import LoRALinear
from lmforge.finetune.nf4 import Linear4bit
from lmforge.model import GPT
from lmforge.tokenizer import train_bpe
from lmforge.weights import save_pretrained

SMS = shared("sms_spam/SMSSpamCollection")
INSTRUCTIONS = shared("llms-from-scratch/instruction-data.json")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random base of each family, with a small BPE trained on the SMS texts."""
    root = tmp_path_factory.mktemp("bases")
    tok = train_bpe([SMS.read_text(encoding="utf-8")[:60_000]], 320, progress=False)
    out = {}
    for family, preset in (("llama", "nano"), ("gpt2", "small")):
        torch.manual_seed(0)
        config = Config.from_name(preset, vocab_size=tok.vocab_size, context_length=256, n_layer=2, n_head=4, n_embd=64,
                                  mlp_hidden=128, **({"n_kv_head": 2} if family == "llama" else {}))
        out[family] = save_pretrained(GPT(config), root / family, tokenizer=tok)
    return out


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> str:
    return run_cli_both(capsys, *args)[0]


def run_cli_both(capsys: pytest.CaptureFixture, *args: str) -> tuple[str, str]:
    """(stdout, stderr) of a command that must succeed."""
    code = main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


# --- the classification head -----------------------------------------------------------


@pytest.mark.parametrize("preset", ["nano", "small"])
def test_head_reads_the_last_real_token_with_either_padding(preset):
    torch.manual_seed(0)
    model = GPT(Config.from_name(preset, vocab_size=50, context_length=16, n_layer=2, labels=["a", "b", "c"])).eval()
    rows = [torch.randint(0, 50, (n,)) for n in (9, 4, 1)]
    alone = torch.cat([model(r[None]) for r in rows])
    for side in ("right", "left"):
        ids = torch.full((3, 9), 7)
        mask = torch.zeros(3, 9, dtype=torch.long)
        for b, r in enumerate(rows):
            where = slice(0, len(r)) if side == "right" else slice(9 - len(r), 9)
            ids[b, where], mask[b, where] = r, 1
        torch.testing.assert_close(model(ids, attention_mask=mask), alone, rtol=0, atol=1e-5)
        # the pad id's value must not matter: the mask alone says what is padding
        ids[mask == 0] = 3
        torch.testing.assert_close(model(ids, attention_mask=mask), alone, rtol=0, atol=1e-5)


def test_left_padding_keeps_gradients_finite():
    torch.manual_seed(0)
    model = GPT(Config.from_name("nano", vocab_size=50, context_length=16, n_layer=1, labels=["a", "b"]))
    mask = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])
    model(torch.randint(0, 50, (2, 4)), attention_mask=mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_classify_end_to_end(bases, tmp_path, capsys):
    out = tmp_path / "spam"
    printed, said = run_cli_both(capsys, "finetune", "classify", "--base", str(bases["llama"]), "--data", str(SMS),
                                 "--max-steps", "6", "--batch-size", "8", "--lr", "1e-3", "--eval-every", "3", "--out", str(out))
    assert "test  accuracy" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["ham", "spam"] and metrics["steps"] == 6
    assert {s: metrics["splits"][s]["examples"] for s in ("train", "val", "test")} == {"train": 1045, "val": 149, "test": 300}
    # before and after read at most --eval-examples (200) of each split, and say so
    assert {s: metrics["splits"][s]["evaluated"] for s in ("train", "val", "test")} == {"train": 200, "val": 149, "test": 200}
    for when in ("before", "after"):
        assert (f"{when} training: measuring the loss and accuracy on 200 of 1,045 train examples, 149 val examples, 200 of 300 "
                "test examples (at most 200 per split: --eval-examples N changes it, 0 measures every example)") in said
    assert printed.startswith("trained 6 steps\n") and "(200 of 1,045 examples)" in printed and "(149 examples)" in printed
    # a classifier's validation loss is a cross-entropy over labels, not over a vocabulary: no perplexity
    assert "step 6: val loss" in said and "perplexity" not in said
    for split in metrics["splits"].values():
        for when in ("before", "after"):
            assert 0.0 <= split[when]["accuracy"] <= 1.0 and split[when]["loss"] > 0
    assert metrics["splits"]["train"]["after"]["loss"] < metrics["splits"]["train"]["before"]["loss"]
    model = lmforge.load(out)
    assert model.config.labels == ["ham", "spam"] and model.score is not None
    lines = run_cli(capsys, "classify", "--model", str(out), "WIN a prize now", "see you at 6").splitlines()
    assert [line.split("\t")[0] in ("ham", "spam") for line in lines] == [True, True]
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in lines)
    assert (out / "split" / "test.jsonl").is_file() and (out / "loss.png").is_file()


def test_last_block_training_changes_only_the_last_block_norm_and_head(bases, tmp_path, capsys):
    out = tmp_path / "last"
    run_cli(capsys, "finetune", "classify", "--base", str(bases["gpt2"]), "--data", str(SMS), "--max-steps", "3",
            "--batch-size", "4", "--lr", "1e-2", "--trainable", "last-1", "--out", str(out))
    base, tuned = lmforge.load(bases["gpt2"]).state_dict(), lmforge.load(out).state_dict()
    for name, before in base.items():
        learns = name.startswith(("blocks.1.", "norm_f."))  # the last of 2 blocks and the final norm
        assert torch.equal(before, tuned[name]) == (not learns), name
    assert "score.weight" in tuned


# --- instruction tuning ------------------------------------------------------------------


def test_instruct_end_to_end_with_lora(bases, tmp_path, capsys):
    out = tmp_path / "instruct"
    printed, said = run_cli_both(capsys, "finetune", "instruct", "--base", str(bases["gpt2"]), "--data", str(INSTRUCTIONS),
                                 "--max-steps", "4", "--batch-size", "4", "--lr", "3e-3", "--lora-r", "4", "--lora-targets",
                                 "all-linear", "--eval-batches", "2", "--out", str(out))
    assert "train response loss" in printed and "(200 of 935 examples)" in printed and "(110 examples)" in printed
    assert ("before training: measuring the response loss on 200 of 935 train examples, 55 val examples, "
            "110 test examples (at most 200 per split") in said
    assert f"writing greedy answers for 110 test examples to {out / 'responses.jsonl'}\n" in said
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["template"] == "alpaca" and metrics["steps"] == 4
    assert {s: v["evaluated"] for s, v in metrics["splits"].items()} == {"train": 200, "val": 55, "test": 110}
    assert metrics["splits"]["val"]["after"]["loss"] < metrics["splits"]["val"]["before"]["loss"]
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    test_items = book_split(read_instructions(INSTRUCTIONS))["test"]
    assert [r["instruction"] for r in responses] == [it["instruction"] for it in test_items]
    # the checkpoint holds the adapter only; lmforge.load puts it on its base, with the chat template
    model_dir = sorted((out / "checkpoints").glob("step-*"))[-1] / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["adapter.safetensors", "adapter_config.json", "tokenizer.json"]
    model = lmforge.load(out)
    assert any(isinstance(m, LoRALinear) for m in model.modules()) and model.tokenizer.chat_template == "alpaca"
    # merged into a plain model folder, the logits stay
    merged = tmp_path / "merged"
    run_cli(capsys, "lora", "merge", "--adapter", str(model_dir), "--out", str(merged))
    x = torch.randint(0, 300, (2, 20))
    torch.testing.assert_close(lmforge.load(merged)(x), model(x), rtol=0, atol=1e-5)
    reply = run_cli(capsys, "generate", "--model", str(out), "--chat", "--prompt", "Name a color.", "--temperature", "0",
                    "--max-new-tokens", "5")
    assert "### Response" not in reply


def test_eval_examples_bounds_the_measures_and_the_answers(bases, tmp_path, capsys):
    out = tmp_path / "few"
    printed, said = run_cli_both(capsys, "finetune", "instruct", "--base", str(bases["llama"]), "--data", str(INSTRUCTIONS),
                                 "--max-steps", "1", "--batch-size", "2", "--eval-batches", "1", "--eval-examples", "7",
                                 "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert {s: (v["examples"], v["evaluated"]) for s, v in metrics["splits"].items()} == {
        "train": (935, 7), "val": (55, 7), "test": (110, 7)}
    assert "on 7 of 935 train examples, 7 of 55 val examples, 7 of 110 test examples (at most 7 per split" in said
    assert "writing greedy answers for 7 of 110 test examples (--eval-examples N changes how many; 0 answers every one)" in said
    test_items = book_split(read_instructions(INSTRUCTIONS))["test"]
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in responses] == [test_items[i * 110 // 7]["instruction"] for i in range(7)]  # spread out
    assert printed.startswith("trained 1 step\n") and "(7 of 935 examples)" in printed


def test_eval_rows_are_all_or_spread_evenly():
    from lmforge.recipes.common import eval_rows

    assert eval_rows(5, 0) == eval_rows(5, 5) == eval_rows(5, 200) == [0, 1, 2, 3, 4]
    assert eval_rows(10, 3) == [0, 3, 6] and eval_rows(935, 200)[-1] == 930 and len(set(eval_rows(935, 200))) == 200


def test_finetune_help_describes_fine_tuning(capsys):
    for task in ("classify", "instruct"):
        with pytest.raises(SystemExit):
            main(["finetune", task, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "windows" not in text and "max_tokens" not in text and "--max-tokens" not in text
        assert "--batch-size SIZE examples per micro-batch per process" in text
        assert "--max-steps STEPS optimizer steps; 0: --epochs passes over the training split" in text
        assert "--eval-examples EXAMPLES examples per split measured before and after training" in text
        assert ("--sample-prompts" in text) == (task == "instruct")  # a classifier does not train the head that continues text


def _adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(sorted((run / "checkpoints").glob("step-*"))[-1] / "model" / "adapter.safetensors")


def test_qlora_run_resumes_exactly(bases, tmp_path, capsys):
    common = ["finetune", "classify", "--base", str(bases["llama"]), "--data", str(SMS), "--max-steps", "4", "--batch-size", "4",
              "--lr", "1e-3", "--lora-r", "4", "--lora-dropout", "0.1", "--quantize", "nf4", "--grad-accum", "2",
              "--save-every", "2", "--eval-every", "2", "--eval-batches", "1"]
    run_cli(capsys, *common, "--out", str(tmp_path / "whole"))
    model = lmforge.load(tmp_path / "whole")
    assert any(isinstance(m, Linear4bit) for m in model.modules())  # the adapter brings its NF4 base back
    run_cli(capsys, *common, "--max-steps", "4", "--out", str(tmp_path / "cut"))
    import shutil

    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000004")
    run_cli(capsys, *common, "--out", str(tmp_path / "cut"), "--resume")
    whole, resumed = _adapter_tensors(tmp_path / "whole"), _adapter_tensors(tmp_path / "cut")
    assert whole.keys() == resumed.keys() and "score.weight" in whole
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_bad_options_say_what_to_do(bases, tmp_path, capsys):
    assert main(["finetune", "classify", "--base", str(bases["llama"]), "--data", str(SMS), "--out", str(tmp_path)]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert main(["finetune", "classify", "--base", str(bases["llama"]), "--data", str(SMS), "--epochs", "1",
                 "--quantize", "nf4", "--out", str(tmp_path)]) == 2
    assert "--lora-r" in capsys.readouterr().err
    assert main(["finetune", "classify", "--base", str(bases["llama"]), "--data", str(SMS), "--epochs", "1",
                 "--trainable", "last-9", "--out", str(tmp_path)]) == 2
    assert "only 2 blocks" in capsys.readouterr().err
    assert main(["finetune", "instruct", "--base", str(bases["llama"]), "--data", str(INSTRUCTIONS), "--epochs", "1",
                 "--eval-examples", "-1", "--out", str(tmp_path)]) == 2
    assert "--eval-examples must be a number of examples >= 0 (0: every example), got -1" in capsys.readouterr().err
    # a time limit alone ran one step: it only stops a run early
    assert main(["finetune", "classify", "--base", str(bases["llama"]), "--data", str(SMS), "--time-limit", "60",
                 "--out", str(tmp_path)]) == 2
    assert "say how long to train: --epochs N or --max-steps N (--time-limit only stops a run early)" in capsys.readouterr().err


def test_imported_bases_fine_tune_too(tmp_path, capsys):
    """A Hugging Face GPT-2 folder (random, with GPT-2's vocabulary files) and a llama2.c
    .bin (stories260K) are bases like our own folders."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128)).save_pretrained(hf)
    shutil.copy(shared("gpt2/encoder.json"), hf / "vocab.json")
    shutil.copy(shared("gpt2/vocab.bpe"), hf / "merges.txt")
    llama2c = shared("weights/stories260K/stories260K.bin")
    shutil.copy(llama2c, tmp_path / "stories260K.bin")
    shutil.copy(shared("weights/stories260K/tok512.bin"), tmp_path / "tokenizer.bin")
    for base in (hf, tmp_path / "stories260K.bin"):
        out = tmp_path / f"spam-{base.stem}"
        run_cli(capsys, "finetune", "classify", "--base", str(base), "--data", str(SMS), "--max-steps", "2", "--batch-size", "4",
                "--lora-r", "2", "--max-length", "48", "--out", str(out))
        assert lmforge.load(out).config.labels == ["ham", "spam"]
    run_cli(capsys, "finetune", "instruct", "--base", str(hf), "--data", str(INSTRUCTIONS), "--max-steps", "2", "--batch-size", "2",
            "--eval-batches", "1", "--out", str(tmp_path / "instruct-hf"))
    assert lmforge.load(tmp_path / "instruct-hf").tokenizer.chat_template == "alpaca"


def test_chat_template_travels_with_the_tokenizer_without_changing_ids(tmp_path):
    from lmforge.tokenizer import Tokenizer

    tok = train_bpe(["hello there, general kenobi"], 270, progress=False)
    before = tok.fingerprint
    tok.chat_template = "chat"
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.chat_template == "chat" and again.fingerprint == before
    assert again.encode("hello there") == tok.encode("hello there")


def test_engine_generates_from_adapted_and_4bit_models(bases):
    """Greedy decoding through LoRA and NF4 layers equals the model's own argmax chain."""
    from lmforge.engine import Engine
    from lmforge.engine.sampling import SamplingParams
    from lmforge.finetune.lora import LoRAConfig, apply_lora
    from lmforge.finetune.nf4 import quantize_model

    model = lmforge.load(bases["llama"])
    quantize_model(model)
    apply_lora(model, LoRAConfig(r=2, targets=("all-linear",)))
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_b, std=0.5)  # adapters that change the output
    ids = [5, 17, 42]
    expected = list(ids)
    with torch.no_grad():
        for _ in range(6):
            expected.append(int(model(torch.tensor([expected]))[0, -1].argmax()))
    got = Engine(model, model.tokenizer).generate([ids], max_new_tokens=6, sampling=SamplingParams(temperature=0.0))[0].ids
    assert got == expected[3:]
