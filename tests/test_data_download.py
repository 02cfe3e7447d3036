"""`lmforge data download`: verified downloads, tested against a local HTTP server only."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_fixtures import SHARED

from lmforge.data import DATASETS, download
from lmforge.data.download import MIRROR_ENV, source_url
from lmforge.errors import LmforgeError

SERVED = ["llms-from-scratch/the-verdict.txt", "gpt2/encoder.json", "gpt2/vocab.bpe"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach the internet: only loopback names resolve, and no mirror is inherited."""
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host: str, *args: object, **kwargs: object) -> object:
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test tried to reach {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)


class Mirror:
    """A folder served over HTTP on 127.0.0.1; `requests` records every path asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    root = tmp_path / "mirror"
    for rel in SERVED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED / rel, root / rel)
    server = Mirror(root)
    yield server
    server.close()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_good_download_is_identical_to_the_source(tmp_path: Path, mirror: Mirror) -> None:
    out = tmp_path / "out"
    [(path, fetched)] = download("the-verdict", out, mirror=mirror.url)
    assert fetched and path == out / "the-verdict.txt"
    assert path.read_bytes() == (SHARED / "llms-from-scratch" / "the-verdict.txt").read_bytes()
    assert mirror.requests == ["/llms-from-scratch/the-verdict.txt"]
    assert _files(out) == ["the-verdict.txt"]  # no temporary file left


def test_gpt2_vocab_fetches_both_files_into_a_folder_named_after_the_set(tmp_path: Path, mirror: Mirror) -> None:
    results = download("gpt2-vocab", tmp_path / "data", mirror=mirror.url)
    assert results == [(tmp_path / "data" / "gpt2-vocab" / "encoder.json", True), (tmp_path / "data" / "gpt2-vocab" / "vocab.bpe", True)]
    for p, _ in results:
        assert p.read_bytes() == (SHARED / "gpt2" / p.name).read_bytes()


def test_where_files_are_saved_follows_one_rule() -> None:
    """One file: OUT/<file name>; several: OUT/<set name>/<file name>. Names never collide within --out."""
    everything: list[str] = []
    for source in DATASETS.values():
        saved = [source.saved_as(f) for f in source.files]
        if len(source.files) == 1:
            assert saved == [source.files[0].name]
        else:
            assert saved == [f"{source.name}/{f.name}" for f in source.files]
        everything += saved
    assert len(everything) == len(set(everything))
    assert DATASETS["sms-spam"].saved_as(DATASETS["sms-spam"].files[0]) == "SMSSpamCollection"


def test_a_path_in_the_way_is_named(tmp_path: Path, mirror: Mirror) -> None:
    (tmp_path / "out" / "the-verdict.txt").mkdir(parents=True)
    with pytest.raises(LmforgeError, match="the-verdict.txt exists and is not a file"):
        download("the-verdict", tmp_path / "out", mirror=mirror.url)
    assert mirror.requests == []


def test_a_bad_checksum_is_refused_and_nothing_is_saved(tmp_path: Path, mirror: Mirror) -> None:
    served = mirror.root / "llms-from-scratch" / "the-verdict.txt"
    served.write_bytes(served.read_bytes().replace(b"Gisburn", b"Gisbvrn"))
    actual = hashlib.sha256(served.read_bytes()).hexdigest()
    with pytest.raises(LmforgeError) as e:
        download("the-verdict", tmp_path / "out", mirror=mirror.url)
    message = str(e.value)
    assert DATASETS["the-verdict"].files[0].sha256 in message and actual in message
    assert f"{mirror.url}/llms-from-scratch/the-verdict.txt" in message
    assert _files(tmp_path / "out") == []


def test_a_file_already_there_is_not_fetched_again(tmp_path: Path, mirror: Mirror) -> None:
    out = tmp_path / "out"
    download("the-verdict", out, mirror=mirror.url)
    before = (out / "the-verdict.txt").stat().st_mtime_ns
    [(path, fetched)] = download("the-verdict", out, mirror=mirror.url)
    assert not fetched and path.stat().st_mtime_ns == before
    assert len(mirror.requests) == 1


def test_a_different_existing_file_is_kept_unless_overwrite(tmp_path: Path, mirror: Mirror) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "the-verdict.txt").write_text("my own notes")
    with pytest.raises(LmforgeError, match="exists but its sha256 is .*--overwrite"):
        download("the-verdict", out, mirror=mirror.url)
    assert (out / "the-verdict.txt").read_text() == "my own notes" and mirror.requests == []
    [(path, fetched)] = download("the-verdict", out, mirror=mirror.url, overwrite=True)
    assert fetched and path.read_bytes() == (SHARED / "llms-from-scratch" / "the-verdict.txt").read_bytes()


def test_a_missing_file_on_the_server_is_a_clear_error(tmp_path: Path, mirror: Mirror) -> None:
    with pytest.raises(LmforgeError, match="could not download .*/tinyshakespeare.txt: .*--mirror"):
        download("tinyshakespeare", tmp_path / "out", mirror=mirror.url)
    assert _files(tmp_path / "out") == []


def test_the_mirror_can_be_a_folder_given_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIRROR_ENV, str(SHARED))
    [(path, fetched)] = download("sms-spam", tmp_path / "out")
    assert fetched and path == tmp_path / "out" / "SMSSpamCollection"
    assert path.read_bytes() == (SHARED / "sms_spam" / "SMSSpamCollection").read_bytes()
    results = download("stories260K", tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p, _ in results] == ["stories260K/stories260K.bin", "stories260K/tok512.bin"]
    assert all(p.read_bytes() == (SHARED / "weights" / "stories260K" / p.name).read_bytes() for p, _ in results)


def test_without_a_mirror_the_pinned_url_is_asked(tmp_path: Path) -> None:
    # the `offline` fixture makes the lookup fail: the error shows which URL was asked for
    with pytest.raises(LmforgeError, match=re.escape(f"could not download {DATASETS['the-verdict'].files[0].url}")):
        download("the-verdict", tmp_path / "out")
    assert _files(tmp_path / "out") == []


def test_mirror_urls_join_the_relative_path() -> None:
    f = DATASETS["the-verdict"].files[0]
    assert source_url(f) == f.url
    assert source_url(f, "https://example.org/data/") == "https://example.org/data/llms-from-scratch/the-verdict.txt"
    with pytest.raises(LmforgeError, match="neither a URL"):
        source_url(f, "/no/such/folder")


def test_an_unknown_name_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="unknown data set 'shakespeare'.*tinyshakespeare"):
        download("shakespeare", tmp_path)


def _sources_rows() -> dict[str, tuple[str, str, str, str]]:
    """SOURCES.md's per-file table: mirror path -> (origin repo, origin path, commit, sha256)."""
    rows = {}
    for line in (SHARED / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.split("|")[1:]]
        if len(cells) >= 6 and re.fullmatch(r"[0-9a-f]{64}", cells[5]):
            rows[cells[0]] = (cells[1], cells[2], cells[3], cells[5])
    return rows


def test_registry_matches_the_shared_files_and_sources_md() -> None:
    rows = _sources_rows()
    expected = {
        "tinyshakespeare", "the-verdict", "sms-spam", "instruction-data", "instruction-data-with-preference",
        "alpaca-en-demo", "dpo-en-demo", "hh-rlhf-harmless", "gpt2-vocab", "gutenberg", "nltk-gutenberg", "stories260K",
    }  # fmt: skip
    assert set(DATASETS) == expected
    assert [f.path for f in DATASETS["gutenberg"].files] == sorted(
        (f"gutenberg/{p.name}" for p in (SHARED / "gutenberg").iterdir()), key=lambda p: int(p.split("-")[0][len("gutenberg/pg"):])
    )
    assert {f.path for f in DATASETS["nltk-gutenberg"].files} == {f"nltk/gutenberg/{p.name}" for p in (SHARED / "nltk" / "gutenberg").iterdir()}
    for source in DATASETS.values():
        for f in source.files:
            local = (SHARED / f.path).read_bytes()
            assert hashlib.sha256(local).hexdigest() == f.sha256 == rows[f.path][3]
            assert len(local) == f.size
            repo, origin, commit, _ = rows[f.path]
            if f.url.startswith("https://raw.githubusercontent.com/"):
                # pinned to the repository and commit SOURCES.md names
                assert f.url == f"https://raw.githubusercontent.com/{repo}/{commit}/{origin}".replace(" ", "%20")
            else:
                assert f.url.startswith("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/")
