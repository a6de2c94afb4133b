"""The ONNX Runtime backend: a graph per class (its experts baked in) and one of the full model, each in
a session of its own (runtime/onnx.OnnxRuntime), on CUDA where a GPU answers, else the CPU. Every
session holds its own copy of the weights the classes share (attention, embeddings, head): nothing is
shared between sessions here. Lean graphs (the Llama family) decode in continuous batches, rows joining
at a step boundary, as the PyTorch backend's do; traced graphs in windowed ones (a new batch when none
runs). Every prompt is prefilled through its group's own graph, as the PyTorch backend's classes are.

The graphs are written at start into `onnx_dir` (a temporary folder without one), named by each bundle's
digest so a later start finds them again. Routing (model "auto") runs on the PyTorch base model's first
layers, kept for it only where there is a router.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..model.decoding import eos_ids
from ..model.load import LoadedModel, use_threads
from ..runtime.onnx import OnnxRuntime
from ..settings import ServeSettings
from .backends import FULL_MODEL, Backend, export_each, read_classes, route_on


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, lm: LoadedModel, graphs: dict[str, Path], *, router=None, guard: bool = True,
                 max_batch: int, threads: int | None):
        self.sessions = {g: OnnxRuntime(path, provider="auto", threads=threads, pruned_prefill=True)
                         for g, path in graphs.items()}
        # a request must fit the graphs' KV buffers as well as the model's context
        room = min(s.graph.info.max_length or lm.context_length or 0 for s in self.sessions.values())
        super().__init__(lm.tokenizer, eos_ids(lm.config, lm.tokenizer), room or lm.context_length,
                         [g for g in graphs if g != FULL_MODEL], routes=router is not None, identity=lm.identity)
        self.router, self.guard = router, guard
        self.lm = lm if router is not None else None  # the PyTorch model routes; without a router it goes
        self.max_batch = max_batch
        self.joins = all(s.joins_batches for s in self.sessions.values())
        self.provider = next(iter(self.sessions.values())).describe()

    def route(self, ids: torch.Tensor) -> tuple[str, dict]:
        return route_on(self.lm, self.router, self.guard, ids)

    def start(self, group: str, batch: list[torch.Tensor], room: int):
        return self.sessions[group].start_batch([x.cpu() for x in batch], room)

    def join(self, group: str, state, new, room: int):
        return self.sessions[group].join_batch(state, new, room)

    def step(self, group: str, state, tokens: list[int], keep: list[int]) -> torch.Tensor:
        return self.sessions[group].step_batch(state, tokens, keep)


def load_onnx(settings: ServeSettings, report: Callable[[str], None] | None = None) -> OnnxBackend:
    """Each class's graph and the full model's (written where missing), each in an ONNX Runtime session."""
    from ..targets.onnx.export import export_onnx

    say = report or (lambda line: None)
    use_threads(settings.threads)
    c = read_classes(settings, say)
    # the experts go into the model for an export, and out again
    _, graphs = export_each(c, settings.onnx_dir, lambda group, tag: f"{group}-{tag}",
                            lambda bundle, path: export_onnx(c.lm, path, bundle), say)
    say(f"opening {len(graphs)} ONNX Runtime sessions ...")
    return OnnxBackend(c.lm, graphs, router=c.router, guard=settings.guard, max_batch=settings.max_batch,
                       threads=settings.threads)
