"""A guard on bad input, for every `lmforge` command (issue 11).

A user's mistake must end in exit code 2 and one line `lmforge: error: ...` naming the
culprit (the flag, the value or the file), never a traceback, and never a change to files
that were there before. Two tables:

- the explicit table: reported cases, each required to fail that way;
- generated cases, from the parser itself (`build_parser()`): every option of every command
  gets a value of the wrong type, out of range, empty, and (path options) a folder, a file,
  a FIFO and a missing path, on an otherwise valid fast invocation (`BASES` in
  cli_guard_fixtures.py). A value may be legitimate, so these only require no traceback,
  no hang, exit 2 (or 0 where ALLOW_ZERO says why the value is fine) and no changed files.

A new command fails `test_every_command_has_a_base_invocation` until it has a base
invocation; a new option joins the generated cases by itself.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from cli_guard_fixtures import (
    BASES,
    NEEDS,
    Case,
    base_argv,
    build_fixtures,
    changes,
    fill,
    generated_cases,
    leaf_parsers,
    make_workspace,
    run_in_process,
    run_subprocess,
    snapshot,
)

from lmforge.cli import build_parser

PARSER = build_parser()
GENERATED = generated_cases(PARSER)

# (command or "*", flag, kind of bad value) -> why exit 0 is right for it. Anything else must exit 2.
ALLOW_ZERO: dict[tuple[str, str, str], str] = {
    ("*", "--seed", "negative"): "any integer is a seed",
    ("*", "--out", "dir"): "new files may go into an existing folder as long as what it held stays (checked)",
    ("*", "--time-limit", "inf"): "an infinite time limit is no time limit",
    ("*", "--grad-clip", "inf"): "clipping at an infinite norm is no clipping",
    ("*", "--resume", "empty"): "'' is TrainConfig's value for 'do not resume'",
    ("*", "--quantize", "empty"): "'' is FinetuneConfig's value for 'no quantization'",
    ("*", "--replay", "empty"): "'' is FinetuneConfig's value for 'no replay'",
    ("pretrain", "--device", "empty"): "'' is TrainConfig's value for 'pick the device'",
    ("pretrain", "--init-from", "empty"): "'' is the default: a fresh model from the preset",
    ("finetune classify", "--device", "empty"): "'' is TrainConfig's value for 'pick the device'",
    ("finetune instruct", "--device", "empty"): "'' is TrainConfig's value for 'pick the device'",
    ("tokenizer train", "--input", "file"): "any text file is a corpus",
    ("tokenizer train", "--input", "dir"): "a folder of .txt files is a corpus",
    ("data prepare", "--input", "file"): "any text file is a corpus",
    ("data prepare", "--input", "dir"): "a folder of .txt files is a corpus",
    ("quickstart", "--input", "file"): "any text file is a corpus",
    ("quickstart", "--input", "dir"): "a folder of .txt files is a corpus",
    ("tokenizer stats", "files", "file"): "any text file can be measured",
    ("tokenizer stats", "files", "dir"): "a folder of .txt files can be measured",
    ("generate", "--prompt", "empty"): "an empty prompt is no prompt: the model starts a fresh document",
    ("chat", "--system", "empty"): "an empty system message is no system message",
    ("align ppo", "--reward-label", "empty"): "'' is the default: a reward model (one score) takes no label",
    ("reward", "--prompt", "empty"): "an empty user message still renders in the template: the response to it is scored",
    ("reward", "--response", "empty"): "an empty response has a score too (the prompt, then <|endoftext|>)",
    ("eval", "--text", "file"): "any text file can be measured",
}


def allowed_zero(case: Case) -> str | None:
    return ALLOW_ZERO.get((case.command, case.flag, case.kind)) or ALLOW_ZERO.get(("*", case.flag, case.kind))


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-guard")
    fx = build_fixtures(root)
    shutil.copytree(fx, root / "pristine", symlinks=True)
    return fx


@pytest.fixture(scope="module")
def run_dir(fx, tmp_path_factory) -> Path:
    """A finished one-step pretraining run (for `--out EXISTING_RUN`), made by the base invocation."""
    ws = make_workspace(tmp_path_factory.mktemp("run"))
    result = run_in_process([fill(t, fx, ws) for t in base_argv(PARSER, "pretrain")], ws, b"", lambda: ("", ""))
    assert result.code == 0, result.describe()
    return ws / "out" / "run"


@pytest.fixture
def guard(fx, tmp_path, capfd):
    """Runs a case in a fresh workspace and says what went wrong, if anything."""
    return Guard(fx, make_workspace(tmp_path / "ws"), capfd)


class Guard:
    def __init__(self, fx: Path, ws: Path, capfd) -> None:
        self.fx, self.ws, self.capfd = fx, ws, capfd

    def read(self) -> tuple[str, str]:
        captured = self.capfd.readouterr()
        return captured.out, captured.err

    def run(self, argv, stdin: bytes = b"", subprocess: bool = False):
        """Returns the result and the changes to pre-existing files (the fixtures are put back if changed)."""
        argv = [fill(t, self.fx, self.ws) for t in argv]
        before_fx, before_ws = snapshot(self.fx), snapshot(self.ws)
        if subprocess:
            with self.capfd.disabled():
                result = run_subprocess(argv, self.ws, stdin)
        else:
            result = run_in_process(argv, self.ws, stdin, self.read, fifos=[self.ws / "fifo"])
        changed = changes(before_ws, snapshot(self.ws), self.ws, new_allowed=True)
        fx_changed = changes(before_fx, snapshot(self.fx), self.fx, new_allowed=False)
        if fx_changed:  # put the fixtures back for the cases after this one
            shutil.rmtree(self.fx)
            shutil.copytree(self.fx.parent / "pristine", self.fx, symlinks=True)
        return result, changed + fx_changed


# --- the table stays complete -----------------------------------------------------------------


def test_every_command_has_a_base_invocation():
    commands = [name for name, _ in leaf_parsers(PARSER)]
    missing = [c for c in commands if c not in BASES]
    assert not missing, f"add a valid, fast invocation of {missing} to BASES in tests/cli_guard_fixtures.py"
    assert not set(BASES) - set(commands), f"BASES names commands that no longer exist: {set(BASES) - set(commands)}"


def test_allow_list_and_needs_name_generated_cases():
    used = {key for case in GENERATED for key in ((case.command, case.flag, case.kind), ("*", case.flag, case.kind))}
    assert not set(ALLOW_ZERO) - used, f"ALLOW_ZERO entries that match no case: {set(ALLOW_ZERO) - used}"
    flags = {(case.command, case.flag) for case in GENERATED}
    assert not set(NEEDS) - flags, f"NEEDS entries that match no option: {set(NEEDS) - flags}"


@pytest.mark.parametrize("command", sorted(BASES), ids=lambda c: c.replace(" ", "-"))
def test_base_invocation_succeeds(guard, command):
    """Each generated case changes one flag of this; it must be valid, or the cases test nothing."""
    result, changed = guard.run(base_argv(PARSER, command), BASES[command].stdin)
    assert result.code == 0 and "Traceback" not in result.err and not result.hung, result.describe()
    assert not changed, changed


# --- generated cases ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", GENERATED, ids=[c.id for c in GENERATED])
def test_generated_bad_value(guard, case):
    assert case.argv, f"`lmforge {case.command}` has no base invocation: add one to BASES in tests/cli_guard_fixtures.py"
    result, changed = guard.run(case.argv, case.stdin)
    reason = allowed_zero(case)
    problems = []
    if "Traceback" in result.err:
        problems.append("a traceback")
    if result.hung:
        problems.append("a hang")
    if result.code not in ({0, 2} if reason else {2}):
        problems.append(f"exit code {result.code}" + ("" if reason else " (0 is not in ALLOW_ZERO for this value)"))
    problems += changed
    assert not problems, f"{', '.join(problems)}: {result.describe()}"


# --- the explicit table ---------------------------------------------------------------------------


def _cut_tokenizer(ws: Path, fx: Path, run: Path) -> None:
    shutil.copytree(fx / "model", ws / "badtok")
    data = (ws / "badtok" / "tokenizer.json").read_bytes()
    (ws / "badtok" / "tokenizer.json").write_bytes(data[: len(data) // 2])


def _bad_config(ws: Path, fx: Path, run: Path) -> None:
    shutil.copytree(fx / "model", ws / "badcfg")
    text = (ws / "badcfg" / "config.json").read_text()
    (ws / "badcfg" / "config.json").write_text(re.sub(r'"n_layer": \d+', '"n_layer": "four"', text))
    assert '"four"' in (ws / "badcfg" / "config.json").read_text()


def _books(ws: Path, fx: Path, run: Path) -> None:
    shutil.copytree(fx / "books", ws / "X" / "books")


def _toml(text: str):
    def write(ws: Path, fx: Path, run: Path) -> None:
        (ws / "run.toml").write_text(text)

    return write


def _copy_run(ws: Path, fx: Path, run: Path) -> None:
    shutil.copytree(run, ws / "existing-run", symlinks=True)


def explicit(case_id: str, command: str, values: list[tuple[str, str]], culprit: str, setup=None, *,
             in_subprocess: bool = False, drop: tuple[str, ...] = (), extra: tuple[str, ...] = ()):
    """A reported case: the base invocation of `command` with `values` set (and `drop` left
    out, `extra` added); its one error line must match the regex `culprit` ({ws}: the
    workspace). `setup(ws, fx, run_dir)` makes the bad files. In a subprocess what could hang
    or allocate without bound."""
    argv = (*base_argv(PARSER, command, values, drop), *extra)
    return pytest.param(argv, BASES[command].stdin, culprit, setup, in_subprocess, id=case_id)


EXPLICIT = [
    explicit("generate/--max-new-tokens=-5", "generate", [("--max-new-tokens", "-5")], r"--max-new-tokens|-5"),
    explicit("generate/--temperature=nan", "generate", [("--temperature", "nan")], r"--temperature|nan"),
    explicit("generate/--prompt-ids=5,-2", "generate", [("--prompt-ids", "5,-2")], r"-2"),
    explicit("generate/--stop=''", "generate", [("--stop", "")], r"--stop|stop string"),
    explicit("generate/--stop-id=99999", "generate", [("--stop-id", "99999")], r"--stop-id|99999"),
    explicit("tokenizer-train/--out=EXISTING_FILE", "tokenizer train", [("--out", "{ws}/keep.txt")], r"keep\.txt"),
    explicit("tokenizer-train/--special=''", "tokenizer train", [("--special", "")], r"--special"),
    explicit("tokenizer-train/--pattern=x*", "tokenizer train", [("--pattern", "x*")], r"--pattern|x\*"),
    explicit("tokenizer-train/--pattern=[a-z]+", "tokenizer train", [("--pattern", "[a-z]+")], r"--pattern|\[a-z\]\+"),
    explicit("pretrain/--set=n_layer=abc", "pretrain", [("--set", "n_layer=abc")], r"n_layer|abc"),
    explicit("pretrain/--beta1=2", "pretrain", [("--beta1", "2")], r"beta1"),
    # the file must supply max_steps: a --max-steps flag would win over it
    explicit("pretrain/--config=max_steps-x", "pretrain", [("--config", "{ws}/run.toml")], r"max_steps|max-steps",
             _toml('max_steps = "x"\n'), drop=("--max-steps",)),
    explicit("pretrain/--config=lr-fast", "pretrain", [("--config", "{ws}/run.toml")], r"\blr\b|--lr|fast", _toml('lr = "fast"\n')),
    explicit("pretrain/--set=n_embd=100000", "pretrain", [("--set", "n_embd=100000")], r"(?i)memory|[GT]iB", in_subprocess=True),
    explicit("pretrain/--set=vocab_size=10", "pretrain", [("--set", "vocab_size=10")], r"vocab"),
    explicit("pretrain/--out=EXISTING_RUN", "pretrain", [("--out", "{ws}/existing-run")], r"existing-run|--resume|--overwrite",
             _copy_run),
    explicit("data-prepare/--out=.", "data prepare", [("--out", ".")], r"--out|'\.'|\"\.\"|{ws}"),
    explicit("data-prepare/--input=X-books,--out=X,--overwrite", "data prepare", [("--input", "{ws}/X/books"), ("--out", "{ws}/X")],
             r"--out|--input|{ws}/X\b", _books, extra=("--overwrite",)),
    explicit("data-prepare/--input=/dev/zero", "data prepare", [("--input", "/dev/zero")], r"/dev/zero", in_subprocess=True),
    explicit("data-prepare/--input=FIFO", "data prepare", [("--input", "{ws}/fifo")], r"fifo", in_subprocess=True),
    explicit("finetune-classify/--data=one-class-csv", "finetune classify", [("--data", "{fx}/one_class.csv")],
             r"one_class\.csv|(?i:class|label)"),
    explicit("finetune-classify/--lora-r=100000", "finetune classify", [("--lora-r", "100000")], r"--lora-r|lora_r|100000"),
    explicit("generate/--model=truncated-tokenizer.json", "generate", [("--model", "{ws}/badtok")], r"tokenizer\.json",
             _cut_tokenizer),
    explicit("generate/--model=config-n_layer-four", "generate", [("--model", "{ws}/badcfg")], r"n_layer|four", _bad_config),
]


@pytest.mark.parametrize("argv, stdin, culprit, setup, in_subprocess", EXPLICIT)
def test_explicit_bad_input(guard, run_dir, argv, stdin, culprit, setup, in_subprocess):
    if setup is not None:
        setup(guard.ws, guard.fx, run_dir)
    result, changed = guard.run(argv, stdin, subprocess=in_subprocess)
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lmforge: error: ")]
    problems = []
    if "Traceback" in result.err:
        problems.append("a traceback")
    if result.hung:
        problems.append("a hang")
    if result.code != 2:
        problems.append(f"exit code {result.code}, not 2")
    if len(errors) != 1 or lines[-1] != errors[0]:
        problems.append("not one last line `lmforge: error: ...` on stderr")
    elif not re.search(culprit.replace("{ws}", re.escape(str(guard.ws))), errors[0]):
        problems.append(f"the error does not name the culprit (/{culprit}/)")
    problems += changed
    assert not problems, f"{', '.join(problems)}: {result.describe()}"
