"""A tiny pretraining run's settings, shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

from lmforge.train.config import TrainConfig

TINY_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "mlp_hidden": 128, "dropout": 0.1}


def tiny_cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    """Seconds of training on the small data folder: nano shapes, context 32, checkpoints every 2 steps."""
    values = dict(
        data=str(data_dir), out=str(out), preset="nano", context_length=32, batch_size=4, grad_accum=2, max_steps=8,
        lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4, eval_batches=2, save_every=2, keep_last=2, log_every=1,
        sample_prompts=["I had"], sample_tokens=4, seed=7, model=dict(TINY_MODEL),
    )
    values.update(kw)
    return TrainConfig(**values)
