"""The serving engine: one worker thread owns the model and decodes every request.

Requests are grouped by what they decode with (a class's experts, or the full model), each group with its
queue. The running batches take a step each per round of the worker:

    admit    waiting requests join a running batch at this step boundary (continuous batching; a
             backend that cannot join starts a new batch only when none runs), oldest first, up to
             `max_batch` rows and `prefill_tokens` prompt tokens a turn (one prompt at least); each
             group's newcomers are prefilled together, through their own experts
    advance  each row's Continuation picks its token from its logits (stop strings, eos, max_tokens);
             a finished row leaves the batch at once, and so does a row whose client went away
    step     one forward for the rows still decoding

Where the backend `mixes` (the PyTorch backend on the lean step), there is one running batch for every
group: rows of different classes decode together, each through its own FF weights, every other weight read
once per step for all of them. Elsewhere each group has its batch, and the groups take turns step by step,
so one class cannot starve another. Either way a long request holds a short one back by one turn's prefill
at most, never until it finishes. Each request's text goes to its `emit` as it is decoded, from the worker
thread; `Ticket` hands the events to asyncio code (serve/app.py turns them into answers and server-sent
events).

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
    arrival: int = 0  # its place in the order requests reached the worker

    def cancel(self) -> None:
        """The client went away: the request leaves its batch (or the queue) at the next step boundary."""
        self.cancelled = True


@dataclass
class _Row:
    request: Request
    seq: Continuation


@dataclass
class _Batch:
    """A running batch: its rows, the backend's state of them, and each row's next token's logits."""

    rows: list[_Row] = field(default_factory=list)
    state: object = None
    logits: torch.Tensor | None = None  # [len(rows), vocab]


MIXED = "*"  # the one batch of a backend that mixes groups


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
        self.queues: dict[str, deque[Request]] = {}  # each group's waiting requests
        self.batches: dict[str, _Batch] = {}  # each group's running batch, or the one MIXED batch
        self._arrivals = 0
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
        return {"running": sum(len(b.rows) for b in list(self.batches.values())), "waiting": self._waiting,
                "alive": self._thread is not None and self._thread.is_alive(), **asdict(self.stats)}

    # -- the worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = any(self.queues.values()) or any(b.rows for b in self.batches.values())
            self._take(block=not busy)
            if self.backend.mixes:
                self._turn(MIXED, list(self.queues))
            else:
                for g in list(self.queues):
                    if not self._stop.is_set() and (self.queues[g] or (g in self.batches and self.batches[g].rows)):
                        self._turn(g, [g])
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
        self._arrivals += 1
        r.arrival = self._arrivals
        self.queues.setdefault(r.group, deque()).append(r)

    def _leave_queue(self, r: Request, cancelled: bool = False) -> None:
        with self._lock:
            self._waiting -= 1
        if cancelled:
            self.stats.cancelled += 1

    def _turn(self, key: str, groups: list[str]) -> None:
        b = self.batches.setdefault(key, _Batch())
        try:
            self._admit(key, b, groups)
            self._advance(key, b)
        except Exception as e:  # noqa: BLE001 - a backend failure fails this batch, not the server
            log.exception("decoding %s failed", key)
            for row in b.rows:
                self._fail(row.request, e)
            b.rows, b.state, b.logits = [], None, None

    def _pick(self, groups: list[str], free: int) -> dict[str, list[Request]]:
        """The waiting requests to admit now, oldest first, by group; cancelled ones leave the queues."""
        picked: dict[str, list[Request]] = {}
        n = tokens = 0
        while n < free:
            heads = []
            for g in groups:
                q = self.queues.get(g)
                while q and q[0].cancelled:
                    self._leave_queue(q.popleft(), cancelled=True)
                if q:
                    heads.append((q[0].arrival, g))
            if not heads:
                break
            g = min(heads)[1]
            r = self.queues[g][0]
            if n and tokens + r.ids.shape[1] > self.prefill_tokens:
                break
            picked.setdefault(g, []).append(self.queues[g].popleft())
            self._leave_queue(r)
            n, tokens = n + 1, tokens + r.ids.shape[1]
        return picked

    def _admit(self, key: str, b: _Batch, groups: list[str]) -> None:
        free = self.max_batch - len(b.rows)
        if free <= 0 or (b.rows and not self.backend.joins):
            return
        for g, new in self._pick(groups, free).items():
            room = max(r.opts.max_new_tokens for r in new)
            try:
                state, logits = self.backend.start(g, [r.ids for r in new], room)
            except Exception as e:  # noqa: BLE001
                log.exception("prefilling for %s failed", g)
                for r in new:
                    self._fail(r, e)
                continue
            self.stats.prefills += 1
            rows = [_Row(r, Continuation(r.opts, tokenizer=self.backend.tokenizer, eos=self.backend.eos,
                                         on_text=lambda piece, r=r: r.emit(("text", piece)))) for r in new]
            if b.rows:  # the running rows each need their own remaining tokens' room
                room = max(room, *(row.request.opts.max_new_tokens - row.seq.i for row in b.rows))
                b.state = self.backend.join(g, b.state, state, room)
                b.logits = torch.cat([b.logits, logits])
                self.stats.joins += 1
            else:
                b.state, b.logits = state, logits
            b.rows += rows

    def _advance(self, key: str, b: _Batch) -> None:
        keep, tokens = [], []
        for j, row in enumerate(b.rows):
            r = row.request
            if r.cancelled:
                self.stats.cancelled += 1
                continue
            tok = row.seq.advance(b.logits[j])
            if tok is None:
                gen = row.seq.result
                gen.extra.update(r.route)
                self.stats.served += 1
                self.stats.tokens += len(gen.token_ids)
                r.emit(("done", gen))
            else:
                keep.append(j)
                tokens.append(tok)
        b.rows = [b.rows[j] for j in keep]
        if keep:
            if self._delay:
                time.sleep(self._delay)
            b.logits = self.backend.step(None if key == MIXED else key, b.state, tokens, keep)
            self.stats.steps += 1
        else:
            b.state, b.logits = None, None

    def _fail(self, r: Request, e: Exception | str) -> None:
        self.stats.failed += 1
        r.emit(("error", e if isinstance(e, str) else (str(e) if isinstance(e, GriffinError) else
                                                      f"{type(e).__name__}: {e}")))

    def _fail_all(self, why: str) -> None:
        for b in self.batches.values():
            for row in b.rows:
                self._fail(row.request, why)
            b.rows, b.state, b.logits = [], None, None
        for q in self.queues.values():
            for r in q:
                self._fail(r, why)
            q.clear()
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
