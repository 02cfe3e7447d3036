"""`lmforge serve` under load: throughput of continuous batching, and robustness to bad clients.

The server runs as a subprocess on loopback (`--port 0`); every client is asyncio + aiohttp.

Speed: --clients streaming clients each send --requests fixed requests (short story openings,
temperature 0, --max-tokens, usage in the last chunk) one after another, all clients at once,
so up to --clients generations share the server's decode batch. Then the same requests are sent
one at a time (the sequential baseline: one generation per decode step). Completion tokens come
from the usage chunks; time to first token is to the first chunk with text; latency is to
`[DONE]`. Batching pays if concurrent tokens/s is several times the sequential one (the target is
>= 3x at 8 clients); "same text" counts the requests whose greedy text matched in both modes.

Robustness: --robust requests, 16 in flight: well-formed completions and chat, streamed or not;
~20% malformed (bad JSON, wrong types, bad messages, token ids out of range, a prompt longer
than the context, out-of-range sampling values, an unsupported parameter); ~10% streams the
client abandons after 1-3 chunks. It checks: no status >= 500; every malformed request got a 4xx
with an OpenAI error body; every well-formed one was answered whole (a finish_reason per
choice, a stream ended by `data: [DONE]` without an error chunk); 429s are retried after
Retry-After and counted apart; the server is alive and /health answers at the end. It reports
the server's RSS before and after, and exits 1 if a check fails.

    python benchmarks/bench_serve.py                          # stories260K, both parts
    python benchmarks/bench_serve.py --only speed --clients 8 --requests 4 --max-tokens 64
    python benchmarks/bench_serve.py --only robust --robust 1000 --model runs/instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from _common import SHARED, print_table

OPENINGS = ["Once upon a time", "One day, a little girl named Lily", "Tom had a big red ball.", "The sun was shining and",
            "There was a small dog who", "Sara and Ben went to the park."]
TIMEOUT = aiohttp.ClientTimeout(total=300)
MAX_RETRIES = 30  # 429s in a row before a request counts as refused


@dataclass
class Reply:
    """One request's outcome as the client saw it."""

    status: int = 0
    tokens: int = 0
    ttft: float = float("nan")
    latency: float = 0.0
    text: str = ""
    problem: str | None = None  # a broken answer: a wrong shape, an error chunk, a stream that did not end
    retries: int = 0


class Server:
    """`lmforge serve` in a subprocess, its URL read from the line it prints when listening."""

    def __init__(self, model: str, max_batch: int, max_queue: int, threads: int | None) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-serve-", suffix=".log")
        cmd = [str(Path(sys.executable).parent / "lmforge"), "serve", "--model", model, "--port", "0",
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), *(["--threads", str(threads)] if threads else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        try:
            line = self.proc.stdout.readline()
            found = re.search(r"(http://\S+)/v1", line)
            if not found:
                raise RuntimeError(f"the server did not start: {line!r}\n{self.stderr()}")
        except BaseException:
            self.stop()
            raise
        self.url = found.group(1)
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def send(session: aiohttp.ClientSession, url: str, body: Any, hang_up_after: int = 0) -> Reply:
    """POST `body` (raw bytes are sent as they are); read a stream to `[DONE]`, or drop the
    connection after `hang_up_after` chunks. A 429 is retried after its Retry-After."""
    reply = Reply()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    while True:
        start = time.perf_counter()
        async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
            reply.status = r.status
            if r.status == 429 and reply.retries < MAX_RETRIES:
                reply.retries += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status != 200 or r.content_type != "text/event-stream":
                try:
                    reply.text = json.dumps(await r.json(content_type=None))
                except ValueError:
                    reply.problem = f"status {r.status}, body is not JSON: {(await r.text())[:200]!r}"
                reply.latency = time.perf_counter() - start
                return reply
            chunks, finished, done, usage = 0, set(), False, False
            async for raw in r.content:
                line = raw.decode().strip()
                if not line:
                    continue
                if done or not line.startswith("data: "):
                    reply.problem = f"unexpected line {line[:200]!r}"
                    break
                if line == "data: [DONE]":
                    done = True
                    continue
                try:
                    chunk = json.loads(line[6:])
                except ValueError:
                    reply.problem = f"a chunk is not JSON: {line[:200]!r}"
                    break
                if "error" in chunk:
                    reply.problem = f"error chunk {line[:300]}"
                for c in chunk.get("choices", []):
                    text = c.get("text") or c.get("delta", {}).get("content") or ""
                    if text and math.isnan(reply.ttft):
                        reply.ttft = time.perf_counter() - start
                    reply.text += text
                    if c.get("finish_reason"):
                        finished.add(c["index"])
                if chunk.get("usage"):
                    reply.tokens, usage = chunk["usage"]["completion_tokens"], True
                chunks += 1
                if chunks == hang_up_after:
                    r.close()  # drop the connection mid-stream
                    return reply
            reply.latency = time.perf_counter() - start
            n, wants_usage = (body.get("n", 1), "stream_options" in body) if isinstance(body, dict) else (1, False)
            if reply.problem is None and not (done and len(finished) == n and usage >= wants_usage):
                reply.problem = f"incomplete stream: [DONE] {done}, finish_reason for choices {sorted(finished)}, usage {usage}"
            return reply


# --- speed -----------------------------------------------------------------------------------
def story(i: int, route: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"temperature": 0, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    prompt = OPENINGS[i % len(OPENINGS)]
    return body | ({"prompt": prompt} if route == "completions" else {"messages": [{"role": "user", "content": prompt}]})


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


async def speed(base: str, args: argparse.Namespace) -> bool:
    url = f"{base}/v1/{'completions' if args.route == 'completions' else 'chat/completions'}"
    plan = [[story(c * args.requests + k, args.route, args.max_tokens) for k in range(args.requests)] for c in range(args.clients)]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await asyncio.gather(*(send(s, url, story(c, args.route, args.max_tokens)) for c in range(args.clients)))  # warm-up

        async def client(bodies: list[dict[str, Any]]) -> list[Reply]:
            return [await send(s, url, b) for b in bodies]

        t = time.perf_counter()
        concurrent = [r for rs in await asyncio.gather(*(client(b) for b in plan)) for r in rs]
        t_conc = time.perf_counter() - t
        t = time.perf_counter()
        sequential = await client([b for bodies in plan for b in bodies])
        t_seq = time.perf_counter() - t
    rows, rates = [], []
    for mode, replies, secs in (("concurrent", concurrent, t_conc), ("sequential", sequential, t_seq)):
        tokens = sum(r.tokens for r in replies)
        rates.append(tokens / secs)
        ttft, lat = [r.ttft * 1000 for r in replies], [r.latency * 1000 for r in replies]
        rows.append([f"{mode} ({args.clients if mode == 'concurrent' else 1} clients)", len(replies), tokens, secs, tokens / secs,
                     pct(ttft, 50), pct(ttft, 99), pct(lat, 50), pct(lat, 99)])
    print_table(["mode", "requests", "tokens", "seconds", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "latency p50 ms", "latency p99 ms"],
                rows)
    same = sum(a.text == b.text for a, b in zip(concurrent, sequential))
    bad = [r for r in concurrent + sequential if r.status != 200 or r.problem]
    print(f"concurrent / sequential throughput: {rates[0] / rates[1]:.2f}x (target >= 3x at 8 clients); "
          f"same text in both modes: {same}/{len(sequential)}; failed requests: {len(bad)}")
    for r in bad[:5]:
        print(f"  status {r.status}: {r.problem or r.text[:300]}")
    return not bad


# --- robustness ----------------------------------------------------------------------------------
CHAT, COMPLETE = "chat/completions", "completions"
HI = [{"role": "user", "content": "Hi"}]
MALFORMED: list[tuple[str, Any]] = [
    (COMPLETE, b'{"prompt": "Once upon'), (CHAT, b'{"messages": [}'), (COMPLETE, b"[1, 2, 3]"), (CHAT, b'"hello"'), (COMPLETE, b""),
    (COMPLETE, {"prompt": 123}), (COMPLETE, {"prompt": "x", "max_tokens": "8"}), (CHAT, {"messages": HI, "stream": "yes"}),
    (CHAT, {"messages": None}), (CHAT, {"messages": [123]}), (CHAT, {"messages": [{}]}), (CHAT, {"messages": []}),
    (CHAT, {"messages": [{"role": 1, "content": "hi"}]}), (CHAT, {"messages": [{"role": "user"}]}),
    (COMPLETE, {"prompt": [-1, 5]}), (COMPLETE, {"prompt": [10**9]}), (COMPLETE, {"prompt": [[1, 2], [10**9]]}),
    (COMPLETE, {"prompt": [1] * 5000}), (COMPLETE, {"prompt": "x", "max_tokens": 10**6}), (COMPLETE, {"prompt": "x", "max_tokens": 0}),
    (CHAT, {"messages": HI, "max_tokens": 0}), (COMPLETE, {"prompt": "x", "temperature": 5}), (CHAT, {"messages": HI, "top_p": 0}),
    (COMPLETE, {"prompt": "x", "presence_penalty": 1}), (CHAT, {"messages": HI, "frobnicate": True}), (COMPLETE, {"prompt": "x", "n": 0}),
    (COMPLETE, {"prompt": "x", "stop": [""]}), (CHAT, {"messages": HI, "model": "no-such-model"}),
    (COMPLETE, {"prompt": "x", "stream_options": {"include_usage": True}}), (COMPLETE, {"prompt": []}),
    (COMPLETE, {"prompt": [10**9], "stream": True}), (COMPLETE, b'{"prompt": "x", "temperature": NaN}'), (COMPLETE, b'{"prompt": "\xff\xfe"}'), (CHAT, b"[" * 50000 + b"]" * 50000),
]


def well_formed(rng: random.Random, stream: bool) -> tuple[str, dict[str, Any]]:
    route = rng.choice([COMPLETE, CHAT])
    body: dict[str, Any] = {"max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.8, 1.5]), "stream": stream,
                            "n": rng.choice([1, 1, 1, 2])}
    if rng.random() < 0.3:
        body |= {"top_p": 0.9, "seed": rng.randrange(1000)}
    if rng.random() < 0.2:
        body["stop"] = ["."]
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    prompt = rng.choice(OPENINGS)
    return route, body | ({"prompt": prompt} if route == COMPLETE else {"messages": [{"role": "user", "content": prompt}]})


def whole_problem(route: str, body: dict[str, Any], r: Reply) -> str | None:
    """What is wrong with a non-streamed 200 answer, if anything."""
    try:
        answer = json.loads(r.text)
        choices = answer["choices"]
        ok = len(choices) == body["n"] and all(c["finish_reason"] in ("stop", "length") for c in choices)
        ok = ok and all(isinstance(c["text"] if route == COMPLETE else c["message"]["content"], str) for c in choices)
        return None if ok and isinstance(answer["usage"]["completion_tokens"], int) else f"incomplete answer {r.text[:300]}"
    except (ValueError, KeyError, TypeError):
        return f"malformed answer {r.text[:300]}"


async def robust(server: Server, args: argparse.Namespace) -> bool:
    rng = random.Random(args.seed)
    jobs: list[tuple[str, str, Any, int]] = []  # kind, route, body, hang up after
    for _ in range(args.robust):
        x = rng.random()
        if x < 0.2:
            jobs.append(("malformed", *rng.choice(MALFORMED), 0))
        elif x < 0.3:
            route, body = well_formed(rng, True)
            jobs.append(("disconnect", route, body | {"max_tokens": 64, "temperature": 0.8}, rng.randint(1, 3)))
        else:
            stream = rng.random() < 0.5
            jobs.append(("stream" if stream else "whole", *well_formed(rng, stream), 0))
    counts = dict.fromkeys(["ok", "4xx (malformed)", "429 retried", "disconnects", "5xx", "failed checks"], 0)
    failures: list[str] = []
    rss_before = server.rss_mib()
    pending = list(reversed(jobs))

    async def worker(s: aiohttp.ClientSession) -> None:
        while pending:
            kind, route, body, hang_up = pending.pop()
            try:
                r = await send(s, f"{server.url}/v1/{route}", body, hang_up)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                r = Reply(problem=f"{type(e).__name__}: {e}")
            counts["429 retried"] += r.retries
            problem = r.problem
            if r.status >= 500:
                counts["5xx"] += 1
            elif kind == "malformed":
                err = json.loads(r.text) if r.text else None
                err = err.get("error") if isinstance(err, dict) else None
                if not (400 <= r.status < 500 and isinstance(err, dict) and isinstance(err.get("message"), str)):
                    problem = problem or f"status {r.status}, not a 4xx with an error body"
                counts["4xx (malformed)"] += problem is None
            elif kind == "disconnect":
                counts["disconnects"] += problem is None and r.status == 200
                problem = problem or (None if r.status == 200 else f"status {r.status}")
            else:
                if r.status != 200:
                    problem = problem or f"status {r.status}"
                elif kind == "whole":
                    problem = whole_problem(route, body, r)
                counts["ok"] += problem is None
            if problem or r.status >= 500:
                counts["failed checks"] += 1
                failures.append(f"{kind} POST /v1/{route} {body!r:.160}: {problem or r.text[:200]}")

    t = time.perf_counter()
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=args.in_flight)) as s:
        await asyncio.gather(*(worker(s) for _ in range(args.in_flight)))
        await asyncio.sleep(1)  # let the server notice the last hang-ups
        async with s.get(f"{server.url}/health") as h:
            health, left = h.status, await h.json()
        async with s.get(f"{server.url}/metrics") as m:
            metrics = await m.text()
    secs = time.perf_counter() - t
    alive = server.proc.poll() is None
    rss_after = server.rss_mib() if alive else float("nan")
    print_table(["outcome", "requests"], list(counts.items()))
    idle = left.get("running") == 0 and left.get("queued") == 0  # no generation outlived its request
    print(f"{len(jobs)} requests in {secs:.1f} s, {args.in_flight} in flight; server alive: {alive}, /health {health} "
          f"(running {left.get('running')}, queued {left.get('queued')}); server RSS {rss_before:.1f} MiB before, {rss_after:.1f} MiB after")
    by_route: dict[str, list[str]] = {}
    for route, status, n in re.findall(r'^lmforge_requests_total\{route="([^"]+)",status="([^"]+)"\} (\S+)', metrics, re.MULTILINE):
        by_route.setdefault(route, []).append(f"{status}: {float(n):.0f}")
    for route in ("/v1/completions", "/v1/chat/completions"):
        print(f"  /metrics lmforge_requests_total {route}: {', '.join(by_route.get(route, []))}")
    for f in failures[:10]:
        print(f"  FAILED {f}")
    return alive and health == 200 and idle and not failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "weights" / "stories260K" / "stories260K.bin"),
                   help="anything `lmforge serve` loads (default: the shared stories260K llama2.c file)")
    p.add_argument("--only", choices=["speed", "robust"], help="run one part (default: both)")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default: 8)")
    p.add_argument("--requests", type=int, default=4, help="requests per client (default: 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per speed request (default: 64)")
    p.add_argument("--route", choices=["completions", "chat"], default="completions", help="the speed part's route")
    p.add_argument("--robust", type=int, default=1000, help="requests in the robustness part (default: 1000)")
    p.add_argument("--in-flight", type=int, default=16, help="robustness requests in flight (default: 16)")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (default: 64)")
    p.add_argument("--threads", type=int, help="the server's --threads (default: its own, every core but one)")
    p.add_argument("--seed", type=int, default=0, help="for the robustness mix")
    args = p.parse_args()

    server = Server(args.model, args.max_batch, args.max_queue, args.threads)
    ok = True
    try:
        print(f"model: {args.model}; server {server.url} (--max-batch {args.max_batch}, --max-queue {args.max_queue}, "
              f"threads {args.threads or 'default'})")
        if args.only != "robust":
            ok &= asyncio.run(speed(server.url, args))
        if args.only != "speed":
            ok &= asyncio.run(robust(server, args))
    except KeyboardInterrupt:
        ok = False
    finally:
        log = server.stderr()
        server.stop()
    if "Traceback" in log:
        ok = False
        first = log.index("Traceback")
        print(f"server stderr has {log.count('Traceback')} tracebacks; the first:\n{log[max(0, first - 300):first + 6000]}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
