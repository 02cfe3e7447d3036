"""`lmforge tokenizer ...` end to end, as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import shared

from lmforge.tokenizer import Tokenizer


def lmforge(*args: str, stdin: bytes = b"", check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], input=stdin, capture_output=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = out / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(shared("llms-from-scratch/the-verdict.txt").read_text(encoding="utf-8"), encoding="utf-8")
    (corpus / "b.md").write_text("대한민국은 민주공화국이다.\n" * 20, encoding="utf-8")
    (corpus / "skip.bin").write_bytes(b"\x00\x01binary")
    proc = lmforge("tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--special", "<|user|>", "--out", str(out / "tok"))
    assert b"400 ids" in proc.stdout
    return out / "tok"


def test_train_writes_a_loadable_tokenizer(trained):
    tok = Tokenizer.load(trained)
    assert tok.vocab_size == 400
    assert set(tok.special_tokens) == {"<|endoftext|>", "<|user|>"}


def test_train_refuses_existing_output(trained):
    proc = lmforge("tokenizer", "train", "--input", str(shared("llms-from-scratch/the-verdict.txt")), "--out", str(trained), check=False)
    assert proc.returncode == 2 and b"--overwrite" in proc.stderr


def test_encode_decode_via_stdin(trained):
    text = "I had always thought Jack Gisburn 대한민국 <|user|> 🙂\n"
    ids = json.loads(lmforge("tokenizer", "encode", "--tokenizer", str(trained), stdin=text.encode()).stdout)
    tok = Tokenizer.load(trained)
    assert ids == tok.encode(text)
    assert tok.special_tokens["<|user|>"] not in ids
    allowed = json.loads(lmforge("tokenizer", "encode", "--tokenizer", str(trained), "--allow-special", stdin=text.encode()).stdout)
    assert tok.special_tokens["<|user|>"] in allowed
    back = lmforge("tokenizer", "decode", "--tokenizer", str(trained), stdin=json.dumps(allowed).encode()).stdout
    assert back == text.encode()


def test_decode_split_character_replacement_and_raw_bytes(trained):
    ids = Tokenizer.load(trained).encode("🙂")
    head = json.dumps(ids[:1]).encode()
    assert "\ufffd" in lmforge("tokenizer", "decode", "--tokenizer", str(trained), stdin=head).stdout.decode()
    assert lmforge("tokenizer", "decode", "--tokenizer", str(trained), "--bytes", stdin=head).stdout == "🙂".encode()[:1]


def test_from_gpt2_and_stats(tmp_path):
    lmforge("tokenizer", "from-gpt2", "--encoder-json", str(shared("gpt2/encoder.json")), "--vocab-bpe", str(shared("gpt2/vocab.bpe")), "--out", str(tmp_path / "g"))
    ids = json.loads(lmforge("tokenizer", "encode", "--tokenizer", str(tmp_path / "g"), stdin=b"Hello, world").stdout)
    assert ids == [15496, 11, 995]
    out = lmforge("tokenizer", "stats", "--tokenizer", str(tmp_path / "g"), str(shared("llms-from-scratch/the-verdict.txt"))).stdout.decode()
    total = out.strip().splitlines()[-1].split()
    assert total[0] == "total" and total[1] == "20,479"
    assert 3.5 < float(total[3]) < 5.5  # GPT-2 on English prose: about 4.3 bytes per token


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["tokenizer", "encode", "--tokenizer", "/nonexistent"], b"x", b"no tokenizer at"),
        (["tokenizer", "decode", "--tokenizer", "TOK"], b"not json", b"JSON array"),
        (["tokenizer", "decode", "--tokenizer", "TOK"], b"[1, 999999]", b"not in this tokenizer's vocabulary"),
        (["tokenizer", "encode", "--tokenizer", "TOK"], b"\xff\xfe bad", b"not valid UTF-8"),
        (["tokenizer", "train", "--input", "/nonexistent/x.txt", "--out", "OUT"], b"", b"does not exist"),
    ],
)
def test_errors_are_one_clear_line(trained, tmp_path, args, stdin, message):
    args = [a.replace("TOK", str(trained)).replace("OUT", str(tmp_path / "o")) for a in args]
    proc = lmforge(*args, stdin=stdin, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and b"Traceback" not in proc.stderr


@pytest.mark.parametrize("cmd", ["train", "from-gpt2", "encode", "decode", "stats"])
def test_every_subcommand_has_help_with_examples(cmd):
    out = lmforge("tokenizer", cmd, "--help").stdout.decode()
    assert "examples:" in out and f"lmforge tokenizer {cmd}" in out
