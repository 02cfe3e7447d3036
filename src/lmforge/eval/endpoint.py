"""A chat model behind any OpenAI-compatible endpoint as a judge (Ollama, vLLM, llama.cpp's
server, OpenAI itself): `POST {url}/chat/completions`, one user message, temperature 0.

The standard library's urllib is enough for one JSON request at a time and keeps the
package free of an HTTP dependency. A server that is busy or restarting (HTTP 5xx, 429, a
dropped connection, a timeout) is asked again after a growing pause; any other status, or
an answer the judge was told how to give and did not, stops with the row named: a score
silently dropped or guessed would bias the mean.

Scoring follows "Build a Large Language Model (From Scratch)", chapter 7: given the input
and the correct output, score the model response from 0 to 100, "Respond with the integer
number only." (its GPT-2-medium SFT model scored about 50 with Llama 3 8B as the judge).
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval.judge import Pair, PairJudge, Row, Scorer, Verdict

RETRIED_STATUS = (429, 500, 502, 503, 504)
SEED = 123  # the book's judge options: seed 123, temperature 0


def chat_url(url: str) -> str:
    """The chat-completions address of an OpenAI-compatible base URL (`http://host:port/v1`)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LmforgeError(f"--judge-url {url!r} is not an http(s) URL: give the endpoint's base, e.g. http://localhost:11434/v1")
    base = url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


class ChatEndpoint:
    """One judge model at one OpenAI-compatible endpoint."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> None:
        if not model:
            raise LmforgeError("--judge-model is empty: name the model the endpoint serves (e.g. llama3)")
        self.url, self.model, self.api_key = chat_url(url), model, api_key
        self.timeout, self.retries, self.backoff, self.sleep = timeout, retries, backoff, sleep

    def body(self, content: str) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0, "seed": SEED}

    def ask(self, content: str, where: str) -> str:
        """The judge's reply to one user message; `where` names the row in errors."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(self.body(content)).encode()
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                detail = _excerpt(e.read())
                if e.code in RETRIED_STATUS:
                    problem = f"HTTP {e.code} {detail}".rstrip()
                    continue
                raise LmforgeError(f"{where}: the judge at {self.url} answered HTTP {e.code} {detail}".rstrip()
                                   + _status_hint(e.code)) from None
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                problem = str(getattr(e, "reason", None) or e or type(e).__name__)
                continue
            return _content(raw, self.url, where)
        raise LmforgeError(f"{where}: the judge at {self.url} failed {self.retries + 1} times (last: {problem}); "
                           "is the server up? (--retries, --timeout)")


def _status_hint(code: int) -> str:
    if code in (401, 403):
        return "; set the API key in the variable --api-key-env names"
    if code == 404:
        return "; check --judge-url (the base, ending in /v1) and --judge-model"
    return ""


def _excerpt(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", errors="replace").strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _content(raw: bytes, url: str, where: str) -> str:
    try:
        reply = json.loads(raw)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LmforgeError(f"{where}: the judge at {url} sent no chat completion (expected choices[0].message.content): "
                           f"{_excerpt(raw)!r}") from None
    if not isinstance(content, str):
        raise LmforgeError(f"{where}: the judge's message content is {type(content).__name__}, not text")
    return content


# --- the prompts and their answers ---------------------------------------------------------------------


def score_prompt(row: Row, response: str) -> str:
    """The book's chapter 7 scoring prompt."""
    return (f"Given the input `{row.judge_input}` and correct output `{row.reference}`, score the model response `{response}`"
            " on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")


def pair_prompt(pair: Pair) -> str:
    """The scoring prompt's pairwise twin: which of two responses is better, or a tie."""
    reference = f" and correct output `{pair.row.reference}`" if pair.row.reference is not None else ""
    return (f"Given the input `{pair.row.judge_input}`{reference}, which model response is better?\n"
            f"Response A: `{pair.first}`\nResponse B: `{pair.second}`\n"
            "Respond with A, B or tie only.")


_SCORE = re.compile(r"(?:score\s*[:=]?\s*)?(\d{1,3})(?:\s*/\s*100)?\.?", re.IGNORECASE)
_CHOICE = re.compile(r"(?:response\s+)?(a|b|tie)\.?", re.IGNORECASE)


def parse_score(answer: str, where: str) -> int:
    """The integer 0-100 the judge was asked for (a "Score: 85" or "85/100" is read too)."""
    match = _SCORE.fullmatch(_bare(answer))
    if match is None or not 0 <= int(match.group(1)) <= 100:
        raise LmforgeError(f"{where}: the judge answered {_excerpt(answer.encode())!r}, not an integer from 0 to 100")
    return int(match.group(1))


def parse_choice(answer: str, where: str) -> Verdict:
    match = _CHOICE.fullmatch(_bare(answer))
    if match is None:
        raise LmforgeError(f"{where}: the judge answered {_excerpt(answer.encode())!r}, not A, B or tie")
    return {"a": "first", "b": "second", "tie": "tie"}[match.group(1).lower()]  # type: ignore[return-value]


def _bare(answer: str) -> str:
    """The answer without the wrapping a chat model adds around a one-word reply."""
    return answer.strip().strip("*`'\"").strip()


def endpoint_scorer(client: ChatEndpoint, progress: Callable[[int], None] | None = None) -> Scorer:
    """0-100 scores of rows' answers against their references, one request each."""

    def scorer(rows: Sequence[Row]) -> list[float]:
        out: list[float] = []
        for row in rows:
            where = f"line {row.line}"
            out.append(float(parse_score(client.ask(score_prompt(row, row.response or ""), where), where)))
            if progress:
                progress(1)
        return out

    return scorer


def endpoint_pair_judge(client: ChatEndpoint, progress: Callable[[int], None] | None = None) -> PairJudge:
    """A or B (or a tie) for each pair, one request each; the caller asks in both orders."""

    def judge(pairs: Sequence[Pair]) -> list[Verdict]:
        out: list[Verdict] = []
        for pair in pairs:
            where = f"line {pair.row.line}" + (f" ({pair.order})" if pair.order else "")
            out.append(parse_choice(client.ask(pair_prompt(pair), where), where))
            if progress:
                progress(1)
        return out

    return judge
