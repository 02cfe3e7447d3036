"""A real `lmforge serve` app on 127.0.0.1 for the serving tests: uvicorn on a free port in
a thread of the test process (the model is built in the test), and raw HTTP for the
requests no well-behaved client would send."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import uvicorn

from lmforge.config import Config
from lmforge.engine import Engine
from lmforge.engine.batch import Batcher
from lmforge.model import GPT
from lmforge.serve.api import Service
from lmforge.serve.app import create_app, listen
from lmforge.serve.scheduler import Scheduler


def tiny_gpt(tokenizer: Any, context_length: int = 128, seed: int = 0) -> GPT:
    """A random 2-layer model over `tokenizer`'s vocabulary, sharpened so greedy paths are decisive."""
    torch.manual_seed(seed)
    config = Config.from_name("nano", vocab_size=tokenizer.vocab_size, context_length=context_length, n_layer=2, n_head=2,
                              n_kv_head=1, n_embd=32, mlp_hidden=64)
    model = GPT(config).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(8)
    model.tokenizer = tokenizer
    return model


def make_service(model: GPT, name: str = "tiny", max_batch: int = 4, max_queue: int = 32) -> Service:
    engine = Engine(model, model.tokenizer)
    return Service(engine, Scheduler(Batcher(engine, max_batch), max_queue), name)


@contextlib.contextmanager
def running(service: Service, **app_options: Any) -> Iterator[str]:
    """Serve `service` on a free port of 127.0.0.1; yields the base URL (http://127.0.0.1:PORT)."""
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, **app_options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def request(base: str, method: str, path: str, body: bytes | str | Any = None, headers: dict[str, str] | None = None,
            timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request: `body` as bytes or str is sent as it is, anything else as JSON."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    res = conn.getresponse()
    data = res.read()
    conn.close()
    return res.status, {k.lower(): v for k, v in res.getheaders()}, data


def events(data: bytes) -> list[Any]:
    """The `data:` payloads of a server-sent-events body, JSON-decoded (`[DONE]` as the string)."""
    out = []
    for line in data.decode("utf-8").split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
