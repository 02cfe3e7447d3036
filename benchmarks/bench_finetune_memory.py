"""Peak training memory of full fine-tuning, LoRA and QLoRA on one model, with and without checkpointing.

QLoRA's promise is that a model fine-tunes in a fraction of the memory full
fine-tuning needs: the frozen base is held in 4 bits and only small adapters get
gradients and AdamW moments. This measures how big that fraction is here, on the
`gpt2` preset (124M parameters, fp32 on CPU), with the same batch for every method:

- full: every weight trains;
- LoRA: r=16, alpha=32 on every linear layer of the blocks (`all-linear`), the base
  frozen in fp32;
- QLoRA: the blocks' linear layers in NF4 with double quantization
  (`lmforge.finetune.nf4.quantize_model`), then the same LoRA; the embeddings (and so
  the tied head), norms and biases stay fp32, as in `lmforge.recipes.common.set_trainable`.

Each runs with gradient checkpointing off and on. A run is `--steps` real training
steps on random token ids: `next_token_loss` (the head and the cross-entropy fused, a
block of rows at a time), backward, the fused AdamW of `build_optimizer`,
zero_grad(set_to_none=True); the first step allocates AdamW's moments, the later ones
are the steady state. Every measurement is a fresh subprocess, so nothing one run
allocated or cached is left for the next. Measured as `bench_memory.py` does:

- allocator peak: the CPU allocator reports every allocation and free to the PyTorch
  profiler (`profile_memory=True`); the running sum of those events, at its maximum
  during the training steps, is the exact peak of tensor memory, weights included. The
  events are summed from model construction on, so the model's own tensors are counted;
  the construction itself (QLoRA builds the dense model before quantizing it) is not
  part of the step's peak;
- peak RSS: the process's resident high-water mark (VmHWM, what getrusage reports as
  ru_maxrss, reset through /proc/self/clear_refs once the model is ready) minus its
  resident size just before the model is built, after imports and a warm-up run of the
  same method on a one-layer model. It adds malloc's retained free memory to the
  tensors (see bench_memory.py; `--pin-mmap` pins glibc's mmap threshold to show how much).

Also reported: the model's weight bytes (dense, or with the 4-bit blocks), its trainable
parameters, and the steady-state step time (median of the steps after the first, from
the RSS run, which has no profiler overhead). The target is QLoRA's peak <= 0.4x full
fine-tuning's for a model of >= 100M parameters, with a quantized base of <= 0.52
bytes per parameter.

Loading QLoRA's base (`--only load`): the preset with random weights (seed 0), saved to a
temporary folder ours and Hugging Face's, then read into the 4-bit model two ways:
`lmforge.load` then `quantize_model` (the dense model first: what QLoRA did before) and
`lmforge.loading.load_quantized` (each block weight quantized as it is read, the two
give the same model bit for bit). Each is a fresh process, warmed up by loading a
one-layer model the same way; measured: the peak RSS during the load over the RSS just
before it, the RSS once it is done (and how much of it is pages of the weights file
still mapped: `load` reads through a memory map, its tensors are views of it, and the
embedding, kept, keeps the pages the quantization read), the allocator peak (the
profiler counts that map as one allocation of the file's size, resident or not) and
the seconds. glibc's default mmap threshold keeps a varying share of the freed dense
weights as free heap (0 to 290 MiB here, either way): `--pin-mmap` takes it out.

    python benchmarks/bench_finetune_memory.py [--preset gpt2] [--batch 4] [--context 256] [--steps 3] [--pin-mmap] [--only train|load]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _common import PINNED_MMAP, allocator_peaks, args_or_child, print_table, reset_hwm, run_child, status_kib

from lmforge.config import Config

if TYPE_CHECKING:
    from lmforge.model import GPT

MIB = 2**20
METHODS = ("full", "LoRA", "QLoRA")
LORA_R, LORA_ALPHA = 16, 32
TARGET_RATIO = 0.4  # QLoRA peak / full fine-tuning peak
TARGET_PARAMS = 100_000_000  # ... for a model at least this big
TARGET_BYTES_PER_PARAM = 0.52  # NF4 with double quantization: 0.516
MARK = "bench_finetune_memory.train_steps"  # profiler range around the training steps
LOADS = {"dense": "load, then quantize_model", "streamed": "load_quantized"}  # how QLoRA's base is read
SOURCES = ("ours", "Hugging Face")  # the folders it is read from


# --- the child: one measurement in a fresh process --------------------------------------------
def _prepare(config: Config, method: str, checkpointing: bool) -> tuple[GPT, dict[str, object]]:
    """The model ready to train by `method`, and what it is: weight bytes, parameter counts, NF4 summary."""
    import torch

    from lmforge.finetune.lora import LoRAConfig, apply_lora, count_parameters
    from lmforge.model import GPT

    torch.manual_seed(0)
    model = GPT(config).train()
    model.gradient_checkpointing = checkpointing
    summary = None
    if method == "QLoRA":
        from lmforge.finetune.nf4 import quantize_model

        summary = quantize_model(model)  # as set_trainable does: quantize, then add the adapters
        summary.pop("skipped")
    if method in ("LoRA", "QLoRA"):
        apply_lora(model, LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, targets=("all-linear",)))
    trainable, total = count_parameters(model)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    return model, {"trainable": trainable, "params": total, "weight_bytes": sum(storages.values()), "nf4": summary}


def _train(model: GPT, config: Config, batch: int, context: int, steps: int) -> list[float]:
    """`steps` training steps as the trainer takes them; the seconds each took."""
    import torch

    from lmforge.train.loss import next_token_loss
    from lmforge.train.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    x = torch.randint(config.vocab_size, (batch, context))
    y = torch.randint(config.vocab_size, (batch, context))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = next_token_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        times.append(time.perf_counter() - t)
    return times


def _measure_rss(config: Config, method: str, checkpointing: bool, batch: int, context: int, steps: int) -> dict[str, object]:
    import gc

    warm = config.replace(n_layer=1, vocab_size=256, context_length=16)
    _train(_prepare(warm, method, checkpointing)[0], warm, 1, 16, 1)
    gc.collect()
    baseline = status_kib("VmRSS")
    model, info = _prepare(config, method, checkpointing)
    gc.collect()
    ready = status_kib("VmRSS")
    reset = reset_hwm()  # from here on: the training steps' high-water mark, not the dense model QLoRA starts from
    times = _train(model, config, batch, context, steps)
    step = statistics.median(times[1:] or times)
    return {**info, "rss_peak": (status_kib("VmHWM") - baseline) * 1024, "rss_ready": (ready - baseline) * 1024, "hwm_reset": reset, "step_s": step}


def _measure_tensors(config: Config, method: str, checkpointing: bool, batch: int, context: int, steps: int) -> dict[str, object]:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model, info = _prepare(config, method, checkpointing)
        with record_function(MARK):
            _train(model, config, batch, context, steps)
    # the training steps' peak counts from what is live when they start: the model, its inputs
    build_peak, train_peak = allocator_peaks(prof, MARK)
    return {**info, "tensor_peak": train_peak, "build_peak": build_peak}


def _load(folder: str, how: str) -> GPT:
    """QLoRA's base from `folder`: the dense model, then quantized; or quantized as it is read."""
    from lmforge.finetune.nf4 import quantize_model
    from lmforge.loading import load, load_quantized

    if how == "streamed":
        return load_quantized(folder)
    model = load(folder)
    quantize_model(model)
    return model


def _weight_bytes(model: GPT) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def _measure_load_rss(folder: str, warm: str, how: str) -> dict[str, object]:
    import gc

    _load(warm, how)
    gc.collect()
    baseline, file_pages = status_kib("VmRSS"), status_kib("RssFile")
    reset = reset_hwm()
    start = time.perf_counter()
    model = _load(folder, how)
    seconds = time.perf_counter() - start
    gc.collect()
    return {
        "rss_peak": (status_kib("VmHWM") - baseline) * 1024,
        "rss_after": (status_kib("VmRSS") - baseline) * 1024,
        "file_after": (status_kib("RssFile") - file_pages) * 1024,
        "weight_bytes": _weight_bytes(model),
        "hwm_reset": reset,
        "load_s": seconds,
    }


def _measure_load_tensors(folder: str, warm: str, how: str) -> dict[str, object]:
    from torch.profiler import ProfilerActivity, profile

    _load(warm, how)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = _load(folder, how)
    return {"tensor_peak": allocator_peaks(prof)[1], "weight_bytes": _weight_bytes(model)}


def _child(spec: str) -> None:
    s = json.loads(spec)
    if s["measure"] in ("load-rss", "load-tensors"):
        measure = _measure_load_rss if s["measure"] == "load-rss" else _measure_load_tensors
        print(json.dumps(measure(s["folder"], s["warm"], s["how"])))
        return
    config = Config.from_name(s["preset"])
    measure = _measure_rss if s["measure"] == "rss" else _measure_tensors
    print(json.dumps(measure(config, s["method"], s["checkpointing"], s["batch"], s["context"], s["steps"])))


def measure(spec: dict[str, object], env: dict[str, str] | None = None) -> dict[str, object]:
    """One measurement (`spec["measure"]` "tensors" or "rss") in a fresh interpreter."""
    return run_child(__file__, spec, env, timeout=3600)


# --- the parent: the table ----------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model preset (default gpt2, 124M parameters)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (>= 2 to include the steady state)")
    parser.add_argument("--pin-mmap", action="store_true", help="run the RSS measurements with MALLOC_MMAP_THRESHOLD_=131072")
    parser.add_argument("--only", choices=("train", "load"), help="only the training steps, or only loading QLoRA's base (default: both)")
    args = args_or_child(parser, _child)
    if args is None:
        return
    if args.only != "load":
        train_table(args)
    if args.only != "train":
        load_table(args)


def load_table(args: argparse.Namespace) -> None:
    """Loading QLoRA's base from a folder: the dense model first, then quantized, against quantized as it is read."""
    import torch

    from lmforge.interop.hf import save_hf
    from lmforge.model import GPT
    from lmforge.weights import save_pretrained

    env = PINNED_MMAP if args.pin_mmap else None
    config = Config.from_name(args.preset)
    results: dict[tuple[str, str], dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        folders = {}
        for name, cfg in (("model", config), ("warm", config.replace(n_layer=1, vocab_size=256, context_length=16))):
            torch.manual_seed(0)
            model = GPT(cfg)
            folders[name, "ours"] = str(save_pretrained(model, Path(tmp) / name))
            folders[name, "Hugging Face"] = str(save_hf(model, Path(tmp) / f"{name}-hf"))
            del model
        for source in SOURCES:
            for how, what in LOADS.items():
                spec = {"folder": folders["model", source], "warm": folders["warm", source], "how": how}
                tensors = measure({**spec, "measure": "load-tensors"})
                results[source, how] = {**tensors, **measure({**spec, "measure": "load-rss"}, env)}
                print(f"  measured loading from {source}: {what}", file=sys.stderr, flush=True)

    print(f"\n# Loading QLoRA's base: {args.preset} ({config.n_layer} layers) with random fp32 weights, from a folder, on CPU\n")
    rows = [
        [source, LOADS[how], r["rss_peak"] / MIB, r["rss_after"] / MIB, r["file_after"] / MIB, r["tensor_peak"] / MIB,
         r["weight_bytes"] / MIB, r["load_s"]]
        for (source, how), r in results.items()
    ]  # fmt: skip
    print_table(["folder", "loading", "peak RSS MiB", "RSS after MiB", "of it, file pages", "allocator peak MiB", "model MiB", "s"], rows)
    print()
    for source in SOURCES:
        dense, streamed = results[source, "dense"], results[source, "streamed"]
        print(f"{source} folder: load_quantized's peak RSS is {streamed['rss_peak'] / dense['rss_peak']:.2f}x that of "
              f"load + quantize_model ({streamed['rss_peak'] / MIB:,.0f} vs {dense['rss_peak'] / MIB:,.0f} MiB), "
              f"{streamed['rss_peak'] / streamed['weight_bytes']:.2f}x the finished model")
    if not all(r["hwm_reset"] for r in results.values()):
        print("note: VmHWM could not be reset: the peaks include the warm-up's")
    if args.pin_mmap:
        print("note: RSS measured with MALLOC_MMAP_THRESHOLD_=131072 (glibc's mmap threshold pinned)")


def train_table(args: argparse.Namespace) -> None:
    """Peak memory of the training steps of each method, checkpointing off and on."""
    env = PINNED_MMAP if args.pin_mmap else None
    base = {"preset": args.preset, "batch": args.batch, "context": args.context, "steps": args.steps}
    results: dict[tuple[str, bool], dict[str, object]] = {}
    for ckpt in (False, True):
        for method in METHODS:
            spec = {**base, "method": method, "checkpointing": ckpt}
            tensors = measure({**spec, "measure": "tensors"})
            rss = measure({**spec, "measure": "rss"}, env)
            results[method, ckpt] = {**tensors, **{k: rss[k] for k in ("rss_peak", "rss_ready", "hwm_reset", "step_s")}}
            print(f"  measured {method}, checkpointing {'on' if ckpt else 'off'}", file=sys.stderr, flush=True)

    rows, split = [], []
    for (method, ckpt), r in results.items():
        full = results["full", ckpt]
        rows.append(
            [
                method,
                "yes" if ckpt else "no",
                f"{r['trainable']:,}",
                r["weight_bytes"] / MIB,
                r["tensor_peak"] / MIB,
                r["rss_peak"] / MIB,
                f"{r['tensor_peak'] / full['tensor_peak']:.3f} (RSS {r['rss_peak'] / full['rss_peak']:.3f})",
                r["step_s"],
            ]
        )
        moments = 2 * 4 * r["trainable"]  # AdamW's two fp32 moments, live through every step after the first
        rest = r["tensor_peak"] - r["weight_bytes"] - moments
        split.append([method, "yes" if ckpt else "no", r["weight_bytes"] / MIB, moments / MIB, rest / MIB, r["rss_ready"] / MIB])

    print(f"# Peak memory of a fine-tuning step, {args.preset} fp32 on CPU, batch {args.batch} x context {args.context}, {args.steps} steps\n")
    print_table(
        [
            "method",
            "checkpointing",
            "trainable params",
            "weight bytes (MiB)",
            "peak (allocator) MiB",
            "peak RSS MiB",
            "ratio to full fine-tuning",
            "step s",
        ],
        rows,
    )
    print(
        "\n## Where the allocator peak goes, MiB (the rest: activations, the gradients live at that moment and the "
        "loss's blocks of logits; RSS before the steps: the model at rest plus what malloc kept of what building it freed)\n"
    )
    print_table(["method", "checkpointing", "weights", "AdamW moments", "rest", "RSS before the steps"], split)

    params = results["full", False]["params"]
    nf4 = results["QLoRA", False]["nf4"]
    print()
    for ckpt in (False, True):
        q, f = results["QLoRA", ckpt], results["full", ckpt]
        ratio, rss_ratio = q["tensor_peak"] / f["tensor_peak"], q["rss_peak"] / f["rss_peak"]
        verdict = "holds" if ratio <= TARGET_RATIO else "MISSED"
        print(
            f"target: QLoRA peak <= {TARGET_RATIO}x full fine-tuning for a model of >= {TARGET_PARAMS / 1e6:.0f}M parameters "
            f"(this one: {params / 1e6:.1f}M), checkpointing {'on' if ckpt else 'off'}: "
            f"allocator {ratio:.3f}, RSS {rss_ratio:.3f} -> {verdict}"
            + ("" if params >= TARGET_PARAMS else " (model below the target's size)")
        )
    bpp = nf4["bytes_per_param"]
    print(
        f"quantized base: {nf4['layers']} layers, {nf4['params']:,} weights, {nf4['bytes'] / MIB:.1f} MiB "
        f"(dense fp32 {nf4['dense_bytes'] / MIB:.1f} MiB): {bpp:.4f} bytes/param (target <= {TARGET_BYTES_PER_PARAM}) -> "
        + ("holds" if bpp <= TARGET_BYTES_PER_PARAM else "MISSED")
    )
    build = results["QLoRA", False]["build_peak"]
    print(f"note: building the QLoRA model (dense, then quantized) peaks at {build / MIB:.0f} MiB of tensors, before training starts "
          "(read from a folder with load_quantized, the dense model is never whole: --only load)")
    if not all(r["hwm_reset"] for r in results.values()):
        print("note: VmHWM could not be reset: the RSS peaks include model construction's")
    if args.pin_mmap:
        print("note: RSS measured with MALLOC_MMAP_THRESHOLD_=131072 (glibc's mmap threshold pinned)")


if __name__ == "__main__":
    main()
