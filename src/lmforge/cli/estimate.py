"""`lmforge estimate`: parameters, weight and KV-cache bytes, training memory of a config, and whether a training setup fits."""

from __future__ import annotations

import argparse
import json
import math
import re

from lmforge.cli.common import add_command
from lmforge.config import PRESETS, Config
from lmforge.errors import LmforgeError
from lmforge.estimate import (
    DTYPES,
    LORA_TARGETS,
    OPTIMIZERS,
    Estimate,
    Plan,
    Setup,
    describe_remedies,
    estimate,
    loss_block_rows,
    remedies,
)
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
        lmforge estimate --preset gpt2-xl --train --optimizer adamw8bit --checkpointing --memory 24GiB
        lmforge estimate --preset llama-3.2-1b --train --lora-r 16 --quantize nf4 --context 2048 --memory 8G
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

        --train answers "will it fit": the step as the trainer takes it with the flags the
        training commands take (--optimizer, --optimizer-states, --gradient-checkpointing,
        --lora-r, --lora-targets, --quantize), broken down, and a verdict against --memory
        (default: the memory this machine has available now). Paged moments live in
        memory-mapped files: they count against disk, not against the memory needed.
        """,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", metavar="NAME", help=f"a named config: {', '.join(PRESETS)}")
    source.add_argument("--config", metavar="PATH", help="a config.json, or any model lmforge reads (its config; the weights are not loaded)")
    p.add_argument("--dtype", default="fp32", help=f"storage dtype of weights and KV cache: {'|'.join(DTYPES)} (default: fp32)")
    p.add_argument("--context", type=int, metavar="N", help="tokens per sequence (default: the config's context_length)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences (default: 1)")
    p.add_argument("--json", action="store_true", help="print the numbers (bytes, counts) as one JSON object")
    train = p.add_argument_group("will it fit (--train)")
    train.add_argument("--train", action="store_true", help="the training step of the setup below (implied by any of its flags), "
                       "and whether it fits --memory")
    train.add_argument("--memory", metavar="SIZE", help="memory to fit in: 24GiB, 512MiB, 24G (binary units), 16GB (decimal) "
                       "or bytes (default: what this machine has available)")
    train.add_argument("--optimizer", default="adamw",
                       help=f"{' | '.join(OPTIMIZERS)}: fp32 moments, or 8-bit blockwise ones (default: adamw)")
    train.add_argument("--optimizer-states", default="memory", metavar="WHERE",
                       help="memory | paged: the moments in memory-mapped files the OS pages out (default: memory)")
    train.add_argument("--gradient-checkpointing", "--checkpointing", action="store_true",
                       help="recompute activations in the backward pass: keep only each block's input")
    train.add_argument("--lora-r", type=int, default=0, metavar="R",
                       help="adapters of rank R over a frozen base (default: 0, every weight trains)")
    train.add_argument("--lora-targets", nargs="+", default=["q", "k", "v", "o"], metavar="TEXT",
                       help=f"the Linears the adapters go on: {' '.join(LORA_TARGETS)} or all-linear (default: q k v o)")
    train.add_argument("--quantize", default="", help='"nf4": the frozen base in 4 bits (QLoRA; needs --lora-r)')


def _run(args: argparse.Namespace) -> int:
    setup = _setup(args)  # every flag checked before the config is read
    memory = parse_size(args.memory, "--memory") if args.memory is not None else None
    if args.preset is not None:
        config = Config.from_name(args.preset)
    else:
        from lmforge.loading import load_config

        config = load_config(args.config)
    if args.dtype not in DTYPES:
        raise LmforgeError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    train = args.train or setup != Setup() or memory is not None
    est = estimate(config, dtype=args.dtype, context=args.context, batch=args.batch, setup=setup if train else None)
    if train and memory is None:
        memory = _available()
    if args.json:
        d = est.to_dict()
        if est.plan is not None:
            d["memory"] = memory
            d["fits"] = None if memory is None else est.plan.fits(memory)
        print(json.dumps(d, indent=2))
    elif est.plan is not None:
        plan = render_plan(config, est.plan, memory, given=args.memory is not None)
        print("\n".join([f"{est.config}: {_family(config)}", "", *plan]))
    else:
        print("\n".join(render(config, est)))
    return 0


def _setup(args: argparse.Namespace) -> Setup:
    """The training setup the flags describe (the training commands' names and checks)."""
    if args.optimizer_states not in ("memory", "paged"):
        raise LmforgeError(f"--optimizer-states must be memory or paged, got {args.optimizer_states!r}")
    return Setup(optimizer=args.optimizer, paged=args.optimizer_states == "paged", checkpointing=args.gradient_checkpointing,
                 lora_r=args.lora_r, lora_targets=tuple(args.lora_targets), quantize=args.quantize)


def _available() -> int | None:
    """What this machine can still allocate (Linux's MemAvailable), None when unknown."""
    import torch

    from lmforge.device import available_memory

    return available_memory(torch.device("cpu"))


UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str, flag: str) -> int:
    """Bytes from "24GiB", "512MiB", "24G" (K/M/G/T are binary, as `free` and Docker read
    them), "16GB" (decimal) or a plain byte count; anything else is refused in one line."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise LmforgeError(f"{flag} {text!r} is not a size: give bytes or a number with a unit, e.g. 24GiB, 512MiB, 24G or 16GB")
    number = match.group(1)
    if UNITS[unit] == 1:
        if not number.isdigit():
            raise LmforgeError(f"{flag} {text!r} is not a whole number of bytes: give e.g. 24GiB, or bytes as an integer")
        size: float = int(number)
    else:
        size = float(number) * UNITS[unit]
    if size < 1 or size == math.inf:
        raise LmforgeError(f"{flag} {text!r} is not a positive size: give e.g. 24GiB")
    return int(size)


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


def render_plan(config: Config, plan: Plan, memory: int | None, given: bool) -> list[str]:
    """The training step of one setup, part by part, then the verdict against `memory`
    (`given`: --memory; else this machine's available memory)."""
    setup = plan.setup
    base = "frozen NF4 base + adapters" if setup.quantize else "frozen base + adapters" if setup.lora else "fp32"
    trainable = f"{count(plan.trainable)} {'adapter parameters' if setup.lora else 'parameters'}"
    rows = [
        (f"weights ({base})", plan.weights),
        (f"gradients ({trainable})", plan.gradients),
        (f"optimizer moments ({'8-bit' if setup.optimizer == 'adamw8bit' else 'fp32'})", plan.resident_moments),
    ]
    if plan.paged:
        rows.append(("  paged to disk (not resident)", plan.paged))
    if plan.code_tables or plan.step_buffers:
        rows.append(("optimizer code tables + step buffers", plan.code_tables + plan.step_buffers))
    rows += [
        (f"activations{' (checkpointed)' if setup.checkpointing else ''}", plan.activations),
        ("weights + grads + moments + activations", plan.total),
        ("peak of a step (modeled)", plan.peak),
    ]
    lines = [_row(f"training, {plan.batch} x {plan.context} tokens: {setup.describe()}", indent=0)]
    lines += [_row(label, size(n)) for label, n in rows]
    lines += [_row("peak set by", plan.peak_phase), ""]
    return lines + verdict(config, plan, memory, given)


TIGHT = 0.1  # a fit with less than this fraction of the memory to spare is called tight


def verdict(config: Config, plan: Plan, memory: int | None, given: bool) -> list[str]:
    """"verdict: fits" or "verdict: does not fit", with the numbers, and what would lower the need."""
    if memory is None:
        return [f"verdict: unknown: needs {size(plan.peak)}, and how much memory this machine has is unknown: pass --memory"]
    of = f"the {size(memory)} of --memory" if given else f"the {size(memory)} this machine has available"
    if plan.fits(memory):
        spare = memory - plan.peak
        if spare < TIGHT * memory:
            return [(f"verdict: fits, but tight: needs {size(plan.peak)} of {of} ({spare / memory:.0%} to spare; a process's "
                     "resident memory runs a few percent above its tensors' peak)")]
        return [f"verdict: fits: needs {size(plan.peak)} of {of} ({size(spare)} to spare)"]
    helps = remedies(config, plan.batch, plan.context, plan.setup)
    line = f"verdict: does not fit: needs {size(plan.peak)}, {size(plan.peak - memory)} more than {of}"
    return [line] + ([f"  lower it with {describe_remedies(helps, memory)}"] if helps else [])
