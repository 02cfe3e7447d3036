"""DPO training throughput and peak memory: lmforge's DPO pieces vs trl's `DPOTrainer`.

Both sides train the very same network on the very same pairs: one GPT-2-family model
(the `small` preset, 6 layers x 384, context 256, random init from a fixed seed: speed
does not depend on what the weights have learned) is built here, with the GPT-2
tokenizer (50,257 ids, `../shared/data/gpt2/`; `--vocab V` keeps its first V - 257
merges and puts <|endoftext|> at V - 1), and exported once with `lmforge.interop.hf.export_hf`
to a Hugging Face folder that both sides load: ours with `lmforge.load`, trl as a
`GPT2LMHeadModel` (`AutoModelForCausalLM.from_pretrained`, fp32, SDPA attention).

The pairs are the first `--pairs` (64) training pairs of LLMs-from-scratch's
`instruction-data-with-preference.json`, rendered with the Alpaca template by
`recipes.preference.read_pairs` (prompt, chosen, rejected). Ours encodes them with
`PreferenceBatches` (prompt and response encoded apart, <|endoftext|> after each
response); trl is given the same texts and tokenizes them itself (prompt + response +
eos text, the completion starting where the prompt's ids stop being a prefix). The trl
child checks that its ids equal ours pair by pair (prompt, chosen and rejected apart),
and the parent that no pair is cut by either side's `max_length` (256: trl counts
prompt + response tokens, ours input positions, one fewer; pairs that would be cut are
skipped, with a note), so both learn exactly the same tokens. The batches are the same
too: `--batch` (8) consecutive pairs, in file order, cycling (trl with
`train_sampling_strategy="sequential"`), so every step pads to the same width on both
sides (trl's rows hold one more position: it feeds prompt + response and drops the last
hidden state, ours feeds the inputs already shifted). Before timing, the policy's summed
log-probs of the first batch must agree between the two (relative 1e-4): the same
model scoring the same tokens.

One step, both sides: DPO sigmoid loss, beta 0.1, summed log-probs, both rows of a
pair in one forward of 2B rows, the reference's log-probs under no_grad, backward,
gradient clipping to norm 1, fused AdamW (lr 5e-6, constant; betas 0.9/0.95, weight
decay 0.1), zero_grad; fp32; no dropout; no gradient checkpointing (trl's DPOConfig
turns it on by default: here it is off, as in our recipe).

- ours: the pieces `recipes.dpo` trains with, in a plain loop that does what
  `train.loop.Trainer._train_step` and `fit` do per step: `PreferenceBatches.collate`
  + `recipes.preference.as_inputs`, `recipes.dpo.objective(cfg)(policy, reference)`
  (`pair_logps`, `Reference.logps`, `align.losses.dpo_loss`) `.loss.mean()`, backward,
  `clip_grad_norm_`, `train.optim.build_optimizer`'s fused AdamW. The Trainer itself
  is not used: it also evaluates, logs, checkpoints and samples, which are not the
  step's cost and which trl's side has turned off.
- trl: `DPOTrainer.train()` with `max_steps`, i.e. what trl's users run, per-step
  metrics included (trl computes its logging metrics inside `compute_loss` whatever
  the logging interval; logging, saving, evaluation and tqdm are off). A manual loop
  over `compute_loss` would time the same forward/backward without the Trainer's
  dataloader and `training_step` bookkeeping; `train()` is the fairer (and for trl the
  less favourable only by that small bookkeeping) measure of what a user gets. Steps
  are timed by a `TrainerCallback` between consecutive `on_step_end`s.

Rows:
  full        every weight trains; the reference is a frozen copy (ours `Reference(policy,
              frozen)`, loaded as `recipes.preference.frozen_reference` does; trl `ref_model`).
  lora        LoRA r=16, alpha=32 on attention; the reference is the policy with its
              adapters off (ours `adapters_disabled`; trl/peft `disable_adapter`). Ours
              adapts q, k, v, o (4 x 6 layers); GPT-2's HF layout fuses q, k, v into one
              `c_attn` (384 -> 1152), so peft adapts `attn.c_attn` and `attn.c_proj`. With
              r=16 on both, peft trains 221,184 weights to our 294,912; by default
              (`--trl-lora params`) peft's `c_attn` gets r=24, alpha=48 (same scale 2),
              which makes the trainable weights AND the adapters' FLOPs exactly equal to
              ours (q,k,v at r=16: 3 x (384x16 + 16x384) = 384x24 + 24x1152); `--trl-lora rank`
              gives peft r=16 everywhere instead.
  precompute  full weights, the reference's log-probs computed once before training (ours
              `Reference.precompute`, which then frees the frozen copy; trl
              `precompute_ref_log_probs=True`, which never loads a reference model and
              scores with the policy before it trains). Also reported: each side's speedup
              over its own `full` row, and the one-off precompute time (trl's includes its
              dataset tokenization).

Measurements, each in its own child process (`_common.run_child`): a timing run, `--warmup`
(2) steps then `--steps` (8) timed ones, pairs/s = timed pairs / their wall time (the
median step beside it), and the process's peak RSS over the steps (VmHWM, reset once the
models and data are ready: the absolute peak, and the peak above the RSS after imports);
then, unless `--memory rss`, a second run of the same steps under the PyTorch profiler
(`profile_memory=True`) for the allocator peak (`_common.allocator_peaks`: exact bytes of
CPU tensors live at the step's worst moment, weights, both models, AdamW moments,
activations; counted from model loading on). The table's memory figures are the allocator
peaks; the RSS ones follow. The steps' peak starts from what is live when they start: the
precompute's own peak (ours holds the frozen copy while it scores, trl only the policy) is
printed apart, as the peak before the steps.

On a shared machine, give `--threads 1`: with every core busy elsewhere, each multi-threaded
op waits for its slowest thread to be scheduled, which slows the many small ops of a step far
more than the big matmuls (on 2 busy cores, one run of the defaults measured ours at 1.6x
trl's speed, `--threads 1` at 3.3x). Quiet-machine figures use torch's default threads.

Target (the project's): ours >= 1.2x trl's pairs/s at no more peak memory.

    python benchmarks/bench_align.py [--pairs 64] [--batch 8] [--steps 8] [--warmup 2]
        [--rows full lora precompute] [--vocab 50257] [--memory both|rss|tensors] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED, allocator_peaks, args_or_child, print_table, reset_hwm, run_child, status_kib

MIB = 2**20
ROWS = ("full", "lora", "precompute")
SIDES = ("ours", "trl")
PAIRS_FILE = SHARED / "llms-from-scratch" / "instruction-data-with-preference.json"
GPT2_DIR = SHARED / "gpt2"
BETA, LR, WEIGHT_DECAY, BETAS, GRAD_CLIP = 0.1, 5e-6, 0.1, (0.9, 0.95), 1.0
LORA_R, LORA_ALPHA = 16, 32
MARK = "bench_align.train_steps"  # profiler range around the training steps
LOGPS_RTOL = 1e-4
TARGET_SPEED = 1.2


# --- the parent's preparation: tokenizer, model folder, pairs ------------------------------------
def make_tokenizer(vocab: int):  # -> lmforge.tokenizer.Tokenizer
    """GPT-2's tokenizer, or with `vocab` < 50257 its first vocab - 257 merges and <|endoftext|> at vocab - 1."""
    from lmforge.tokenizer import Tokenizer, from_gpt2_files

    gpt2 = from_gpt2_files(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")
    if vocab >= gpt2.vocab_size:
        if vocab > gpt2.vocab_size:
            raise SystemExit(f"--vocab {vocab}: GPT-2's vocabulary has {gpt2.vocab_size} ids at most")
        return gpt2
    if vocab < 258:
        raise SystemExit("--vocab must be at least 258 (256 bytes, one merge, <|endoftext|>)")
    return Tokenizer(gpt2.merges[: vocab - 257], {"<|endoftext|>": vocab - 1}, gpt2.pattern, gpt2.byte_order, name=f"gpt2-{vocab}")


def prepare(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Export the model (with its tokenizer) to work/model; write the pairs and our ids to work/pairs.json."""
    import torch

    from lmforge.config import Config
    from lmforge.interop.hf import export_hf
    from lmforge.model import GPT
    from lmforge.recipes.preference import read_pairs

    tok = make_tokenizer(args.vocab)
    torch.manual_seed(0)
    config = Config.from_name(args.preset, vocab_size=tok.vocab_size, context_length=args.context, **args.shape)
    model = GPT(config)
    model.tokenizer = tok
    export = export_hf(model, work / "model", tokenizer=tok)
    if export.notes:
        raise SystemExit("the export is not exact: " + "; ".join(export.notes))

    texts = read_pairs(str(PAIRS_FILE), "alpaca", say=lambda _: None).texts["train"]
    eot = tok.eot_id
    chosen, skipped, ids = [], 0, []
    for prompt, good, bad in texts:
        p, c, r = tok.encode(prompt), tok.encode(good) + [eot], tok.encode(bad) + [eot]
        # trl keeps prompt + response <= max_length tokens; ours max_length input positions (one fewer):
        # a pair within both limits is cut by neither
        if len(p) + max(len(c), len(r)) > args.max_length:
            skipped += 1
            continue
        chosen.append((prompt, good, bad))
        ids.append((p, c, r))
        if len(chosen) == args.pairs:
            break
    if len(chosen) < args.pairs:
        raise SystemExit(f"only {len(chosen)} training pairs fit in {args.max_length} tokens; lower --pairs")
    tokens = sum(len(p) + len(c) + len(p) + len(r) for p, c, r in ids)
    learned = sum(len(c) + len(r) for _, c, r in ids)
    (work / "pairs.json").write_text(json.dumps({"texts": chosen, "ids": ids}))
    return {
        "params": model.num_params(),
        "config": f"{config.n_layer} layers x {config.n_embd} ({config.n_head} heads), context {config.context_length}, "
        f"vocab {config.vocab_size:,}",
        "skipped": skipped,
        "tokens_per_pair": tokens / len(ids),
        "learned_per_pair": learned / len(ids),
        "longest": max(len(p) + max(len(c), len(r)) for p, c, r in ids),
    }


# --- the children -------------------------------------------------------------------------------
def _threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _ours(s: dict, work: Path, profiler: object | None) -> dict[str, object]:
    """Our DPO steps: objective + Reference + fused AdamW, as the recipe's Trainer takes them."""
    import torch

    from lmforge.data.preference import PreferenceBatches
    from lmforge.finetune.lora import LoRAConfig, apply_lora, count_parameters
    from lmforge.loading import load
    from lmforge.recipes.config import AlignConfig
    from lmforge.recipes.dpo import objective
    from lmforge.recipes.preference import Reference, as_inputs, pair_logps
    from lmforge.train.optim import build_optimizer

    row, B, steps = s["row"], s["batch"], s["warmup"] + s["steps"]
    texts = [tuple(t) for t in json.loads((work / "pairs.json").read_text())["texts"]]
    baseline = status_kib("VmRSS")
    policy = load(work / "model")
    tok = policy.tokenizer
    frozen = None
    if row == "lora":
        apply_lora(policy, LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, targets=("q", "k", "v", "o")))
    else:  # recipes.preference.frozen_reference: the base loaded again, frozen
        frozen = load(work / "model")
        frozen.requires_grad_(False)
        frozen.eval()
    policy.train()
    trainable = count_parameters(policy)[0]
    batches = PreferenceBatches(texts, tok, batch_size=B, max_length=s["max_length"], drop_last=True)
    if batches.truncated or batches.dropped:
        raise RuntimeError(f"ours cut {batches.truncated} pairs and dropped {len(batches.dropped)}: lengths differ from trl's")
    ref = Reference(policy, frozen)
    del frozen  # the Reference holds it (and frees it after precomputing)
    precompute_s = None
    if row == "precompute":
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            ref.precompute({"train": batches}, {"bench": "align"}, Path(folder), say=lambda _: None)
        precompute_s = time.perf_counter() - t
    cfg = AlignConfig(data=str(PAIRS_FILE), base=str(work / "model"), beta=BETA, logps="sum", lr=LR, batch_size=B,
                      precompute_ref=row == "precompute")
    loss_fn = objective(cfg)(policy, ref)
    opt = build_optimizer(policy, LR, WEIGHT_DECAY, BETAS)
    n = len(texts) // B

    def batch(step: int) -> tuple[dict, torch.Tensor]:
        k = step % n
        return as_inputs(batches.collate(range(k * B, (k + 1) * B)))

    with torch.no_grad():  # the first batch's policy log-probs, before any update: the check against trl's
        x, y = batch(0)
        first = pair_logps(policy, x, y).value(False).mean(0).tolist()
    ready = status_kib("VmRSS")
    reset = reset_hwm()
    stamps = [time.perf_counter()]
    losses = []

    def train() -> None:
        for step in range(steps):
            x, y = batch(step)
            loss = loss_fn(policy, x, y).loss.mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
            for group in opt.param_groups:  # the Trainer sets the schedule's rate every step
                group["lr"] = LR
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # the Trainer, too, reads the loss every step
            stamps.append(time.perf_counter())

    if profiler is not None:
        from torch.profiler import record_function

        with record_function(MARK):
            train()
    else:
        train()
    return {"stamps": stamps, "first_logps": first, "losses": losses, "trainable": trainable, "baseline_kib": baseline,
            "ready_kib": ready, "hwm_kib": status_kib("VmHWM"), "hwm_reset": reset, "precompute_s": precompute_s}


def _trl(s: dict, work: Path, profiler: object | None) -> dict[str, object]:
    """trl's DPOTrainer.train() for warmup + steps steps; the step times from a callback."""
    import logging
    import warnings

    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)
    disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"

    row, B, steps = s["row"], s["batch"], s["warmup"] + s["steps"]
    data = json.loads((work / "pairs.json").read_text())
    baseline = status_kib("VmRSS")
    folder = str(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def model() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")

    policy = model()
    ref_model = model() if row == "full" else None  # precompute: trl scores with the policy, before it trains
    peft_config = None
    if row == "lora":
        from peft import LoraConfig

        extra = {} if s["trl_lora"] == "rank" else {"rank_pattern": {"attn.c_attn": 24}, "alpha_pattern": {"attn.c_attn": 48}}
        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["attn.c_attn", "attn.c_proj"],
                                 bias="none", task_type="CAUSAL_LM", **extra)
    out = tempfile.mkdtemp(prefix="bench_align_trl_")
    config = DPOConfig(
        output_dir=out, per_device_train_batch_size=B, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8,
        max_grad_norm=GRAD_CLIP, optim="adamw_torch_fused", beta=BETA, loss_type=["sigmoid"], max_length=s["max_length"],
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
        precompute_ref_log_probs=row == "precompute", seed=0,
    )
    stamps: list[float] = []
    first: list[float] = []
    holder: dict[str, DPOTrainer] = {}

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            if not first:  # the first step's policy log-probs, before the end of train() logs (and clears) them
                metrics = holder["trainer"]._metrics["train"]
                first.extend([metrics["logps/chosen"][0], metrics["logps/rejected"][0]])

    dataset = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in data["texts"]])
    t = time.perf_counter()
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Stamp()])
    setup_s = time.perf_counter() - t
    holder["trainer"] = trainer
    del policy, ref_model
    # the ids trl will train on, against ours
    prepared = trainer.train_dataset
    mismatched = [i for i, (p, c, r) in enumerate(data["ids"])
                  if (prepared[i]["prompt_ids"], prepared[i]["chosen_ids"], prepared[i]["rejected_ids"]) != (p, c, r)]
    cut = sum(len(prepared[i]["prompt_ids"]) + max(len(prepared[i]["chosen_ids"]), len(prepared[i]["rejected_ids"])) > s["max_length"]
              for i in range(len(prepared)))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    ready = status_kib("VmRSS")
    reset = reset_hwm()
    if profiler is not None:
        from torch.profiler import record_function

        with record_function(MARK):
            trainer.train()
    else:
        trainer.train()
    shutil.rmtree(out, ignore_errors=True)  # trl's output_dir: nothing is saved there
    return {"stamps": stamps, "first_logps": first, "trainable": trainable, "baseline_kib": baseline, "ready_kib": ready,
            "hwm_kib": status_kib("VmHWM"), "hwm_reset": reset, "precompute_s": setup_s if row == "precompute" else None,
            "setup_s": setup_s, "mismatched": mismatched, "pairs": len(prepared), "cut": cut, "n_steps": trainer.state.global_step}


def _child(spec: str) -> None:
    s = json.loads(spec)
    _threads(s["threads"])
    work = Path(s["work"])
    run = _ours if s["side"] == "ours" else _trl
    if s["measure"] == "tensors":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            r = run(s, work, prof)
        setup, peak = allocator_peaks(prof, MARK)
        result = {"tensor_peak": peak, "setup_peak": setup, "trainable": r["trainable"]}
    else:
        r = run(s, work, None)
        result = {**r}
    import torch

    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


# --- the parent ------------------------------------------------------------------------------
def environment(args: argparse.Namespace) -> str:
    import peft
    import torch
    import transformers
    import trl

    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_") if k in os.environ}
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, peft {peft.__version__}; {os.cpu_count()} CPUs, torch threads "
        f"{args.threads or torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"
        + (f"; env {env}" if env else "")
    )


def rate(stamps: list[float], warmup: int, batch: int) -> tuple[float, float, list[float]]:
    """pairs/s over the steps after the warm-up (their total wall time), pairs/s of the median step, the step seconds."""
    times = [b - a for a, b in itertools.pairwise(stamps)][warmup:]
    return batch * len(times) / sum(times), batch / statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64, help="training pairs (the file's first that fit; default 64)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run, after the warm-up (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary size (default GPT-2's 50257; smaller: GPT-2's first merges)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=256, help="max_length on both sides (default 256)")
    parser.add_argument("--memory", choices=["both", "rss", "tensors"], default="both",
                        help="rss: from the timing run only; tensors/both: also a profiled run for the allocator peak")
    parser.add_argument("--trl-lora", choices=["params", "rank"], default="params",
                        help="params: peft's c_attn at r=24 (same trainable weights as ours); rank: r=16 everywhere")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch's default)")
    parser.add_argument("--work", help="folder for the exported model and pairs (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2-layer x 64 model, 8k vocab, 16 pairs, batch 4, 1+2 steps")
    args = args_or_child(parser, _child)
    if args is None:
        return
    args.shape = {}
    if args.quick:
        args.pairs, args.batch, args.steps, args.warmup = 16, 4, 2, 1
        args.vocab = min(args.vocab, 8192)
        args.shape = {"n_layer": 2, "n_embd": 64, "n_head": 2}
    if args.pairs < args.batch:
        raise SystemExit("--pairs must be at least --batch")
    args.pairs -= args.pairs % args.batch  # whole batches only

    started = time.perf_counter()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print("# " + environment(args))
    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        if (work / "model").exists():
            shutil.rmtree(work / "model")
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_align_")
        work = Path(tmp.name)
    info = prepare(args, work)
    print(f"# model: {args.preset}{' (quick: ' + str(args.shape) + ')' if args.shape else ''}, {info['config']}, "
          f"{info['params'] / 1e6:.1f}M parameters, fp32, random init (seed 0), exported to a HF folder (GPT2LMHeadModel)")
    print(f"# pairs: the first {args.pairs} training pairs of {PAIRS_FILE.name} (Alpaca template)"
          + (f", {info['skipped']} longer than {args.max_length} tokens skipped" if info["skipped"] else "")
          + f"; {info['tokens_per_pair']:.1f} tokens per pair (both rows), {info['learned_per_pair']:.1f} of them learned, "
          f"longest row {info['longest']}; batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps; "
          f"DPO sigmoid beta {BETA}, summed log-probs, AdamW lr {LR}, max_length {args.max_length}\n")

    results: dict[tuple[str, str], dict] = {}
    base = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "max_length": args.max_length,
            "trl_lora": args.trl_lora, "threads": args.threads, "work": str(work)}
    for row in args.rows:
        for side in SIDES:
            spec = {**base, "row": row, "side": side}
            r = run_child(__file__, {**spec, "measure": "time"}, timeout=7200)
            if args.memory != "rss":
                r.update(run_child(__file__, {**spec, "measure": "tensors"}, timeout=7200))
            results[row, side] = r
            print(f"  measured {row}: {side}", file=sys.stderr, flush=True)

    # checks: the same tokens, the same first log-probs
    problems = []
    for row in args.rows:
        t, o = results[row, "trl"], results[row, "ours"]
        if t["mismatched"]:
            problems.append(f"{row}: trl's ids differ from ours in {len(t['mismatched'])} of {t['pairs']} pairs "
                            f"(first: pair {t['mismatched'][0]})")
        if t["cut"] or t["pairs"] != args.pairs:
            problems.append(f"{row}: trl keeps {t['pairs']} pairs, {t['cut']} of them cut")
        if t["n_steps"] != args.warmup + args.steps:
            problems.append(f"{row}: trl ran {t['n_steps']} steps")
        for k, name in enumerate(("chosen", "rejected")):
            a, b = o["first_logps"][k], t["first_logps"][k]
            if abs(a - b) > LOGPS_RTOL * abs(b):
                problems.append(f"{row}: the first batch's mean {name} log-prob differs: ours {a:.6f}, trl {b:.6f}")
    if problems:
        raise SystemExit("the two sides do not do the same work:\n  " + "\n  ".join(problems))

    use_tensors = args.memory != "rss"
    rows, rss_rows = [], []
    speed = {}
    for row in args.rows:
        o, t = results[row, "ours"], results[row, "trl"]
        (o_rate, o_med, _), (t_rate, t_med, _) = rate(o["stamps"], args.warmup, args.batch), rate(t["stamps"], args.warmup, args.batch)
        speed[row] = (o_rate, t_rate)
        label = {"full": "(a) full, frozen-copy reference", "lora": "(b) LoRA r=16 attention, adapters-off reference",
                 "precompute": "(c) full, precomputed reference"}[row]
        mem_key = "tensor_peak" if use_tensors else None
        o_mem = o["tensor_peak"] / MIB if mem_key else (o["hwm_kib"] - o["baseline_kib"]) / 1024
        t_mem = t["tensor_peak"] / MIB if mem_key else (t["hwm_kib"] - t["baseline_kib"]) / 1024
        rows.append([label, o_rate, t_rate, f"{o_rate / t_rate:.2f}x", o_mem, t_mem, f"{o_mem / t_mem:.2f}x"])
        rss_rows.append([label, o["hwm_kib"] / 1024, t["hwm_kib"] / 1024, (o["hwm_kib"] - o["baseline_kib"]) / 1024,
                         (t["hwm_kib"] - t["baseline_kib"]) / 1024, o_med, t_med, f"{o['trainable']:,} / {t['trainable']:,}"])
    mem_name = "allocator peak" if use_tensors else "peak RSS above imports"
    print_table(["row", "ours pairs/s", "trl pairs/s", "speed ours/trl", f"ours {mem_name} MiB", f"trl {mem_name} MiB",
                 "memory ours/trl"], rows)
    print("\n## RSS (VmHWM over the steps, reset once ready) and more\n")
    print_table(["row", "ours peak RSS MiB", "trl peak RSS MiB", "ours above imports", "trl above imports",
                 "ours pairs/s (median step)", "trl pairs/s (median step)", "trainable ours / trl"], rss_rows)
    print()
    if "precompute" in args.rows:
        o, t = results["precompute", "ours"], results["precompute", "trl"]
        line = f"precomputing the reference log-probs once: ours {o['precompute_s']:.2f} s, trl {t['precompute_s']:.2f} s (trl: its whole DPOTrainer setup, tokenization included)"
        if "full" in args.rows:
            line += (f"; speedup over the live reference: ours {speed['precompute'][0] / speed['full'][0]:.2f}x, "
                     f"trl {speed['precompute'][1] / speed['full'][1]:.2f}x")
        print(line)
    for row in args.rows:
        o, t = results[row, "ours"], results[row, "trl"]
        print(f"{row}: first batch's policy log-probs (chosen, rejected) ours {o['first_logps'][0]:.4f}, {o['first_logps'][1]:.4f}; "
              f"trl {t['first_logps'][0]:.4f}, {t['first_logps'][1]:.4f}; ids identical in all {t['pairs']} pairs, none cut")
    for row in args.rows:
        o_rate, t_rate = speed[row]
        o, t = results[row, "ours"], results[row, "trl"]
        if use_tensors:
            mem_ok = o["tensor_peak"] <= t["tensor_peak"]
        else:
            mem_ok = o["hwm_kib"] - o["baseline_kib"] <= t["hwm_kib"] - t["baseline_kib"]
        verdict = "holds" if o_rate >= TARGET_SPEED * t_rate and mem_ok else "MISSED"
        print(f"target {row}: ours >= {TARGET_SPEED}x trl's pairs/s at no more memory: {o_rate / t_rate:.2f}x, "
              f"memory {'not more' if mem_ok else 'MORE'} -> {verdict}")
    if use_tensors:
        print("allocator peak before the steps (loading, ours' first-batch check forward, the precompute, for which ours "
              "holds the frozen copy and trl only the policy): " + "; ".join(f"{row} ours {results[row, 'ours']['setup_peak'] / MIB:,.0f} MiB, "
                                          f"trl {results[row, 'trl']['setup_peak'] / MIB:,.0f} MiB" for row in args.rows))
    if not all(r.get("hwm_reset", True) for r in results.values()):
        print("note: VmHWM could not be reset: the RSS peaks include loading")
    print(f"{time.perf_counter() - started:.0f} s in all")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
