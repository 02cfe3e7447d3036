"""`lmforge data download`: the standard small public data sets, fetched and verified.

Every file is pinned twice: its URL names a commit (or OpenAI's immutable GPT-2 blob),
and its sha256 is checked while it streams in. A file whose hash differs is refused and
deleted, never saved: a changed upstream, a captive portal or a truncated transfer must
not become training data. A file already present with the right hash is not fetched
again, and a download appears under its name only once it is whole and verified.

Each file also has a path relative to a mirror (the layout of the project's shared data
folder, e.g. `llms-from-scratch/the-verdict.txt`): with `mirror=` (or the environment
variable LMFORGE_DATA_MIRROR) set to a URL or a local folder, files come from there.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.io import atomic_file

MIRROR_ENV = "LMFORGE_DATA_MIRROR"
_BLOCK = 1 << 20
_TIMEOUT = 60  # seconds without data before a download fails


@dataclass(frozen=True)
class RemoteFile:
    """One file: where it lives, where it lives on a mirror, and what it must hash to."""

    url: str
    path: str  # relative to a mirror; the file is saved as its last component
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class DataSource:
    """A named entry of the registry: one or more files that belong together."""

    name: str
    description: str
    license: str
    files: tuple[RemoteFile, ...]


_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57"
_LLAMA_FACTORY = "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30"
_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"

DATASETS: dict[str, DataSource] = {
    s.name: s
    for s in [
        DataSource(
            "tinyshakespeare",
            "1.1 MB of Shakespeare's plays, one file (karpathy/char-rnn)",
            "text public domain; repo MIT",
            (
                RemoteFile(
                    "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
                    "tinyshakespeare.txt",
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                    1115394,
                ),
            ),
        ),
        DataSource(
            "the-verdict",
            "Edith Wharton's short story The Verdict, 20 kB (LLMs-from-scratch ch. 2)",
            "text public domain; repo Apache-2.0",
            (
                RemoteFile(
                    f"{_RASBT}/ch02/01_main-chapter-code/the-verdict.txt",
                    "llms-from-scratch/the-verdict.txt",
                    "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
                    20479,
                ),
            ),
        ),
        DataSource(
            "sms-spam",
            "UCI SMS Spam Collection v.1: 5,574 tab-separated `label<TAB>text` rows (ham/spam)",
            "free with the copyright notice kept (see its readme); UCI lists CC BY 4.0",
            (
                RemoteFile(
                    "https://raw.githubusercontent.com/PARKER-X/SpamClassifier/5fa41eaf3ec0d21d3ffced673800d25b6b8ffc20/smsspamcollection/SMSSpamCollection",
                    "sms_spam/SMSSpamCollection",
                    "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
                    477907,
                ),
            ),
        ),
        DataSource(
            "instruction-data",
            "1,100 Alpaca-style instruction/input/output items (LLMs-from-scratch ch. 7)",
            "Apache-2.0",
            (
                RemoteFile(
                    f"{_RASBT}/ch07/01_main-chapter-code/instruction-data.json",
                    "llms-from-scratch/instruction-data.json",
                    "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
                    203524,
                ),
            ),
        ),
        DataSource(
            "instruction-data-with-preference",
            "the 1,100 instruction items with chosen/rejected answers, for DPO (LLMs-from-scratch ch. 7)",
            "Apache-2.0",
            (
                RemoteFile(
                    f"{_RASBT}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
                    "llms-from-scratch/instruction-data-with-preference.json",
                    "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
                    386968,
                ),
            ),
        ),
        DataSource(
            "alpaca-en-demo",
            "999 Alpaca-format instruction items (LLaMA-Factory demo)",
            "repo Apache-2.0; rows look like Alpaca-GPT4 (CC BY-NC 4.0): non-commercial use",
            (
                RemoteFile(
                    f"{_LLAMA_FACTORY}/data/alpaca_en_demo.json",
                    "llama-factory/alpaca_en_demo.json",
                    "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
                    859893,
                ),
            ),
        ),
        DataSource(
            "dpo-en-demo",
            "300 preference pairs, sharegpt format: conversations/chosen/rejected (LLaMA-Factory demo)",
            "repo Apache-2.0; origin of the rows not stated: research use",
            (
                RemoteFile(
                    f"{_LLAMA_FACTORY}/data/dpo_en_demo.json",
                    "llama-factory/dpo_en_demo.json",
                    "b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3",
                    1575286,
                ),
            ),
        ),
        DataSource(
            "gpt2-vocab",
            "OpenAI's GPT-2 tokenizer files encoder.json + vocab.bpe (for `lmforge tokenizer from-gpt2`)",
            "openai/gpt-2 Modified MIT",
            (
                RemoteFile(
                    f"{_GPT2}/encoder.json",
                    "gpt2/encoder.json",
                    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                    1042301,
                ),
                RemoteFile(
                    f"{_GPT2}/vocab.bpe",
                    "gpt2/vocab.bpe",
                    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                    456318,
                ),
            ),
        ),
    ]
}


def source_url(file: RemoteFile, mirror: str | None = None) -> str:
    """Where to fetch `file`: its own URL, or MIRROR/path for a mirror URL or local folder."""
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    if mirror is None:
        return file.url
    if not urlparse(mirror).scheme:  # a local folder
        folder = Path(mirror).expanduser()
        if not folder.is_dir():
            raise LmforgeError(f"mirror {mirror!r} is neither a URL (http://, https://, file://) nor a folder")
        mirror = folder.resolve().as_uri()
    return f"{mirror.rstrip('/')}/{file.path}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def download_file(
    file: RemoteFile,
    out: str | os.PathLike,
    *,
    mirror: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> tuple[Path, bool]:
    """Fetch `file` into the folder `out`, verified; return (its path, whether it was downloaded).

    A file already there with the right sha256 is kept as is; one with another hash is
    refused unless `overwrite`, since it may be the user's own.
    """
    dest = Path(out) / file.name
    if dest.is_file():
        actual = sha256_file(dest)
        if actual == file.sha256:
            return dest, False
        if not overwrite:
            raise LmforgeError(
                f"{dest} exists but its sha256 is {actual}, not the expected {file.sha256}; "
                "move it away or pass --overwrite to replace it"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = source_url(file, mirror)
    with atomic_file(dest) as f:
        actual = _stream(url, f, file.size, progress)
        if actual != file.sha256:
            raise LmforgeError(
                f"refused {url}: its sha256 is {actual}, expected {file.sha256}; nothing was saved "
                "(the source changed or the transfer was damaged: try again, or use --mirror)"
            )
    return dest, True


def _stream(url: str, f, size: int, progress: bool) -> str:
    """Copy `url` into the open file `f` block by block; return the sha256 of what came."""
    h = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": f"lmforge/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            total = int(response.headers.get("Content-Length") or size)
            with tqdm(total=total, desc=Path(urlparse(url).path).name, unit="B", unit_scale=True, disable=not progress, leave=False) as bar:
                while block := response.read(_BLOCK):
                    h.update(block)
                    f.write(block)
                    bar.update(len(block))
    except OSError as e:  # URLError, HTTPError, timeouts, resets
        reason = getattr(e, "reason", None) or e
        raise LmforgeError(f"could not download {url}: {reason}; check the connection, or fetch from a mirror with --mirror") from None
    return h.hexdigest()


def download(
    name: str,
    out: str | os.PathLike,
    *,
    mirror: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> list[tuple[Path, bool]]:
    """Fetch every file of the registry entry `name` into `out` (see `download_file`)."""
    if name not in DATASETS:
        raise LmforgeError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)} (see `lmforge data download --list`)")
    return [download_file(f, out, mirror=mirror, overwrite=overwrite, progress=progress) for f in DATASETS[name].files]
