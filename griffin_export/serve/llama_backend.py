"""The llama.cpp backend: each class's pruned GGUF (targets/gguf_export.py) and the base GGUF for the
full model, each in a llama_cpp.Llama of its own. No weights are shared: every class is a whole model
(its attention, embeddings and head included) and a KV context of its own. llama-cpp-python's Llama
decodes one sequence at a time, so a class answers its requests one after another; classes take turns
step by step (the engine's round-robin), each on its own model.

The GGUF files are written at start into `gguf_dir` (a temporary folder without one), named by each
bundle's digest so a later start finds them again. Routing (model "auto") runs on the PyTorch base
model's first layers, as the router was made; the PyTorch model is kept for it only where there is a
router. The tokenizer is the base model's, as the GGUF carries it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import GriffinError
from ..model.decoding import eos_ids
from ..model.load import use_threads
from ..runtime.llama_cpp import gguf_for
from ..settings import ServeSettings
from ..targets.gguf_export import last_log_line, stderr_to
from .backends import FULL_MODEL, Backend, export_each, read_classes, route_on


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    max_batch = 1

    def __init__(self, lm, files: dict[str, Path], *, router=None, guard: bool = True, threads: int | None = None,
                 log: Path):
        import llama_cpp

        super().__init__(lm.tokenizer, eos_ids(lm.config, lm.tokenizer), lm.context_length,
                         [g for g in files if g != FULL_MODEL], routes=router is not None, identity=lm.identity)
        self.router, self.guard = router, guard
        self.lm = lm if router is not None else None  # the PyTorch model routes; without a router it goes
        n = threads or os.cpu_count() or 1
        self.llms: dict[str, object] = {}
        for group, path in files.items():
            try:
                with stderr_to(log):  # llama.cpp logs its load from C
                    self.llms[group] = llama_cpp.Llama(str(path), n_ctx=self.context_length or 0, n_threads=n,
                                                       n_threads_batch=n, verbose=False)
            except ValueError as e:
                raise GriffinError(f"llama.cpp could not load {path.name}: {last_log_line(log) or e}") from None
        self._logits = llama_cpp.llama_get_logits
        self.files = files

    def route(self, ids: torch.Tensor) -> tuple[str, dict]:
        return route_on(self.lm, self.router, self.guard, ids)

    def _last_logits(self, llm) -> torch.Tensor:
        raw = np.ctypeslib.as_array(self._logits(llm.ctx), shape=(llm.n_vocab(),))
        return torch.from_numpy(raw.astype(np.float32))[None]

    def start(self, group: str, batch: list[torch.Tensor], room: int):
        if len(batch) != 1:
            raise GriffinError("the llama.cpp backend decodes one sequence per class at a time")
        llm = self.llms[group]
        llm.reset()
        llm.eval(batch[0][0].tolist())
        return llm, self._last_logits(llm)

    def step(self, group: str, state, tokens: list[int], keep: list[int]) -> torch.Tensor:
        state.eval(tokens)
        return self._last_logits(state)

    def close(self) -> None:
        for llm in self.llms.values():
            llm.close()
        self.llms = {}


def load_llama_cpp(settings: ServeSettings, report: Callable[[str], None] | None = None) -> LlamaCppBackend:
    """Each class's pruned GGUF (written where missing) and the base GGUF, in llama.cpp."""
    say = report or (lambda line: None)
    use_threads(settings.threads)
    c = read_classes(settings, say)
    folder, files = export_each(c, settings.gguf_dir, lambda group, tag: f"{group}-{tag}.{settings.gguf_quant}.gguf",
                                lambda bundle, path: gguf_for(c.lm, path, bundle, settings.gguf_quant,
                                                              settings.threads), say)
    say(f"loading {len(files)} GGUF files in llama.cpp ...")
    return LlamaCppBackend(c.lm, files, router=c.router, guard=settings.guard, threads=settings.threads,
                           log=folder / "llama.cpp.log")
