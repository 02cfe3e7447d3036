"""`lmforge estimate`: parameters, weight and KV-cache bytes, training memory of a config."""

from __future__ import annotations

import argparse
import json

from lmforge.cli.common import add_command
from lmforge.config import PRESETS, Config
from lmforge.errors import LmforgeError
from lmforge.estimate import DTYPES, Estimate, estimate, loss_block_rows
from lmforge.text import plural


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "estimate",
        "parameter count and memory estimate of a model config (nothing is allocated)",
        _run,
        examples="""
        lmforge estimate --preset gpt2
        lmforge estimate --preset llama-3.2-1b --dtype nf4 --context 8192
        lmforge estimate --preset small --context 256 --batch 8      # training memory at 8 x 256
        lmforge estimate --config runs/model/config.json --json
        lmforge estimate --config runs/quickstart --batch 8      # a run's (or a quickstart's) model
        """,
        description="""
        Parameters (exact, as the model counts them), weight bytes in every storage dtype,
        KV-cache bytes per token and for --batch sequences of --context tokens, and the
        memory of the trainer's fp32 AdamW step at --batch x --context: weights, gradients,
        AdamW moments, activations saved for backward with and without gradient
        checkpointing, the loss's transient buffer (a block of rows of fp32 logits and
        their softmax: the trainer's loss never holds all N x vocab), and the step's
        modeled peak.

        int8 and nf4 quantize the Linear weights inside the blocks only; embeddings, norms,
        biases and the head stay 16-bit, and so does the KV cache.
        """,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", metavar="NAME", help=f"a named config: {', '.join(PRESETS)}")
    source.add_argument("--config", metavar="PATH", help="a config.json, or any model lmforge reads (its config; the weights are not loaded)")
    p.add_argument("--dtype", default="fp32", help=f"storage dtype of weights and KV cache: {'|'.join(DTYPES)} (default: fp32)")
    p.add_argument("--context", type=int, metavar="N", help="tokens per sequence (default: the config's context_length)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences (default: 1)")
    p.add_argument("--json", action="store_true", help="print the numbers (bytes, counts) as one JSON object")


def _run(args: argparse.Namespace) -> int:
    if args.preset is not None:
        config = Config.from_name(args.preset)
    else:
        from lmforge.loading import load_config

        config = load_config(args.config)
    if args.dtype not in DTYPES:
        raise LmforgeError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    est = estimate(config, dtype=args.dtype, context=args.context, batch=args.batch)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        print("\n".join(render(config, est)))
    return 0


# --- formatting ---------------------------------------------------------------------------
def count(n: int) -> str:
    """124.44 M, 1.24 B: parameters the way model cards state them."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return str(n)


def size(n: int) -> str:
    """Bytes in binary units (what `free` and allocators report)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = 2 ** {"TiB": 40, "GiB": 30, "MiB": 20, "KiB": 10}[unit]
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def _family(config: Config) -> str:
    kv = "" if config.n_kv_head == config.n_head else f", {config.n_kv_head} kv heads"
    head = "tied head" if config.tie_embeddings else "separate head"
    return (
        f"{plural(config.n_layer, 'layer')}, {plural(config.n_head, 'head')}{kv}, n_embd {config.n_embd}, mlp {config.mlp} {config.mlp_hidden}, "
        f"{config.norm}, {config.positions} positions, vocab {config.vocab_size:,}, {head}"
    )


def _row(label: str, *cells: str, indent: int = 2) -> str:
    """A label column then right-aligned cells; sub-rows indent under their heading."""
    return (" " * indent + f"{label:<{42 - indent}}" + "".join(f"{c:>16}" for c in cells)).rstrip()


def render(config: Config, est: Estimate) -> list[str]:
    """The human-readable table: one section per question the issue asks."""
    p, t = est.params, est.training
    lines = [f"{est.config}: {_family(config)}", ""]
    lines.append(_row("parameters", count(p.total), indent=0) + f"   ({p.total:,})")
    for name in ("embeddings", "attention", "mlp", "norms", "head"):
        lines.append(_row(name, "tied" if name == "head" and config.tie_embeddings else count(getattr(p, name))))

    lines += ["", _row("weights", "bytes", "bytes/param", indent=0)]
    for dtype, n in est.weight_bytes.items():
        lines.append(_row(dtype, size(n), f"{n / p.total:.3f}") + ("   <- --dtype" if dtype == est.dtype else ""))
    lines.append("  (int8, nf4: block Linear weights only; embeddings, norms, biases, head stay 16-bit)")

    kv_dtype = est.dtype if est.dtype in ("fp32", "bf16", "fp16") else "bf16"
    lines += [
        "",
        _row(f"KV cache ({kv_dtype})", indent=0),
        _row("per token", size(est.kv_bytes_per_token)),
        _row(f"{est.batch} x {est.context} tokens", size(est.kv_bytes)),
    ]

    lines += ["", _row(f"training, fp32 AdamW, {est.batch} x {est.context}", "plain", "checkpointed", indent=0)]
    loss_rows = loss_block_rows(est.batch * est.context, config.vocab_size)
    rows = [
        ("weights", t.weights, t.weights),
        ("gradients", t.gradients, t.gradients),
        ("AdamW moments (exp_avg, exp_avg_sq)", t.adamw, t.adamw),
        ("activations saved for backward", t.activations, t.activations_checkpointed),
        (f"loss, transient (2 x {loss_rows} x vocab)", t.loss_blocks, t.loss_blocks),
        ("weights + grads + AdamW + activations", t.total, t.total - t.activations + t.activations_checkpointed),
        ("peak of a step (modeled)", t.peak, t.peak_checkpointed),
    ]
    lines += [_row(label, size(plain), size(ckpt)) for label, plain, ckpt in rows]
    lines.append(_row("peak set by", t.peak_phase, t.peak_phase_checkpointed))
    return lines
