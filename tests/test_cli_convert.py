"""`lmforge convert` end to end: llama2.c -> ours -> Hugging Face -> ours, logits unchanged,
and the Hugging Face folder read by `transformers` itself: LlamaForCausalLM's logits and
greedy story, AutoTokenizer's ids and text equal to ours."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from cli_runner import run_cli
from conftest import shared
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lmforge.loading import load
from lmforge.tokenizer.llama2c import Llama2cTokenizer

STORIES = "weights/stories260K"
TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "  two leading spaces, a tab\there and a trailing space ",
    "\"I'm sorry, Mom,\" said Tom.\n\nThe end.",
    "안녕하세요, naïve café ☃ 🙂",  # not in the 512-piece vocabulary: byte fallback
    "",
]


@pytest.fixture
def lmforge(capsys):
    """`lmforge ARGS` run in this process (tests/cli_runner.py: a subprocess per run was 3 s of imports)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return run_cli(capsys, *args)

    return run


def test_convert_chain_keeps_logits_and_greedy_output(tmp_path, lmforge):
    bin_file = shared(f"{STORIES}/stories260K.bin")
    steps = [
        ("--from-llama2c", str(bin_file), "--tokenizer", str(shared(f"{STORIES}/tok512.bin")), "--out", str(tmp_path / "ours")),
        ("--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")),
        ("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")),
    ]
    outputs = []
    for args in steps:
        proc = lmforge("convert", *args)
        assert proc.returncode == 0, proc.stderr.decode()
        assert b"Warning" not in proc.stdout + proc.stderr and b"warn(" not in proc.stdout + proc.stderr  # never Python's raw warning
        outputs.append(proc.stdout.decode())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    # it names exactly the files it wrote, and says what the tokenizer cannot carry
    said = outputs[1].splitlines()
    written = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert written == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(said[0].split(": ", 1)[1].split(", ")) == written
    assert said[1].startswith("note: tokenizer.json encodes as llama2.c does") and "U+2581" in said[1]
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = load(bin_file)(ids)
    for folder in ("ours", "hf", "back"):
        assert torch.equal(load(tmp_path / folder)(ids), reference), folder
    original, back = load(bin_file).tokenizer, load(tmp_path / "back").tokenizer
    assert isinstance(back, Llama2cTokenizer)  # the tokenizer made the round trip too, encoding alike
    for text in TEXTS:
        assert back.encode(text) == original.encode(text) and back.decode(back.encode(text)) == text, text
    expected = json.loads(shared(f"{STORIES}/expected_greedy.json").read_text())
    proc = lmforge("generate", "--model", str(tmp_path / "ours"), "--prompt-ids", "1", "--max-new-tokens", "200", "--temperature", "0", "--ids")
    assert json.loads(proc.stdout) == expected["generated_ids"]
    proc = lmforge("generate", "--model", str(tmp_path / "ours"), "--max-new-tokens", "200", "--temperature", "0")
    assert proc.stdout.decode() == expected["text"] + "\n"


def test_exported_stories260k_runs_in_transformers_with_its_tokenizer(tmp_path, lmforge):
    """The whole exported folder in transformers: LlamaForCausalLM gives our logits and
    llama2.c's greedy story, and AutoTokenizer encodes and decodes as our tokenizer does."""
    proc = lmforge("convert", "--to-hf", str(shared(f"{STORIES}/stories260K.bin")), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr.decode()
    ours = load(shared(f"{STORIES}/stories260K.bin"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs) is LlamaForCausalLM
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    expected = json.loads(shared(f"{STORIES}/expected_greedy.json").read_text())
    story = expected["prompt_ids"] + expected["generated_ids"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.tensor([story])).logits, ours(torch.tensor([story])), atol=1e-5, rtol=0)
        greedy = theirs.generate(torch.tensor([expected["prompt_ids"]]), do_sample=False, max_new_tokens=200, min_new_tokens=200,
                                 attention_mask=torch.ones(1, 1, dtype=torch.long), eos_token_id=None, pad_token_id=0)
    assert greedy[0, 1:].tolist() == expected["generated_ids"]
    assert hf_tok.decode(story, skip_special_tokens=True) == expected["text"]
    for text in TEXTS + expected["text"].split("\n"):
        ids = ours.tokenizer.encode(text)
        assert hf_tok.encode(text) == ids, text
        assert hf_tok.decode(ids, skip_special_tokens=True) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (1, 2)


def test_convert_refuses_a_non_empty_output_and_bad_sources(tmp_path, lmforge):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = lmforge("convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not empty" in proc.stderr.decode()
    proc = lmforge("convert", "--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr.decode()


def test_what_cannot_be_converted_is_a_note_never_a_raw_warning(tmp_path, capsys):
    """A Hugging Face tokenizer lmforge cannot reproduce exactly: the command says so in its
    own words (note: ...), not in Python's `file:line: UserWarning` form."""
    from lmforge.cli import main

    assert main(["convert", "--to-hf", str(shared(f"{STORIES}/stories260K.bin")), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": None, "decoder": None}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(wordpiece))
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    out, err = capsys.readouterr()
    assert "note: " in out and "no exact conversion of the tokenizer" in out and "WordPiece" in out
    assert "Warning" not in out + err and "(no tokenizer found)" in out
    assert load(tmp_path / "ours").tokenizer is None
