"""What the serving engine asks of a backend (registry.SERVE_BACKENDS), and the PyTorch one.

A backend decodes *groups*: each class, and the full model ("full"). The engine's one worker thread
calls `route`, `start`, `join` and `step`; `encode` may run on any thread (the tokenizer is locked).

    state, logits = backend.start("class-1", [ids, ...], room)   # a batch's prefill: logits [B, vocab]
    state = backend.join("class-1", state, new, room)             # where `joins`: rows join a running batch
    logits = backend.step("class-1", state, tokens, keep)         # one token for each row still decoding

The PyTorch backend holds one base model: its attention, embeddings and head once, each class adding
only its FF slices (runtime/routed.ExpertSet), swapped in at a group's turn (a swap of references).
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..bundle.experts import check_bundle
from ..bundle.format import Bundle, read_bundle
from ..classes.router import Router, bundle_digest, check_router, read_router, route
from ..errors import GriffinError
from ..model.load import LoadedModel, check_device, load_model, use_threads
from ..model.tokens import check_context, encode
from ..runtime.routed import FULL, ExpertSet, RoutedRuntime, _route_fields, load_routed
from ..settings import ServeSettings

FULL_MODEL = "full"  # the model id of the full model
AUTO = "auto"  # the model id that routes: the router's class, or the full model where the guard fires
RESERVED = (FULL_MODEL, AUTO)


class LockedTokenizer:
    """A tokenizer shared by the request threads (encoding) and the engine's worker (decoding the
    streamed text): a fast tokenizer refuses to be used from two threads at once ("Already borrowed")."""

    def __init__(self, tokenizer):
        self._tok, self._lock = tokenizer, threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tok(*args, **kwargs)

    def decode(self, *args, **kwargs):
        with self._lock:
            return self._tok.decode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        with self._lock:
            return self._tok.apply_chat_template(*args, **kwargs)

    @property
    def chat_template(self):
        return getattr(self._tok, "chat_template", None)


class Backend:
    """The interface the engine decodes through; subclasses supply the model calls."""

    name = "?"
    max_batch = 1  # rows one batch decodes together
    joins = False  # rows join a running batch at a step boundary (continuous batching)
    mixes = False  # rows of every group decode in one batch (step's group is then None)

    def __init__(self, tokenizer, eos: set[int], context_length: int | None, classes: Sequence[str], *,
                 routes: bool, identity: str):
        for c in classes:
            if c in RESERVED:
                raise GriffinError(f"a class may not be named {c!r}: the model ids {', '.join(RESERVED)} are the "
                                   "server's own")
        self.tokenizer = LockedTokenizer(tokenizer) if tokenizer is not None else None
        self.eos, self.context_length, self.classes = eos, context_length, list(classes)
        self.routes, self.identity = routes, identity

    def models(self) -> list[str]:
        """The model ids a request may name: each class, the full model, and `auto` where a router routes."""
        return [*self.classes, FULL_MODEL, *([AUTO] if self.routes else [])]

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> torch.Tensor:
        """A completion's prompt as it is, or a chat's messages through the model's chat template -> ids
        [1, T], refused past the context."""
        if messages is None:
            return encode(self.tokenizer, prompt, context=self.context_length, model=self.identity)
        if not self.tokenizer.chat_template:
            raise GriffinError(f"the model {self.identity} has no chat template: send a prompt to /v1/completions")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        if not ids:
            raise GriffinError("the messages encode to 0 tokens")
        check_context(self.context_length, len(ids))
        return torch.tensor([ids], dtype=torch.long)

    def route(self, ids: torch.Tensor) -> tuple[str, dict]:
        """The group a prompt of model `auto` decodes in, and what the answer says of its route."""
        raise GriffinError("this server has no router: name a class or `full` as the model")

    def start(self, group: str, batch: list[torch.Tensor], room: int):
        raise NotImplementedError

    def join(self, group: str, state, new, room: int):
        raise GriffinError(f"the {self.name} backend does not join batches")

    def step(self, group: str | None, state, tokens: list[int], keep: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds outside Python's reach (llama.cpp contexts)."""


class TorchBackend(Backend):
    """Every class's experts in one base model (ExpertSet), decoded by the PyTorch runtime's batched lean step."""

    name = "torch"

    def __init__(self, rt: RoutedRuntime, *, max_batch: int, identity: str):
        super().__init__(rt.tokenizer, rt.eos, rt.lm.context_length, [n for n in rt.experts.modules if n],
                         routes=rt.router is not None, identity=identity)
        # the lean step: rows join running batches, and rows of every class share one (each row keeps the FF
        # weights it was prefilled with); transformers' forward: a batch per class, as its modules are swapped
        self.rt, self.max_batch, self.joins = rt, max_batch, rt.joins_batches
        self.mixes = rt.joins_batches
        rt.prepare()

    def _use(self, group: str) -> None:
        name = FULL if group == FULL_MODEL else group
        if self.rt.experts.active != name:  # (the router's partial prefill swaps the full model in)
            self.rt.experts.activate(name)

    def route(self, ids: torch.Tensor) -> tuple[str, dict]:
        r = self.rt.route(ids.to(self.rt.lm.device))
        used = self.rt.choice(r)
        return (FULL_MODEL if used is FULL else used), _route_fields(r, used)

    def start(self, group: str, batch: list[torch.Tensor], room: int):
        self._use(group)
        return self.rt.start_batch(batch, room)

    def join(self, group: str, state, new, room: int):
        self._use(group)
        return self.rt.join_batch(state, new, room)

    def step(self, group: str | None, state, tokens: list[int], keep: list[int]) -> torch.Tensor:
        if group is not None:  # a mixed batch's rows decode with their own experts
            self._use(group)
        return self.rt.step_batch(state, tokens, keep)

    def class_bytes(self) -> dict[str, int]:
        """What each group's FF linears hold (the full model's: its whole FF)."""
        return {FULL_MODEL if n is FULL else n: self.rt.experts.bytes(n) for n in self.rt.experts.modules}


class ClassRuntime(RoutedRuntime):
    """RoutedRuntime's decoding over class bundles named per request, without a router."""

    def __init__(self, lm: LoadedModel, bundles: dict[str, Bundle], *, lean: bool | None = None):
        self.router, self.guard, self.bundle = None, False, None
        self._init_decoding(lm, lean, compile=False)
        self.experts = ExpertSet(lm, bundles, lean=self._lean_settings is not None)
        self.lean = self.experts.lean

    def tokenize(self, text: str) -> torch.Tensor:
        return encode(self.lm.tokenizer, text, context=self.lm.context_length, model=self.lm.identity)


def class_bundles(paths: Sequence[str]) -> dict[str, Bundle]:
    """Class bundles by their class name, each read whole but for a KV cache (a class bundle has none)."""
    from ..bundle.format import read_info

    out: dict[str, Bundle] = {}
    for path in paths:
        info = read_info(path)
        if info.kind != "class":
            raise GriffinError(f"{path} is a prompt's bundle; serve takes class bundles (griffin-export class or "
                               "discover)")
        name = info.extra.get("class") or str(path)
        if name in out:
            raise GriffinError(f"two bundles of class {name!r}: {path} and another; serve one bundle per class")
        out[name] = read_bundle(path, load_kv=False)
    bases = {b.info.base_model for b in out.values()}
    if len(bases) > 1:
        raise GriffinError(f"the bundles come from different base models ({', '.join(sorted(bases))}); serve "
                           "the classes of one base model")
    return out


def load_torch(settings: ServeSettings, report: Callable[[str], None] | None = None) -> TorchBackend:
    """The PyTorch backend: the router's classes (or the bundles') in one base model."""
    check_device(settings.device)
    use_threads(settings.threads)
    say = report or (lambda line: None)
    if settings.router is not None:
        say(f"loading the router {settings.router}, its classes and their base model ...")
        rt = load_routed(settings.router, settings.model, gguf_file=settings.gguf_file, device=settings.device,
                         guard=settings.guard)
    else:
        bundles = class_bundles(settings.bundles)
        base = settings.model or next(iter(bundles.values())).info.base_model
        say(f"loading {len(bundles)} class bundles and the base model {base} ...")
        lm = load_model(base, gguf_file=settings.gguf_file, device=settings.device,
                        dtype=next(iter(bundles.values())).info.dtype, quiet=True)
        rt = ClassRuntime(lm, bundles)
    return TorchBackend(rt, max_batch=settings.max_batch, identity=rt.lm.identity)


# -- for the backends that export a file per class (llama.cpp, onnx) ----------------------------------


@dataclass
class Classes:
    """The classes to serve, as a backend that writes a file per class needs them: each class's bundle and
    its file's digest (what names its exported file), the router where there is one, and the base model
    (loaded, checked against the router or each bundle)."""

    lm: LoadedModel
    router: Router | None
    bundles: dict[str, Bundle]
    digests: dict[str, str]


def read_classes(settings: ServeSettings, say: Callable[[str], None]) -> Classes:
    if settings.router is not None:
        router = read_router(settings.router)
        paths = dict(zip(router.info.classes, router.bundle_paths()))
        bundles = {n: read_bundle(p, load_kv=False) for n, p in paths.items()}
        base = settings.model or router.info.base_model
    else:
        router, bundles = None, class_bundles(settings.bundles)
        paths = dict(zip(bundles, settings.bundles))
        base = settings.model or next(iter(bundles.values())).info.base_model
    say(f"loading the base model {base} ...")
    lm = load_model(base, gguf_file=settings.gguf_file, dtype=next(iter(bundles.values())).info.dtype, quiet=True)
    if router is not None:
        check_router(router, lm)
    for name, bundle in bundles.items():
        check_bundle(lm, bundle.info, str(paths[name]))
    return Classes(lm, router, bundles, {n: bundle_digest(p)[:16] for n, p in paths.items()})


def export_each(c: Classes, directory: str | None, name: Callable[[str, str], str],
                write: Callable[[Bundle | None, Path], Path | None], say: Callable[[str], None]) -> tuple[Path, dict]:
    """Each class's file (and the full model's, bundle None) in `directory` (a temporary folder without one):
    named by `name(group, digest)` (the bundle file's digest, the model's fingerprint for the full model), so
    a later start finds it again, and written by `write(bundle, path)` where missing (it may return another
    path: the base model's own file, say). Returns the folder and {group: path}."""
    folder = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="griffin-serve-"))
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for group, bundle in [*c.bundles.items(), (FULL_MODEL, None)]:
        path = folder / name(group, c.digests[group] if bundle is not None else c.lm.fingerprint[:16])
        if not path.exists():
            say(f"writing {path} ...")
            path = write(bundle, path) or path
        out[group] = path
    return folder, out


def route_on(lm: LoadedModel, router: Router, guard: bool, ids: torch.Tensor) -> tuple[str, dict]:
    """A prompt's group from the router on the PyTorch base model's first layers (RoutedRuntime.route's)."""
    r = route(lm, router, ids.to(lm.device))
    used = None if guard and r.guarded else r.name
    return (FULL_MODEL if used is None else used), _route_fields(r, used)
