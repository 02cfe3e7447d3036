"""The quickstart's choices, by measurement: which model size, vocabulary, context and
learning rate give the lowest validation bits per byte on the embedded corpus (this
Python's standard library) within the quickstart's time budget on this machine.

Each candidate trains exactly as `lmforge quickstart` does (the pretraining recipe sized
by its time limit alone, so the cosine ends on time), on a tokenizer of its vocabulary
trained on the same corpus, and is then scored on the same held-out documents: the mean
loss over `--eval-batches` seeded batches of validation windows, turned into bits per
byte (nats per token / ln 2 / bytes per token), which compares vocabularies. Tokenizer
training and data preparation are timed once per vocabulary; they are part of the
quickstart's wall time, not of the training budget.

    python benchmarks/bench_quickstart.py --minutes 6 --only default 4x192 4x192-v2k 4x192-ctx128
    python benchmarks/bench_quickstart.py --list
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from _common import print_table

from lmforge.corpus import ReadStats, corpus_paths, iter_documents
from lmforge.data.prepare import prepare
from lmforge.data.tokens import TokenData
from lmforge.recipes.pretrain import run as pretrain
from lmforge.recipes.quickstart import QuickstartConfig, train_config
from lmforge.tokenizer.train import train_bpe

SHAPES = {  # Llama family: n_layer x n_embd, grouped-query attention, SwiGLU at ~8/3 the width
    "micro": {},  # the preset itself: 6 x 384, 6 heads, 2 KV heads, SwiGLU 768
    "6x256": {"n_layer": 6, "n_head": 4, "n_kv_head": 2, "n_embd": 256, "mlp_hidden": 683},
    "4x256": {"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 256, "mlp_hidden": 683},
    "4x192": {"n_layer": 4, "n_head": 3, "n_kv_head": 1, "n_embd": 192, "mlp_hidden": 512},
    "4x128": {"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 128, "mlp_hidden": 384},
    "3x128": {"n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 128, "mlp_hidden": 384},
    "nano": {"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 128, "mlp_hidden": 256},  # the nano preset's shape
}
# the other choices, on any shape: NAME-v2k (vocabulary), NAME-ctx128 (context, same tokens per step), NAME-lr4e-3
VARIANTS = {
    "": (4096, {}),
    "-v2k": (2048, {}), "-v8k": (8192, {}),
    "-ctx128": (4096, {"context_length": 128, "batch_size": 32}), "-ctx512": (4096, {"context_length": 512, "batch_size": 8}),
    "-lr1e-3": (4096, {"lr": 1e-3, "min_lr": 1e-4}), "-lr4e-3": (4096, {"lr": 4e-3, "min_lr": 4e-4}),
}


def candidate(name: str) -> tuple[int, dict]:
    """(vocabulary, overrides of the quickstart's TrainConfig) for a name like "4x192-ctx128"
    ("default": the quickstart as it is)."""
    if name == "default":
        return QuickstartConfig.vocab_size, {}
    for suffix, (vocab, overrides) in VARIANTS.items():
        shape = name[: len(name) - len(suffix)] if suffix else name
        if name.endswith(suffix) and shape in SHAPES:
            return vocab, {"preset": "micro", "model": dict(SHAPES[shape]), **overrides}
    raise SystemExit(f"unknown candidate {name!r}: a shape ({', '.join(SHAPES)}) with an optional suffix ({', '.join(VARIANTS)})")


def data_for(vocab: int, root: Path, paths: list[Path], cache: dict[int, tuple[Path, float]]) -> tuple[Path, float]:
    """A prepared data folder of the embedded corpus with a tokenizer of `vocab` ids, and
    the seconds the tokenizer and the data took."""
    if vocab not in cache:
        start = time.perf_counter()
        tokenizer = train_bpe((c for doc in iter_documents(paths, ReadStats(), "text") for c in doc), vocab, progress=False)
        prepare(paths, tokenizer, root / f"data-{vocab}", overwrite=True)
        cache[vocab] = (root / f"data-{vocab}", time.perf_counter() - start)
    return cache[vocab]


def score(name: str, vocab: int, overrides: dict, data: Path, out: Path, minutes: float, eval_batches: int) -> dict:
    cfg = train_config(QuickstartConfig(minutes=minutes), data, out, replace=False)
    cfg.__dict__.update(overrides)
    start = time.perf_counter()
    result = pretrain(cfg, say=lambda m: None, progress=False)
    wall = time.perf_counter() - start
    final = _bits_per_byte(out, data, eval_batches, cfg)
    return {"name": name, "vocab": vocab, "steps": result.step, "wall_s": wall, **final}


def _bits_per_byte(out: Path, data: Path, eval_batches: int, cfg: object) -> dict:
    """Validation loss of the run's final model over `eval_batches` seeded batches (more
    than the run's own evaluation, so candidates are told apart), in bits per byte."""
    import torch

    from lmforge.data.windows import RandomWindows
    from lmforge.loading import load
    from lmforge.train.loss import next_token_loss

    model = load(out)
    model.eval()
    tokens = TokenData.open(data)
    windows = RandomWindows(tokens.split("val"), model.config.context_length, 16, 4242, 0, 1)
    with torch.no_grad():
        loss = sum(float(next_token_loss(model, *windows.batch(i))) for i in range(eval_batches)) / eval_batches
    bpt = tokens.bytes_per_token("val", tokens.tokenizer())
    return {"params_m": model.num_params() / 1e6, "val_loss": loss, "bpb": loss / math.log(2) / bpt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=QuickstartConfig.minutes, help="training budget per candidate")
    parser.add_argument("--only", nargs="*", help="candidate names (default: all)")
    parser.add_argument("--eval-batches", type=int, default=50)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    if args.list:
        for name in ["default", *SHAPES, *(f"4x192{v}" for v in VARIANTS if v)]:
            vocab, overrides = candidate(name)
            print(f"{name:<14} vocab {vocab:>5}  {overrides}")
        return
    names = args.only or ["default", *SHAPES]
    paths = corpus_paths(None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp), {}
        for name in names:
            vocab, overrides = candidate(name)
            data, prep_s = data_for(vocab, root, paths, cache)
            r = score(name, vocab, overrides, data, root / f"run-{name}", args.minutes, args.eval_batches)
            r["prep_s"] = prep_s
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "a", encoding="utf-8") as f:
                    f.write(json.dumps(r) + "\n")
            rows.append([name, vocab, f"{r['params_m']:.2f}M", r["steps"], f"{r['wall_s']:.0f} s", f"{prep_s:.0f} s",
                         f"{r['val_loss']:.3f}", f"{r['bpb']:.3f}"])
    print_table(["candidate", "vocab", "params", "steps", "train wall", "tokenizer+data", "val loss", "bits/byte"], rows)


if __name__ == "__main__":
    main()
