"""The scheduler: one thread owns the engine's running batch; requests join and leave it.

HTTP handlers run on the event loop and must never wait for the model, and the model
must never wait for a client. So one thread runs the `Batcher` in a loop, between steps
it admits waiting generations into free rows (prefill), then runs one shared decode
step, and hands every token to its request's `sink` (a callable the handler gives, which
must not block: the HTTP layer passes one that puts the update on its asyncio queue).
A cancelled request (its client went away) leaves the batch before the next step, so
its row is free for the next waiting one.

The queue is bounded: `submit` refuses a request whose generations would make more than
`max_queue` wait (`QueueFull`), so a flood of requests gets told to come back later
instead of growing memory without end.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.engine.batch import Batcher, Emitted, Generation
from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge.serve")


class QueueFull(LmforgeError):
    """More generations are waiting than the server's --max-queue allows."""


@dataclass
class Update:
    """What a request's sink receives: a token or finish of its generation `index`, or an error."""

    index: int
    emitted: Emitted | None = None
    error: str | None = None


@dataclass(eq=False)
class Ticket:
    """A request inside the scheduler: its generations (choices) and where their updates go."""

    generations: list[Generation]
    sink: Callable[[Update], None]
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)


class Scheduler:
    """Runs the continuous batch on its own thread; `submit` and `cancel` are thread-safe."""

    def __init__(self, batcher: Batcher, max_queue: int) -> None:
        self.batcher = batcher
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue[Ticket | None] = queue.SimpleQueue()
        self._waiting: collections.deque[tuple[Ticket, int]] = collections.deque()
        self._owner: dict[Generation, tuple[Ticket, int]] = {}
        self._queued = 0  # generations submitted and not yet admitted
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the handlers' side ----------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return len(self.batcher.rows)

    def submit(self, generations: list[Generation], sink: Callable[[Update], None]) -> Ticket:
        """Queue a request; its updates go to `sink` from the scheduler's thread."""
        with self._lock:
            if self._queued + len(generations) > self.max_queue:
                raise QueueFull(
                    f"{self._queued} generations are already waiting (the server's --max-queue is {self.max_queue}); retry shortly"
                )
            self._queued += len(generations)
        ticket = Ticket(generations, sink)
        self._inbox.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request's generations (its client is gone); their rows are freed before the next step."""
        ticket.cancelled = True
        self._inbox.put(None)  # wake the loop if it is idle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    # --- the scheduler's thread --------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self._take(block=not self.batcher.rows and not self._waiting)
            self._drop_cancelled()
            self._admit()
            if self.batcher.rows:
                try:
                    self._deliver(self.batcher.step())
                except Exception as e:  # a bug, not a client's mistake: fail the running requests, keep serving
                    log.exception("decode step failed")
                    self._fail_running(f"generation failed: {type(e).__name__}: {e}")

    def _take(self, block: bool) -> None:
        try:
            ticket = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if ticket is not None:
                    self._waiting.extend((ticket, i) for i in range(len(ticket.generations)))
                ticket = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for g in list(self.batcher.rows):
            ticket, _ = self._owner[g]
            if ticket.cancelled:
                self.batcher.remove(g)
                del self._owner[g]

    def _admit(self) -> None:
        while self._waiting and self.batcher.free:
            ticket, i = self._waiting.popleft()
            with self._lock:
                self._queued -= 1
            if ticket.cancelled:
                continue
            g = ticket.generations[i]
            self._owner[g] = (ticket, i)
            try:
                self._deliver(self.batcher.add(g))
            except Exception as e:  # the handler checked the request, so this is unexpected: tell its client
                log.exception("prefill failed")
                self.batcher.remove(g)
                self._owner.pop(g, None)
                ticket.cancelled = True
                self._send(ticket, Update(i, error=f"generation failed: {type(e).__name__}: {e}"))

    def _deliver(self, emitted: list[Emitted]) -> None:
        for e in emitted:
            ticket, i = self._owner[e.generation]
            if e.finish_reason is not None:
                del self._owner[e.generation]
            if not ticket.cancelled:
                self._send(ticket, Update(i, e))

    def _fail_running(self, message: str) -> None:
        for g in list(self.batcher.rows):
            ticket, i = self._owner.pop(g)
            self.batcher.remove(g)
            if not ticket.cancelled:
                ticket.cancelled = True
                self._send(ticket, Update(i, error=message))

    def _send(self, ticket: Ticket, update: Update) -> None:
        try:
            ticket.sink(update)
        except Exception:  # a sink whose event loop has closed: its request is over
            ticket.cancelled = True
