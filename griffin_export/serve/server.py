"""Serving: a backend and its engine behind the app, under uvicorn, here or on Ray Serve.

    serve(ServeSettings(router="classes/router.safetensors"))      # blocks; SIGTERM drains, then returns
    with start(ServeSettings(router=..., port=0)) as running:       # in a thread (tests, benchmarks)
        openai.OpenAI(base_url=running.url + "/v1", api_key="-").completions.create(model="auto", ...)

SIGTERM drains: the server keeps listening but answers new requests 503 (a load balancer's health check
sees it), lets the requests in flight finish (at most `drain_s` seconds), then exits; a second SIGTERM
or Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import GriffinError
from ..settings import ServeSettings
from .assemble import Served, build, require_serve

Report = Callable[[str], None]


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn that drains on SIGTERM (or `drain()`): 503 to new requests, exit once none is in flight."""

        def __init__(self, config, state, drain_s: float):
            super().__init__(config)
            self.state, self.drain_s, self.deadline = state, drain_s, None

        def drain(self) -> None:
            self.state.draining = True
            self.deadline = time.monotonic() + self.drain_s

        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM and not self.state.draining:
                self.drain()  # not recorded as captured: the process then ends with 0, not re-killed
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.state.draining and not self.should_exit and (
                    self.state.inflight == 0 or time.monotonic() > self.deadline):
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise GriffinError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _uvicorn(served: Served, drain_s: float):
    import uvicorn

    config = uvicorn.Config(served.app, log_level="warning", timeout_graceful_shutdown=drain_s + 5, access_log=False)
    return _server_class()(config, served.state, drain_s)


def serve(settings: ServeSettings, report: Report | None = None, *, ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM (drained) or Ctrl-C: here, or on Ray Serve (engine='ray', serve/ray_app.py).
    `ready(url)` once it listens."""
    require_serve()
    if settings.engine == "ray":
        from .ray_app import serve_on_ray

        return serve_on_ray(settings, report, ready=ready)
    sock = _bind(settings.host, settings.port)  # refused before the model loads
    served = build(settings, report)
    try:
        server = _uvicorn(served, settings.drain_s)
        if ready is not None:
            ready(_url(sock))
        server.run(sockets=[sock])
    finally:
        sock.close()
        served.close()


@dataclass
class Running:
    """A server in a thread of this process."""

    url: str
    served: Served
    server: object
    thread: threading.Thread

    def drain(self) -> None:
        """What SIGTERM does: new requests get 503, the ones in flight finish, then the server stops."""
        self.server.drain()

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.served.close()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(settings: ServeSettings | Served, *, host: str = "127.0.0.1", port: int = 0,
          drain_s: float | None = None) -> Running:
    """A server in a thread, on `port` (0: a free one): for tests, benchmarks and notebooks. Takes settings
    (the backend is loaded here) or something already built."""
    served = build(settings) if isinstance(settings, ServeSettings) else settings
    if isinstance(settings, ServeSettings):
        host, port = settings.host, settings.port
        drain_s = settings.drain_s if drain_s is None else drain_s
    sock = _bind(host, port)
    server = _uvicorn(served, 30.0 if drain_s is None else drain_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="griffin-serve-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            served.close()
            raise GriffinError(f"the server on {_url(sock)} did not start")
        time.sleep(0.01)
    return Running(_url(sock), served, server, thread)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"
