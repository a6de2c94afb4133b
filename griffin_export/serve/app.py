"""The ASGI app (FastAPI): the OpenAI routes over the engine, and the guard in front of them.

    GET  /health                  {"status": "ok" | "draining", ...}; 503 while draining
    GET  /v1/models               every class, "full" (the full model) and "auto" (routed) where a router is
    POST /v1/completions          prompt -> text; stream=true: server-sent events
    POST /v1/chat/completions     messages through the model's chat template

Every refusal is an OpenAI error body with a 4xx status (schema.ApiError), unknown routes and methods
included; the server keeps serving. The guard (pure ASGI, so a streaming response still hears its
client leave) refuses while draining (503), checks the Bearer key in constant time (401) and the body
size (413), and counts the requests in flight for the drain (server.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GriffinError
from .backends import AUTO, FULL_MODEL
from .engine import SHUTTING_DOWN, Engine, Overloaded, Ticket
from .schema import ApiError, answer, chunk, context_error, error_body, griffin_fields, new_id, parse, usage

log = logging.getLogger("griffin_export.serve")


@dataclass
class ServerState:
    """What the guard and the draining server share."""

    draining: bool = False
    inflight: int = 0  # HTTP requests being answered


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               default_max_tokens: int = 64, state: ServerState | None = None, replica: str | None = None) -> FastAPI:
    """The app serving `engine`'s backend. `replica` names this copy (Ray Serve) in /health."""
    backend = engine.backend
    state = state or ServerState()
    created = int(time.time())
    app = FastAPI(title="griffin-export", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.get("/health")
    async def health():
        body = {"status": "draining" if state.draining else "ok", "backend": backend.name, "models": backend.models(),
                "replica": replica, **engine.status()}
        return JSONResponse(body, status_code=503 if state.draining or not body["alive"] else 200)

    @app.get("/v1/models")
    async def models():
        def card(m: str) -> dict:
            kind = "routed" if m == AUTO else "full" if m == FULL_MODEL else "class"
            return {"id": m, "object": "model", "created": created, "owned_by": "griffin-export",
                    "griffin": {"kind": kind, "backend": backend.name}}

        return {"object": "list", "data": [card(m) for m in backend.models()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(request, chat=True)

    async def _answer(request: Request, chat: bool):
        ask = parse(await request.body(), chat=chat, models=backend.models())
        try:
            ids = backend.encode(prompt=ask.prompt, messages=ask.messages)
        except GriffinError as e:
            raise context_error(e, chat) from None
        n = int(ids.shape[1])
        opts = ask.decode_options(n, backend.context_length, default_max_tokens)
        try:
            ticket = Ticket(engine, ids, opts, ask.model)
        except Overloaded as e:
            shutting = str(e) == SHUTTING_DOWN
            raise ApiError(503 if shutting else 429, str(e), headers={"Retry-After": "1"},
                           kind="unavailable_error" if shutting else "rate_limit_error") from None
        rid = new_id(chat)
        if ask.stream:
            # the background task cancels too where the client left before the stream began
            return StreamingResponse(_events(ask, rid, n, ticket), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(ticket.cancel))
        return await _whole(request, ask, rid, n, ticket)

    async def _whole(request: Request, ask, rid: str, n: int, ticket: Ticket):
        """The answer in one piece; a client that leaves before it is done frees its slot too."""
        async def result():
            async for kind, value in ticket.events():
                if kind != "text":
                    return kind, value

        waiter = asyncio.ensure_future(result())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiter.done():
                waiter.cancel()
                ticket.cancel()
        if not waiter.done() or waiter.cancelled():
            return JSONResponse(error_body("the client went away", "invalid_request_error"), status_code=499)
        kind, value = waiter.result()
        if kind == "error":
            return _server_error(value)
        return JSONResponse(answer(ask, rid, n, value))

    async def _events(ask, rid: str, n: int, ticket: Ticket):
        """Server-sent events: the first chunk, a chunk per piece of text, the finish, the usage, [DONE]. A
        client that disconnects cancels this generator, and with it the request's row."""
        try:
            yield _sse(chunk(ask, rid, first=True) if ask.chat else chunk(ask, rid, text=""))
            async for kind, value in ticket.events():
                if kind == "text":
                    yield _sse(chunk(ask, rid, text=value))
                elif kind == "error":
                    yield _sse(_server_error_body(value))
                    return
                else:
                    yield _sse(chunk(ask, rid, text=None if ask.chat else "",
                                     finish="length" if value.stop_reason == "length" else "stop",
                                     griffin=griffin_fields(value)))
                    if ask.include_usage:
                        yield _sse(chunk(ask, rid, usage_=usage(n, value)))
            yield "data: [DONE]\n\n"
        finally:
            ticket.cancel()  # nothing if it finished; else its slot is freed at the next step

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, kind), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        log.exception("answering %s failed", request.url.path)
        return _server_error(f"{type(e).__name__}: {e}")

    app.add_middleware(Guard, state=state, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _server_error_body(message: str) -> dict:
    return error_body(f"decoding failed: {message}", "server_error")


def _server_error(message: str) -> JSONResponse:
    return JSONResponse(_server_error_body(message), status_code=503 if message == SHUTTING_DOWN else 500)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Guard:
    """Pure ASGI middleware in front of the app: drain, key, body size, requests in flight."""

    def __init__(self, app, *, state: ServerState, api_key: str | None, max_body_bytes: int):
        self.app, self.state, self.limit = app, state, max_body_bytes
        self.key = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.draining:
            return await _refuse(send, 503, SHUTTING_DOWN, "unavailable_error",
                                 [(b"retry-after", b"1"), (b"connection", b"close")])
        if self.key is not None and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            # digests of equal length compared in constant time: neither the key nor its length leaks
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(),
                                                                         self.key)):
                return await _refuse(send, 401, "a valid API key is needed: Authorization: Bearer KEY",
                                     "authentication_error", code="invalid_api_key")
        self.state.inflight += 1
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._body(scope, receive, send)
                if body is None:
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1

    async def _body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None once it is past the limit (413 sent) or the client left."""
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"the request body is over the limit of {self.limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _refuse(send, 413, too_big, "invalid_request_error", [(b"connection", b"close")])
            return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            part = message.get("body", b"")
            size += len(part)
            if size > self.limit:
                await _refuse(send, 413, too_big, "invalid_request_error", [(b"connection", b"close")])
                return None
            parts.append(part)
            if not message.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive):
    """receive() that gives the body read once, then the real messages (a disconnect among them)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def _refuse(send, status: int, message: str, kind: str, headers: list | None = None, code: str | None = None):
    body = json.dumps(error_body(message, kind, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
