"""`lmforge serve`'s API against real clients on 127.0.0.1: the official `openai` package,
raw HTTP for the requests no client library would send, and a schema-driven fuzz run
(schemathesis over /openapi.json). The reference for every answer is the engine itself:
the same model, prompt, settings and seed through `Engine.generate` in the test."""

from __future__ import annotations

import copy
import functools
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from serve_fixtures import events, make_service, request, running, tiny_gpt

from lmforge.engine import Engine, SamplingParams, end_of_text_ids
from lmforge.engine.batch import Batcher
from lmforge.serve.api import Service
from lmforge.serve.scheduler import Scheduler
from lmforge.tokenizer.templates import ChatTemplate

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def chat_tok(gpt2_tok):
    tok = copy.copy(gpt2_tok)
    tok.chat_template = "chat"  # as instruction tuning saves it
    return tok


@pytest.fixture(scope="module")
def model(chat_tok):
    return tiny_gpt(chat_tok)


@pytest.fixture(scope="module")
def server(model):
    with running(make_service(model, max_batch=4)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, model.tokenizer)


def solo(engine, prompt, n, sampling=GREEDY, seed=None, stop_strings=()):
    ids = prompt if isinstance(prompt, list) else engine.tokenizer.encode(prompt)
    return engine.generate([ids], max_new_tokens=n, sampling=sampling, seed=seed, stop_ids=end_of_text_ids(engine.tokenizer),
                           stop_strings=stop_strings)[0]


# --- the openai package ---------------------------------------------------------------------
def test_completions_match_the_engine(client, engine):
    out = client.completions.create(model="tiny", prompt="The cat sat on", max_tokens=12, temperature=0)
    ref = solo(engine, "The cat sat on", 12)
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert out.usage.prompt_tokens == len(engine.tokenizer.encode("The cat sat on"))
    assert out.usage.completion_tokens == len(ref.ids)


def test_prompt_lists_n_and_seeds(client, engine):
    for prompts in (["Once upon a time", "The end"], [[464, 3290, 318], [40]]):
        out = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, n=2, seed=11, temperature=1.0)
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        for i, c in enumerate(out.choices):  # choice i continues prompt i // n with seed + i % n
            ref = solo(engine, prompts[i // 2], 6, SamplingParams(temperature=1.0), seed=11 + i % 2)
            assert c.text == ref.text
        again = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, n=2, seed=11, temperature=1.0)
        assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_stop_strings_cut_the_text(client, engine):
    free = solo(engine, "The dog", 16).text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    out = client.completions.create(model="tiny", prompt="The dog", max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert out.choices[0].text == free[: free.index(stop)] and out.choices[0].finish_reason == "stop"


def test_echo_scores_the_prompt_with_the_models_log_probs(client, model):
    ids = [464, 3290, 318, 257, 1332]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = out.choices[0].logprobs
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx([ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)], abs=1e-5)
    assert [max(t.values()) for t in lp.top_logprobs[1:]] == pytest.approx(ref[:-1].max(-1).values.tolist(), abs=1e-5)
    assert out.choices[0].text == model.tokenizer.decode(ids) and out.usage.completion_tokens == 0


def test_a_streamed_completion_is_the_whole_one_in_pieces(server):
    body = {"prompt": "Hello world", "max_tokens": 8, "temperature": 0.8, "seed": 5, "echo": True, "logprobs": 2, "n": 2}
    whole = json.loads(request(server, "POST", "/v1/completions", body)[2])
    chunks = [e for e in events(request(server, "POST", "/v1/completions", {**body, "stream": True})[2]) if e != "[DONE]"]
    for i, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]  # the echoed prompt first, then the new text
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        logprobs = [t for c in mine if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
        assert tokens == choice["logprobs"]["tokens"]
        assert logprobs == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-6)
        assert mine[-1]["finish_reason"] == choice["finish_reason"]


def test_chat_uses_the_models_template_and_streams_the_same_reply(client, engine, chat_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = ChatTemplate().render(messages, add_generation_prompt=True)
    ref = solo(engine, prompt, 20, stop_strings=ChatTemplate.stop_strings)
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(chat_tok.encode(prompt))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_chat_logprobs(client, model, chat_tok):
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)  # greedy: the top one was taken
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_streamed_text_never_splits_a_character(client, engine):
    """Byte-level tokens split Korean and emoji; a stream's pieces must each be whole characters."""
    ids = engine.tokenizer.encode("한국어 🙂 문장")
    status, _, body = request(client.base_url.__str__().removesuffix("/v1/"), "POST", "/v1/completions",
                              {"prompt": ids, "max_tokens": 24, "temperature": 1.0, "seed": 3, "stream": True})
    assert status == 200
    texts = [e["choices"][0]["text"] for e in events(body) if isinstance(e, dict) and e["choices"]]
    ref = solo(engine, ids, 24, SamplingParams(temperature=1.0), seed=3)
    assert "".join(texts) == ref.text
    for piece in texts:  # each piece re-encodes to itself: no half of a UTF-8 sequence
        assert piece.encode("utf-8").decode("utf-8") == piece


def test_errors_surface_as_the_openai_exception_classes(client, server, model):
    with pytest.raises(openai.BadRequestError, match="context is 128 tokens"):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="tiny", prompt="Hi", presence_penalty=0.5)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4o", prompt="Hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert e.value.param == "tools" and e.value.code == "unsupported_parameter"
    with running(make_service(model), api_key="s3cret") as locked:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{locked}/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=f"{locked}/v1", api_key="s3cret", max_retries=0).models.list().data[0].id == "tiny"
        assert request(locked, "GET", "/health")[0] == 200  # liveness needs no key
        assert request(locked, "GET", "/metrics")[0] == 401


class HeldBatcher(Batcher):
    """Admits nothing until `gate` opens, so a test can fill the queue without racing the model."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.entered, self.gate = threading.Event(), threading.Event()

    def add(self, g):
        self.entered.set()
        self.gate.wait(30)
        return super().add(g)


def test_a_full_queue_answers_429_with_retry_after(model):
    engine = Engine(model, model.tokenizer)
    batcher = HeldBatcher(engine, max_batch=1)
    service = Service(engine, Scheduler(batcher, max_queue=1), "tiny")
    with running(service) as base, ThreadPoolExecutor(2) as pool:
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        ask = functools.partial(api.completions.create, model="tiny", prompt="Hi", max_tokens=3, temperature=0)
        first = pool.submit(ask)  # taken from the queue, held in prefill
        assert batcher.entered.wait(30)
        second = pool.submit(ask)  # waits in the queue, which is now full
        while service.scheduler.queued < 1:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="max-queue") as e:
            ask()
        assert e.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):  # a stream too: refused before its 200 and first event
            ask(stream=True)
        with pytest.raises(openai.BadRequestError, match="fewer at once"):  # could never fit: not worth retrying
            api.completions.create(model="tiny", prompt="Hi", n=2)
        batcher.gate.set()
        assert first.result(30).choices[0].text == second.result(30).choices[0].text


# --- raw HTTP: what no client library sends -------------------------------------------------
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BAD = [  # (path, body, status, the parameter named)
    (CHAT, b"{not json", 400, None),
    (CHAT, b"", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, b'"a string"', 400, None),
    (CHAT, {"messages": None}, 400, "messages"),
    (CHAT, {"messages": "hello"}, 400, "messages"),
    (CHAT, {"messages": [123]}, 400, "messages.0"),
    (CHAT, {"messages": [{}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"role": 1, "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": 1}]}, 400, "messages.0.content"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, 400, "temperature"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (COMPLETIONS, {"prompt": [-1, 5]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, 10**9]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, 2.5]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[]]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": list(range(200))}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": -3}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": 1000}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "Hi", "stop": ""}, 400, "stop"),
    (COMPLETIONS, {"prompt": "Hi", "stop": [1]}, 400, "stop"),
    (COMPLETIONS, {"prompt": "Hi", "logprobs": 99}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "Hi", "seed": -1}, 400, "seed"),
    (COMPLETIONS, {"prompt": "Hi", "best_of": 3}, 400, "best_of"),
    (COMPLETIONS, {"prompt": "Hi", "frequency_penalty": 1.0}, 400, "frequency_penalty"),
    (COMPLETIONS, {"prompt": "Hi", "logit_bias": {"50256": -100}}, 400, "logit_bias"),
    (COMPLETIONS, {}, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_openai_errors_naming_the_parameter(server, path, body, status, param):
    got, headers, data = request(server, "POST", path, body)
    assert got == status, data
    assert headers["content-type"].startswith("application/json")
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and error["param"] == param


def test_echo_with_zero_max_tokens_is_scoring_not_an_error(server):
    status, _, data = request(server, "POST", COMPLETIONS, {"prompt": "Hello there", "max_tokens": 0, "echo": True})
    assert status == 200
    choice = json.loads(data)["choices"][0]
    assert choice["text"] == "Hello there" and choice["finish_reason"] == "length"


def test_size_limit_routes_and_methods(server):
    status, _, data = request(server, "POST", COMPLETIONS, b'{"prompt": "' + b"a" * (1 << 20) + b'"}')
    assert status == 413 and json.loads(data)["error"]["code"] == "body_too_large"
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # a chunked body, no length given: cut off as it grows
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 65536
        try:
            for _ in range(20):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server may close before the rest is sent
        answer = s.recv(4096)
    assert b" 413 " in answer.split(b"\r\n")[0]
    assert request(server, "GET", "/v1/nothing")[0] == 404
    assert request(server, "GET", COMPLETIONS)[0] == 405
    assert json.loads(request(server, "GET", "/v1/nothing")[2])["error"]["code"] == "not_found"


class Recording(Batcher):
    """A batcher that sleeps 50 ms a step (a long generation whatever the machine) and keeps
    what it removed; `fail` makes its next step raise, as a bug in the engine would."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.removed, self.fail = [], False

    def step(self):
        time.sleep(0.05)
        if self.fail:
            self.fail = False
            raise RuntimeError("injected fault")
        return super().step()

    def remove(self, g):
        if g in self.rows:
            self.removed.append(g)
        super().remove(g)


@pytest.fixture
def slow(model):
    engine = Engine(model, model.tokenizer)
    batcher = Recording(engine, max_batch=2)
    with running(Service(engine, Scheduler(batcher, max_queue=8), "tiny")) as base:
        yield base, batcher


def send_raw(base, body):
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
              % (len(data), data))
    return s


def wait_idle(base):
    while True:  # until nothing runs and nothing waits (each generation below would take 5 s to finish)
        health = json.loads(request(base, "GET", "/health")[2])
        if health["running"] == 0 and health["queued"] == 0:
            return
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_disconnect_cancels_the_generation_and_frees_its_row(slow, stream):
    base, batcher = slow
    with send_raw(base, {"prompt": "Once", "max_tokens": 100, "temperature": 1.0, "stream": stream}) as s:
        while not batcher.rows:  # generating
            time.sleep(0.01)
        if stream:
            seen = b""
            while b"data: " not in seen:  # the stream has begun
                seen += s.recv(4096)
    wait_idle(base)
    [g] = batcher.removed
    assert g.finish_reason is None and len(g.ids) < 100  # cancelled, not finished
    assert batcher.free == 2


def test_a_fault_mid_stream_is_an_error_chunk_then_done(slow):
    base, batcher = slow
    with send_raw(base, {"prompt": "Once", "max_tokens": 50, "stream": True}) as s:
        seen = b""
        while b'"text"' not in seen:  # a token has arrived
            seen += s.recv(4096)
        batcher.fail = True
        while not seen.endswith(b"0\r\n\r\n"):  # the chunked body's end
            part = s.recv(4096)
            assert part, seen
            seen += part
    payloads = [line[6:] for line in seen.decode().splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    status, _, data = request(base, "POST", "/v1/completions", {"prompt": "Once", "max_tokens": 3})  # still serving
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] >= 1


def test_a_client_that_does_not_read_blocks_no_one(server, client):
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Slow", "max_tokens": 100, "temperature": 1.0, "stream": True}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        out = client.completions.create(model="tiny", prompt="Fast", max_tokens=5, temperature=0)  # while s is never read
        assert out.choices[0].finish_reason in ("length", "stop")


def test_models_health_metrics_and_schema(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    client.completions.create(model="tiny", prompt="Count me", max_tokens=3, temperature=0)
    status, headers, data = request(server, "GET", "/metrics")
    text = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'lmforge_requests_total{route="/v1/completions",status="200"}' in text
    for name in ("lmforge_prompt_tokens_total", "lmforge_completion_tokens_total", "lmforge_queue_depth", "lmforge_running",
                 "lmforge_time_to_first_token_seconds_bucket", "lmforge_request_latency_seconds_count"):
        assert name in text
    schema = json.loads(request(server, "GET", "/openapi.json")[2])
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    assert "CompletionRequest" in schema["components"]["schemas"]
    page = request(server, "GET", "/")
    assert page[0] == 200 and b"/v1/chat/completions" in page[2]


# --- schema-driven fuzzing ------------------------------------------------------------------
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_fuzzed_requests_never_get_a_server_error(server, mode):
    """schemathesis draws requests from /openapi.json, valid ones and ones that break it (a
    bounded number per route); none may get a 5xx, and every answer must be JSON or a stream."""
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    for operation in schema.get_all_operations():
        op = operation.ok()
        if mode == GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # a GET without parameters cannot be made invalid

        @settings(max_examples=50 if op.method.upper() == "POST" else 5, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def call(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        call()


def test_accepted_connections_have_nagle_off():
    """A streamed event must leave at once, not wait for the client's delayed ACK (~40 ms)."""
    import asyncio

    from lmforge.serve.app import listen

    seen = []

    async def main():
        async def accepted(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listen("127.0.0.1", 0))
        async with server:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(main())
    assert seen == [1]
