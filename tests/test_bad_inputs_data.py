"""Inputs that are not text files (a FIFO, a device, a broken link) are named for what they are, never read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from data_fixtures import small_tokenizer, write_texts

from lmforge.corpus import ReadStats, file_kind, iter_documents, read_chunks, resolve_inputs
from lmforge.data import prepare
from lmforge.errors import LmforgeError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_texts(tmp_path / "corpus", ["one document", "another one"])
    return tmp_path / "corpus"


def test_file_kind(tmp_path: Path, corpus: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert file_kind(corpus / "doc000.txt") is None
    assert file_kind(tmp_path / "pipe") == "a FIFO (named pipe)"
    assert file_kind("/dev/zero") == "a character device"
    assert file_kind(corpus) == "a folder"
    assert file_kind(tmp_path / "missing") == "missing"
    assert file_kind(tmp_path / "dangling") == f"a broken symbolic link (to {tmp_path / 'nowhere'})"


def test_a_device_or_fifo_named_as_input_says_what_it_is(tmp_path: Path) -> None:
    """Regression: /dev/zero and a FIFO were reported as "does not exist"."""
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(LmforgeError, match=r"input '/dev/zero' is not a regular file: it is a character device"):
        resolve_inputs(["/dev/zero"])
    with pytest.raises(LmforgeError, match=r"pipe.txt' is not a regular file: it is a FIFO \(named pipe\)"):
        resolve_inputs([tmp_path / "pipe.txt"])
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(LmforgeError, match="is not a regular file: it is a broken symbolic link"):
        resolve_inputs([tmp_path / "dangling.txt"])
    with pytest.raises(LmforgeError, match="does not exist"):
        resolve_inputs([tmp_path / "missing.txt"])


def test_a_fifo_in_a_folder_or_a_glob_is_refused_not_read(corpus: Path) -> None:
    os.mkfifo(corpus / "pipe.txt")  # a reader would block here forever
    with pytest.raises(LmforgeError, match=r"pipe.txt \(in the input folder .*\) is not a regular file: it is a FIFO"):
        resolve_inputs([corpus])
    with pytest.raises(LmforgeError, match=r"pipe.txt \(matched by the input glob .*\) is not a regular file: it is a FIFO"):
        resolve_inputs([str(corpus / "*.txt")])
    os.unlink(corpus / "pipe.txt")
    os.mkfifo(corpus / "pipe.bin")  # not a text suffix: a folder never takes it
    assert [p.name for p in resolve_inputs([corpus])] == ["doc000.txt", "doc001.txt"]
    with pytest.raises(LmforgeError, match="pipe.bin"):
        resolve_inputs([str(corpus / "*")])


def test_a_glob_that_matches_a_device_says_so() -> None:
    with pytest.raises(LmforgeError, match=r"/dev/zero \(matched by the input glob '/dev/zer\*'\) is not a regular file: it is a character device"):
        resolve_inputs(["/dev/zer*"])


def test_readers_refuse_special_files_given_directly(tmp_path: Path) -> None:
    """`read_chunks` / `iter_documents` on a path that skipped `resolve_inputs` still never open a FIFO or read /dev/zero."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(LmforgeError, match="character device"):
        next(read_chunks(Path("/dev/zero"), ReadStats()))
    with pytest.raises(LmforgeError, match="FIFO"):
        next(iter_documents([tmp_path / "pipe.jsonl"], ReadStats()))


def test_prepare_refuses_them_and_writes_nothing(tmp_path: Path, corpus: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    for bad in ("/dev/zero", tmp_path / "pipe"):
        with pytest.raises(LmforgeError, match="is not a regular file"):
            prepare([corpus, bad], small_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_empty_input_is_not_the_current_folder(tmp_path, monkeypatch):
    from lmforge.corpus import resolve_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not meant as input")
    with pytest.raises(LmforgeError, match="an --input is empty"):
        resolve_inputs([""])
