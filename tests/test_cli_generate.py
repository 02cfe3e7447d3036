"""`lmforge generate` and `lmforge chat` end to end on a tiny saved model."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest
import torch
from cli_runner import run_cli

from lmforge.config import Config
from lmforge.engine import Engine, generate_uncached
from lmforge.engine.sampling import SamplingParams
from lmforge.loading import load
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.weights import save_pretrained


@pytest.fixture
def lmforge(capsys):
    """`lmforge ARGS` run in this process (tests/cli_runner.py: a subprocess per run was 3 s of
    imports); stdin is the given bytes, a pipe at end of file (not a terminal), as `input=` gave it."""

    def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        return run_cli(capsys, *args, stdin=stdin)

    return run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, small_tok):
    torch.manual_seed(0)
    model = GPT(Config.from_name("nano", vocab_size=small_tok.vocab_size, n_layer=2, init_std=0.2))
    path = tmp_path_factory.mktemp("model")
    save_pretrained(model, path, small_tok)
    return path


def test_saved_model_loads_with_identical_logits(model_dir):
    a, b = load(model_dir), load(model_dir)
    ids = torch.randint(0, a.config.vocab_size, (2, 12))
    assert torch.equal(a(ids), b(ids)) and a.tokenizer is not None


def test_generate_ids_prints_exactly_the_greedy_ids(model_dir, lmforge):
    proc = lmforge("generate", "--model", str(model_dir), "--prompt-ids", "5,6,7", "--max-new-tokens", "12", "--temperature", "0", "--ids")
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == generate_uncached(load(model_dir), [5, 6, 7], 12)[0]


def test_generate_text_streamed_equals_unstreamed(model_dir, lmforge):
    args = ["generate", "--model", str(model_dir), "--prompt", "To be", "--max-new-tokens", "15", "--seed", "3", "--temperature", "0.9"]
    plain, streamed = lmforge(*args), lmforge(*args, "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0
    assert plain.stdout == streamed.stdout
    model = load(model_dir)
    expected = Engine(model, model.tokenizer).generate(["To be"], max_new_tokens=15, sampling=SamplingParams(temperature=0.9), seed=3)[0]
    assert plain.stdout.decode() == "To be" + expected.text + "\n"


def test_chat_keeps_history(model_dir, lmforge):
    proc = lmforge("chat", "--model", str(model_dir), "--max-new-tokens", "6", "--seed", "1", stdin=b"hello\n/reset\nhello\n")
    assert proc.returncode == 0, proc.stderr.decode()
    replies = proc.stdout.decode().splitlines()
    assert len(replies) == 2 and replies[0] == replies[1]  # /reset: the same first turn again


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--prompt-ids", "99999"], "outside the vocabulary"),
        (["--prompt-ids", "1", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt-ids", "1", "--device", "gpu0"], "is not a device name"),
        # regressions: each of these was a traceback, blamed the wrong id, or was silently accepted
        (["--prompt-ids", "1", "--max-new-tokens", "-5"], "max_new_tokens must be a whole number >= 1 (how many tokens to generate), got -5"),
        (["--prompt-ids", "1", "--temperature", "nan"], "temperature must be >= 0 and finite (0 is greedy), got nan"),
        (["--prompt-ids", "1", "--temperature", "inf"], "temperature must be >= 0 and finite (0 is greedy), got inf"),
        (["--prompt-ids", "1", "--top-p", "-0.5"], "top_p must be in (0, 1]"),
        (["--prompt-ids", "1", "--top-k", "-2"], "top_k must be a whole number >= 1"),
        (["--prompt-ids", "5,-2"], "prompt has token id -2 (at position 1), outside the vocabulary"),
        (["--prompt-ids", "1", "--stop", ""], "a stop string is empty"),
        (["--prompt-ids", "1", "--stop-id", "99999"], "stop id 99999 is outside the model's vocabulary of 1,000 ids (0..999)"),
        (["--prompt-ids", "1", "--stream", "--max-new-tokens", "0"], "max_new_tokens must be a whole number >= 1"),
    ],
)
def test_generate_errors(model_dir, args, message, capsys):
    """In process (the CLI's own error path, as a run prints it; a subprocess per case cost 3 s of imports)."""
    from lmforge.cli import main

    code = main(["generate", "--model", str(model_dir), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_chat_refuses_a_bad_max_new_tokens_before_the_first_turn(model_dir, lmforge):
    proc = lmforge("chat", "--model", str(model_dir), "--max-new-tokens", "-1")  # no input: the check comes first
    assert proc.returncode == 2 and "max_new_tokens must be a whole number >= 1" in proc.stderr.decode()


def test_missing_model_is_a_clear_error(tmp_path, lmforge):
    proc = lmforge("generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1")
    assert proc.returncode == 2 and "neither a model folder" in proc.stderr.decode()


# --- which chat template: said, never a silent fallback ------------------------------------------
NO_TEMPLATE = "has no chat template (it was not instruction-tuned with `lmforge finetune instruct`); using the plain transcript"


def run_main(capsys, *args: str) -> tuple[str, str]:
    from lmforge.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_chat_with_a_base_model_says_once_that_it_uses_the_plain_transcript(model_dir, capsys, monkeypatch):
    _, err = run_main(capsys, "generate", "--model", str(model_dir), "--chat", "--prompt", "Hi", "--max-new-tokens", "3",
                      "--temperature", "0")
    assert err.count(NO_TEMPLATE) == 1 and err.startswith(f"note: {model_dir} has no chat template")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n"))
    out, err = run_main(capsys, "chat", "--model", str(model_dir), "--max-new-tokens", "3", "--seed", "1")
    assert err.count(NO_TEMPLATE) == 1 and NO_TEMPLATE not in out


def test_chat_with_an_instruction_tuned_model_adds_no_note(model_dir, tmp_path, capsys):
    tuned = shutil.copytree(model_dir, tmp_path / "tuned")
    tok = Tokenizer.load(tuned)
    tok.chat_template = "alpaca"
    tok.save(tuned)
    out, err = run_main(capsys, "generate", "--model", str(tuned), "--chat", "--prompt", "Hi", "--max-new-tokens", "3",
                        "--temperature", "0")
    assert "chat template" not in err and "### Response" not in out
    _, err = run_main(capsys, "generate", "--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "3")
    assert "chat template" not in err  # without --chat no template is used: nothing to say


@pytest.mark.parametrize("preset", ["nano", "small"])  # RoPE (Llama family) and learned positions (GPT-2)
def test_generating_from_a_saved_folder_never_imports_dynamo(preset, tmp_path, small_tok):
    """Loaders build the model on the meta device, then fill it. torch's meta kernels for
    `normal_` and for RoPE's arithmetic import Dynamo, which took 2-3 s of every command's
    start (`model.on_meta` keeps them from running). Checked in a fresh process."""
    torch.manual_seed(0)
    save_pretrained(GPT(Config.from_name(preset, vocab_size=small_tok.vocab_size, n_layer=1)), tmp_path, small_tok)
    script = (
        "import sys\nfrom lmforge.cli import main\n"
        f"code = main(['generate', '--model', {str(tmp_path)!r}, '--prompt', 'To be', '--max-new-tokens', '3'])\n"
        "assert code == 0, code\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False", run.stdout
