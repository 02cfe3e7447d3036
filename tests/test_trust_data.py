"""Pretraining checks what it can before it allocates or trains: the tokenizer copy in a
data folder, the ids in its token files, and whether the model fits in memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared
from data_fixtures import small_tokenizer

from lmforge.config import Config
from lmforge.data.prepare import prepare
from lmforge.data.tokens import TokenData
from lmforge.errors import LmforgeError
from lmforge.estimate import check_training_fits, training_memory
from lmforge.recipes import pretrain
from lmforge.tokenizer import train_bpe
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import init_distributed


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    out = tmp_path / "data"
    prepare([shared("llms-from-scratch/the-verdict.txt")], small_tokenizer(), out, val_fraction=0.1)
    return out


def cfg(data_dir: Path, out: Path, **model) -> TrainConfig:
    return TrainConfig(data=str(data_dir), out=str(out), preset="nano", context_length=16, batch_size=2, max_steps=1,
                       eval_batches=1, sample_prompts=[], model={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1,
                                                                 "mlp_hidden": 64, **model})


def build(c: TrainConfig):
    return pretrain.build(c, init_distributed("cpu"), say=lambda m: None, progress=False)


def test_a_swapped_tokenizer_copy_is_refused_naming_both(data_dir, tmp_path):
    text = shared("tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000]
    other = train_bpe([text], vocab_size=300, workers=1, progress=False)
    assert other.vocab_size == small_tokenizer().vocab_size and other.fingerprint != small_tokenizer().fingerprint
    other.save(data_dir)  # over the copy prepare wrote
    with pytest.raises(LmforgeError, match=r"tokenizer.json is not the tokenizer .* was prepared with: .*fingerprint"):
        build(cfg(data_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_lowered_vocab_size_in_meta_is_refused(data_dir, tmp_path):
    meta = json.loads((data_dir / "meta.json").read_text())
    meta["vocab_size"] = 100
    (data_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LmforgeError, match=r"it has 300 ids .* meta.json says 100 ids"):
        build(cfg(data_dir, tmp_path / "run"))


def test_ids_outside_the_vocabulary_are_refused_before_training(data_dir, tmp_path):
    tokens = np.memmap(data_dir / "train.bin", dtype="<u2", mode="r+")
    tokens[len(tokens) // 2] = 299 + 7  # past the 300-id vocabulary
    tokens.flush()
    del tokens
    with pytest.raises(LmforgeError, match=r"train.bin holds id 306, outside the vocabulary of 300"):
        build(cfg(data_dir, tmp_path / "run"))
    TokenData.open(data_dir).check_ids(400)  # a larger table takes them


def test_a_model_vocabulary_smaller_than_the_data_is_refused(data_dir, tmp_path):
    with pytest.raises(LmforgeError, match=r"vocabulary of 300 ids but the model has 10"):
        build(cfg(data_dir, tmp_path / "run", vocab_size=10))


def test_a_model_that_cannot_fit_in_memory_fails_at_once_with_the_numbers(data_dir, tmp_path):
    with pytest.raises(LmforgeError, match=r"needs about [\d,.]+ GiB to train .* only [\d,.]+ GiB are available"):
        build(cfg(data_dir, tmp_path / "run", n_layer=100_000, n_embd=512, n_head=8, n_kv_head=8, mlp_hidden=2048))
    with pytest.raises(LmforgeError, match=r"GiB are available"):
        build(cfg(data_dir, tmp_path / "run", n_embd=100_000, n_head=1000, n_kv_head=1000))


def test_the_memory_check_compares_the_modeled_peak():
    config = Config.from_name("nano")
    t = training_memory(config, 4, 64)
    check_training_fits(config, 4, 64, False, t.peak)  # exactly enough
    check_training_fits(config, 4, 64, False, None)  # unknown: not checked
    check_training_fits(config, 4, 64, True, t.peak_checkpointed)
    with pytest.raises(LmforgeError, match="or --gradient-checkpointing"):
        check_training_fits(config, 4, 64, False, t.peak - 1)


def test_the_cli_reports_an_absurd_size_in_one_line(data_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                        "--preset", "nano", "--max-steps", "1", "--set", "n_layer=100000"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("lmforge: error: this run needs about") and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()
    shutil.rmtree(data_dir)
