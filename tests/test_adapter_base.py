"""A LoRA adapter finds its base again, and only its base.

The adapter records the base's absolute path, its path relative to the adapter, the
training run it is a checkpoint of and the sha256 of its weights (taken from the
checkpoint's manifest, not recomputed). So: a moved tree loads through the relative path;
a base that `--keep-last` deleted is found in its run if a checkpoint there still holds
those weights, and is otherwise an error naming it and saying how to give a copy; a copy
given by hand (`base=`, `lmforge lora merge --base`) loads when its weights match and is
refused when they do not; an adapter written before hashes (a path only) still loads.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import shared
from data_fixtures import small_tokenizer
from train_fixtures import tiny_cfg

from lmforge.cli import main
from lmforge.data.prepare import prepare
from lmforge.errors import LmforgeError
from lmforge.finetune.adapter import ADAPTER_CONFIG, save_adapter
from lmforge.finetune.lora import LoRAConfig, apply_lora
from lmforge.loading import find_adapter_base, load, load_adapted, resolve_model_path
from lmforge.recipes import pretrain
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.distributed import init_distributed

IDS = torch.tensor([[5, 17, 60, 2, 99, 140, 7, 31]])
LORA = LoRAConfig(r=2, alpha=4, targets=("q", "v"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "verdict"
    prepare([shared("llms-from-scratch/the-verdict.txt")], small_tokenizer(), out, val_fraction=0.1)
    return out


def train(data_dir: Path, run: Path, steps: int, resume: bool = False) -> None:
    """A tiny pretraining run that keeps only its newest checkpoint (and the best)."""
    cfg = tiny_cfg(data_dir, run, max_steps=steps, keep_last=1, eval_every=0, resume="latest" if resume else "")
    pretrain.build(cfg, init_distributed(), say=lambda m: None, progress=False).fit()


def make_adapter(base: Path, out: Path) -> torch.Tensor:
    """An adapter with non-zero updates saved at `out` on the model at `base`; returns the adapted logits."""
    model = load(base)
    apply_lora(model, LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    save_adapter(model, out, base=resolve_model_path(base), cfg=LORA)
    with torch.no_grad():
        return model.eval()(IDS)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


@pytest.fixture
def tree(tmp_path, data_dir) -> tuple[Path, torch.Tensor]:
    """work/base (a run, 2 steps) and work/adapter made on its checkpoint: (work, adapted logits)."""
    work = tmp_path / "work"
    train(data_dir, work / "base", 2)
    return work, make_adapter(work / "base", work / "adapter")


def meta(adapter: Path) -> dict:
    return json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def test_the_record_names_the_base_every_way_and_its_hash_is_the_manifests(tree):
    work, adapted = tree
    base = work / "base" / "checkpoints" / "step-00000002" / "model"
    record = meta(work / "adapter")
    assert record["base"] == str(base.resolve())
    assert record["base_relative"] == "../base/checkpoints/step-00000002/model"
    assert record["base_run"] == str((work / "base").resolve())
    weights = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert record["base_sha256"] == {"model.safetensors": weights}
    manifest = json.loads((base.parent / "manifest.json").read_text())
    assert manifest["files"]["model/model.safetensors"]["sha256"] == weights
    assert torch.equal(logits(load(work / "adapter")), adapted)


def test_a_moved_tree_loads_through_the_relative_path(tree, tmp_path):
    work, adapted = tree
    moved = work.rename(tmp_path / "elsewhere")
    assert find_adapter_base(moved / "adapter") == (moved / "base" / "checkpoints" / "step-00000002" / "model").resolve()
    assert torch.equal(logits(load_adapted(moved / "adapter")), adapted)


def test_a_base_deleted_by_keep_last_is_named_and_a_copy_is_taken(tree, data_dir, tmp_path, capsys):
    work, adapted = tree
    copy = shutil.copytree(work / "base" / "checkpoints" / "step-00000002" / "model", tmp_path / "copy")
    train(data_dir, work / "base", 4, resume=True)  # trains on; --keep-last 1 deletes step 2, the adapter's base
    assert [p.name for p in list_checkpoints(work / "base")] == ["step-00000004"]
    with pytest.raises(LmforgeError) as caught:
        load(work / "adapter")
    message = str(caught.value)
    for said in (f"was made on {work.resolve()}/base/checkpoints/step-00000002/model (weights sha256 ", "which is not there any more",
                 "--keep-last deletes its older checkpoints", f"no intact checkpoint left in {(work / 'base').resolve()} holds those weights",
                 "base=COPY", "--base COPY"):
        assert said in message, message
    assert torch.equal(logits(load_adapted(work / "adapter", base=copy)), adapted)
    # the run's newest checkpoint has the architecture but other weights: refused, saying so
    with pytest.raises(LmforgeError, match=r"has the architecture adapter .* was made for but other weights \(sha256 [0-9a-f]{12}; "):
        load_adapted(work / "adapter", base=work / "base")
    # the CLI takes the copy too, and says which base it merged into
    assert main(["lora", "merge", "--adapter", str(work / "adapter"), "--base", str(copy), "--out", str(tmp_path / "merged")]) == 0
    assert f"base {copy.resolve()} " in capsys.readouterr().out
    torch.testing.assert_close(logits(load(tmp_path / "merged")), adapted, atol=1e-5, rtol=0)
    assert main(["lora", "merge", "--adapter", str(work / "adapter"), "--base", str(work / "base"), "--out", str(tmp_path / "m2")]) == 2
    assert "other weights" in capsys.readouterr().err and not (tmp_path / "m2").exists()


def test_the_run_is_searched_for_a_checkpoint_with_the_same_weights(tree, capsys):
    work, adapted = tree
    ckpts = work / "base" / "checkpoints"
    (ckpts / "step-00000002").rename(ckpts / "step-00000003")  # the recorded folder is gone; its weights are in the run
    model = load(work / "adapter")
    assert torch.equal(logits(model), adapted)
    assert "holds the same weights" in capsys.readouterr().err


def test_a_base_replaced_by_other_weights_is_refused(tree, data_dir, tmp_path):
    """The recorded folder now holds other weights (copied over it): neither it nor its run's
    checkpoint, whose manifest no longer matches the file, is taken for the base."""
    work, _ = tree
    train(data_dir, tmp_path / "other", 4)
    base = work / "base" / "checkpoints" / "step-00000002" / "model"
    shutil.copy(tmp_path / "other" / "checkpoints" / "step-00000004" / "model" / "model.safetensors", base / "model.safetensors")
    with pytest.raises(LmforgeError) as caught:
        load(work / "adapter")
    message = str(caught.value)
    assert re.search(r"which is there but \S+/step-00000002/model holds other weights \(sha256 [0-9a-f]{12}\); ", message), message
    assert "step-00000002 lists those weights but is damaged (model/model.safetensors does not match its sha256" in message
    assert "and no intact checkpoint left in" in message and "base=COPY" in message


def test_an_adapter_from_before_hashes_still_loads(tree):
    work, adapted = tree
    record = meta(work / "adapter")
    old = {k: v for k, v in record.items() if k not in ("base_relative", "base_run", "base_sha256")}
    (work / "adapter" / ADAPTER_CONFIG).write_text(json.dumps(old), encoding="utf-8")
    assert torch.equal(logits(load(work / "adapter")), adapted)
    shutil.rmtree(work / "base")
    with pytest.raises(LmforgeError, match=r"was made on .*/base/checkpoints/step-00000002/model, which is not there any more; "
                                           r"give a copy of that base: lmforge.load_adapted\("):
        load(work / "adapter")
