"""What one server is: the backend (registry.SERVE_BACKENDS), its engine and the app in front of them.
Built the same way by `serve` (server.py) and by every Ray Serve replica (ray_app.py)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from ..errors import GriffinError
from ..registry import serve_backend
from ..settings import ServeSettings

__all__ = ["Served", "build", "require_serve"]

Report = Callable[[str], None]


def require_serve() -> None:
    """Refuse in one line, before any work, when the [serve] extra is missing."""
    missing = [pkg for pkg in ("fastapi", "uvicorn") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise GriffinError(f"{', '.join(missing)} not installed: serving needs the [serve] extra "
                           "(pip install -e \".[serve]\")")


@dataclass
class Served:
    """A backend, its engine and the app in front of them."""

    backend: object
    engine: object
    app: object
    state: object

    def close(self) -> None:
        self.engine.stop()
        self.backend.close()


def build(settings: ServeSettings, report: Report | None = None, *, replica: str | None = None) -> Served:
    """Load the backend (registry.SERVE_BACKENDS), start its engine, and make the app."""
    require_serve()
    entry = serve_backend(settings.backend)
    if entry.needs and importlib.util.find_spec(entry.needs) is None:
        raise GriffinError(f"backend={settings.backend!r} needs {entry.install}")
    from .app import ServerState, create_app
    from .engine import Engine

    backend = entry.load(settings, report)
    engine = Engine(backend, max_batch=settings.max_batch, max_waiting=settings.max_waiting,
                    prefill_tokens=settings.prefill_tokens).start()
    state = ServerState()
    app = create_app(engine, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                     default_max_tokens=settings.max_tokens, state=state, replica=replica)
    return Served(backend, engine, app, state)
