"""8-bit AdamW (`lmforge.train.adamw8bit`) against bitsandbytes' own, and paged moments.

bitsandbytes (a test-only oracle) runs its blockwise 8-bit optimizers on the CPU since
0.47; ours must give the same weights and the same 8-bit states, bit for bit, step after
step, on tensors of every kind it treats differently: small ones (fp32 moments), a
partial last block, several chunks of the step's loop. Then: the trainer's
`--optimizer adamw8bit` learns like fp32 AdamW, resumes bit-exactly, and pages its
moments into files when asked.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from conftest import shared
from data_fixtures import small_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from train_fixtures import tiny_cfg

import lmforge
from lmforge import LmforgeError
from lmforge.data.prepare import prepare
from lmforge.recipes import pretrain
from lmforge.train.adamw8bit import BLOCK, CHUNK, AdamW8bit, PagedStore, dequantize, dynamic_map, nearest_table, quantize
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import init_distributed
from lmforge.train.loss import next_token_loss

bnb = pytest.importorskip("bitsandbytes")  # x86-64 only (pyproject): the parity tests need its CPU kernels
import bitsandbytes.functional as F

SHAPES = [(300,), (5000,), (70, 1000), (3, CHUNK // 2 + 77)]  # fp32 moments; partial block; 8-bit; three chunks


def test_codes_are_bitsandbytes_dynamic_maps():
    assert torch.equal(dynamic_map(signed=True), F.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(signed=False), F.create_dynamic_map(signed=False))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.sampled_from([1e-8, 1e-3, 1.0, 1e4]), n=st.integers(1, 3 * BLOCK + 5))
def test_quantize_gives_bitsandbytes_codes_and_scales(seed, scale, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale * torch.rand(n, generator=g) ** 4  # many values far below their block's max
    for signed in (True, False):
        v = x if signed else x.abs()
        code = dynamic_map(signed)
        ours, absmax = quantize(v, nearest_table(code))
        theirs, their_absmax = torch.ops.bitsandbytes.quantize_blockwise(v, code.clone(), BLOCK)
        assert torch.equal(absmax, their_absmax)
        assert torch.equal(ours, theirs.view(-1))
        back = torch.ops.bitsandbytes.dequantize_blockwise(theirs, their_absmax, code, BLOCK, torch.float32)
        assert torch.equal(dequantize(ours, absmax, code), back)


def twins(seed: int = 0, shapes=SHAPES):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


def their_state(opt, p):
    s = opt.state[p]
    if s["state1"].dtype == torch.float32:
        return {"exp_avg": s["state1"], "exp_avg_sq": s["state2"]}
    return {"m_codes": s["state1"], "m_absmax": s["absmax1"], "v_codes": s["state2"], "v_absmax": s["absmax2"]}


def test_two_hundred_steps_equal_bitsandbytes_bit_for_bit():
    ours, theirs = twins()
    a = AdamW8bit(ours, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    b = bnb.optim.AdamW8bit(theirs, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(200):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g) * (10.0 if step % 17 == 0 else 0.05)
            if step % 5 == 0:
                grad.view(-1)[:BLOCK] = 0  # a block with no gradient this step
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q), tuple(p.shape)
        mine, ref = a.state[p], their_state(b, q)
        assert int(mine["step"]) == 200
        for key, value in ref.items():
            assert torch.equal(mine[key].view(-1), value.view(-1)), (tuple(p.shape), key)
    assert [a.quantized(p) for p in ours] == [False, True, True, True]


def test_state_is_a_quarter_of_adamws():
    p = torch.nn.Parameter(torch.randn(1000, 1000))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    held = sum(t.numel() * t.element_size() for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.dim())
    assert held == opt.state_bytes(p) == 2 * 10**6 + 2 * 4 * -(-10**6 // BLOCK)  # 2.03 bytes a parameter, against 8


def test_paged_moments_live_in_files_and_step_the_same(tmp_path):
    ours, theirs = twins(2, SHAPES[:3])
    store = PagedStore(tmp_path / "states")
    paged = AdamW8bit(ours, lr=1e-3, store=store)
    plain = AdamW8bit(theirs, lr=1e-3)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape)
            p.grad, q.grad = grad, grad.clone()
        paged.step()
        plain.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    files = sorted((tmp_path / "states").iterdir())
    assert len(files) == sum(len(paged.state_shapes(p)) for p in ours)
    assert sum(f.stat().st_size for f in files) == sum(paged.state_bytes(p) for p in ours)
    p = ours[1]
    on_disk = torch.from_file(str(files[len(paged.state_shapes(ours[0]))]), size=p.numel(), dtype=torch.uint8)
    assert torch.equal(on_disk, paged.state[p]["m_codes"].view(-1))  # the state is the file's memory
    # loading a state dict puts the moments back into files
    again = AdamW8bit(ours, lr=1e-3, store=PagedStore(tmp_path / "again"))
    again.load_state_dict(paged.state_dict())
    assert len(list((tmp_path / "again").iterdir())) == len(files)
    store.close()
    assert not (tmp_path / "states").exists()


# --- in the trainer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "verdict"
    prepare([shared("llms-from-scratch/the-verdict.txt")], small_tokenizer(), out, val_fraction=0.1)
    return out


def fit(cfg):
    trainer = pretrain.build(cfg, init_distributed(), say=lambda m: None, progress=False)
    return trainer, trainer.fit()


def train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_pretraining_with_8bit_moments_tracks_fp32_adamw(data_dir, tmp_path):
    curves = {}
    for name, extra in [("fp32", {}), ("8bit", {"optimizer": "adamw8bit"}),
                        ("paged", {"optimizer": "adamw8bit", "optimizer_states": "paged"})]:
        fit(tiny_cfg(data_dir, tmp_path / name, max_steps=60, eval_every=0, save_every=0, **extra))
        curves[name] = train_losses(tmp_path / name)
        assert not (tmp_path / name / "optimizer-states").exists()  # paged scratch files are gone after the run
    fp32, q8 = torch.tensor(curves["fp32"]), torch.tensor(curves["8bit"])
    assert q8[-10:].mean() < q8[:5].mean() - 0.5  # it learns
    assert (q8 - fp32).abs().max() < 0.05 * fp32[0]  # within 5% of the first loss, every step
    assert curves["paged"] == curves["8bit"]  # paging moves the moments, never changes them


def test_8bit_run_resumes_bit_exactly_and_refuses_the_other_optimizer(data_dir, tmp_path):
    _, straight = fit(tiny_cfg(data_dir, tmp_path / "straight", optimizer="adamw8bit", optimizer_states="paged"))

    class Interrupt:  # Ctrl-C while step 5 runs: a checkpoint is written, then the run resumes
        def __call__(self, model, x, y):
            if self.trainer.draws == 5 and not getattr(self, "sent", False):
                self.sent = True
                signal.raise_signal(signal.SIGINT)
            return next_token_loss(model, x, y)

    interrupt = Interrupt()
    trainer = pretrain.build(tiny_cfg(data_dir, tmp_path / "broken", optimizer="adamw8bit", optimizer_states="paged"),
                             init_distributed(), say=lambda m: None, progress=False)
    interrupt.trainer = trainer
    trainer.loss_fn = interrupt
    assert trainer.fit().stopped == "interrupted"
    _, resumed = fit(tiny_cfg(data_dir, tmp_path / "broken", optimizer="adamw8bit", optimizer_states="paged", resume="latest"))
    a, b = lmforge.load(straight.checkpoint / "model").state_dict(), lmforge.load(resumed.checkpoint / "model").state_dict()
    assert resumed.step == 8 and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LmforgeError, match="resume with the --optimizer and --optimizer-states the checkpoint was written with"):
        fit(tiny_cfg(data_dir, tmp_path / "broken", max_steps=10, resume="latest"))  # fp32 AdamW on 8-bit moments


def test_8bit_moments_resume_paged_after_running_out_of_memory(data_dir, tmp_path):
    """A run memory could not hold resumes with its moments paged, and back; fp32 moments
    cannot switch (torch's fused AdamW in memory, ours paged) and say so."""
    _, first = fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=4, optimizer="adamw8bit"))
    _, paged = fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=6, optimizer="adamw8bit", optimizer_states="paged", resume="latest"))
    _, back = fit(tiny_cfg(data_dir, tmp_path / "run", max_steps=8, optimizer="adamw8bit", resume="latest"))
    assert (first.step, paged.step, back.step) == (4, 6, 8)
    assert len(train_losses(tmp_path / "run")) == 8 and all(math.isfinite(x) for x in train_losses(tmp_path / "run"))
    fit(tiny_cfg(data_dir, tmp_path / "fp32", max_steps=4))
    with pytest.raises(LmforgeError, match="resume with the --optimizer and --optimizer-states the checkpoint was written with"):
        fit(tiny_cfg(data_dir, tmp_path / "fp32", max_steps=6, optimizer_states="paged", resume="latest"))


def test_optimizer_settings_are_checked():
    for field, value, words in [("optimizer", "sgd", "--optimizer must be one of adamw, adamw8bit"),
                                ("optimizer_states", "disk", "--optimizer-states must be memory or paged")]:
        with pytest.raises(LmforgeError, match=words):
            TrainConfig(data="d", max_steps=1, **{field: value}).validate()
