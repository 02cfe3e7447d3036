"""`lmforge convert` end to end: llama2.c -> ours -> Hugging Face -> ours, logits unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import shared

from lmforge.loading import load


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, timeout=300)


def test_convert_chain_keeps_logits_and_greedy_output(tmp_path):
    bin_file = shared("weights/stories260K/stories260K.bin")
    steps = [
        ("--from-llama2c", str(bin_file), "--tokenizer", str(shared("weights/stories260K/tok512.bin")), "--out", str(tmp_path / "ours")),
        ("--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")),
        ("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")),
    ]
    for args in steps:
        proc = lmforge("convert", *args)
        assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = load(bin_file)(ids)
    for folder in ("ours", "hf", "back"):
        assert torch.equal(load(tmp_path / folder)(ids), reference), folder
    expected = json.loads(shared("weights/stories260K/expected_greedy.json").read_text())
    proc = lmforge("generate", "--model", str(tmp_path / "ours"), "--prompt-ids", "1", "--max-new-tokens", "200", "--temperature", "0", "--ids")
    assert json.loads(proc.stdout) == expected["generated_ids"]
    proc = lmforge("generate", "--model", str(tmp_path / "ours"), "--max-new-tokens", "200", "--temperature", "0")
    assert proc.stdout.decode() == expected["text"] + "\n"


def test_convert_refuses_a_non_empty_output_and_bad_sources(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = lmforge("convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not empty" in proc.stderr.decode()
    proc = lmforge("convert", "--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr.decode()
