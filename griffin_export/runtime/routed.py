"""Serving mixed traffic with class experts: one base model in memory, each class adding only its FF
slices, a router that picks a prompt's class from a partial prefill, a guard that sends a prompt that
fits no class to the full model, and prompts of one class decoded together.

    rt = load_routed("classes/router.safetensors")
    gens = rt.generate_batch(["Summarize: ...", "def parse(...):"], DecodeOptions(max_new_tokens=64))
    gens[0].extra     # {"class": "class-2", "guarded": False, "similarity": 0.91, "margin": 0.12}

A prompt's prefill runs through its class's experts (what a standalone class checkpoint computes:
the pruned prefill is where classes speed up the prefill too), then its decoding does. A guarded
prompt runs the full model throughout.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence

import torch

from ..bundle.experts import check_bundle
from ..bundle.format import Bundle, read_bundle
from ..classes.router import Route, Router, check_router, read_router, route
from ..errors import GriffinError
from ..model.arch import ff_blocks, ff_modules, per_layer, put_ff, sliced_linears
from ..model.decoding import Generation
from ..model.load import LoadedModel, load_model
from ..model.prefill import prefill
from ..model.tokens import check_context, tokenize
from ..settings import DecodeOptions
from .base import BatchStats
from .lean import FFPacks, LeanDecoder, ff_packs
from .pytorch import TorchDecoding

__all__ = ["ExpertSet", "RoutedRuntime", "load_routed"]

FULL = None  # the full model's FF linears, in an ExpertSet


class ExpertSet:
    """A base model and the FF experts of several class bundles. One class's linears are in the model
    at a time (`activate`): a swap of modules, no copy; the attention weights, embeddings and head are
    held once for all. The lean step, where it covers the model, swaps its FF packs alike."""

    def __init__(self, lm: LoadedModel, bundles: dict[str, Bundle], *, lean: bool, kv_dtype: torch.dtype | None = None):
        self.lm, self.blocks = lm, ff_blocks(lm.model, lm.spec)
        self.modules: dict[str | None, list[dict]] = {FULL: ff_modules(self.blocks, lm.spec)}
        self.lean = LeanDecoder(lm.model, 0, kv_dtype=kv_dtype) if lean else None
        self.packs: dict[str | None, FFPacks] = {FULL: self.lean.ff()} if self.lean is not None else {}
        self.active: str | None = FULL
        for name, bundle in bundles.items():
            self.add(name, bundle)

    def add(self, name: str, bundle: Bundle) -> None:
        """One more set of experts (a class's, or a prompt's own), checked against the model."""
        check_bundle(self.lm, bundle.info, name)
        layers = per_layer(self.blocks, bundle.weights)
        self.modules[name] = [sliced_linears(b, self.lm.spec, {k: v.to(self.lm.device) for k, v in t.items()})
                              for b, t in zip(self.blocks, layers)]
        if self.lean is not None:
            self.packs[name] = ff_packs(self.modules[name], self.lm.spec)

    def remove(self, name: str) -> None:
        if self.active == name:
            self.activate(FULL)
        self.modules.pop(name)
        self.packs.pop(name, None)

    def activate(self, name: str | None) -> None:
        """This class's experts (FULL: the full model) in the model and the lean step from now on."""
        if name not in self.modules:
            raise GriffinError(f"no class {name!r}; the classes are {', '.join(n for n in self.modules if n)}")
        put_ff(self.blocks, self.modules[name])
        if self.lean is not None:
            self.lean.use_ff(self.packs[name])
        self.active = name

    def bytes(self, name: str | None) -> int:
        """What a class's FF linears hold (the full model's: its whole FF)."""
        return sum(t.numel() * t.element_size() for layer in self.modules[name] for m in layer.values()
                   for t in m.parameters())


class RoutedRuntime(TorchDecoding):
    """Generates for any prompt with its class's experts (router + guard), batching each class's prompts."""

    def __init__(self, lm: LoadedModel, router: Router, *, guard: bool = True, lean: bool | None = None,
                 kv_dtype: str | None = None):
        check_router(router, lm)
        self.router, self.guard = router, guard
        self.bundle = None
        self._init_decoding(lm, lean, compile=False, kv_dtype=kv_dtype)
        bundles = {name: read_bundle(path, load_kv=False)
                   for name, path in zip(router.info.classes, router.bundle_paths())}
        lean_on = self._lean_settings is not None
        self.experts = ExpertSet(lm, bundles, lean=lean_on, kv_dtype=self._lean_settings["kv_dtype"] if lean_on else None)
        self.lean = self.experts.lean

    def tokenize(self, text: str) -> torch.Tensor:
        return tokenize(self.lm, text, chat=self.router.info.chat)

    def route(self, ids: torch.Tensor) -> Route:
        """The prompt's class, from the first layers of a full-model prefill."""
        self.experts.activate(FULL)
        return route(self.lm, self.router, ids)

    def choice(self, r: Route) -> str | None:
        """The experts a routed prompt runs with: its class's, or the full model's when the guard fires."""
        return FULL if self.guard and r.guarded else r.name

    def start(self, ids: torch.Tensor | None = None):
        """The prompt's prefill through the experts in the model (the active class's)."""
        if ids is None:
            raise GriffinError("a routed runtime has no prompt of its own: give it a prompt")
        check_context(self.lm.context_length, ids.shape[1])
        return prefill(self.lm.model, ids)

    def _batch_prefill_ff(self) -> AbstractContextManager[None]:
        return nullcontext()  # the active class's experts: the prefill is pruned too

    def generate(self, opts: DecodeOptions | None = None, *, prompt: str | None = None,
                 ids: torch.Tensor | None = None, on_text=None) -> Generation:
        """One prompt: routed, guarded, prefilled and decoded with its experts; `extra` says which."""
        if ids is None:
            if prompt is None:
                raise GriffinError("a routed runtime has no prompt of its own: give it a prompt")
            ids = self.tokenize(prompt)
        r = self.route(ids)
        self.experts.activate(self.choice(r))
        out = super().generate(opts, ids=ids, on_text=on_text)
        out.extra.update(_route_fields(r, self.choice(r)))
        return out

    def generate_batch(self, prompts: Sequence[str | torch.Tensor], opts: DecodeOptions | None = None, *,
                       batch_size: int = 8, on_done: Callable[[int, Generation], None] | None = None,
                       names: Sequence[str] | None = None, stats: BatchStats | None = None) -> list[Generation]:
        """Every prompt routed first (the guard applied), then each class's prompts generated together,
        `batch_size` at a time, in input order within the class; `on_done(index, generation)` as each
        finishes, its `extra` saying the class and whether the guard fired."""
        opts = opts or DecodeOptions()
        ids = self.checked_ids(prompts, opts, names)
        routes = [self.route(x) for x in ids]
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(routes):
            groups.setdefault(self.choice(r), []).append(i)
        results: list[Generation | None] = [None] * len(ids)
        for name, members in groups.items():
            self.experts.activate(name)

            def done(j: int, gen: Generation, members=members) -> None:
                i = members[j]
                gen.extra.update(_route_fields(routes[i], self.choice(routes[i])))
                results[i] = gen
                if on_done is not None:
                    on_done(i, gen)

            super().generate_batch([ids[i] for i in members], opts, batch_size=batch_size, on_done=done,
                                   names=[names[i] for i in members] if names is not None else None, stats=stats)
        return results  # type: ignore[return-value]


def _route_fields(r: Route, used: str | None) -> dict:
    return {"class": used if used is not None else "full", "routed": r.name, "guarded": used is None and r.guarded,
            "similarity": round(r.similarity, 4), "margin": round(r.margin, 4) if r.margin != float("inf") else None}


def load_routed(router: str | os.PathLike | Router, model: LoadedModel | str | None = None, *,
                gguf_file: str | None = None, device: str = "cpu", guard: bool = True, lean: bool | None = None,
                quiet: bool = True, kv_dtype: str | None = None) -> RoutedRuntime:
    """A router file (with its class bundles beside it) on its base model (the one it records unless
    `model` says otherwise; checked by fingerprint, and the bundles by digest)."""
    if not isinstance(router, Router):
        router = read_router(router)
    if not isinstance(model, LoadedModel):
        model = load_model(model or router.info.base_model, gguf_file=gguf_file, device=device, quiet=quiet)
    return RoutedRuntime(model, router, guard=guard, lean=lean, kv_dtype=kv_dtype)
