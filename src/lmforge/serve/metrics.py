"""`/metrics`: what an operator graphs, in Prometheus' text format (prometheus_client).

Requests by route and status, prompt and completion tokens, the queue depth and running
batch (read at scrape time), and histograms of time to first token and whole-request
latency. Each server has its own registry, so two apps in one process (the tests) keep
their own counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lmforge.serve.api import Choice, Job, Service

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/", "/openapi.json")
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("lmforge_completion_tokens", "tokens generated for finished requests", registry=r)
        queued = Gauge("lmforge_queue_depth", "generations waiting for a row of the batch", registry=r)
        queued.set_function(lambda: service.scheduler.queued)
        running = Gauge("lmforge_running", "generations in the running batch", registry=r)
        running.set_function(lambda: service.scheduler.running)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "from request to its first generated token", buckets=SECONDS,
                              registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "from request to its last token", buckets=SECONDS, registry=r)

    def request(self, path: str, status: int) -> None:
        """Count an answered request (paths outside the API count as "other", so a scan cannot
        grow the label set; status "none" is a client that left before the answer began)."""
        self.requests.labels(path if path in ROUTES else "other", str(status) if status else "none").inc()

    def first_token(self, started: float) -> Callable[[], None]:
        return lambda: self.ttft.observe(time.monotonic() - started)

    def finished(self, job: Job, choices: list[Choice], started: float) -> None:
        self.latency.observe(time.monotonic() - started)
        self.prompt_tokens.inc(sum(len(p) for p in job.prompts))
        self.completion_tokens.inc(sum(len(c.ids) for c in choices))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
