"""`lmforge data prepare | info | download` end to end, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli
from data_fixtures import SHARED, expected_tokens, small_tokenizer, write_jsonl, write_texts

import lmforge.corpus
from lmforge.cli import main
from lmforge.data import TokenData
from lmforge.data.download import MIRROR_ENV

DOCS = ["First document.\n", "Second one, a little longer than the first.\n", "Third.", "Fourth and last\n"]


def run_subprocess(*args: str | Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter, as the `lmforge` console script does."""
    code = "import sys; from lmforge.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], check=False, capture_output=True, text=True, timeout=120)


@pytest.fixture
def run_lmforge(capsys: pytest.CaptureFixture):
    """Run the CLI in this process, as the console script would (tests/cli_runner.py; a fresh
    interpreter per run was 3 s of imports). The working directory and environment are the
    test's: monkeypatch.chdir and monkeypatch.setenv."""

    def run(*args: str | Path, fifos: tuple[Path, ...] | list[Path] = ()) -> subprocess.CompletedProcess:
        return run_cli(capsys, *args, text=True, fifos=fifos)

    return run


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    small_tokenizer().save(tmp_path / "tok")
    return tmp_path / "tok"


def test_prepare_then_info(tmp_path: Path, tokenizer_dir: Path, run_lmforge) -> None:
    write_texts(tmp_path / "corpus", DOCS)
    out = tmp_path / "data"
    run = run_lmforge("data", "prepare", "--input", tmp_path / "corpus", "--tokenizer", tokenizer_dir, "--out", out, "--val-fraction", "0.5")
    assert run.returncode == 0, run.stderr
    assert "read 4 documents from 4 files" in run.stderr
    assert f"wrote {out}" in run.stdout and "bytes/token" in run.stdout
    assert "train" in run.stdout and "val" in run.stdout
    data = TokenData.open(out, small_tokenizer())
    assert data.split("train").tolist() == expected_tokens(small_tokenizer(), [DOCS[0], DOCS[2]])
    assert data.split("val").tolist() == expected_tokens(small_tokenizer(), [DOCS[1], DOCS[3]])

    info = run_lmforge("data", "info", out)
    assert info.returncode == 0, info.stderr
    assert f"{data.num_tokens('train'):,} tokens, 2 documents" in info.stdout
    assert "uint16" in info.stdout and small_tokenizer().fingerprint[:16] in info.stdout
    as_json = run_lmforge("data", "info", out, "--json")
    assert json.loads(as_json.stdout) == data.meta


def test_prepare_jsonl_and_the_tail_split_are_reported(tmp_path: Path, tokenizer_dir: Path, run_lmforge) -> None:
    write_jsonl(tmp_path / "one.jsonl", ["a single record, so val comes from the tail of the tokens"], field="body")
    run = run_lmforge("data", "prepare", "--input", tmp_path / "one.jsonl", "--text-field", "body", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d")
    assert run.returncode == 0, run.stderr
    assert "val is the last 0.1 of the tokens" in run.stderr


def test_prepare_errors_are_one_line_and_leave_nothing(tmp_path: Path, tokenizer_dir: Path, run_lmforge) -> None:
    run = run_lmforge("data", "prepare", "--input", tmp_path / "missing.txt", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d")
    assert run.returncode == 2
    assert run.stderr.startswith("lmforge: error: input") and run.stderr.count("\n") == 1
    assert not (tmp_path / "d").exists()

    write_texts(tmp_path / "corpus", DOCS)
    (tmp_path / "d").mkdir()
    run = run_lmforge("data", "prepare", "--input", tmp_path / "corpus", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d")
    assert run.returncode == 2 and "already exists" in run.stderr and "--overwrite" in run.stderr
    run = run_lmforge("data", "prepare", "--input", tmp_path / "corpus", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d", "--overwrite")
    assert run.returncode == 0, run.stderr


def test_overwrite_refuses_the_inputs_and_unrelated_folders(
    tmp_path: Path, tokenizer_dir: Path, run_lmforge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `--input corpus/books --out corpus --overwrite` deleted the corpus; `--out userdir --overwrite`
    deleted unrelated files; `--out .` was a raw ValueError."""
    monkeypatch.chdir(tmp_path)  # the relative paths below are the user's, typed in tmp_path
    write_texts(tmp_path / "corpus" / "books", DOCS)
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userdir" / "thesis.tex").write_text("years of work")
    prepare = ["data", "prepare", "--input", "corpus/books", "--tokenizer", tokenizer_dir, "--overwrite", "--out"]
    for out, message in [
        ("corpus", "--out corpus holds the input corpus/books/doc000.txt; prepare would replace the corpus it reads"),
        ("corpus/books", "--out corpus/books holds the input"),
        ("userdir", "--out userdir already exists and is a folder that is not a data folder (it has no meta.json"),
        (".", "--out '.' names no folder of its own"),
    ]:
        run = run_lmforge(*prepare, out)
        assert run.returncode == 2 and run.stderr.startswith("lmforge: error: ")
        assert message in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert len(list((tmp_path / "corpus" / "books").iterdir())) == len(DOCS)
    assert (tmp_path / "userdir" / "thesis.tex").read_text() == "years of work"

    run = run_lmforge(*prepare, "tokens")
    assert run.returncode == 0, run.stderr
    run = run_lmforge(*prepare, "tokens")  # a data folder prepare made is replaced
    assert run.returncode == 0, run.stderr
    assert "--overwrite" in run_lmforge("data", "prepare", "--help").stdout


def test_prepare_names_a_device_or_fifo_input(tmp_path: Path, tokenizer_dir: Path, run_lmforge) -> None:
    """Regression: /dev/zero and FIFOs were "does not exist" (and a FIFO would block a reader)."""
    # /dev/zero in a subprocess, with a timeout: were the check gone, the run would read it without end,
    # which in process would take the test session's memory (and the shared machine's) with it.
    run = run_subprocess("data", "prepare", "--input", "/dev/zero", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d")
    assert run.returncode == 2 and "is not a regular file: it is a character device" in run.stderr, run.stderr
    # the FIFO in process: a run that opens it is released by the runner (instead of hanging) and fails
    os.mkfifo(tmp_path / "pipe")
    run = run_lmforge("data", "prepare", "--input", tmp_path / "pipe", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d",
                      fifos=[tmp_path / "pipe"])
    assert run.returncode == 2 and "is not a regular file: it is a FIFO (named pipe)" in run.stderr, run.stderr
    assert not (tmp_path / "d").exists()


def test_info_on_a_folder_that_is_not_data(tmp_path: Path, run_lmforge) -> None:
    run = run_lmforge("data", "info", tmp_path)
    assert run.returncode == 2 and "no meta.json" in run.stderr


def test_download_list_and_from_a_local_mirror(tmp_path: Path, run_lmforge, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = run_lmforge("data", "download", "--list")
    assert listing.returncode == 0
    for name in ("tinyshakespeare", "the-verdict", "sms-spam", "gpt2-vocab", "dpo-en-demo", "llms-from-scratch/the-verdict.txt"):
        assert name in listing.stdout

    with monkeypatch.context() as m:  # read when download() runs, not at import: in process is the same
        m.setenv(MIRROR_ENV, str(SHARED))
        run = run_lmforge("data", "download", "the-verdict", "tinyshakespeare", "--out", tmp_path / "dl")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "dl" / "tinyshakespeare.txt").read_bytes() == (SHARED / "tinyshakespeare.txt").read_bytes()
    assert (tmp_path / "dl" / "the-verdict.txt").read_bytes() == (SHARED / "llms-from-scratch" / "the-verdict.txt").read_bytes()
    again = run_lmforge("data", "download", "the-verdict", "--out", tmp_path / "dl", "--mirror", SHARED)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_download_needs_a_name_and_an_out(tmp_path: Path, run_lmforge) -> None:
    assert "name a data set" in run_lmforge("data", "download", "--out", tmp_path).stderr
    assert "--out" in run_lmforge("data", "download", "the-verdict").stderr


def test_prepare_without_input_uses_and_announces_the_default_corpus(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    files = write_texts(tmp_path / "stdlib", ["import os\n", "def f():\n    return 1\n"], suffix=".py")
    monkeypatch.setattr(lmforge.corpus, "default_corpus_files", lambda: files)
    code = main(["data", "prepare", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"), "--val-fraction", "0"])
    assert code == 0
    err = capsys.readouterr().err
    assert "no --input given: using the embedded default corpus, the 2 .py files of" in err
    data = TokenData.open(tmp_path / "d")
    assert data.split("train").tolist() == expected_tokens(small_tokenizer(), ["import os\n", "def f():\n    return 1\n"])


@pytest.mark.parametrize("command", ["prepare", "info", "download"])
def test_every_command_has_examples_in_its_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["data", command, "--help"])
    assert e.value.code == 0
    assert f"examples:\n  lmforge data {command}" in capsys.readouterr().out
