"""The README's examples run as written (issue 12: a new user's first hour).

Every command of the README's ```bash blocks after the two set-up commands runs, in the
README's order, in one fresh folder, as `bash -c 'set -euo pipefail; COMMAND'` with the
venv's `lmforge` first on PATH; ```python blocks run with the venv's Python in the same
folder; a ```toml block whose first line is `# NAME` is the file NAME a reader writes
(written before the walk). Data comes from `lmforge data download`, with
LMFORGE_DATA_MIRROR pointing at ../shared/data, so nothing is fetched from the internet.

Tiny sizes come from one table, TINY: each (pattern, replacement) is applied to every
command and written file, so the README keeps the real figures and the test runs in
minutes. Every pattern must be used (a stale one fails), and the number of commands run is
asserted (EXPECTED_RUN), so a README change that silently drops or adds commands fails
here. What cannot run here is listed in NOT_RUN, each entry matching exactly one command.
Sections are separate tests that share the folder; a section runs the ones before it first.
A command that starts a server (`lmforge serve`) runs in the background, and the walk goes
on once it listens; the commands after it (curl, the `openai` client) talk to it, and it
is stopped when the walk ends.
Each command's time is printed (`pytest -s -p no:xdist` shows them); about 6.5 minutes in all on one of 2 cores.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SHARED

from lmforge.data.download import DATASETS, MIRROR_ENV

README = Path(__file__).resolve().parents[1] / "README.md"


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


PORT = _free_port()  # the README's server listens on 8000; the walk's on a free port
SETUP_MARK = "scripts/bootstrap"  # the two set-up commands of "Set up and run": they make the venv this test runs in
SETUP_COMMANDS = 2

# (regex, replacement): the README's real sizes -> tiny ones. Applied in order to every command and written file.
TINY: list[tuple[str, str]] = [
    (r"--max-steps \d+", "--max-steps 2"),
    (r"checkpoints/step-\d{8}", "checkpoints/step-00000002"),  # a checkpoint the 2-step run keeps: its last
    (r"(?m)^max_steps = \d+", "max_steps = 2"),
    (r"--epochs [\d.]+", "--epochs 0.01"),  # a few batches of the training split
    (r"--vocab-size \d+", "--vocab-size 400"),  # 256 bytes + a few merges: BPE training in a second
    (r"--preset (micro|small)\b", "--preset nano"),
    (r'(?m)^preset = "(micro|small)"', 'preset = "nano"'),
    (r"--batch-size \d+", "--batch-size 2"),
    (r"(?m)^batch_size = \d+", "batch_size = 2"),
    (r"--max-new-tokens \d+", "--max-new-tokens 8"),
    (r"--minutes [\d.]+", "--minutes 0.05"),
    # flags the README leaves at their defaults, added: fewer examples / batches measured and answered
    (r"^lmforge (finetune|align) [\w-]+", r"\g<0> --eval-examples 16"),
    (r"--rounds \d+", "--rounds 1 --rollout-tokens 8"),
    (r"--iterations \d+", "--iterations 1 --rollout-batch 8 --rollout-tokens 8"),
    (r"(^lmforge|-m lmforge) pretrain", r"\g<0> --eval-batches 2"),
    (r"^lmforge quickstart", r"\g<0> --preset nano"),
    # the evaluation sets sit beside the checkout (../shared/data/eval), not in the test's fresh folder
    (r"--data-dir \.\./shared/data/eval", f"--data-dir {SHARED / 'eval'}"),
    (r"--tasks all", "--tasks all --limit 3"),
    # a 20 KB story instead of the 1.1 MB play: the same sliding windows, a 50th of the tokens
    (r"--text data/tinyshakespeare\.txt", f"--text {SHARED / 'llms-from-scratch' / 'the-verdict.txt'}"),
    # the server of the Serving section: a free port instead of 8000 (a busy machine may hold 8000)
    (r"^lmforge serve [^#]*?(?=\s*$)", rf"\g<0> --port {PORT}"),
    (r"127\.0\.0\.1:8000", f"127.0.0.1:{PORT}"),
]
BACKGROUND = "lmforge serve "  # a command that starts a server (not a --check): it runs in the background until the walk ends

# A substring of each command that cannot run here -> why. Each must match exactly one README command.
NOT_RUN: dict[str, str] = {
    "--nnodes=2": "needs two machines with 8 GPUs each",
    "--judge-url": "needs a chat model behind an OpenAI-compatible endpoint",
}
EXPECTED_RUN = 63  # commands and Python blocks run: change it with the README, on purpose

# what a command reads on stdin (by its start); anything else gets an empty stdin
STDIN = {"lmforge chat": "Once upon a time\n/quit\n"}
TIMEOUT = 600  # seconds per command: a hang fails instead of blocking the suite


@dataclasses.dataclass(frozen=True)
class Step:
    section: str
    kind: str  # "bash" | "python"
    text: str  # as written in the README
    comment: str = ""  # a bash command's trailing `# ...`


def _fences(text: str) -> Iterator[tuple[str, str, str]]:
    """(section heading, language, body) of every fenced block, in order."""
    section = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^```(\w*)", line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            yield section, fence.group(1), "\n".join(lines[i + 1:end])
            i = end
        i += 1


def _commands(body: str) -> Iterator[tuple[str, str]]:
    """(command, trailing comment) of a bash block: backslash continuations joined, comment lines skipped."""
    joined = re.sub(r"\\\n\s*", "", body)
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^(.*?)\s+#\s(.*)$", line)
        yield (m.group(1), m.group(2).strip()) if m and m.group(1).count("'") % 2 == 0 else (line, "")


def readme_walk() -> tuple[list[Step], dict[str, str], list[str], list[str]]:
    """The README's steps in order, the files its named ```toml blocks write, the set-up and the not-run commands."""
    steps, files, setup, skipped = [], {}, [], []
    for section, lang, body in _fences(README.read_text(encoding="utf-8")):
        if lang == "bash":
            for command, comment in _commands(body):
                if SETUP_MARK in command:
                    setup.append(command)
                elif any(s in command for s in NOT_RUN):
                    skipped.append(command)
                else:
                    steps.append(Step(section, "bash", command, comment))
        elif lang == "python":
            steps.append(Step(section, "python", body))
        elif lang == "toml" and (name := re.match(r"#\s*(\S+\.toml)\s*$", body.splitlines()[0])):
            files[name.group(1)] = body
    return steps, files, setup, skipped


STEPS, FILES, SETUP, SKIPPED = readme_walk()
SECTIONS = list(dict.fromkeys(s.section for s in STEPS))


def tiny(text: str, used: set[str] | None = None) -> str:
    """`text` with TINY applied; the patterns that matched are added to `used` (so a stale one is caught)."""
    for pattern, replacement in TINY:
        text, n = re.subn(pattern, replacement, text)
        if n and used is not None:
            used.add(pattern)
    return text


def test_the_walk_is_what_the_readme_says() -> None:
    """Set-up commands, exclusions and tiny values all still match the README: nothing is dropped silently."""
    assert len(SETUP) == SETUP_COMMANDS, SETUP
    for marker in NOT_RUN:
        assert sum(marker in c for c in SKIPPED) == 1, f"NOT_RUN entry {marker!r} must match exactly one README command"
    assert len(STEPS) == EXPECTED_RUN, f"the README has {len(STEPS)} runnable examples, the test expects {EXPECTED_RUN}"
    used: set[str] = set()
    for step in STEPS:
        tiny(step.text, used)
    for body in FILES.values():
        tiny(body, used)
    assert used == {p for p, _ in TINY}, f"TINY patterns that match nothing in the README: {sorted({p for p, _ in TINY} - used)}"
    assert "run.toml" in FILES


def test_every_data_path_is_where_an_earlier_download_writes() -> None:
    """`data/...` in a command is a file (or a set's folder, or a glob over files) that a
    `lmforge data download ... --out data/` before it writes: the rule of DataSource.saved_as."""
    written: set[str] = set()
    downloads = 0
    for command in [s.text for s in STEPS if s.kind == "bash"]:
        if command.startswith("lmforge data download "):
            downloads += 1
            words = command.split()[3:]
            assert words[-2:] == ["--out", "data/"], command
            for name in words[:-2]:
                assert name in DATASETS, f"{command}: no data set {name!r}"
                source = DATASETS[name]
                written |= {f"data/{source.saved_as(f)}" for f in source.files}
                if len(source.files) > 1:
                    written.add(f"data/{name}")
            continue
        for path in re.findall(r"(?<![\w/.])['\"]?(data/[^\s'\"]+)", command):
            found = fnmatch.filter(written, path) if "*" in path else [path] if path.rstrip("/") in written else []
            assert found, f"`{command}` reads {path}, which no earlier `lmforge data download` writes"
    assert downloads >= 4


class Walk:
    """One fresh folder; the README's sections run into it in order, each at most once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, str | None] = {}  # section -> None (passed) or why it failed
        for name, body in FILES.items():
            (root / name).write_text(tiny(body), encoding="utf-8")
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), MIRROR_ENV: str(SHARED)}
        # The tiny models are bound by per-call overhead: a second torch thread only adds it, and on a busy shared
        # machine its spin-waiting made a 0.6M-parameter evaluation 6-10x slower (as conftest.py's set_num_threads(1)).
        self.env["OMP_NUM_THREADS"] = "1"
        self.env.pop("LMFORGE_TRACEBACK", None)
        self.servers: list[subprocess.Popen] = []

    def through(self, section: str) -> None:
        """Run every section up to `section` that has not run; fail if one of them failed."""
        for earlier in SECTIONS[: SECTIONS.index(section) + 1]:
            if earlier not in self.done:
                try:
                    for step in (s for s in STEPS if s.section == earlier):
                        self.run(step)
                except BaseException as e:
                    self.done[earlier] = str(e)
                    raise
                self.done[earlier] = None
            elif self.done[earlier] is not None and earlier != section:
                pytest.fail(f"section {earlier!r}, which {section!r} builds on, failed")
            elif self.done[earlier] is not None:
                pytest.fail(self.done[earlier])

    def serve(self, text: str) -> None:
        """Start a server command and return once it says it listens."""
        proc = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.servers.append(proc)
        line = proc.stdout.readline()
        if not line.startswith("lmforge: serving"):
            proc.kill()
            pytest.fail(f"`{text}` did not start serving: {line}{proc.stderr.read()[-2000:]}")
        print(f"         {text[:120]} (serving)")

    def stop(self) -> None:
        for proc in self.servers:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def run(self, step: Step) -> None:
        text = tiny(step.text)
        if step.kind == "bash" and text.startswith(BACKGROUND) and "--check" not in text:
            return self.serve(text)
        if step.kind == "python":
            argv = [sys.executable, "-c", text]
        else:
            argv = ["bash", "-c", f"set -euo pipefail\n{text}"]
        stdin = next((v for k, v in STDIN.items() if text.startswith(k)), "")
        start = time.perf_counter()
        run = subprocess.run(argv, check=False, cwd=self.root, env=self.env, input=stdin, capture_output=True, text=True,
                             timeout=TIMEOUT)
        print(f"{time.perf_counter() - start:6.1f} s  {text[:120]}")
        if run.returncode != 0:
            tail = "\n".join((run.stdout + run.stderr).splitlines()[-25:])
            pytest.fail(f"README ({step.section}) `{step.text}`\nran as `{text}`\nexited {run.returncode}:\n{tail}")
        if re.match(r"echo .*\| lmforge tokenizer (encode|decode)", text):  # the comment is what it prints
            assert run.stdout.strip() == step.comment, (step.text, run.stdout)
        if stdin:  # a chat answered
            assert run.stdout.strip(), f"`{text}` printed no answer to {stdin!r}"


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    walk = Walk(tmp_path_factory.mktemp("readme"))
    yield walk
    walk.stop()


@pytest.mark.slow
@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs_as_written(walk: Walk, section: str) -> None:
    walk.through(section)
