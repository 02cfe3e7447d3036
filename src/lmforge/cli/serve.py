"""`lmforge serve`: a model behind an OpenAI-compatible HTTP API and a web chat page."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lmforge.cli.common import add_command, add_weight_dtype_flag
from lmforge.device import pick_device
from lmforge.engine import Engine
from lmforge.engine.batch import Batcher
from lmforge.engine.quantize import quantize
from lmforge.errors import LmforgeError
from lmforge.loading import load, resolve_model_path
from lmforge.serve.api import Service
from lmforge.serve.app import create_app, listen
from lmforge.serve.scheduler import Scheduler
from lmforge.tokenizer.templates import template_note

KEY_VARIABLE = "LMFORGE_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "serve",
        "serve a model over an OpenAI-compatible HTTP API, with a web chat page",
        _serve,
        examples="""
        lmforge serve --model runs/instruct
        lmforge serve --model data/stories260K/stories260K.bin --port 8080 --max-batch 16
        LMFORGE_API_KEY=secret lmforge serve --model runs/instruct --host 0.0.0.0
        """,
        description=f"""
        Serve any model lmforge loads (our folders and runs, LoRA adapters, Hugging Face
        folders, llama2.c files) at /v1/completions and /v1/chat/completions (the model's
        chat template from instruction tuning), with streaming, and a chat page at /.
        Requests share one running batch (continuous batching): up to --max-batch
        generations decode together, up to --max-queue more wait, and beyond that the
        server answers 429. It binds to 127.0.0.1 unless told otherwise; with --api-key
        (or ${KEY_VARIABLE}) every route but /health and the page needs
        'Authorization: Bearer KEY'.
        """,
    )
    p.add_argument("--model", required=True, metavar="PATH", help="model folder (ours or Hugging Face), run, adapter or llama2.c .bin")
    p.add_argument("--name", help="the model's id in the API (default: the model folder's or file's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="generations decoded together (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="M", help="generations that may wait for the batch (default: 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="BYTES", help="largest request body (default: 1 MiB)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${KEY_VARIABLE}, else none)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, mps")
    add_weight_dtype_flag(p)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for the model on the CPU (default: every core but one, which the HTTP side keeps)")
    p.add_argument("--check", action="store_true",
                   help="load the model and bind the address, then exit without serving (a deployment's dry run)")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1), ("--threads", args.threads or 1, 1),
                               ("--max-body-bytes", args.max_body_bytes, 1024), ("--port", args.port, 0)):
        if value < least:
            raise LmforgeError(f"{flag} must be >= {least}, got {value}")
    if args.port > 65535:
        raise LmforgeError(f"--port must be at most 65535, got {args.port}")
    for flag, value in (("--host", args.host), ("--name", args.name)):
        if value is not None and not value.strip():
            raise LmforgeError(f"{flag} is empty: give a value or leave the flag out for the default")
    key = args.api_key if args.api_key is not None else os.environ.get(KEY_VARIABLE) or None
    if key is not None and not key.strip():
        raise LmforgeError("--api-key is empty: give a key, or leave the flag out to serve without one")
    try:  # before loading: a taken port should not cost a model load
        sock = listen(args.host, args.port)
    except OSError as e:
        raise LmforgeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; pick another --port") from None
    with sock:  # closed however this ends (a bad model, --check, a signal)
        device = pick_device(args.device)
        if device.type == "cpu":
            # The event loop (JSON, server-sent events) needs a core of its own: on 2 cores one torch thread
            # served 2.8x the tokens/s of two on a 260K model and the same on a 14M one (benchmarks/bench_serve.py).
            torch.set_num_threads(args.threads or max(1, _cores() - 1))
        model = load(args.model, device=device)
        if model.config.labels:
            raise LmforgeError(f"{args.model} is a classifier (labels {model.config.labels}); serve a model that generates text")
        n_params = model.num_params()
        if args.dtype != "float32":
            quantize(model, args.dtype)
        engine = Engine(model, model.tokenizer)
        name = args.name or _default_name(args.model)
        service = Service(engine, Scheduler(Batcher(engine, args.max_batch), args.max_queue), name)
        if (note := template_note(engine.tokenizer, args.model)) is not None:
            print(note, file=sys.stderr)
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        if args.check:
            weights = "" if args.dtype == "float32" else f", {args.dtype} weights"
            print(f"lmforge: {name} loads ({n_params:,} parameters{weights}, context {model.config.context_length}) and {url} "
                  "is free; not serving (--check)")
            return 0
        print(f"lmforge: serving {name} at {url}/v1 (chat page: {url}/)", flush=True)
        app = create_app(service, api_key=key, max_body_bytes=args.max_body_bytes)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    return 0


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _default_name(path: str) -> str:
    source = resolve_model_path(path)
    return source.stem if source.is_file() else Path(path).resolve().name
