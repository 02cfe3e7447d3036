"""Nothing lost in run folders: a run folder holds one run (a second run into it is
refused unless it resumes or overwrites it), it is locked by the live process that owns
it (a lock the system drops however that process ends), quickstart never removes a
folder that is not its own product, and a run stopped by a signal exits with 128 + it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import shared
from data_fixtures import small_tokenizer

from lmforge import LmforgeError
from lmforge.cli import main
from lmforge.config import Config
from lmforge.data.prepare import prepare
from lmforge.io import LOCK_FILE, folder_owner, lock_folder
from lmforge.model import GPT
from lmforge.tokenizer import train_bpe
from lmforge.weights import save_pretrained

VERDICT = shared("llms-from-scratch/the-verdict.txt")
SMS = shared("sms_spam/SMSSpamCollection")
TINY = ["--preset", "nano", "--context-length", "32", "--batch-size", "4", "--eval-batches", "2", "--log-every", "1",
        "--sample-tokens", "4", "--set", "n_layer=2", "--set", "n_embd=64", "--set", "n_head=4", "--set", "mlp_hidden=128"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "verdict"
    prepare([VERDICT], small_tokenizer(), out, val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random base with a small BPE trained on the SMS texts (as in test_finetune)."""
    tok = train_bpe([SMS.read_text(encoding="utf-8")[:60_000]], 320, progress=False)
    torch.manual_seed(0)
    config = Config.from_name("nano", vocab_size=tok.vocab_size, context_length=256, n_layer=2, n_head=4, n_kv_head=2,
                              n_embd=64, mlp_hidden=128)
    return save_pretrained(GPT(config), tmp_path_factory.mktemp("base") / "llama", tokenizer=tok)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pretrain(capsys, data_dir: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "pretrain", "--data", str(data_dir), "--out", str(out), *TINY, "--eval-every", "2", "--save-every", "2",
               *extra)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Everything under `root` but the lock file: path -> bytes (None for a folder)."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.name != LOCK_FILE}


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


# --- one run per folder ------------------------------------------------------------------
def test_pretrain_into_an_existing_run_is_refused_and_changes_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = pretrain(capsys, data_dir, out, "--max-steps", "6")
    assert code == 0, err
    before = snapshot(out)
    code, _, err = pretrain(capsys, data_dir, out, "--max-steps", "4", "--lr", "5e-3")
    assert code == 2
    assert f"--out {out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lmforge: error: ")
    assert snapshot(out) == before  # no checkpoint, run.json or metrics record of a second run mixed in
    # --resume and --overwrite contradict each other
    code, _, err = pretrain(capsys, data_dir, out, "--max-steps", "8", "--resume", "--overwrite")
    assert code == 2 and "pass one of them" in err
    assert snapshot(out) == before


def test_overwrite_replaces_the_run_and_says_what_it_removes(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(capsys, data_dir, out, "--max-steps", "8")[0] == 0
    assert (out / "checkpoints" / "step-00000008").is_dir()
    code, _, err = pretrain(capsys, data_dir, out, "--max-steps", "4", "--overwrite")
    assert code == 0, err
    assert f"--overwrite: removing the run in {out}: " in err and "checkpoints/" in err and "metrics.jsonl" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert train_steps(out) == [1, 2, 3, 4]  # one run's records, not two runs' appended
    saved = json.loads((out / "run.json").read_text())
    assert saved["max_steps"] == 4 and saved["overwrite"] is False  # `--config run.json --resume` continues, never removes
    code, _, err = cli(capsys, "pretrain", "--config", str(out / "run.json"), "--max-steps", "6", "--resume")
    assert code == 0, err
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]


def test_overwrite_never_removes_what_is_not_a_run_or_what_the_run_reads(data_dir, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "NOTES.md").write_text("mine\n")
    for flags in ([], ["--overwrite"], ["--resume"]):
        code, _, err = pretrain(capsys, data_dir, notes, "--max-steps", "2", *flags)
        assert code == 2 and "holds no run" in err and "NOTES.md" in err, err
    assert snapshot(notes) == {"NOTES.md": b"mine\n"}
    # a run folder that holds the run's own --data
    run = tmp_path / "run"
    assert pretrain(capsys, data_dir, run, "--max-steps", "2")[0] == 0
    prepare([VERDICT], small_tokenizer(), run / "data", val_fraction=0.1)
    before = snapshot(run)
    code, _, err = pretrain(capsys, run / "data", run, "--max-steps", "2", "--overwrite")
    assert code == 2 and "--data" in err and "reads" in err
    assert snapshot(run) == before
    # a file where the folder should be
    (tmp_path / "file").write_text("x")
    code, _, err = pretrain(capsys, data_dir, tmp_path / "file", "--max-steps", "2")
    assert code == 2 and "not a folder" in err


def test_finetune_refuses_an_existing_run_before_reading_anything(base, tmp_path, capsys):
    out = tmp_path / "spam"
    code, _, err = cli(capsys, "finetune", "classify", "--base", str(base), "--data", str(SMS), "--max-steps", "2",
                       "--batch-size", "4", "--eval-batches", "1", "--out", str(out))
    assert code == 0, err
    before = snapshot(out)
    # the data and the base do not exist: the folder is refused first, before the long work
    for task in ("classify", "instruct"):
        code, _, err = cli(capsys, "finetune", task, "--base", str(tmp_path / "no-base"), "--data", str(tmp_path / "no-data"),
                           "--epochs", "1", "--out", str(out))
        assert code == 2 and f"--out {out} already holds a run" in err, err
    assert snapshot(out) == before
    # --overwrite never removes the --base it starts from
    code, _, err = cli(capsys, "finetune", "classify", "--base", str(out), "--data", str(SMS), "--max-steps", "2",
                       "--out", str(out), "--overwrite")
    assert code == 2 and "--base" in err
    assert snapshot(out) == before
    code, _, err = cli(capsys, "finetune", "classify", "--base", str(base), "--data", str(SMS), "--max-steps", "2",
                       "--batch-size", "4", "--eval-batches", "1", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert "--overwrite: removing the run in" in err and "split/" in err


# --- the lock ------------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from lmforge.io import lock_folder

    def say(line):  # one write per line: parent and child share the pipe, and an unbuffered
        os.write(1, f"{line}\\n".encode())  # print writes the text and its newline apart

    lock = lock_folder(sys.argv[1], what="run folder")
    if sys.argv[2] == "fork":  # a worker forked while the lock is held (the tokenizer's pool)
        if os.fork() == 0:  # the child says its pid once its fork handlers have run
            say(os.getpid())
            time.sleep(600)
            os._exit(0)
    say("locked")
    sys.stdin.readline()
    lock.release()
    say("released")
    sys.stdin.readline()
    """
)


def hold(folder: Path, mode: str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def test_a_second_process_is_refused_with_the_owners_pid_until_the_owner_releases(tmp_path):
    folder = tmp_path / "run"
    owner = hold(folder)
    try:
        assert owner.stdout.readline().strip() == "locked"
        assert folder_owner(folder)["pid"] == owner.pid
        with pytest.raises(LmforgeError, match=re.escape(f"run folder {folder} is in use by process {owner.pid} (")):
            lock_folder(folder, what="run folder")
        owner.stdin.write("release\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "released"
        with lock_folder(folder) as lock:  # the owner still lives, but its run ended
            assert folder_owner(folder)["pid"] == os.getpid() and lock.path == folder
    finally:
        owner.kill()
        owner.wait()
        owner.stdin.close()
        owner.stdout.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or not hasattr(os, "fork"), reason="needs SIGKILL and fork")
def test_a_killed_owner_leaves_no_stale_lock_even_with_a_forked_worker_alive(tmp_path):
    folder = tmp_path / "run"
    owner = hold(folder, "fork")
    child = None
    try:
        lines = sorted(owner.stdout.readline().strip() for _ in range(2))  # the two processes print in either order
        assert lines[1] == "locked", lines
        child = int(lines[0])
        with pytest.raises(LmforgeError, match=f"in use by process {owner.pid}"):
            lock_folder(folder)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        os.kill(child, 0)  # the worker outlived its parent
        lock = lock_folder(folder)  # and does not hold the folder
        assert folder_owner(folder)["pid"] == os.getpid()
        lock.release()
    finally:
        owner.kill()
        owner.wait()
        owner.stdin.close()
        owner.stdout.close()
        if child is not None:
            os.kill(child, signal.SIGKILL)


def test_a_process_locks_a_folder_again_after_releasing_it_and_nested_locks_share(tmp_path):
    folder = tmp_path / "run"
    for _ in range(3):  # several runs, one after another, in one process
        with lock_folder(folder):
            with lock_folder(folder):  # quickstart holds its model folder while pretrain locks it too
                pass
            other = subprocess.run([sys.executable, "-c", f"from lmforge.io import lock_folder; lock_folder({str(folder)!r})"],
                                   capture_output=True, text=True)
            assert other.returncode != 0 and f"in use by process {os.getpid()}" in other.stderr  # still held
    other = subprocess.run([sys.executable, "-c", f"from lmforge.io import lock_folder; lock_folder({str(folder)!r})"],
                           capture_output=True, text=True)
    assert other.returncode == 0, other.stderr


# --- live runs: the lock and the signals --------------------------------------------------
def start_pretrain(data_dir: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", "--data", str(data_dir), "--out", str(out), *TINY,
                             "--max-steps", "1000000", "--eval-every", "0", "--save-every", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_until_training(proc: subprocess.Popen, out: Path) -> None:
    """Until the run has logged a training step (its signal handlers are in place then)."""
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and '"split": "train"' in metrics.read_text()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)


def stop_when_training(proc: subprocess.Popen, out: Path, sig: int, meanwhile=lambda: None) -> tuple[int, str, str]:
    """Wait until the run in `out` trains, run `meanwhile`, send `sig`: (exit code, stdout, stderr).
    The process is killed whatever happens, so a failed test leaves no run behind."""
    try:
        wait_until_training(proc, out)
        meanwhile()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=600)
        return proc.returncode, stdout, stderr
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_live_run_holds_its_folder_and_ctrl_c_exits_130(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start_pretrain(data_dir, out)

    def second_writers() -> None:
        for flag in ("--resume", "--overwrite"):  # not even --overwrite removes a live run
            second = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--data", str(data_dir), "--out", str(out),
                                     *TINY, "--max-steps", "2", flag], capture_output=True, text=True)
            assert second.returncode == 2, second.stderr
            assert f"run folder {out} is in use by process {proc.pid} (lmforge pretrain" in second.stderr

    code, stdout, err = stop_when_training(proc, out, signal.SIGINT, second_writers)
    assert code == 130, err
    assert "interrupted at step" in stdout and "continue with:" in stdout
    step = train_steps(out)[-1]
    assert (out / "checkpoints" / f"step-{step:08d}").is_dir()  # the checkpoint was written before exiting
    with lock_folder(out):  # released with the process
        pass


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_143(data_dir, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = stop_when_training(start_pretrain(data_dir, out), out, signal.SIGTERM)
    step = train_steps(out)[-1]
    assert (out / "checkpoints" / f"step-{step:08d}").is_dir()
    assert "continue with:" in stdout
    assert code == 143, err


@pytest.mark.slow
def test_sigterm_stops_a_fine_tuning_run_with_143(base, tmp_path):
    out = tmp_path / "spam"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "finetune", "classify", "--base", str(base), "--data", str(SMS),
                             "--max-steps", "1000000", "--batch-size", "4", "--eval-every", "0", "--log-every", "1",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, stdout, err = stop_when_training(proc, out, signal.SIGTERM)
    assert "continue with: lmforge finetune classify" in stdout
    assert code == 143, err


# --- quickstart ------------------------------------------------------------------------------
QUICK = ["--preset", "nano", "--minutes", "0.15", "--vocab-size", "300"]


def test_quickstart_never_replaces_a_folder_holding_its_input(tmp_path, capsys, monkeypatch):
    """The issue's case: `cd p && lmforge quickstart --out . --input data/the-verdict.txt`."""
    project = tmp_path / "p"
    (project / "data").mkdir(parents=True)
    (project / "data" / "the-verdict.txt").write_bytes(VERDICT.read_bytes())
    (project / "data" / "NOTES.md").write_text("notes\n")
    before = snapshot(project)
    monkeypatch.chdir(project)
    code, _, err = cli(capsys, "quickstart", "--out", ".", "--input", "data/the-verdict.txt", *QUICK)
    assert code == 2 and "which already holds data/" in err and "--overwrite" in err
    code, _, err = cli(capsys, "quickstart", "--out", ".", "--input", "data/the-verdict.txt", *QUICK, "--overwrite")
    assert code == 2 and "holds the input" in err
    code, _, err = cli(capsys, "quickstart", "--out", ".", "--input", "data/*.txt", *QUICK, "--overwrite")
    assert code == 2 and "holds the input" in err
    assert snapshot(project) == before  # not a file written, not one removed


def test_quickstart_refuses_an_empty_out_or_a_budget_that_is_not_a_number(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flags, culprit in ((["--out", ""], "--out"), (["--minutes", "nan"], "--minutes"), (["--minutes", "inf"], "--minutes"),
                           (["--minutes", "0"], "--minutes")):
        code, _, err = cli(capsys, "quickstart", "--input", str(VERDICT), "--preset", "nano", "--vocab-size", "300", *flags)
        assert code == 2 and err.startswith(f"lmforge: error: {culprit}"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["tokenizer", "data", "model"])
def test_quickstart_overwrites_only_its_own_folders(tmp_path, capsys, name):
    out = tmp_path / "qs"
    (out / name).mkdir(parents=True)
    (out / name / "mine.txt").write_text("keep me\n")
    before = snapshot(out)
    code, _, err = cli(capsys, "quickstart", "--out", str(out), "--input", str(VERDICT), *QUICK)
    assert code == 2 and f"which already holds {name}/" in err
    code, _, err = cli(capsys, "quickstart", "--out", str(out), "--input", str(VERDICT), *QUICK, "--overwrite")
    assert code == 2 and f"{out / name} is not" in err and "move it away or choose another --out" in err, err
    assert snapshot(out) == before


@pytest.mark.slow
def test_quickstart_overwrite_replaces_an_earlier_quickstart(tmp_path, capsys):
    out = tmp_path / "qs"
    code, printed, err = cli(capsys, "quickstart", "--out", str(out), "--input", str(VERDICT), *QUICK)
    assert code == 0, err
    (out / "NOTES.md").write_text("mine\n")  # beside the products: never touched
    code, printed, err = cli(capsys, "quickstart", "--out", str(out), "--input", str(VERDICT), *QUICK, "--overwrite")
    assert code == 0, err
    assert "--overwrite: replacing the earlier quickstart's tokenizer/, data/ and model/" in printed
    assert (out / "NOTES.md").read_text() == "mine\n"
    steps = train_steps(out / "model")
    first = json.loads((out / "model" / "run.json").read_text())["log_every"]
    # one run's records, not two runs' appended: the first is at --log-every, or at the last step of a run
    # the time limit kept shorter than that (a loaded machine)
    assert steps == sorted(set(steps)) and steps[0] == min(first, steps[-1])


@pytest.mark.slow
def test_sigterm_stops_quickstart_with_143(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "quickstart", "--out", str(out), "--input", str(VERDICT),
                             "--preset", "nano", "--minutes", "30", "--vocab-size", "300", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, stdout, err = stop_when_training(proc, out / "model", signal.SIGTERM)
    assert "Stopped (terminated)" in stdout and "--resume" in stdout
    checkpoint = Path(next(line for line in stdout.splitlines() if line.startswith("checkpoint:")).split(None, 1)[1])
    assert checkpoint.parent == out / "model" / "checkpoints" and checkpoint.is_dir()
    assert int(checkpoint.name.split("-")[1]) >= train_steps(out / "model")[-1]  # written when the signal came
    assert code == 143, err
