"""`lmforge tokenizer ...` end to end, as a user types it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess

import pytest
from cli_runner import run_cli
from conftest import shared

from lmforge.cli import main
from lmforge.tokenizer import Tokenizer


@pytest.fixture
def lmforge(capsysbinary):
    """`lmforge ARGS` run in this process (tests/cli_runner.py: a subprocess per run was 3 s of
    imports); bytes out, as a pipe gives them. A non-zero exit fails the test unless check=False."""

    def run(*args: str, stdin: bytes = b"", check: bool = True, fifos=()) -> subprocess.CompletedProcess:
        return run_cli(capsysbinary, *args, stdin=stdin, check=check, fifos=fifos)

    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = out / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(shared("llms-from-scratch/the-verdict.txt").read_text(encoding="utf-8"), encoding="utf-8")
    (corpus / "b.md").write_text("대한민국은 민주공화국이다.\n" * 20, encoding="utf-8")
    (corpus / "skip.bin").write_bytes(b"\x00\x01binary")
    with contextlib.redirect_stdout(io.StringIO()) as said:  # in process, as `lmforge` runs it (module scope: no capsys)
        code = main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--special", "<|user|>", "--out", str(out / "tok")])
    assert code == 0 and "400 ids" in said.getvalue()
    return out / "tok"


def test_train_writes_a_loadable_tokenizer(trained):
    tok = Tokenizer.load(trained)
    assert tok.vocab_size == 400
    assert set(tok.special_tokens) == {"<|endoftext|>", "<|user|>"}


def test_train_refuses_existing_output(trained, lmforge):
    proc = lmforge("tokenizer", "train", "--input", str(shared("llms-from-scratch/the-verdict.txt")), "--out", str(trained), check=False)
    assert proc.returncode == 2 and b"--overwrite" in proc.stderr


def test_encode_decode_via_stdin(trained, lmforge):
    text = "I had always thought Jack Gisburn 대한민국 <|user|> 🙂\n"
    ids = json.loads(lmforge("tokenizer", "encode", "--tokenizer", str(trained), stdin=text.encode()).stdout)
    tok = Tokenizer.load(trained)
    assert ids == tok.encode(text)
    assert tok.special_tokens["<|user|>"] not in ids
    allowed = json.loads(lmforge("tokenizer", "encode", "--tokenizer", str(trained), "--allow-special", stdin=text.encode()).stdout)
    assert tok.special_tokens["<|user|>"] in allowed
    back = lmforge("tokenizer", "decode", "--tokenizer", str(trained), stdin=json.dumps(allowed).encode()).stdout
    assert back == text.encode()


def test_decode_split_character_replacement_and_raw_bytes(trained, lmforge):
    ids = Tokenizer.load(trained).encode("🙂")
    head = json.dumps(ids[:1]).encode()
    assert "\ufffd" in lmforge("tokenizer", "decode", "--tokenizer", str(trained), stdin=head).stdout.decode()
    assert lmforge("tokenizer", "decode", "--tokenizer", str(trained), "--bytes", stdin=head).stdout == "🙂".encode()[:1]


def test_from_gpt2_and_stats(tmp_path, lmforge):
    lmforge("tokenizer", "from-gpt2", "--encoder-json", str(shared("gpt2/encoder.json")), "--vocab-bpe", str(shared("gpt2/vocab.bpe")), "--out", str(tmp_path / "g"))
    ids = json.loads(lmforge("tokenizer", "encode", "--tokenizer", str(tmp_path / "g"), stdin=b"Hello, world").stdout)
    assert ids == [15496, 11, 995]
    out = lmforge("tokenizer", "stats", "--tokenizer", str(tmp_path / "g"), str(shared("llms-from-scratch/the-verdict.txt"))).stdout.decode()
    total = out.strip().splitlines()[-1].split()
    assert total[0] == "total" and total[1] == "20,479"
    assert 3.5 < float(total[3]) < 5.5  # GPT-2 on English prose: about 4.3 bytes per token


def test_stats_shows_whole_paths_in_aligned_columns(trained, tmp_path, lmforge):
    """Paths longer than any fixed column are printed whole (they were cut from the left,
    which could leave the tail of another file's name), the numbers still in columns."""
    folder = tmp_path / ("a-rather-long-folder-name-" * 3) / "corpus"
    folder.mkdir(parents=True)
    files = [folder / "one.txt", folder / "two-with-a-longer-name.txt"]
    files[0].write_text("hello there")
    files[1].write_text("general kenobi")
    lines = lmforge("tokenizer", "stats", "--tokenizer", str(trained), str(folder)).stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == ["file", str(files[0]), str(files[1]), "total"]
    # bytes right-aligned: the second column ends at one place (found by position: its digits, such as
    # "14", may also be in the path, as in pytest's /tmp/pytest-of-root/pytest-14/...)
    assert len({re.match(r"\S+\s+\S+", line).end() for line in lines[1:]}) == 1


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["tokenizer", "encode", "--tokenizer", "/nonexistent"], b"x", b"no tokenizer at"),
        (["tokenizer", "decode", "--tokenizer", "TOK"], b"not json", b"JSON array"),
        (["tokenizer", "decode", "--tokenizer", "TOK"], b"[1, 999999]", b"not in this tokenizer's vocabulary"),
        (["tokenizer", "encode", "--tokenizer", "TOK"], b"\xff\xfe bad", b"not valid UTF-8"),
        (["tokenizer", "train", "--input", "/nonexistent/x.txt", "--out", "OUT"], b"", b"does not exist"),
        # an empty value would have meant the current folder (issue 11)
        (["tokenizer", "train", "--input", "", "--out", "OUT"], b"", b"--input has an empty path"),
        (["tokenizer", "train", "--out", ""], b"", b"--out '' is empty"),
        (["tokenizer", "from-gpt2", "--encoder-json", "E", "--vocab-bpe", "V", "--out", ""], b"", b"--out '' is empty"),
        (["tokenizer", "stats", "--tokenizer", "TOK", ""], b"", b"FILE has an empty path"),
        (["tokenizer", "train", "--input", "VERDICT", "--workers", "-1", "--out", "OUT"], b"", b"--workers -1"),
    ],
)
def test_errors_are_one_clear_line(trained, tmp_path, args, stdin, message, lmforge):
    args = [a.replace("TOK", str(trained)).replace("OUT", str(tmp_path / "o")).replace("VERDICT", str(shared("llms-from-scratch/the-verdict.txt"))) for a in args]
    proc = lmforge(*args, stdin=stdin, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and b"Traceback" not in proc.stderr


@pytest.mark.parametrize("cmd", ["train", "from-gpt2", "encode", "decode", "stats"])
def test_every_subcommand_has_help_with_examples(cmd, lmforge):
    out = lmforge("tokenizer", cmd, "--help").stdout.decode()
    assert "examples:" in out and f"lmforge tokenizer {cmd}" in out


# --- issue 11: bad flags and files are one clear line, found before any work -------------------
def one_line_error(proc: subprocess.CompletedProcess, *needles: bytes) -> str:
    err = proc.stderr
    assert proc.returncode == 2, err.decode()
    assert b"Traceback" not in err and err.startswith(b"lmforge: error: "), err.decode()
    for n in needles:
        assert n in err, err.decode()
    return err.decode()


@pytest.fixture(scope="module")
def verdict():
    return shared("llms-from-scratch/the-verdict.txt")


def test_train_refuses_an_empty_special_token(verdict, tmp_path, lmforge):
    """It used to train, then hang every encode (the empty string matches everywhere)."""
    proc = lmforge("tokenizer", "train", "--input", str(verdict), "--special", "", "--out", str(tmp_path / "t"), check=False)
    one_line_error(proc, b"empty string", b"--special")
    assert not (tmp_path / "t").exists()


def test_train_refuses_a_pattern_that_drops_text_and_data_prepare_a_tokenizer_that_has_one(verdict, tmp_path, lmforge):
    """'[a-z]+' turned "Hello, World 123" into "elloorld", and `data prepare` wrote that corpus with exit 0."""
    proc = lmforge("tokenizer", "train", "--input", str(verdict), "--pattern", "[a-z]+", "--out", str(tmp_path / "t"), check=False)
    one_line_error(proc, b"does not cover every character", b"'H' (U+0048 LATIN CAPITAL LETTER H)", rb"`|\s+|.`", b"gpt2, gpt4")
    assert not (tmp_path / "t").exists()

    bad = Tokenizer([], {"<|endoftext|>": 256}).to_dict() | {"pattern": "[a-z]+"}  # as an older lmforge saved it
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer.json").write_text(json.dumps(bad), encoding="utf-8")
    proc = lmforge("data", "prepare", "--input", str(verdict), "--tokenizer", str(tmp_path / "old"), "--out", str(tmp_path / "data"), check=False)
    one_line_error(proc, str(tmp_path / "old" / "tokenizer.json").encode(), b"does not cover every character")
    assert not (tmp_path / "data").exists()
    proc = lmforge("tokenizer", "encode", "--tokenizer", str(tmp_path / "old"), stdin=b"Hello, World 123", check=False)
    one_line_error(proc, b"does not cover every character")


def test_train_refuses_a_pattern_that_matches_the_empty_string(verdict, tmp_path, lmforge):
    """'x*' used to save a tokenizer on which every encode panicked inside tiktoken."""
    proc = lmforge("tokenizer", "train", "--input", str(verdict), "--pattern", "x*", "--out", str(tmp_path / "t"), check=False)
    one_line_error(proc, b"can match the empty string")
    assert not (tmp_path / "t").exists()


def test_a_custom_pattern_with_a_catch_all_trains(verdict, tmp_path, lmforge):
    lmforge("tokenizer", "train", "--input", str(verdict), "--vocab-size", "300", "--pattern", r"[a-z]+|\s+|.", "--out", str(tmp_path / "t"))
    text = "Hello, World 123 대한민국 🙂"
    ids = json.loads(lmforge("tokenizer", "encode", "--tokenizer", str(tmp_path / "t"), stdin=text.encode()).stdout)
    assert lmforge("tokenizer", "decode", "--tokenizer", str(tmp_path / "t"), stdin=json.dumps(ids).encode()).stdout == text.encode()


def test_out_that_is_a_file_is_refused_before_training(verdict, tmp_path, lmforge):
    """`--out EXISTING_FILE` used to train, then end in FileExistsError."""
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        proc = lmforge("tokenizer", "train", "--input", str(verdict), "--out", str(out), check=False)
        one_line_error(proc, b"is a file, not a folder", b"--out")
        assert b"read " not in proc.stderr  # refused before the corpus was read
        proc = lmforge("tokenizer", "from-gpt2", "--encoder-json", str(shared("gpt2/encoder.json")), "--vocab-bpe", str(shared("gpt2/vocab.bpe")), "--out", str(out), check=False)
        one_line_error(proc, b"is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"


def test_out_json_file_is_written_and_replaced_only_with_overwrite(verdict, tmp_path, lmforge):
    out = tmp_path / "my.json"
    lmforge("tokenizer", "train", "--input", str(verdict), "--vocab-size", "300", "--out", str(out))
    assert Tokenizer.load(out).vocab_size == 300
    proc = lmforge("tokenizer", "train", "--input", str(verdict), "--vocab-size", "280", "--out", str(out), check=False)
    one_line_error(proc, b"already exists", b"--overwrite")
    lmforge("tokenizer", "train", "--input", str(verdict), "--vocab-size", "280", "--out", str(out), "--overwrite")
    assert Tokenizer.load(out).vocab_size == 280
    (tmp_path / "d" / "tokenizer.json").mkdir(parents=True)
    proc = lmforge("tokenizer", "train", "--input", str(verdict), "--out", str(tmp_path / "d"), "--overwrite", check=False)
    one_line_error(proc, b"is a folder")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("flag", ["--tokenizer", "--encoder-json", "--vocab-bpe", "tok-folder"])
def test_fifos_are_refused_not_read(trained, tmp_path, flag, lmforge):
    """A FIFO with no writer would block the command forever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if flag == "--tokenizer":
        args = ["encode", "--tokenizer", str(fifo)]
    elif flag == "tok-folder":
        (tmp_path / "tok").mkdir()
        os.mkfifo(tmp_path / "tok" / "tokenizer.json")
        args = ["stats", "--tokenizer", str(tmp_path / "tok"), str(shared("llms-from-scratch/the-verdict.txt"))]
    else:
        files = {"--encoder-json": str(shared("gpt2/encoder.json")), "--vocab-bpe": str(shared("gpt2/vocab.bpe")), flag: str(fifo)}
        args = ["from-gpt2", *[x for kv in files.items() for x in kv], "--out", str(tmp_path / "o")]
    fifos = [f for f in (fifo, tmp_path / "tok" / "tokenizer.json") if f.exists()]
    # in process: a run that opens a FIFO is released by the runner (instead of hanging the session) and fails
    one_line_error(lmforge("tokenizer", *args, stdin=b"x", check=False, fifos=fifos), b"not a regular file but a FIFO")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, b"not found at"),
        (lambda p: p.mkdir(), b"not a regular file but a folder"),
        (lambda p: p.write_bytes(b"\xff\xfe{}"), b"not UTF-8"),
        (lambda p: p.write_text("[1, 2]"), b"not GPT-2's encoder.json"),
        (lambda p: p.write_text('{"a": [1]}'), b"not GPT-2's encoder.json"),
        (lambda p: p.write_text('{"a": '), b"not valid JSON"),
    ],
)
def test_bad_encoder_json_is_one_clear_line(tmp_path, make, message, lmforge):
    make(tmp_path / "encoder.json")
    proc = lmforge("tokenizer", "from-gpt2", "--encoder-json", str(tmp_path / "encoder.json"), "--vocab-bpe", str(shared("gpt2/vocab.bpe")), "--out", str(tmp_path / "o"), check=False)
    one_line_error(proc, message)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, b"no tokenizer at"),
        (lambda p: p.mkdir(), b"no tokenizer at"),
        (lambda p: (p.mkdir(), (p / "tokenizer.json").write_text('{"format": "lmforge.tok')), b"truncated or not JSON"),
        (lambda p: (p.mkdir(), (p / "tokenizer.json").write_text("[]")), b"it holds a JSON list"),
        (lambda p: (p.mkdir(), (p / "tokenizer.json").write_bytes(b"\xff")), b"not UTF-8"),
    ],
)
@pytest.mark.parametrize("cmd", ["encode", "decode", "stats"])
def test_bad_tokenizer_is_one_clear_line(tmp_path, make, message, cmd, lmforge):
    make(tmp_path / "tok")
    extra = [str(shared("llms-from-scratch/the-verdict.txt"))] if cmd == "stats" else []
    one_line_error(lmforge("tokenizer", cmd, "--tokenizer", str(tmp_path / "tok"), *extra, stdin=b"[1]", check=False), message)
