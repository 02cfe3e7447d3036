"""OpenAI's completions and chat completions over the scheduler: requests in, choices out.

`Service` turns a checked request body into `Generation`s (one per prompt and choice),
runs them through the `Scheduler`, and shapes what comes back the way OpenAI does:
whole responses, or `text_completion` / `chat.completion.chunk` objects for a stream.
HTTP is `app.py`'s business; everything here is plain data, so the shapes are testable
without a server.

Choices: a completions request with P prompts and n choices each runs P x n generations,
choice i continuing prompt i // n; choice j of a request with a seed uses seed + j, so the
n choices differ and each is reproducible. Log-probabilities are the model's own (log
softmax of its logits, before temperature or top-p), as OpenAI reports them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.engine import Engine, SamplingParams, end_of_text_ids
from lmforge.engine.batch import Emitted, Generation
from lmforge.errors import LmforgeError
from lmforge.serve.protocol import ApiError, ChatRequest, CompletionRequest, Sampling, neutral_values
from lmforge.serve.scheduler import QueueFull, Scheduler, Ticket, Update
from lmforge.tokenizer.templates import Template, template_for

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass
class Choice:
    """One generation's output as it accumulates."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Job:
    """A checked request: its generations, and what the response needs to know."""

    kind: str  # "text_completion" or "chat.completion"
    generations: list[Generation]
    prompts: list[list[int]]  # the distinct prompts (usage counts each once)
    n: int
    echo: bool = False
    logprobs: int | None = None  # completions: top-k count; chat: top_logprobs (0 when only logprobs: true)
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


class Service:
    """The model behind the API: its name, engine, chat template and scheduler."""

    def __init__(self, engine: Engine, scheduler: Scheduler, name: str) -> None:
        if engine.tokenizer is None:
            raise LmforgeError("serving needs a model with a tokenizer (text in, text out)")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.scheduler = scheduler
        self.name = name
        self.created = int(time.time())
        self.context = engine.config.context_length
        self.template: Template = template_for(self.tokenizer)
        self.stop_ids = end_of_text_ids(self.tokenizer)

    # --- requests -> generations ---------------------------------------------------------------
    def completion_job(self, req: CompletionRequest) -> Job:
        self._common(req)
        prompts = self._completion_prompts(req.prompt)
        echo_scores = req.echo and req.logprobs is not None
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 is allowed only with echo, which returns the prompt)", "max_tokens")
        job = Job("text_completion", [], prompts, req.n, echo=req.echo, logprobs=req.logprobs, include_usage=_usage(req))
        if len(prompts) * req.n > self.scheduler.max_queue:
            raise ApiError(400, f"this request asks for {len(prompts) * req.n} generations ({len(prompts)} prompts x n={req.n}); "
                           f"this server queues at most {self.scheduler.max_queue} (--max-queue): send fewer at once", "prompt")
        for p in prompts:
            max_tokens = self._max_tokens(p, req.max_tokens, DEFAULT_COMPLETION_TOKENS, "max_tokens")
            job.generations += self._generations(req, p, max_tokens, list(_stops(req.stop)), req.logprobs, echo_scores)
        return job

    def chat_job(self, req: ChatRequest) -> Job:
        self._common(req)
        if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; give one (max_tokens is its older name)", "max_tokens")
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if limit == 0:
            raise ApiError(400, "max_completion_tokens must be >= 1", "max_completion_tokens")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)} for m in req.messages]
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except LmforgeError as e:
            raise ApiError(400, str(e), "messages") from None
        prompt = self._encode(text, "messages")
        max_tokens = self._max_tokens(prompt, limit, None, "max_completion_tokens")
        top = (req.top_logprobs or 0) if req.logprobs else None
        stops = list(self.template.stop_strings) + [s for s in _stops(req.stop) if s not in self.template.stop_strings]
        if req.n > self.scheduler.max_queue:
            raise ApiError(400, f"n={req.n} is more than this server queues at once ({self.scheduler.max_queue}, --max-queue)", "n")
        job = Job("chat.completion", [], [prompt], req.n, logprobs=top, include_usage=_usage(req))
        job.generations = self._generations(req, prompt, max_tokens, stops, top, False)
        return job

    def _common(self, req: Sampling) -> None:
        neutral_values(req)
        if req.model not in (None, "", self.name):
            raise ApiError(404, f"the model '{req.model}' is not served here; this server serves '{self.name}'", "model", "model_not_found")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        for s in _stops(req.stop):
            if not s:
                raise ApiError(400, "a stop string is empty; it would match before the first token: drop it", "stop")

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self._encode(prompt, "prompt")]
        if not prompt:
            raise ApiError(400, "prompt is an empty list: give a string, a list of strings or token ids", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [self._ids(prompt)]
        return [self._encode(p, "prompt") if isinstance(p, str) else self._ids(p) for p in prompt]

    def _encode(self, text: str, param: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ApiError(400, f"the {param} is empty once tokenized: give some text", param)
        return self._ids(ids, param)

    def _ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise ApiError(400, "a prompt is an empty list of token ids: give at least one id", param)
        vocab = self.engine.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the model's vocabulary 0..{vocab - 1}", param, "invalid_token_id")
        if len(ids) > self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than the model's context of {self.context}; "
                           "shorten it", param, "context_length_exceeded")
        return list(ids)

    def _max_tokens(self, prompt: list[int], asked: int | None, default: int | None, param: str) -> int:
        room = self.context - len(prompt)
        if asked is None:
            asked = room if default is None else min(default, room)
            if asked < 1:
                raise ApiError(400, f"the prompt has {len(prompt)} tokens, which fills the model's context of {self.context}; "
                               "no room is left for a reply: shorten it", param, "context_length_exceeded")
        if asked > room:
            raise ApiError(400, f"this model's context is {self.context} tokens: the prompt has {len(prompt)} and {param} asks for "
                           f"{asked} more; ask for at most {room}", param, "context_length_exceeded")
        return asked

    def _generations(self, req: Sampling, prompt: list[int], max_tokens: int, stops: list[str], logprobs: int | None,
                     prompt_logprobs: bool) -> list[Generation]:
        sampling = SamplingParams(temperature=req.temperature, top_p=None if req.top_p == 1 else req.top_p, top_k=req.top_k)
        out = []
        for j in range(req.n):
            seed = None if req.seed is None else (req.seed + j) % 2**64
            out.append(Generation(prompt, max_tokens, sampling, seed=seed, stop_ids=self.stop_ids, stop_strings=stops,
                                  logprobs=logprobs, prompt_logprobs=prompt_logprobs))
        try:  # the choices differ only in their seed, which is valid for all once it is for one
            self.scheduler.batcher.check(out[0])
        except LmforgeError as e:
            raise ApiError(400, str(e)) from None
        return out

    # --- running -------------------------------------------------------------------------------
    def start(self, job: Job, on_first_token: Callable[[], None] | None = None) -> Run:
        """Queue the job now (a full queue is a 429 here, before any answer has begun);
        its updates come from the returned `Run`."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()
        try:
            ticket = self.scheduler.submit(job.generations, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u))
        except QueueFull as e:
            raise ApiError(429, str(e), None, "queue_full", "rate_limit_error", headers={"Retry-After": "1"}) from None
        return Run(self.scheduler, ticket, updates, len(job.generations), on_first_token)

    # --- shapes --------------------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        return self.tokenizer.decode_bytes([token]).decode("utf-8", "replace")

    def usage(self, job: Job, choices: list[Choice]) -> dict[str, int]:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(len(c.ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def head(self, job: Job, kind: str) -> dict[str, Any]:
        prefix = "cmpl" if job.kind == "text_completion" else "chatcmpl"
        return {"id": f"{prefix}-{job.id}", "object": kind, "created": job.created, "model": self.name}

    def echo_text(self, job: Job, index: int) -> str:
        return self.tokenizer.decode(job.prompts[index // job.n]) if job.echo else ""

    def completion_logprobs(self, job: Job, index: int, choice: Choice) -> dict[str, Any] | None:
        """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs, text_offset (with echo,
        the prompt's tokens first; the first has no log-probability)."""
        if job.logprobs is None:
            return None
        entries: list[tuple[int, float | None, dict[str, float] | None]] = []
        if job.echo:
            g = job.generations[index]
            prompt = job.prompts[index // job.n]
            entries.append((prompt[0], None, None))
            for t, (lp, top) in zip(prompt[1:], g.prompt_scores or []):
                entries.append((t, lp, self._top_dict(top)))
        entries += [(t, lp, self._top_dict(top)) for t, lp, top in choice.logprobs]
        tokens = [self.token_text(t) for t, _, _ in entries]
        offsets, at = [], 0
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": [top for _, _, top in entries],
                "text_offset": offsets}

    def chat_logprobs(self, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> list[dict[str, Any]]:
        return [{**self._token_entry(t, lp), "top_logprobs": [self._token_entry(i, v) for i, v in top]} for t, lp, top in entries]

    def _token_entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    def _top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        return {self.token_text(i): v for i, v in top}

    def completion_response(self, job: Job, choices: list[Choice]) -> dict[str, Any]:
        return {**self.head(job, "text_completion"),
                "choices": [{"index": i, "text": self.echo_text(job, i) + c.text, "logprobs": self.completion_logprobs(job, i, c),
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": self.usage(job, choices)}

    def chat_response(self, job: Job, choices: list[Choice]) -> dict[str, Any]:
        return {**self.head(job, "chat.completion"),
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None if job.logprobs is None else {"content": self.chat_logprobs(c.logprobs)},
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": self.usage(job, choices)}


class Run:
    """A queued job. `updates()` yields its updates as they arrive; leaving it early (a
    closed stream, a vanished client) cancels the job's generations."""

    def __init__(self, scheduler: Scheduler, ticket: Ticket, updates: asyncio.Queue[Update], generations: int,
                 on_first_token: Callable[[], None] | None) -> None:
        self.scheduler, self.ticket, self._queue = scheduler, ticket, updates
        self.left = generations  # generations not finished yet
        self.on_first_token = on_first_token

    async def updates(self) -> AsyncIterator[Update]:
        first = True
        try:
            while self.left:
                update = await self._queue.get()
                if update.error is not None:
                    raise GenerationFailed(update.error)
                e = update.emitted
                if first and e.token is not None and self.on_first_token is not None:
                    self.on_first_token()
                    first = False
                if e.finish_reason is not None:
                    self.left -= 1
                yield update
        finally:
            self.cancel_unless_done()

    def cancel_unless_done(self) -> None:
        """Cancel what is still generating (nobody will read it); nothing once all finished."""
        if self.left:
            self.scheduler.cancel(self.ticket)


class GenerationFailed(Exception):
    """The scheduler could not finish a generation (a server fault, not the client's)."""


def record(choice: Choice, e: Emitted) -> None:
    """Add one update's token, text and log-probability to its choice."""
    if e.token is not None:
        choice.ids.append(e.token)
        if e.logprob is not None:
            choice.logprobs.append((e.token, e.logprob, e.top or []))
    choice.text += e.text
    if e.finish_reason is not None:
        choice.finish_reason = e.finish_reason


def _stops(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def _usage(req: Sampling) -> bool:
    return bool(req.stream and req.stream_options is not None and req.stream_options.include_usage)
