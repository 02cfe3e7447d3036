"""`lmforge data download`: the standard small public data sets, fetched and verified.

Every file is pinned twice: its URL names a commit (or OpenAI's immutable GPT-2 blob),
and its sha256 is checked while it streams in. A file whose hash differs is refused and
deleted, never saved: a changed upstream, a captive portal or a truncated transfer must
not become training data. A file already present with the right hash is not fetched
again, and a download appears under its name only once it is whole and verified.

Where a file is saved under `--out` follows one rule, so that the README's paths are
exactly what the downloader writes: a data set of one file is saved as OUT/<file name>
(`data/tinyshakespeare.txt`), a data set of several files as OUT/<set name>/<file name>
(`data/gutenberg/pg11-alice-s-adventures-in-wonderland.txt`, `data/gpt2-vocab/vocab.bpe`),
so that a set is one folder to pass as `--input` and never mixes with another.

Each file also has a path relative to a mirror (the layout of the project's shared data
folder, e.g. `llms-from-scratch/the-verdict.txt`): with `mirror=` (or the environment
variable LMFORGE_DATA_MIRROR) set to a URL or a local folder, files come from there.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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
    path: str  # relative to a mirror; the file is saved under its last component (see DataSource.saved_as)
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class DataSource:
    """A named entry of the registry: one or more files that belong together."""

    name: str
    description: str
    license: str
    files: tuple[RemoteFile, ...]

    def saved_as(self, file: RemoteFile) -> str:
        """Where `file` goes, relative to `--out`: its name for a one-file set, NAME/its name
        for a set of several files (one folder per set, so sets never mix and a set is one `--input`)."""
        return file.name if len(self.files) == 1 else f"{self.name}/{file.name}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57"
_LLAMA_FACTORY = "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30"
_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
_NLTK = "https://raw.githubusercontent.com/nltk/nltk/4dc39fbf6965509f7b74316eff239bd110a03b49/nltk_data/corpora/gutenberg"
_ESP32_LLM = "https://raw.githubusercontent.com/DaveBben/esp32-llm/934dab4d242d259abd88678488ea3b62d4fca601/data"

# 18 Project Gutenberg novels, each from its GITenberg repository at a commit:
# (repository, commit, file in it, saved name, bytes, sha256). UTF-8 `-0.txt` where the repo has one, else ASCII.
_GUTENBERG = (
    ("Alice-s-Adventures-in-Wonderland_11", "7f18748e114b994d5d9454d5793581bc0b9cf9d7", "11-0.txt", "pg11-alice-s-adventures-in-wonderland.txt", 173595, "49a0b2726606e1290ac03a63978fa1dd1bd38a8d805704d98265f393533ea094"),
    ("The-Time-Machine_35", "154a5c628743bd7d35d1af0fc4bcc017f0e111e1", "35-0.txt", "pg35-the-time-machine.txt", 204492, "0eb70818a4c7e2e04f91be807bad37ca5c1475cd51cec2a7b620c4db2b595ce4"),
    ("The-Adventures-of-Tom-Sawyer_74", "9b4174649064f197ca27895d98806b4a8659722b", "74-0.txt", "pg74-the-adventures-of-tom-sawyer.txt", 428104, "b1cd5782db259c00bc1a8fbb58238f285e40828cc858c1343f74a0a75157cc91"),
    ("Adventures-of-Huckleberry-Finn_76", "8494afff3a26f95f37376f7a79a014cf818ccaba", "76-0.txt", "pg76-adventures-of-huckleberry-finn.txt", 616320, "cd9931183257a850178225bd5e25e4f2df0cbac544dfe9a49cd0ea5a210c24d9"),
    ("Frankenstein_84", "c98a483bd1f34e7366126b81bcedd1a6faee636e", "84-0.txt", "pg84-frankenstein.txt", 450783, "c29a4f56dd91aa894a3f17d5f96b356ccb499e3e2c5a27964de911845e39efab"),
    ("A-Tale-of-Two-Cities_98", "0f6111bc7237af7375295ec1754c2e57e19f67f1", "98-0.txt", "pg98-a-tale-of-two-cities.txt", 804335, "2fcfa071498b30724bd1bd714ba89e38477d632b86d74e87559f6259d3917e36"),
    ("Treasure-Island_120", "46f38f7b63dbda34415ce29ef5548023a8ba8dda", "120-0.txt", "pg120-treasure-island.txt", 396596, "0fee2fef1b2ffde22e2c962bd8bc2b75ea1ae9b02b3fe85ef08d44f4cc1bb2de"),
    ("Middlemarch_145", "39add53d31f10ba5cecdcbe8c095f90b25fd4b3f", "145.txt", "pg145-middlemarch.txt", 1847708, "f499b77eb0e4e34edc3bae6b968e3241c8327384631bd26e8eec76b726915a7d"),
    ("Emma_158", "9943f6422b9246e7ad37625d6bd014b035fbfdea", "158-0.txt", "pg158-emma.txt", 927445, "89b601ce13c21eca31766bdd1a554842fc9ecb7d3638cc769f41712a523e24cf"),
    ("Dracula_345", "5216d6ea255fbf8966426a160b68251b18f16907", "345.txt", "pg345-dracula.txt", 883158, "c802711470ddb2aaca81432fc101ed29c154e7c3d32df4172478695c33f68eae"),
    ("Little-Women_514", "2b0c302d954a57cfa42c95d88ef053fd1b1aef55", "514.txt", "pg514-little-women.txt", 1053433, "b20d98130841548c2137476e18fb1fe3bc7d666202985cafa09b5e02e54f7d7f"),
    ("Wuthering-Heights_768", "7f246b8eba2cf744e757f7425c90ad362ecb8a99", "768.txt", "pg768-wuthering-heights.txt", 681637, "2ff1cd2fa12ecff82da679e889ca7645e132e7bcfd55768ea42a955abe12c1e1"),
    ("Jane-Eyre_1260", "d8976a3c05269fb2ecb83d4575d82c6c2abe0012", "1260.txt", "pg1260-jane-eyre.txt", 1070330, "bc74b04ec70c9283323f5043f3305c4b08e70650a96ca5a9e1c5e5c5b4c0aa9a"),
    ("Pride-and-Prejudice_1342", "81db45c9c48c592f0b77f01fc59e677ad0a5634e", "1342-0.txt", "pg1342-pride-and-prejudice.txt", 724725, "48e0522844402a86a3ea98f0947ba85ea54838db3c59022299298ed968a5a163"),
    ("Great-Expectations_1400", "889db0e100928a957f469bf834c564d04065c8e6", "1400-0.txt", "pg1400-great-expectations.txt", 1049619, "b58ce42c630e06314f2442d5937fa8a8556b6e3c5c16f4713c7332a4bb50b420"),
    ("The-Adventures-of-Sherlock-Holmes_1661", "7e5dd2703fbf503c004063e96ab7c61262375e5f", "1661.txt", "pg1661-the-adventures-of-sherlock-holmes.txt", 594941, "2a0ce5568625a304f54fbb6bfdeeadf527a1437254b5f0e06b5a9e233d4784a2"),
    ("War-and-Peace_2600", "fa22ab90f00f627e83d14acabe32d91602d2365d", "2600-0.txt", "pg2600-war-and-peace.txt", 3359542, "6cbcc5ca5e590fb9ace161a5b93e4ecf280d7118104be0d63b686c004cfa70ae"),
    ("Moby-Dick--Or-The-Whale_2701", "bdf1948e6cd00963730971e5624e764a35f238c3", "2701-0.txt", "pg2701-moby-dick-or-the-whale.txt", 1276201, "baf9b04fcf6e0008f30eaaa6697277751448c1070b20175e0082f28cbb161fd3"),
)  # fmt: skip

# NLTK's "Gutenberg selections" (emma and moby_dick left out: they are in _GUTENBERG), with the corpus README:
# (file, bytes, sha256), all in nltk_data/corpora/gutenberg/ at one commit.
_NLTK_GUTENBERG = (
    ("README", 9275, "791b8a01e866fb107e045c712e8421fc752b672218886c2b5ce71601db1e56ae"),
    ("austen-persuasion.txt", 466292, "cec097657cbfeb62aafe178973f514fa07ab66a5e28ea025ebd5d51ca870e40f"),
    ("austen-sense.txt", 673022, "57b169c7cfa502896dee25bd66616f61cc1d21084caf31f015176ee46fda9718"),
    ("blake-poems.txt", 38153, "840897a66e23a47dd1fd56b864f421b2be0af074dc081244f7995bf26939eee9"),
    ("chesterton-ball.txt", 457450, "c6b6d4e8c09a3f49a09f37f4e47663d4d6f048b62d86c70ccafdfd8f27059a58"),
    ("chesterton-brown.txt", 406629, "67027976205b4b30e367c704807f56c8ffac3e8ea6037d993e57ab1fe28447ec"),
    ("chesterton-thursday.txt", 320525, "8b431a2a8db84089cd6f83fa66610c3b12c04114609df6e90137c0c58f2c5493"),
    ("milton-paradise.txt", 468220, "49028a77c557de1459e96c026edbe72997be2d9015925f7baefb793cd6fe706f"),
    ("shakespeare-caesar.txt", 112310, "7c46bd32fc84d9596bcad55b61ec3c1a390239acb190b286422855aafc2774b3"),
    ("shakespeare-hamlet.txt", 162881, "1eceab7027ad7e0cc25c6b6aadcb2e6bb070395cb2085f775ac732d63d5db240"),
    ("shakespeare-macbeth.txt", 100351, "d4a204352cfe5924cbae76f764225d120e9f7617d39cb8c949dedd3f306353ac"),
    ("whitman-leaves.txt", 711215, "93ebaf1dccc8f1514b4b1c2f52e64e81829113fc58cff63fb51ada0c72f99c3e"),
)

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
            "hh-rlhf-harmless",
            "Anthropic HH-RLHF harmless-base test split: 2,312 chosen/rejected dialogue pairs, gzipped JSONL (offensive by design)",
            "MIT (anthropics/hh-rlhf)",
            (
                RemoteFile(
                    "https://raw.githubusercontent.com/anthropics/hh-rlhf/354e5c3cb8960630860dd5774a6ac2a58313bf4d/"
                    "harmless-base/test.jsonl.gz",
                    "hh-rlhf/harmless-base_test.jsonl.gz",
                    "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
                    742801,
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
            "gutenberg",
            "18 Project Gutenberg novels, 16.5 MB, Gutenberg header and license kept (GITenberg repositories)",
            "public domain in the US; the Project Gutenberg License is inside each file",
            tuple(
                RemoteFile(f"https://raw.githubusercontent.com/GITenberg/{repo}/{commit}/{origin}", f"gutenberg/{name}", sha256, size)
                for repo, commit, origin, name, size, sha256 in _GUTENBERG
            ),
        ),
        DataSource(
            "nltk-gutenberg",
            "NLTK's Gutenberg selections: 11 books (Austen, Blake, Chesterton, Milton, Shakespeare, Whitman), 3.9 MB, + README",
            "public domain texts; nltk repo Apache-2.0",
            tuple(RemoteFile(f"{_NLTK}/{name}", f"nltk/gutenberg/{name}", sha256, size) for name, size, sha256 in _NLTK_GUTENBERG),
        ),
        DataSource(
            "stories260K",
            "llama2.c's stories260K: a 260K-parameter Llama trained on TinyStories + its 512-token tokenizer tok512.bin",
            "MIT (karpathy/llama2.c, tinyllamas); the vendoring repo has no license file",
            (
                RemoteFile(
                    f"{_ESP32_LLM}/stories260K.bin",
                    "weights/stories260K/stories260K.bin",
                    "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
                    1056540,
                ),
                RemoteFile(
                    f"{_ESP32_LLM}/tok512.bin",
                    "weights/stories260K/tok512.bin",
                    "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
                    6227,
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
    dest: str | os.PathLike,
    *,
    mirror: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> tuple[Path, bool]:
    """Fetch `file` to the path `dest`, verified; return (its path, whether it was downloaded).

    A file already there with the right sha256 is kept as is; one with another hash is
    refused unless `overwrite`, since it may be the user's own.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_file():
        raise LmforgeError(f"{dest} exists and is not a file: move it away to download {file.name} there")
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
    """Fetch every file of the registry entry `name` to OUT/`DataSource.saved_as(file)` (see `download_file`)."""
    if name not in DATASETS:
        raise LmforgeError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)} (see `lmforge data download --list`)")
    source = DATASETS[name]
    return [
        download_file(f, Path(out) / source.saved_as(f), mirror=mirror, overwrite=overwrite, progress=progress) for f in source.files
    ]
