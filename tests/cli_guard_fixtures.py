"""Machinery for tests/test_cli_guard.py: tiny fixtures, one valid fast invocation of every
`lmforge` command, bad-input cases generated from the argparse parser, and a runner that
runs the CLI in-process (or, for what could hang or eat the machine, as a subprocess) and
reports exit code, stderr, a traceback, a hang and any change to files that existed before.

Paths in invocations are templates: `{fx}` is the module's read-only fixture folder
(tokenizer, data, model, ...), `{ws}` the case's own workspace, which is also the working
directory of the run. Every workspace holds the same pre-existing files (an unrelated
file, a non-empty folder, a FIFO, an output folder with files in it); both folders are
snapshotted (kind and sha256 of every entry) before a run and compared after.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cli_runner import release_fifo

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VERDICT = SHARED / "llms-from-scratch" / "the-verdict.txt"
INSTRUCTIONS = SHARED / "llms-from-scratch" / "instruction-data.json"
PREFERENCES = SHARED / "llms-from-scratch" / "instruction-data-with-preference.json"
GPT2 = SHARED / "gpt2"

# --- one valid, fast invocation of every command ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Base:
    argv: tuple[str, ...]  # after the command words; positionals first
    stdin: bytes = b""


TINY_MODEL = ("--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "n_kv_head=1", "--set", "mlp_hidden=64")
PRETRAIN = ("--data", "{fx}/data", "--out", "{ws}/out/run", "--preset", "nano", "--context-length", "16", "--batch-size", "2",
            "--max-steps", "1", "--warmup-steps", "0", "--eval-batches", "1", "--sample-prompts", "I", "--sample-tokens", "1",
            "--device", "cpu", *TINY_MODEL)
FINETUNE = ("--base", "{fx}/model", "--max-steps", "1", "--batch-size", "2", "--eval-batches", "1", "--device", "cpu")
ALIGN = (*FINETUNE, "--eval-examples", "1", "--max-length", "64")

BASES: dict[str, Base] = {
    "tokenizer train": Base(("--input", "{fx}/verdict.jsonl", "--text-field", "text", "--vocab-size", "300", "--workers", "1",
                             "--out", "{ws}/out/tok")),
    "tokenizer from-gpt2": Base(("--encoder-json", "{fx}/gpt2/encoder.json", "--vocab-bpe", "{fx}/gpt2/vocab.bpe",
                                 "--out", "{ws}/out/gpt2tok")),
    "tokenizer encode": Base(("--tokenizer", "{fx}/tok"), stdin=b"Hello, world"),
    "tokenizer decode": Base(("--tokenizer", "{fx}/tok"), stdin=b"[72, 101, 108]"),
    "tokenizer stats": Base(("{fx}/books/the-verdict.txt", "--tokenizer", "{fx}/tok")),
    "data prepare": Base(("--input", "{fx}/verdict.jsonl", "--text-field", "text", "--tokenizer", "{fx}/tok", "--workers", "1",
                          "--val-fraction", "0.1", "--out", "{ws}/out/data")),
    "data info": Base(("{fx}/data",)),
    "data download": Base(("the-verdict", "--out", "{ws}/out/dl", "--mirror", "{fx}/mirror")),
    "estimate": Base(("--config", "{fx}/model", "--dtype", "bf16", "--context", "16", "--batch", "2")),
    "pretrain": Base(PRETRAIN),
    "quickstart": Base(("--input", "{fx}/verdict.jsonl", "--vocab-size", "300", "--preset", "nano", "--minutes", "0.01",
                        "--workers", "1", "--text-field", "text", "--out", "{ws}/out/qs")),
    "finetune classify": Base((*FINETUNE, "--data", "{fx}/classify.csv", "--max-length", "16", "--out", "{ws}/out/clf")),
    "finetune instruct": Base((*FINETUNE, "--data", "{fx}/instruct.json", "--max-length", "256", "--out", "{ws}/out/sft")),
    "classify": Base(("free prize now", "--model", "{fx}/classifier", "--device", "cpu")),
    "lora merge": Base(("--adapter", "{fx}/adapter", "--base", "{fx}/model", "--out", "{ws}/out/merged")),
    "generate": Base(("--model", "{fx}/model", "--prompt-ids", "5,6", "--max-new-tokens", "2", "--temperature", "0.8", "--seed", "1",
                      "--top-k", "5", "--top-p", "0.9", "--device", "cpu", "--ids")),
    "chat": Base(("--model", "{fx}/model", "--max-new-tokens", "2", "--seed", "1", "--device", "cpu"), stdin=b"hello\n"),
    "serve": Base(("--model", "{fx}/model", "--port", "0", "--max-batch", "2", "--max-queue", "4", "--max-body-bytes", "4096",
                   "--name", "m", "--api-key", "k", "--device", "cpu", "--check")),
    "convert": Base(("--to-hf", "{fx}/model", "--out", "{ws}/out/hf")),
    "align reward": Base((*ALIGN, "--data", "{fx}/prefs.json", "--out", "{ws}/out/rm")),
    "align dpo": Base((*ALIGN, "--data", "{fx}/prefs.json", "--out", "{ws}/out/dpo")),
    "align orpo": Base((*ALIGN, "--data", "{fx}/prefs.json", "--out", "{ws}/out/orpo")),
    "align iterative-dpo": Base((*ALIGN, "--prompts", "{fx}/prefs.json", "--reward", "{fx}/rm", "--rounds", "1",
                                 "--rollout-tokens", "2", "--out", "{ws}/out/online")),
    "align ppo": Base(("--policy", "{fx}/model", "--prompts", "{fx}/prefs.json", "--reward", "{fx}/rm", "--iterations", "1",
                       "--rollout-batch", "2", "--batch-size", "2", "--rollout-tokens", "2", "--eval-examples", "1",
                       "--device", "cpu", "--out", "{ws}/out/ppo")),
    "reward": Base(("--model", "{fx}/rm", "--prompt", "Name a color.", "--response", "Red.", "--device", "cpu")),
    "compare": Base(("{fx}/runs/a", "{fx}/runs/b", "--x", "tokens", "--metric", "loss", "--out", "{ws}/out/compare.png")),
    "eval judge": Base(("{fx}/responses-a.jsonl", "{fx}/responses-b.jsonl", "--reward-model", "{fx}/rm", "--device", "cpu",
                        "--out", "{ws}/out/judge.json")),
    "eval": Base(("--model", "{fx}/model", "--tasks", "arc_easy,winogrande,lambada_openai", "--data-dir", str(SHARED / "eval"),
                  "--limit", "2", "--num-fewshot", "1", "--batch-size", "4", "--seed", "3", "--bootstrap-iters", "100",
                  "--text", "{fx}/books/the-verdict.txt", "--stride", "128", "--log-samples", "--device", "cpu",
                  "--out", "{ws}/out/eval.json")),
}


# Options that only matter beside another: their cases get these too, so the bad value is read.
# (command, flag) -> (options set, options dropped)
LORA = ([("--lora-r", "2")], ())
ALIGN_COMMANDS = ("align reward", "align dpo", "align orpo", "align iterative-dpo", "align ppo")
NEEDS: dict[tuple[str, str], tuple[list[tuple[str, str]], tuple[str, ...]]] = {
    **{(cmd, flag): LORA for cmd in ("finetune classify", "finetune instruct")
       for flag in ("--lora-alpha", "--lora-dropout", "--lora-targets", "--quantize")},
    **{(cmd, "--epochs"): ([], ("--max-steps",)) for cmd in ("finetune classify", "finetune instruct")},
    # --max-steps wins over --epochs
    ("pretrain", "--max-tokens"): ([], ("--max-steps",)),  # --max-steps wins over --max-tokens
    ("convert", "--tokenizer"): ([("--from-llama2c", "{fx}/llama2c/stories260K.bin")], ()),  # only read with --from-llama2c
    ("convert", "--outtype"): ([("--to-gguf", "{fx}/model")], ()),  # only read with --to-gguf
}


def leaf_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """("tokenizer train", its parser), ... for every command that runs something (`eval` and `eval judge` both do)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs or not subs[0].required:  # runs by itself (`eval`), even when it also has subcommands (`eval judge`)
        yield " ".join(prefix), parser
    if not subs:
        return
    for name, sub in subs[0].choices.items():
        yield from leaf_parsers(sub, (*prefix, name))


# --- what a value is: a path, an int, a float or text ----------------------------------------

PATH_METAVARS = ("DIR", "FILE", "PATH", "F", "MODEL.bin", "TOKENIZER.bin", "URL")
PATH_NAMES = ("out", "model", "data", "tokenizer", "input", "base", "adapter", "config", "resume", "files", "dir", "mirror",
              "from_hf", "to_hf", "from_llama2c", "from_openai_gpt2", "encoder_json", "vocab_bpe")
VALUE_ACTIONS = (argparse._StoreAction, argparse._AppendAction)

# the bad values each kind of option gets; {ws}/... are the workspace's pre-existing entries
BAD_VALUES: dict[str, dict[str, str]] = {
    "int": {"abc": "abc", "empty": "", "negative": "-1"},
    "float": {"abc": "abc", "empty": "", "negative": "-1", "nan": "nan", "inf": "inf"},
    "typed": {"abc": "abc", "empty": "", "negative": "-1", "nan": "nan"},  # a type= of its own: argparse should refuse these
    "path": {"empty": "", "dir": "{ws}/adir", "file": "{ws}/afile.txt", "fifo": "{ws}/fifo", "missing": "{ws}/missing/nothing-here"},
    "text": {"empty": ""},
}
LABELS = {"empty": "''", "dir": "DIR", "file": "FILE", "fifo": "FIFO", "missing": "MISSING"}
OUTPUTS = ("out",)  # options that name what a command writes: a missing path there is what every base invocation gives


def value_kind(action: argparse.Action) -> str:
    if action.type is int:
        return "int"
    if action.type is float:
        return "float"
    if action.type is not None and action.type is not str:
        return "typed"
    metavar = action.metavar if isinstance(action.metavar, str) else ""
    if metavar in PATH_METAVARS or action.dest in PATH_NAMES:
        return "path"
    return "text"


def flag_of(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


# --- invocations as (action, values) segments, so one option can be swapped --------------------


def _segments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[tuple[argparse.Action, list[str]]]]:
    """Split a base invocation (positionals first) into its positionals and option segments."""
    positionals: list[str] = []
    segments: list[tuple[argparse.Action, list[str]]] = []
    for token in argv:
        action = parser._option_string_actions.get(token)
        if action is not None:
            segments.append((action, []))
        elif segments:
            segments[-1][1].append(token)
        else:
            positionals.append(token)
    return positionals, segments


def _exclusive_with(parser: argparse.ArgumentParser, action: argparse.Action) -> set[int]:
    ids: set[int] = set()
    for group in parser._mutually_exclusive_groups:
        if action in group._group_actions:
            ids |= {id(a) for a in group._group_actions if a is not action}
    return ids


def variant(parser: argparse.ArgumentParser, argv: Sequence[str], changes: Sequence[tuple[str, str]] = (),
            drop: Sequence[str] = ()) -> list[str]:
    """`argv` with each (flag or positional dest, value) of `changes` set: an appending option
    gets one more occurrence, any other replaces its segment; options mutually exclusive with
    a changed one and the flags in `drop` are removed."""
    positionals, segments = _segments(parser, argv)
    by_name = {flag_of(a): a for a in parser._actions} | parser._option_string_actions
    for name in drop:
        segments = [(a, v) for a, v in segments if a is not by_name[name]]
    for name, value in changes:
        action = by_name[name]
        if not action.option_strings:
            positionals = [value]
            continue
        excluded = _exclusive_with(parser, action)
        segments = [(a, v) for a, v in segments if id(a) not in excluded]
        if isinstance(action, argparse._AppendAction) or not any(a is action for a, _ in segments):
            segments.append((action, [value]))
        else:
            segments = [(a, [value] if a is action else v) for a, v in segments]
    argv = list(positionals)
    for action, values in segments:
        argv += [action.option_strings[0], *values]
    return argv


# --- generated cases -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    command: str
    argv: tuple[str, ...]  # full template: command words, then arguments
    stdin: bytes = b""
    flag: str = ""
    kind: str = ""


# The align recipes share their training flags (--lr, --warmup-steps, --lora-r, ...) with
# `finetune instruct`: the same parser code (cli/flags.py) and the same config checks. Those
# flags are probed once, there; each align command is probed on its own flags only.
COVERED_BY = {command: "finetune instruct" for command in ALIGN_COMMANDS}


def _same_option(a: argparse.Action, b: argparse.Action) -> bool:
    return (a.option_strings, a.type, a.choices, a.nargs) == (b.option_strings, b.type, b.choices, b.nargs)


def generated_cases(parser: argparse.ArgumentParser) -> list[Case]:
    cases = []
    parsers = dict(leaf_parsers(parser))
    for command, sub in parsers.items():
        base = BASES.get(command)
        covering = parsers[COVERED_BY[command]]._actions if command in COVERED_BY else []
        for action in sub._actions:
            if not isinstance(action, VALUE_ACTIONS) or action.nargs == 0:
                continue
            if any(_same_option(action, other) for other in covering):
                continue
            kind = value_kind(action)
            for bad, value in BAD_VALUES[kind].items():
                if bad == "missing" and action.dest in OUTPUTS:
                    continue  # a new output folder: test_base_invocation_succeeds runs exactly that
                flag = flag_of(action)
                case_id = f"{command.replace(' ', '-')}/{flag}={LABELS.get(bad, value)}"
                if base is None:  # a command with no valid invocation yet: the case says so when it runs
                    cases.append(Case(case_id, command, (), flag=flag, kind=bad))
                    continue
                needs, drop = NEEDS.get((command, flag), ([], ()))
                argv = variant(sub, base.argv, [*needs, (flag, value)], drop)
                cases.append(Case(case_id, command, (*command.split(), *argv), base.stdin, flag, bad))
    return cases


def base_argv(parser: argparse.ArgumentParser, command: str, changes: Sequence[tuple[str, str]] = (),
              drop: Sequence[str] = ()) -> tuple[str, ...]:
    """The base invocation of `command` with some values changed (for the explicit table)."""
    sub = dict(leaf_parsers(parser))[command]
    return (*command.split(), *variant(sub, BASES[command].argv, changes, drop))


# --- fixtures, workspace, snapshots ---------------------------------------------------------------


def fill(template: str, fx: Path, ws: Path) -> str:
    return template.replace("{fx}", str(fx)).replace("{ws}", str(ws))


def make_workspace(ws: Path) -> Path:
    """The pre-existing entries every case starts with (the bad path values point at some)."""
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "keep.txt").write_text("a file that was here before\n")
    (ws / "afile.txt").write_text("an unrelated text file, not what any option expects\n")
    (ws / "adir").mkdir()
    (ws / "adir" / "unrelated.txt").write_text("an unrelated folder's only file\n")
    os.mkfifo(ws / "fifo")
    (ws / "out" / "sub").mkdir(parents=True)
    (ws / "out" / "keep.txt").write_text("an output folder's earlier file\n")
    (ws / "out" / "sub" / "keep.bin").write_bytes(bytes(range(256)))
    return ws


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: (kind, sha256 for files, target for links). FIFOs are never opened."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    entries[rel] = ("file", hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISDIR(mode):
                entries[rel] = ("dir",)
            elif stat.S_ISLNK(mode):
                entries[rel] = ("link", os.readlink(path))
            else:
                entries[rel] = ("fifo" if stat.S_ISFIFO(mode) else "other",)
    return entries


LOCK_FILE = ".lock"  # lmforge.io's folder lock: whoever takes it writes its pid there, by design


def changes(before: dict[str, tuple], after: dict[str, tuple], root: Path, new_allowed: bool) -> list[str]:
    """What happened to the entries of `before`: deleted, or changed kind or bytes (a lock
    file's bytes excepted); with `new_allowed` false, new entries count too."""
    out = []
    for rel, was in before.items():
        now = after.get(rel)
        if now is None:
            out.append(f"{root / rel} was deleted")
        elif now != was and not (Path(rel).name == LOCK_FILE and now[0] == was[0] == "file"):
            out.append(f"{root / rel} changed ({was[0]} -> {now[0]}{', other bytes' if now[0] == was[0] == 'file' else ''})")
    if not new_allowed:
        out += [f"{root / rel} appeared in the fixtures" for rel in after if rel not in before]
    return out


def build_fixtures(root: Path) -> Path:
    """The tiny inputs every invocation reads: a 300-id tokenizer, a data folder, a model, a
    classifier, a reward model, a LoRA adapter, a llama2.c model, JSONL text, a classification CSV
    (and a one-class one), an instruction file, a preference file, GPT-2's vocabulary files and a
    download mirror."""
    import torch

    from lmforge.config import Config
    from lmforge.finetune.adapter import save_adapter
    from lmforge.finetune.lora import LoRAConfig, apply_lora
    from lmforge.model import GPT
    from lmforge.tokenizer import Tokenizer
    from lmforge.weights import load_pretrained, save_pretrained

    fx = root / "fx"
    (fx / "books").mkdir(parents=True)
    shutil.copy(VERDICT, fx / "books" / "the-verdict.txt")
    paragraphs = [p for p in VERDICT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    (fx / "verdict.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    (fx / "mirror" / "llms-from-scratch").mkdir(parents=True)
    shutil.copy(VERDICT, fx / "mirror" / "llms-from-scratch" / "the-verdict.txt")
    (fx / "llama2c").mkdir()  # its tokenizer in another folder, so that only --tokenizer finds it
    shutil.copy(SHARED / "weights" / "stories260K" / "stories260K.bin", fx / "llama2c" / "stories260K.bin")
    (fx / "gpt2").mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(GPT2 / name, fx / "gpt2" / name)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        from lmforge.cli import main

        for argv in (["tokenizer", "train", "--input", f"{fx}/books/the-verdict.txt", "--vocab-size", "300", "--workers", "1",
                      "--out", f"{fx}/tok"],
                     ["data", "prepare", "--input", f"{fx}/books", "--tokenizer", f"{fx}/tok", "--workers", "1", "--out", f"{fx}/data"]):
            if main(argv) != 0:
                raise RuntimeError(f"fixture `lmforge {' '.join(argv)}` failed:\n{err.getvalue()}")
    tok = Tokenizer.load(fx / "tok")
    torch.manual_seed(0)
    config = Config.from_name("nano", vocab_size=tok.vocab_size, context_length=256, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                              mlp_hidden=64)
    save_pretrained(GPT(config), fx / "model", tok)
    save_pretrained(GPT(config.replace(labels=["ham", "spam"])), fx / "classifier", tok)
    save_pretrained(GPT(config.replace(labels=["reward"])), fx / "rm", tok)  # what `align reward` makes
    model, lora = load_pretrained(fx / "model"), LoRAConfig(r=2, alpha=4.0, targets=("q", "v"))
    apply_lora(model, lora)
    save_adapter(model, fx / "adapter", base=fx / "model", cfg=lora)
    texts = VERDICT.read_text(encoding="utf-8").split(".")[:24]
    rows = [(t.strip().replace("\n", " ").replace('"', "'"), ("ham", "spam")[i % 2]) for i, t in enumerate(texts)]
    (fx / "classify.csv").write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows), encoding="utf-8")
    (fx / "one_class.csv").write_text("text,label\n" + "".join(f'"{t}",ham\n' for t, _ in rows), encoding="utf-8")
    items = sorted(json.loads(INSTRUCTIONS.read_text(encoding="utf-8")), key=lambda it: len(json.dumps(it)))[:20]
    (fx / "instruct.json").write_text(json.dumps(items, indent=1), encoding="utf-8")
    pairs = [it for it in json.loads(PREFERENCES.read_text(encoding="utf-8")) if it["chosen"] != it["rejected"]]
    pairs = sorted(pairs, key=lambda it: len(json.dumps(it)))[:24]  # split in order 20 / 2 / 2
    (fx / "prefs.json").write_text(json.dumps(pairs, indent=1), encoding="utf-8")
    _write_runs_and_responses(fx)
    return fx


def _write_runs_and_responses(fx: Path) -> None:
    """Two finished runs' metrics.jsonl and run.json (for `compare`) and two responses files
    answering the same prompts (for `eval judge`), written as the recipes write them."""
    for name, lr in (("a", 1e-3), ("b", 3e-3)):
        run = fx / "runs" / name
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"data": "data", "out": name, "lr": lr, "seed": 1, "model": {"n_layer": 1}}))
        records = [{"step": s, "split": "train", "loss": 5.0 - s * lr * 100, "tokens": 32 * s} for s in (1, 2, 3, 4)]
        records.append({"step": 4, "split": "val", "loss": 4.9 - lr * 100, "tokens": 128})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = ["Name a color.", "Say hello.", "Count to three."]
    for name, answers in (("a", ("Red.", "Hello!", "1, 2, 3.")), ("b", ("Blue.", "No.", "One."))):
        rows = [{"prompt": p, "output": "Red.", "before": "x", "after": a} for p, a in zip(prompts, answers)]
        (fx / f"responses-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# --- running one invocation ---------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    argv: list[str]
    code: int | None
    out: str
    err: str
    hung: list[str]

    def describe(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # what it said before, then where it broke
            start = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
            lines = lines[max(0, start - 2):start + 1] + ["..."] + lines[-3:]
        shown = "\n    ".join(lines[-6:] if len(lines) > 7 else lines)
        hung = f"; {'; '.join(self.hung)}" if self.hung else ""
        return f"`lmforge {' '.join(map(_quote, self.argv))}` exited {self.code}{hung}; stderr:\n    {shown}"


def _quote(token: str) -> str:
    return repr(token) if not token or any(c in token for c in " '\"*[]") else token


TRACEBACK_ENV = "LMFORGE_TRACEBACK"  # when set, the CLI shows OSError tracebacks; the guard checks what users see
FIFO_GRACE = 1.5  # seconds before a FIFO peer blocked in open() is released (and the hang recorded)
INTERRUPT_AFTER = 120.0  # seconds before a run that has not returned gets Ctrl-C (then a second one)


def _release_fifos(fifos: Sequence[Path]) -> bool:
    """`release_fifo` on each; True if a reader was waiting on any."""
    released = [release_fifo(fifo) for fifo in fifos]  # every FIFO, not up to the first with a reader
    return any(released)


@contextlib.contextmanager
def _watchdog(fifos: Sequence[Path], hung: list[str]) -> Iterator[None]:
    """Keep an in-process run from hanging the test session: release FIFO peers, then Ctrl-C."""
    done = threading.Event()

    def watch() -> None:
        start = time.monotonic()
        interrupts = 0
        while not done.wait(0.25):
            elapsed = time.monotonic() - start
            if elapsed > FIFO_GRACE and fifos and _release_fifos(fifos) and not any("FIFO" in h for h in hung):
                hung.append(f"blocked opening a FIFO for {FIFO_GRACE:.0f} s (released by the test)")
            if elapsed > INTERRUPT_AFTER * (1 + interrupts / 4) and interrupts < 2:
                interrupts += 1
                hung.append(f"still running after {elapsed:.0f} s: sent Ctrl-C #{interrupts}")
                _thread.interrupt_main(signal.SIGINT)

    thread = threading.Thread(target=watch, name="cli-guard-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def _restored_process_state() -> Iterator[None]:
    """What an in-process run may leave behind is put back: cwd, signal handlers, environment,
    torch's thread count, stdin, a process group."""
    import torch

    cwd, env, threads, stdin = os.getcwd(), dict(os.environ), torch.get_num_threads(), sys.stdin
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    before = set(threading.enumerate())
    try:
        yield
    finally:
        for thread in set(threading.enumerate()) - before:
            if not thread.daemon:
                thread.join(timeout=10)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_num_threads(threads)
        sys.stdin = stdin
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        _release_folder_locks()


def _release_folder_locks() -> None:
    """A CLI process lets go of its folder locks by ending; in-process, close any left behind."""
    import lmforge.io

    held = getattr(lmforge.io, "_HELD", None)
    if not isinstance(held, dict):
        return
    for entry in list(held.values()):
        with contextlib.suppress(Exception):
            os.close(entry[0])
    held.clear()


_PARSERS: dict[int, argparse.ArgumentParser] = {}


@contextlib.contextmanager
def _parser_built_once(cli) -> Iterator[None]:
    """main() builds its parser on every call (66 ms: the flags' help is read from the config
    classes' source), which 600 runs would spend 40 s on. argparse does not change a parser
    while parsing, so the runs share one, built by the same build_parser()."""
    build = cli.build_parser
    if id(build) not in _PARSERS:
        _PARSERS[id(build)] = build()
    parser = _PARSERS[id(build)]
    cli.build_parser = lambda: parser
    try:
        yield
    finally:
        cli.build_parser = build


def run_in_process(argv: list[str], cwd: Path, stdin: bytes, read_captured: Callable[[], tuple[str, str]],
                   fifos: Sequence[Path] = ()) -> Result:
    """`lmforge.cli.main(argv)` in this process, as `lmforge` would run it: argparse's exits
    become the exit code, an exception that escapes is printed with its traceback (exit 1)."""
    import lmforge.cli
    from lmforge.cli import main

    hung: list[str] = []
    read_captured()  # drop anything printed before
    with _restored_process_state():
        os.chdir(cwd)
        os.environ.pop(TRACEBACK_ENV, None)
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        with _watchdog(fifos, hung), _parser_built_once(lmforge.cli):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - an escaped exception is the bug this test looks for
                traceback.print_exc()
                code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    out, err = read_captured()
    return Result(argv, code, out, err, hung)


SUBPROCESS_TIMEOUT = 120.0
MEMORY_LIMIT = 6 << 30  # address space of a subprocess run: a runaway allocation fails instead of swamping the machine
# `python -m lmforge`, under the memory limit (set in the child itself: no preexec_fn in a threaded parent)
LIMITED_LMFORGE = (f"import resource, runpy; resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT})); "
                   "runpy.run_module('lmforge', run_name='__main__', alter_sys=True)")


def run_subprocess(argv: list[str], cwd: Path, stdin: bytes) -> Result:
    """`python -m lmforge ARGV` with a memory limit and a timeout (then killed, and the hang recorded)."""
    env = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    proc = subprocess.Popen([sys.executable, "-c", LIMITED_LMFORGE, *argv], cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    hung = []
    try:
        out, err = proc.communicate(stdin, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's session
        out, err = proc.communicate()
        hung.append(f"still running after {SUBPROCESS_TIMEOUT:.0f} s: killed")
    code = proc.returncode if not hung else None
    return Result(argv, code, out.decode(errors="replace"), err.decode(errors="replace"), hung)
