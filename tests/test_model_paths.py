"""Every path a user naturally names a model by works wherever a model is read, and a path
that holds no model is an error that says what the path is and which paths hold one.

The paths: a quickstart's folder (tokenizer/, data/ and the run folder model/), a run
folder, its checkpoints/ folder, one checkpoint, a checkpoint's model/ folder. They are
read by `lmforge.load`, `resolve_model_path`, `load_config`, the fine-tuning recipes'
base, and the commands generate, chat, estimate and convert --to-hf.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import shared
from data_fixtures import small_tokenizer
from train_fixtures import tiny_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmforge
from lmforge.cli import main
from lmforge.config import Config
from lmforge.data.prepare import prepare
from lmforge.engine import generate_uncached
from lmforge.errors import LmforgeError
from lmforge.loading import MODEL_PATHS, load_config, resolve_model_path
from lmforge.recipes import pretrain
from lmforge.recipes.common import load_base
from lmforge.recipes.config import FinetuneConfig
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.distributed import init_distributed
from lmforge.weights import load_pretrained

IDS = torch.tensor([[5, 17, 60, 2, 99, 140, 7, 31]])


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """What `lmforge quickstart` leaves, in miniature: tokenizer/, data/ and model/, a run with
    checkpoints at steps 2 and 4 (the newest is the model)."""
    root = tmp_path_factory.mktemp("paths") / "quickstart"
    tok = small_tokenizer()
    prepare([shared("llms-from-scratch/the-verdict.txt")], tok, root / "data", val_fraction=0.1)
    tok.save(root / "tokenizer")
    trainer = pretrain.build(tiny_cfg(root / "data", root / "model", max_steps=4), init_distributed(), say=lambda m: None, progress=False)
    trainer.fit()
    assert [p.name for p in list_checkpoints(root / "model")] == ["step-00000002", "step-00000004"]
    return root


@pytest.fixture(scope="module")
def newest(quickstart) -> Path:
    return quickstart / "model" / "checkpoints" / "step-00000004" / "model"


def forms(qs: Path) -> dict[str, Path]:
    run = qs / "model"
    return {"quickstart": qs, "run": run, "checkpoints": run / "checkpoints", "checkpoint": run / "checkpoints" / "step-00000004",
            "model folder": run / "checkpoints" / "step-00000004" / "model"}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# --- every form reads the same model ------------------------------------------------------------
def test_every_form_resolves_to_the_newest_checkpoint_and_loads_it(quickstart, newest):
    want = load_pretrained(newest)
    with torch.no_grad():
        expected = want(IDS)
    older = load_pretrained(quickstart / "model" / "checkpoints" / "step-00000002" / "model")
    assert not torch.equal(older(IDS), expected), "the two checkpoints differ, so picking the newest is tested"
    for name, path in forms(quickstart).items():
        assert resolve_model_path(path) == newest, name
        model = lmforge.load(path)
        with torch.no_grad():
            assert torch.equal(model(IDS), expected), name
        assert model.tokenizer.encode("I had always") == small_tokenizer().encode("I had always"), name
        assert load_config(path) == want.config, name


def test_a_fine_tuning_run_starts_from_a_quickstart_folder(quickstart, newest):
    base = load_base(FinetuneConfig(base=str(quickstart)))
    with torch.no_grad():
        assert torch.equal(base(IDS), load_pretrained(newest)(IDS))


def test_generate_chat_and_estimate_take_a_quickstart_folder(quickstart, newest, capsys):
    code, out, err = cli(capsys, "generate", "--model", str(quickstart), "--prompt-ids", "5,17,60", "--max-new-tokens", "6",
                         "--temperature", "0", "--ids", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out) == generate_uncached(load_pretrained(newest), [5, 17, 60], 6)[0]
    code, out, err = cli(capsys, "generate", "--model", str(quickstart), "--prompt", "I had", "--max-new-tokens", "4", "--device", "cpu",
                         "--seed", "1")
    assert code == 0 and out.startswith("I had"), err
    code, out, err = cli(capsys, "estimate", "--config", str(quickstart), "--json")
    assert code == 0, err
    assert json.loads(out)["params"]["total"] == load_pretrained(newest).num_params()


def test_chat_takes_a_run_folder(quickstart, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code, out, err = cli(capsys, "chat", "--model", str(quickstart / "model"), "--max-new-tokens", "3", "--seed", "1", "--device", "cpu")
    assert code == 0 and out.strip(), err


def test_convert_exports_a_quickstart_folder_that_transformers_runs(quickstart, newest, tmp_path, capsys):
    code, out, err = cli(capsys, "convert", "--to-hf", str(quickstart), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'hf'} (Hugging Face format): ")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, load_pretrained(newest)(IDS), atol=1e-5, rtol=0)
    text = "I had always thought Jack Gisburn rather a cheap genius"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == small_tokenizer().encode(text)


# --- a path with no model says what it is ----------------------------------------------------------
def _make(kind: str, qs: Path, tmp: Path) -> Path:
    """A path of the given kind, holding no model."""
    if kind == "missing":
        return tmp / "nowhere"
    if kind == "empty folder":
        (tmp / "empty").mkdir()
        return tmp / "empty"
    if kind == "data folder":
        return qs / "data"
    if kind == "token file":
        return qs / "data" / "train.bin"
    if kind == "tokenizer folder":
        return qs / "tokenizer"
    if kind == "weights file":
        return qs / "model" / "checkpoints" / "step-00000004" / "model" / "model.safetensors"
    if kind == "run config":
        return qs / "model" / "run.json"
    if kind == "text file":
        (tmp / "notes.txt").write_text("hello\n")
        return tmp / "notes.txt"
    if kind in ("new run", "quickstart before training"):
        run = tmp / "qs" / "model" if kind == "quickstart before training" else tmp / "run"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"data": "d"}))
        if kind == "quickstart before training":
            shutil.copytree(qs / "tokenizer", tmp / "qs" / "tokenizer")
            shutil.copytree(qs / "data", tmp / "qs" / "data")
            return tmp / "qs"
        return run
    if kind == "interrupted quickstart":
        for name in ("tokenizer", "data"):
            shutil.copytree(qs / name, tmp / "qs" / name)
        (tmp / "qs" / "model").mkdir()
        return tmp / "qs"
    if kind == "damaged run":
        shutil.copytree(qs / "model", tmp / "run")
        for ckpt in list_checkpoints(tmp / "run"):
            (ckpt / "model" / "model.safetensors").write_bytes(b"cut")
        return tmp / "run"
    if kind == "several runs":
        shutil.copytree(qs / "model", tmp / "runs" / "a")
        shutil.copytree(qs / "model", tmp / "runs" / "b")
        return tmp / "runs"
    raise AssertionError(kind)


NO_MODEL = {  # kind -> what the message says the path is
    "missing": "does not exist, so it is neither a model folder nor a llama2.c .bin file",
    "empty folder": "holds no model: it is an empty folder",
    "data folder": "holds no model: it is a prepared data folder (meta.json, train.bin, val.bin); it is what --data takes",
    "token file": "holds no model: it is a file of the prepared data folder",
    "tokenizer folder": "holds no model: it is a tokenizer folder (tokenizer.json, no weights); it is what --tokenizer takes",
    "weights file": "holds no model: it is a file of the model folder",
    "run config": "holds no model: it is the config of the training run",
    "text file": "holds no model: it is a .txt file, not a llama2.c .bin",
    "new run": "holds no model: it is an empty run folder with no checkpoint yet (no intact checkpoint in",
    "quickstart before training": "holds no model: it is a folder whose one training run, model/, is an empty run folder with no checkpoint yet",
    "interrupted quickstart": "holds no model: it is a quickstart's folder whose model/ holds no training run yet",
    "damaged run": "holds no model: it is a training run whose 2 checkpoint(s) are all damaged",
    "several runs": "holds no model: it is a folder of 2 models and runs (a/, b/); name one of them",
}


@pytest.mark.parametrize("kind", list(NO_MODEL))
def test_a_path_with_no_model_says_what_it_is_and_what_is_expected(kind, quickstart, tmp_path, capsys):
    path = _make(kind, quickstart, tmp_path)
    with pytest.raises(LmforgeError) as caught:
        lmforge.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path} ") and NO_MODEL[kind] in message, message
    assert all(form in message for form in MODEL_PATHS), "the accepted forms are listed"
    code, out, err = cli(capsys, "generate", "--model", str(path), "--prompt-ids", "1", "--device", "cpu")
    last = err.splitlines()[-1]  # a damaged run says first which checkpoints it skipped, and why
    assert code == 2 and out == "" and last.startswith("lmforge: error: ") and NO_MODEL[kind] in last and "Traceback" not in err


def test_a_named_file_points_at_its_folder(quickstart):
    file = quickstart / "model" / "checkpoints" / "step-00000004" / "model" / "config.json"
    with pytest.raises(LmforgeError, match=f"give the folder: {file.parent}"):
        resolve_model_path(file)
    assert load_config(file) == Config.load(file.parent)  # estimate --config takes the file itself


def test_a_damaged_checkpoint_named_by_itself_is_an_error_not_a_fallback(quickstart, tmp_path):
    run = shutil.copytree(quickstart / "model", tmp_path / "run")
    newest = list_checkpoints(run)[-1]
    (newest / "manifest.json").unlink()
    with pytest.raises(LmforgeError, match="manifest.json is missing"):
        lmforge.load(newest)
    assert resolve_model_path(run) == list_checkpoints(run)[0] / "model"  # the run falls back to its older checkpoint
