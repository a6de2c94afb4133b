"""The serving engine: one worker thread owns the model and decodes every request.

Requests are grouped by what they decode with (a class's experts, or the full model). Each round of
the worker gives every group with work one turn, so one class cannot starve another:

    admit    waiting requests join the group's running batch at this step boundary (continuous
             batching; a backend that cannot join starts a new batch only when none runs), up to
             `max_batch` rows and `prefill_tokens` prompt tokens a turn (one prompt at least)
    advance  each row's Continuation picks its token from its logits (stop strings, eos, max_tokens);
             a finished row leaves the batch at once, and so does a row whose client went away
    step     one forward for the rows still decoding

So a long request holds a short one of its class back by one turn's prefill at most, never until it
finishes. Each request's text goes to its `emit` as it is decoded, from the worker thread; `Ticket`
hands the events to asyncio code (serve/app.py turns them into answers and server-sent events).

    engine = Engine(backend, max_batch=16, max_waiting=256, prefill_tokens=2048).start()
    ticket = Ticket(engine, ids, DecodeOptions(max_new_tokens=64), "auto")     # in an event loop
    async for kind, value in ticket.events(): ...     # ("text", piece) ..., then ("done", Generation)
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Callable

import torch

from ..errors import GriffinError
from ..model.decoding import Continuation
from ..settings import DecodeOptions
from .backends import AUTO, Backend

log = logging.getLogger("griffin_export.serve")

SHUTTING_DOWN = "the server is shutting down"
# GRIFFIN_EXPORT_SERVE_STEP_DELAY=S sleeps S seconds before each decode step: how the tests slow a tiny
# model down enough to watch a drain or a disconnect happen mid-answer
STEP_DELAY_ENV = "GRIFFIN_EXPORT_SERVE_STEP_DELAY"


class Overloaded(GriffinError):
    """More requests wait than the engine takes (HTTP 429), or it is stopping (HTTP 503)."""


@dataclass
class Request:
    ids: torch.Tensor  # [1, T]
    opts: DecodeOptions
    model: str  # a class, "full", or "auto"
    emit: Callable[[tuple], None]  # ("text", piece), then ("done", Generation) or ("error", message)
    group: str | None = None  # what it decodes with: its class, or "full"
    route: dict = field(default_factory=dict)  # what the answer says of it: class, routed, guarded, ...
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away: the request leaves its batch (or the queue) at the next step boundary."""
        self.cancelled = True


@dataclass
class _Row:
    request: Request
    seq: Continuation


@dataclass
class _Group:
    name: str
    waiting: deque = field(default_factory=deque)
    rows: list[_Row] = field(default_factory=list)
    state: object = None  # the backend's batch
    logits: torch.Tensor | None = None  # [len(rows), vocab]: each row's next token's

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)


@dataclass
class EngineStats:
    submitted: int = 0
    served: int = 0  # answers finished
    cancelled: int = 0  # requests whose client went away before their answer finished
    failed: int = 0
    tokens: int = 0  # generated, by the answers finished
    steps: int = 0  # batched forwards
    prefills: int = 0
    joins: int = 0  # prefills whose rows joined a running batch


class Engine:
    def __init__(self, backend: Backend, *, max_batch: int, max_waiting: int, prefill_tokens: int):
        self.backend = backend
        self.max_batch = max(1, min(max_batch, backend.max_batch))
        self.max_waiting, self.prefill_tokens = max_waiting, prefill_tokens
        self.groups: dict[str, _Group] = {}
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting = 0  # submitted, not decoding yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._delay = float(os.environ.get(STEP_DELAY_ENV) or 0)

    # -- any thread ------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="griffin-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker; requests not finished get an error event."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        if self._stop.is_set():
            raise Overloaded(SHUTTING_DOWN)
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise Overloaded(f"{self._waiting} requests are waiting already (`max_waiting`); try again shortly")
            self._waiting += 1
            self.stats.submitted += 1
        self._inbox.put(request)

    def status(self) -> dict:
        """Requests decoding and waiting, and the counters so far."""
        return {"running": sum(len(g.rows) for g in list(self.groups.values())), "waiting": self._waiting,
                "alive": self._thread is not None and self._thread.is_alive(), **asdict(self.stats)}

    # -- the worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(block=not any(g.busy for g in self.groups.values()))
            for g in list(self.groups.values()):
                if g.busy and not self._stop.is_set():
                    self._turn(g)
        self._fail_all(SHUTTING_DOWN)

    def _take(self, block: bool) -> None:
        """Every submitted request into its group's queue (routed first where it asks for `auto`)."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            self._place(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _place(self, r: Request) -> None:
        if r.cancelled:
            self._leave_queue(r, cancelled=True)
            return
        if r.model == AUTO:
            try:
                r.group, r.route = self.backend.route(r.ids)
            except Exception as e:  # noqa: BLE001 - the request fails, the engine keeps serving
                self._leave_queue(r)
                self._fail(r, e)
                return
        else:
            r.group, r.route = r.model, {"class": r.model, "guarded": False}
        self.groups.setdefault(r.group, _Group(r.group)).waiting.append(r)

    def _leave_queue(self, r: Request, cancelled: bool = False) -> None:
        with self._lock:
            self._waiting -= 1
        if cancelled:
            self.stats.cancelled += 1

    def _turn(self, g: _Group) -> None:
        try:
            self._admit(g)
            self._advance(g)
        except Exception as e:  # noqa: BLE001 - a backend failure fails this batch, not the server
            log.exception("decoding %s failed", g.name)
            for row in g.rows:
                self._fail(row.request, e)
            g.rows, g.state, g.logits = [], None, None

    def _admit(self, g: _Group) -> None:
        free = self.max_batch - len(g.rows)
        if not g.waiting or free <= 0 or (g.rows and not self.backend.joins):
            return
        new: list[Request] = []
        tokens = 0
        while g.waiting and len(new) < free:
            r = g.waiting[0]
            if r.cancelled:
                self._leave_queue(g.waiting.popleft(), cancelled=True)
                continue
            if new and tokens + r.ids.shape[1] > self.prefill_tokens:
                break
            new.append(g.waiting.popleft())
            tokens += r.ids.shape[1]
            self._leave_queue(r)
        if not new:
            return
        room = max(r.opts.max_new_tokens for r in new)
        try:
            state, logits = self.backend.start(g.name, [r.ids for r in new], room)
        except Exception as e:  # noqa: BLE001
            log.exception("prefilling for %s failed", g.name)
            for r in new:
                self._fail(r, e)
            return
        self.stats.prefills += 1
        rows = [_Row(r, Continuation(r.opts, tokenizer=self.backend.tokenizer, eos=self.backend.eos,
                                     on_text=lambda piece, r=r: r.emit(("text", piece)))) for r in new]
        if g.rows:  # the running batch's rows each need their own remaining tokens' room
            room = max(room, *(row.request.opts.max_new_tokens - row.seq.i for row in g.rows))
            g.state = self.backend.join(g.name, g.state, state, room)
            g.logits = torch.cat([g.logits, logits])
            self.stats.joins += 1
        else:
            g.state, g.logits = state, logits
        g.rows += rows

    def _advance(self, g: _Group) -> None:
        keep, tokens = [], []
        for j, row in enumerate(g.rows):
            r = row.request
            if r.cancelled:
                self.stats.cancelled += 1
                continue
            tok = row.seq.advance(g.logits[j])
            if tok is None:
                gen = row.seq.result
                gen.extra.update(r.route)
                self.stats.served += 1
                self.stats.tokens += len(gen.token_ids)
                r.emit(("done", gen))
            else:
                keep.append(j)
                tokens.append(tok)
        g.rows = [g.rows[j] for j in keep]
        if keep:
            if self._delay:
                time.sleep(self._delay)
            g.logits = self.backend.step(g.name, g.state, tokens, keep)
            self.stats.steps += 1
        else:
            g.state, g.logits = None, None

    def _fail(self, r: Request, e: Exception | str) -> None:
        self.stats.failed += 1
        r.emit(("error", e if isinstance(e, str) else (str(e) if isinstance(e, GriffinError) else
                                                      f"{type(e).__name__}: {e}")))

    def _fail_all(self, why: str) -> None:
        for g in self.groups.values():
            for row in g.rows:
                self._fail(row.request, why)
            for r in g.waiting:
                self._fail(r, why)
            g.rows, g.state, g.logits = [], None, None
            g.waiting.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._fail(item, why)


class Ticket:
    """One request submitted from an event loop: its events arrive in `events()`; `cancel()` (the client
    went away) frees its batch slot at the next step boundary."""

    def __init__(self, engine: Engine, ids: torch.Tensor, opts: DecodeOptions, model: str):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.request = Request(ids, opts, model, self._post)
        engine.submit(self.request)

    def _post(self, event: tuple) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.request.cancel()

    async def events(self) -> AsyncIterator[tuple]:
        """("text", piece) as the text is decoded, then ("done", Generation) or ("error", message)."""
        while True:
            event = await self._queue.get()
            yield event
            if event[0] != "text":
                return

    def cancel(self) -> None:
        self.request.cancel()
