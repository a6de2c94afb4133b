"""The same app on Ray Serve: replicas across machines, Serve's proxy spreading the requests among them.

Each replica builds what `griffin-export serve` builds (assemble.build: the backend, its engine, the app)
and hands Serve the app; Serve runs it behind its own HTTP proxy. A replica's batches are its own: the
proxy sends each replica up to `max_batch` * 2 requests at a time, so its batches can fill.

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(deployment(ServeSettings(router="classes/router.safetensors", engine="ray", replicas=2)),
              name="griffin-export", route_prefix="/")

Every node needs griffin-export, the model and the router's files at the same paths. Draining on a replica's
shutdown is Serve's (`graceful_shutdown_timeout_s` = `drain_s`): the 503-while-draining of server.py is for
the single-machine server.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from typing import Callable

from ..errors import GriffinError
from ..settings import ServeSettings
from .assemble import build


class GriffinReplica:
    """One replica: the backend, its engine and the app (Serve calls `__serve_build_asgi_app__` for the app)."""

    def __init__(self, settings: ServeSettings):
        from ray import serve

        self.served = build(settings, replica=serve.get_replica_context().replica_id.unique_id)

    def __serve_build_asgi_app__(self):
        return self.served.app

    def __del__(self):
        served = getattr(self, "served", None)
        if served is not None:
            served.close()


def deployment(settings: ServeSettings, *, num_cpus: float = 1.0):
    """The Serve application of `settings.replicas` replicas, each taking `num_cpus` of its node's CPUs."""
    from ray import serve

    ingress = serve.ingress()(GriffinReplica)
    options = dict(name="griffin-export", num_replicas=settings.replicas, ray_actor_options={"num_cpus": num_cpus},
                   max_ongoing_requests=max(8, 2 * settings.max_batch), graceful_shutdown_timeout_s=settings.drain_s)
    return serve.deployment(**options)(ingress).bind(settings)


def serve_on_ray(settings: ServeSettings, report: Callable[[str], None] | None = None, *,
                 ready: Callable[[str], None] | None = None) -> None:
    """Serve on Ray Serve until SIGTERM or Ctrl-C (Serve then shuts the replicas down gracefully): on the
    cluster at `settings.address`, else on a local cluster started here (and stopped)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise GriffinError('engine=\'ray\' needs Ray Serve: pip install -e ".[ray]"')
    import ray
    from ray import serve

    say = report or (lambda line: None)
    started = not ray.is_initialized()
    local = settings.address is None
    cores = os.cpu_count() or 1
    if started:
        say(f"starting {'a local Ray cluster' if local else 'on the Ray cluster at ' + settings.address} ...")
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 num_cpus=max(cores, settings.replicas) if local else None)
    # on a local cluster the replicas share this machine's cores; on a cluster each takes one
    share = cores / settings.replicas if local else 1.0
    if local and settings.threads is None:
        settings = dataclasses.replace(settings, threads=max(1, int(share)))
    stop = previous = None
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        say(f"starting {settings.replicas} replicas ...")
        serve.run(deployment(settings, num_cpus=min(1.0, share)), name="griffin-export", route_prefix="/",
                  blocking=False)
        if ready is not None:
            ready(f"http://{settings.host}:{settings.port}")
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():  # Ray's own handler would kill the process
            previous = signal.signal(signal.SIGTERM, lambda sig, frame: stop.set())
        while not stop.wait(1.0):
            pass
        say("SIGTERM: shutting the replicas down ...")
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
        if stop is not None and previous is not None:
            signal.signal(signal.SIGTERM, previous)
