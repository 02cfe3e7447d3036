"""`lmforge generate` and `lmforge chat`: text from a model, in one shot or as a conversation."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.cli.common import add_command, add_weight_dtype_flag
from lmforge.device import pick_device
from lmforge.engine import Engine, SamplingParams, end_of_text_ids
from lmforge.engine.quantize import quantize
from lmforge.errors import LmforgeError
from lmforge.loading import load
from lmforge.serve.chat import ChatSession
from lmforge.tokenizer.templates import session_messages, template_for, template_note


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "generate",
        "continue a prompt with a model",
        _generate,
        examples="""
        lmforge generate --model runs/quickstart --prompt 'def fibonacci(n):' --stream
        lmforge generate --model data/stories260K/stories260K.bin --prompt-ids 1 --max-new-tokens 200 --temperature 0
        lmforge generate --model path/to/hf-gpt2 --prompt-ids 464,3290 --max-new-tokens 20 --temperature 0 --ids
        lmforge generate --model runs/instruct --chat --prompt 'Name three primary colors.' --temperature 0
        """,
        description="""
        Continue a prompt (text, or token ids) with a model: our model folder, a Hugging
        Face folder, or a llama2.c .bin. --temperature 0 is greedy. Generation stops at
        the tokenizer's end-of-text token (unless --ignore-eot), at --stop text or ids, or
        after --max-new-tokens. With --ids only the generated ids are printed, as one JSON array.
        """,
    )
    _model_args(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    _sampling_args(p, temperature=0.8, max_new_tokens=128)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears (repeatable)")
    p.add_argument("--stop-id", action="append", type=int, default=[], metavar="ID", help="stop at this token id (repeatable)")
    p.add_argument("--ignore-eot", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--ids", action="store_true", help="print only the generated ids as one JSON array")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user message in the model's chat template (an instruction-tuned model's) and print the reply")

    p = add_command(
        sub,
        "chat",
        "chat with a model in the terminal",
        _chat,
        examples="""
        lmforge chat --model runs/quickstart
        lmforge chat --model runs/instruct --system 'You are a helpful assistant.' --temperature 0.3
        """,
        description="""
        A conversation in the terminal; the history is kept (the oldest turns are dropped
        when it no longer fits the context). Type /reset to start over, /quit to leave.
        """,
    )
    _model_args(p)
    p.add_argument("--system", help="a system message put before the conversation")
    _sampling_args(p, temperature=0.7, max_new_tokens=256)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="model folder (ours or Hugging Face) or llama2.c .bin")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, mps")
    add_weight_dtype_flag(p)
    p.add_argument("--compile", action="store_true",
                   help="decode fp32 or int8 weights on a CPU through a step compiled by TorchInductor "
                   "(fp32 1.4-1.6x faster, int8 1.1x), after a compile of 25-120 s on first use (cached on disk for later runs)")


def _sampling_args(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help=f"(default: {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default: {temperature})")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="sample from the smallest set with probability >= P")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _engine(args: argparse.Namespace) -> Engine:
    model = load(args.model, device=pick_device(args.device))
    if args.dtype != "float32":
        quantize(model, args.dtype)
    return Engine(model, model.tokenizer, compile=args.compile)


def _prompt(args: argparse.Namespace, engine: Engine) -> list[int]:
    tok = engine.tokenizer
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise LmforgeError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if args.prompt is not None:
        if tok is None:
            raise LmforgeError(f"{args.model} has no tokenizer: give the prompt as --prompt-ids")
        return tok.encode(args.prompt)
    for name in ("bos_id", "eot_id"):  # no prompt: start a fresh document
        if (start := getattr(tok, name, None)) is not None:
            return [start]
    raise LmforgeError("give a --prompt or --prompt-ids")


def _generate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    stop_strings = list(args.stop)
    if args.chat:
        if args.prompt is None or engine.tokenizer is None:
            raise LmforgeError("--chat needs a --prompt (text) and a model with a tokenizer")
        template = template_for(engine.tokenizer)
        _say_template(engine, args.model)
        args.prompt = template.render(session_messages(None, [], args.prompt), add_generation_prompt=True)
        stop_strings += list(template.stop_strings)
    prompt = _prompt(args, engine)
    stop_ids = args.stop_id + ([] if args.ignore_eot else end_of_text_ids(engine.tokenizer))
    options = dict(max_new_tokens=args.max_new_tokens, sampling=_sampling(args), seed=args.seed, stop_ids=stop_ids, stop_strings=stop_strings)
    if args.ids:
        print(json.dumps(engine.generate([prompt], **options)[0].ids))
        return 0
    if engine.tokenizer is None:
        raise LmforgeError(f"{args.model} has no tokenizer to print text with: add --ids to print token ids")
    if args.prompt is not None and not args.chat:
        sys.stdout.write(args.prompt)
    if args.stream:
        for _, text in engine.stream(prompt, **options):
            sys.stdout.write(text)
            sys.stdout.flush()
    else:
        sys.stdout.write(engine.generate([prompt], **options)[0].text)
    sys.stdout.write("\n")
    return 0


def _say_template(engine: Engine, model: str) -> None:
    """Once, on stderr: a model without a chat template is talked to in a plain transcript."""
    if (note := template_note(engine.tokenizer, model)) is not None:
        print(note, file=sys.stderr)


def _chat(args: argparse.Namespace) -> int:
    engine = _engine(args)
    engine.check_request(max_new_tokens=args.max_new_tokens, seed=args.seed)  # before the first turn, not after it is typed
    _say_template(engine, args.model)
    session = ChatSession(engine, system=args.system, sampling=_sampling(args), max_new_tokens=args.max_new_tokens, seed=args.seed,
                          template=template_for(engine.tokenizer))
    interactive = sys.stdin.isatty()
    if interactive:
        template = getattr(engine.tokenizer, "chat_template", None)
        how = f"its {template} chat template" if template else "a plain transcript"
        print(f"chatting with {args.model} in {how} (/reset to start over, /quit or Ctrl-D to leave)")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            session.reset()
            continue
        if not line.strip():
            continue
        print("model> " if interactive else "", end="", flush=True)
        for text in session.reply(line.strip()):
            print(text, end="", flush=True)
        print()
