"""Decode at the memory limit: lmforge against llama.cpp on the same weights, in one run.

Two randomly initialised models of about 124M parameters: gpt2, and a Llama shape of the
same size (12 layers of 768, 12 query / 4 KV heads, SwiGLU 2048, 32k vocabulary, untied
head). Each is exported with `lmforge convert --to-gguf` (f32, f16, q8_0) and loaded by
llama-cpp-python (when installed). Batch 1, a 32-token prompt, 128 new tokens greedy, the
threads torch has (2 here); contenders take turns round after round and the medians are
reported, so a burst of load on a shared machine hits all of them alike.

Rows: decode tokens/s (ours fp32, fp32 compiled (`Engine(compile=True)`), int8 (eager and compiled) and fp16 weights; llama.cpp f32, q8_0, f16), prefill
of 512 tokens, batch 8; where one token's time goes (weight reads, attention, sampling,
the rest: Python and dispatch), from the profiler's per-operator times and the unprofiled
wall time; greedy agreement. `--only compile` measures `torch.compile` on the decode step.
`--quality RUN --text FILE` compares int8 (and fp16) with fp32 on a trained model of
ours: held-out perplexity and greedy continuations.

    python benchmarks/bench_decode.py [--shapes gpt2 llama] [--rounds 5] [--only speed|breakdown|compile]
    python benchmarks/bench_decode.py --quality runs/base --text ../shared/data/tinystories/...
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _common import SHARED, print_table

import lmforge
from lmforge.config import Config
from lmforge.engine import Engine, SamplingParams, generate_uncached, sample
from lmforge.engine.cpu_decode import PackedLinear
from lmforge.engine.quantize import Float16Linear, Int8Linear, quantize
from lmforge.interop.gguf import export_gguf
from lmforge.model import GPT
from lmforge.tokenizer.gpt2 import from_gpt2_files
from lmforge.tokenizer.llama2c import Llama2cTokenizer

GREEDY = SamplingParams(temperature=0)
PROMPT, NEW = 32, 128
LLAMA_SHAPE = dict(vocab_size=32000, context_length=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, mlp_hidden=2048, tie_embeddings=False)


def build(shape: str, data: Path) -> tuple[GPT, object]:
    torch.manual_seed(0)
    if shape == "gpt2":
        return GPT(Config.from_name("gpt2")).eval(), from_gpt2_files(data / "gpt2" / "encoder.json", data / "gpt2" / "vocab.bpe")
    tok = Llama2cTokenizer.load_bin(data / "weights" / "llama2c-tok32k" / "tokenizer.bin", 32000)
    return GPT(Config.from_name("micro", **LLAMA_SHAPE)).eval(), tok


def decode_only(engine: Engine, prompt: list[int], new: int, between: Callable[[], object] = lambda: None) -> tuple[float, list[int]]:
    """Tokens/s of `new` decode steps after the prefill (as llama.cpp's loop below is timed),
    and the greedy ids; `between` runs after the prefill, before the clock starts."""
    steps = engine.steps([prompt], new + 1, GREEDY)
    ids = [int(next(steps)[0][0])]  # the prefill and the token it gives
    between()
    t = time.perf_counter()
    ids += [int(token[0]) for token, _ in steps]
    return new / (time.perf_counter() - t), ids


def ours(model: GPT, prompt: list[int], packed: bool = True, compile: bool = False) -> Callable[[int], tuple[float, list[int]]]:
    engine = Engine(model, packed=packed, compile=compile)
    return lambda new: decode_only(engine, prompt, new)


@contextlib.contextmanager
def llama_cpp_decoder(path: Path, prompt: list[int]) -> Iterator[Callable[[int], tuple[float, list[int]]]]:
    """llama.cpp's decode loop, greedy from its own logits, timed as ours is."""
    import numpy as np
    from llama_cpp import Llama

    # logits_all: llama-cpp-python fills `scores` row by row only then (one row per decode step: no extra cost)
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=torch.get_num_threads(), logits_all=True, verbose=False)

    def run(new: int) -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(prompt)
        ids = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        t = time.perf_counter()
        for _ in range(new):
            llm.eval([ids[-1]])
            ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return new / (time.perf_counter() - t), ids

    try:
        yield run
    finally:
        llm.close()


def prefill(model: GPT, n: int = 512) -> Callable[[], float]:
    ids = torch.randint(0, model.config.vocab_size, (1, n))

    def run() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.hidden_states(ids)
        return n / (time.perf_counter() - t)

    return run


def speed(args: argparse.Namespace) -> None:
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
        print("llama-cpp-python is not installed: lmforge rows only\n")
    rows, agree, compile_s = [], [], []
    for shape in args.shapes:
        model, tok = build(shape, args.data)
        prompt = list(range(1, PROMPT + 1))
        ref = generate_uncached(model, prompt, 32)[0]
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            runs: dict[str, Callable[[int], tuple[float, list[int]]]] = {"ours fp32": ours(model, prompt)}
            runs["ours fp32 compiled"] = ours(model, prompt, compile=True)
            started = time.perf_counter()
            runs["ours fp32 compiled"](1)
            compile_s.append(f"{shape} {time.perf_counter() - started:.1f} s")
            int8 = quantize(build(shape, args.data)[0], "int8")
            runs["ours int8"] = ours(int8, prompt)
            runs["ours int8 compiled"] = ours(int8, prompt, compile=True)
            started = time.perf_counter()
            runs["ours int8 compiled"](1)
            compile_s.append(f"{shape} int8 {time.perf_counter() - started:.1f} s")
            runs["ours fp16 weights"] = ours(quantize(build(shape, args.data)[0], "float16"), prompt)
            if have_llama:
                for outtype in ("f32", "q8_0", "f16"):
                    path = Path(tmp) / f"{shape}-{outtype}.gguf"
                    export_gguf(model, path, tok, outtype=outtype)
                    runs[f"llama.cpp {outtype}"] = stack.enter_context(llama_cpp_decoder(path, prompt))
            tokens = {name: run(31)[1] for name, run in runs.items()}  # the prefill's token and 31 decoded: 32
            agree.append([shape, tokens["ours fp32"] == ref]
                         + [sum(a == b for a, b in zip(tokens[n], tokens["ours fp32"])) for n in runs if n != "ours fp32"])
            speeds: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    speeds[name].append(run(NEW)[0])
            med = {name: statistics.median(s) for name, s in speeds.items()}
            for name in runs:
                vs = {"ours fp32": "llama.cpp f32", "ours fp32 compiled": "llama.cpp f32", "ours int8": "llama.cpp q8_0", "ours int8 compiled": "llama.cpp q8_0", "ours fp16 weights": "llama.cpp f16"}.get(name)
                ratio = f"{med[name] / med[vs]:.2f}x {vs}" if vs in med else ""
                rows.append([f"{shape}: decode, batch 1, {name}", med[name], f"{min(speeds[name]):.1f}-{max(speeds[name]):.1f}", ratio])
            fill = {"ours fp32": prefill(model)}
            fill_speeds: dict[str, list[float]] = {"ours fp32": []}
            if have_llama:
                llm_fill = _llama_prefill(Path(tmp) / f"{shape}-f32.gguf", stack)
                fill["llama.cpp f32"], fill_speeds["llama.cpp f32"] = llm_fill, []
            for _ in range(args.rounds):
                for name, run in fill.items():
                    fill_speeds[name].append(run())
            for name, s in fill_speeds.items():
                rows.append([f"{shape}: prefill 512, {name}", statistics.median(s), f"{min(s):.0f}-{max(s):.0f}", ""])
            engine = Engine(model)
            batch = [prompt] * 8
            engine.generate(batch, max_new_tokens=4, sampling=GREEDY)
            b8 = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                engine.generate(batch, max_new_tokens=NEW, sampling=GREEDY)
                b8.append(8 * NEW / (time.perf_counter() - t))
            rows.append([f"{shape}: decode, batch 8, ours fp32 (aggregate)", statistics.median(b8), f"{min(b8):.0f}-{max(b8):.0f}", ""])
    print(f"# Decode, batch 1, {PROMPT}-token prompt, {NEW} new tokens, {torch.get_num_threads()} threads, medians of {args.rounds} alternating rounds\n")
    print_table(["", "tokens/s", "range", "ratio"], rows)
    print(f"\n(--compile: the first generation, compiling included: {', '.join(compile_s)})")
    others = [n for n in ("ours fp32 compiled", "ours int8", "ours int8 compiled", "ours fp16 weights", "llama.cpp f32", "llama.cpp q8_0", "llama.cpp f16") if have_llama or n.startswith("ours")]
    print("\n# Greedy agreement over 32 tokens: ours fp32 vs our reference path, then each contender vs ours fp32\n")
    print_table(["shape", "fp32 == reference", *others], agree)


def _llama_prefill(path: Path, stack: contextlib.ExitStack) -> Callable[[], float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=torch.get_num_threads(), verbose=False)
    stack.callback(llm.close)
    ids = list(range(1, 513))

    def run() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        return len(ids) / (time.perf_counter() - t)

    return run


@contextlib.contextmanager
def matmuls_stubbed() -> Iterator[None]:
    """Every weight matmul of the decode step returns zeros of its output's shape at once
    (a cached tensor): what is left of a token's time is everything but the weight reads."""
    zeros: dict[tuple[int, ...], torch.Tensor] = {}

    def stub(width: Callable[[object], int]) -> Callable[..., torch.Tensor]:
        def call(self: object, x: torch.Tensor) -> torch.Tensor:
            shape = (*x.shape[:-1], width(self))
            if shape not in zeros:
                zeros[shape] = torch.zeros(shape)
            return zeros[shape]

        return call

    patches = [(PackedLinear, "__call__", stub(lambda p: sum(p.sizes)))]
    patches += [(cls, "forward", stub(lambda m: m.out_features)) for cls in (torch.nn.Linear, Int8Linear, Float16Linear)]
    patches += [(cls, "one_row", stub(lambda m: m.out_features)) for cls in (Int8Linear, Float16Linear)]
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    for cls, name, fn in patches:
        setattr(cls, name, fn)
    try:
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def breakdown(args: argparse.Namespace) -> None:
    """Per token: the decode step as it runs (total) and with every weight matmul stubbed
    out (what is not weight reads), taking turns; of the latter, attention (the fused
    attention operator's time, from the profiler) and sampling (greedy, timed alone on the
    logits); the rest is Python, dispatch and the small operators (norms, RoPE, residuals)."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for shape in args.shapes:
        for label, prepare, packed in (
            ("fp32, model's own layers (before)", lambda m: m, False),
            ("fp32, packed step (after)", lambda m: m, True),
            ("int8 weights", lambda m: quantize(m, "int8"), True),
            ("fp16 weights", lambda m: quantize(m, "float16"), True),
        ):
            model = prepare(build(shape, args.data)[0])
            engine = Engine(model, packed=packed)
            prompt = list(range(1, PROMPT + 1))
            decode_only(engine, prompt, 8)
            total, without = [], []
            for _ in range(args.rounds):
                total.append(1e3 / decode_only(engine, prompt, NEW)[0])
                with matmuls_stubbed():
                    without.append(1e3 / decode_only(engine, prompt, NEW)[0])
            prof = profile(activities=[ProfilerActivity.CPU])
            with matmuls_stubbed():
                decode_only(engine, prompt, NEW, between=prof.start)
            prof.stop()
            attention = sum(o.self_cpu_time_total for o in prof.key_averages() if "scaled_dot_product" in o.key) / NEW / 1e3
            logits = torch.randn(1, model.config.vocab_size)
            sampling = _time(lambda: sample(logits, GREEDY)) * 1e3
            t, w = statistics.median(total), statistics.median(without)
            rows.append([f"{shape}: {label}", t, t - w, attention, sampling, w - attention - sampling, 1e3 / t])
    print(f"# Where one decoded token's time goes (ms), batch 1, {torch.get_num_threads()} threads, medians of {args.rounds} rounds\n")
    print_table(["", "total", "weight reads", "attention", "sampling", "Python, dispatch, small ops", "tokens/s"], rows)


def _time(fn: Callable[[], object], n: int = 200) -> float:
    for _ in range(10):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def compiled(args: argparse.Namespace) -> None:
    """torch.compile of each block's forward (the model's decode step; the engine's cache and
    the head stay eager) against the same layers eager and against our packed step:
    tokens/s, and the first generation's time, which includes compiling."""
    rows = []
    for shape in args.shapes:
        model = build(shape, args.data)[0]
        prompt = list(range(1, PROMPT + 1))
        packed, plain = ours(model, prompt), ours(model, prompt, packed=False)
        packed(8), plain(8)
        packed_speed = statistics.median(packed(NEW)[0] for _ in range(args.rounds))
        plain_speed = statistics.median(plain(NEW)[0] for _ in range(args.rounds))
        for block in model.blocks:
            block.forward = torch.compile(block.forward, dynamic=True)
        t = time.perf_counter()
        plain(NEW)
        warm = time.perf_counter() - t
        compiled_speed = statistics.median(plain(NEW)[0] for _ in range(args.rounds))
        rows.append([shape, plain_speed, compiled_speed, warm, packed_speed])
    print("# torch.compile of the blocks (dynamic shapes), batch 1 decode, tokens/s\n")
    print_table(["shape", "eager, model's layers", "compiled, model's layers", "first generation (s, compiling)", "eager, packed step (ours)"], rows)


@torch.inference_mode()
def quality(args: argparse.Namespace) -> None:
    """int8 and fp16 weights against fp32 on a trained model: perplexity on held-out text and
    greedy continuations of its opening windows."""
    base = lmforge.load(args.quality)  # the fp32 row; int8 and float16 each convert a fresh load
    ids = _held_out(Path(args.text), base.tokenizer)
    T = min(256, base.config.context_length)
    windows = ids[: (len(ids) // T) * T].view(-1, T)[: args.windows]
    rows = []
    reference: dict[int, list[int]] = {}
    for label, prepare in (("fp32", lambda m: m), ("int8", lambda m: quantize(m, "int8")), ("fp16 weights", lambda m: quantize(m, "float16"))):
        model = base if label == "fp32" else prepare(lmforge.load(args.quality))
        nll = sum(float(model(w[None, :-1], w[None, 1:])) for w in windows) / len(windows)
        engine = Engine(model)
        same = total = 0
        for i, w in enumerate(windows[: args.prompts]):
            got = engine.generate([w[:32].tolist()], max_new_tokens=32, sampling=GREEDY)[0].ids
            if label == "fp32":
                reference[i] = got
            same += sum(a == b for a, b in zip(got, reference[i]))
            total += len(reference[i])
        rows.append([label, math.exp(nll), f"{same}/{total}"])
    base_ppl = rows[0][1]
    for r in rows:
        r.insert(2, f"{100 * (r[1] / base_ppl - 1):+.2f}%")
    print(f"# {args.quality}: {len(windows)} held-out windows of {T} tokens from {args.text}\n")
    print_table(["weights", "perplexity", "vs fp32", "greedy tokens equal to fp32"], rows)


def _held_out(path: Path, tok: object) -> torch.Tensor:
    """Token ids of a text file, or of a split of a prepared dataset (`lmforge data prepare`:
    a .bin beside its meta.json), e.g. the validation split the model never trained on."""
    if path.suffix != ".bin" or not (path.parent / "meta.json").exists():
        return torch.tensor(tok.encode(path.read_text(encoding="utf-8")))
    import json

    import numpy as np

    dtype = json.loads((path.parent / "meta.json").read_text())["dtype"]
    return torch.from_numpy(np.fromfile(path, dtype=dtype).astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=["speed", "breakdown", "compile"])
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder (GPT-2 vocabulary, llama2.c tokenizer)")
    parser.add_argument("--quality", metavar="RUN", help="a trained model: compare int8 and fp16 weights with fp32")
    parser.add_argument("--text", help="with --quality: held-out text, or a prepared split (runs/data/val.bin)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=20)
    args = parser.parse_args()
    if args.quality:
        quality(args)
        return
    for part, fn in (("speed", speed), ("breakdown", breakdown), ("compile", compiled)):
        if args.only in (None, part):
            fn(args)
            print()


if __name__ == "__main__":
    main()
