"""llama.cpp (through llama-cpp-python) on a bundle's pruned GGUF (targets/gguf_export.py), beside
the base GGUF at the same file type: what a CPU user runs instead of this project's runtimes.

Its KV cache type is the context's (type_k / type_v; a GGUF file does not carry one): F16 by
default, F32, or Q8_0 (blocks of 32 int8 with a float16 scale each, chosen per block as the cache is
written). A quantized V cache needs flash attention, so the Q8_0 rows run with it; the F16 and F32
rows run without, llama-cpp-python's default and the faster here (F16, 2 threads, the full Q4_1 model:
61.8 against 56.5 tok/s at 1,774 prompt tokens, 72.8 against 70.4 at 999; docs/speed.md), so the F16
row every other row is compared with is llama.cpp at its best."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..bundle.format import Bundle
from ..errors import GriffinError
from ..model.load import LoadedModel
from ..settings import LLAMA_KV_TYPE, LLAMA_KV_TYPES
from ..targets.gguf_export import base_gguf, file_type, last_log_line, llama_quantize, stderr_to, write_pruned_gguf
from .timing import BenchContext, BenchRow

QUANTIZED_V = {"Q8_0"}  # KV types llama.cpp takes only with flash attention ("quantized V cache requires flash_attn")


class LlamaCpp:
    """A GGUF in llama.cpp, the prompt evaluated once and its state saved, so each timed run decodes
    from the same KV as the other runtimes' rows."""

    def __init__(self, path: Path, prompt: list[int], threads: int | None, room: int, log: Path,
                 kv_dtype: str = LLAMA_KV_TYPE):
        import llama_cpp

        n = threads or os.cpu_count() or 1
        name = LLAMA_KV_TYPES[kv_dtype]
        kv = getattr(llama_cpp, f"GGML_TYPE_{name}")
        try:
            with stderr_to(log):  # llama.cpp logs its load from C
                self.llm = llama_cpp.Llama(str(path), n_ctx=room, n_threads=n, n_threads_batch=n, verbose=False,
                                           type_k=kv, type_v=kv, flash_attn=name in QUANTIZED_V)
        except ValueError as e:  # llama-cpp-python's word for a file llama.cpp refused
            raise GriffinError(f"llama.cpp could not load {path.name}: {last_log_line(log) or e}") from None
        self.llm.eval(prompt)
        self.state = self.llm.save_state()
        self.n_vocab = self.llm.n_vocab()
        self._get_logits = llama_cpp.llama_get_logits  # bound once, outside the timed loop

    def _next(self) -> int:
        # the last position's logits from the context (without logits_all, Llama.eval leaves
        # its `scores` at zero)
        return int(np.argmax(np.ctypeslib.as_array(self._get_logits(self.llm.ctx), shape=(self.n_vocab,))))

    def decode_seconds(self, n: int) -> float:
        self.llm.load_state(self.state)
        tok = self._next()
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = self._next()
        return time.perf_counter() - t0


def gguf_for(lm: LoadedModel, path: Path, bundle: Bundle | None, quant: str, threads: int | None) -> Path:
    """The GGUF llama.cpp runs for a config: the base GGUF itself when it already has the file type
    (what a user runs), else the base requantized by llama.cpp; a bundle's pruned GGUF."""
    base = base_gguf(lm.identity, None, None)
    if bundle is not None:
        return write_pruned_gguf(bundle, base, path, quant, threads=threads)
    if file_type(base) == quant:
        return base
    llama_quantize(base, path, quant, threads)
    return path


def step_read_bytes(path: Path) -> int:
    """Bytes of weights one decode step reads from a GGUF, at their own types: every tensor, except a
    token embedding that an output head of its own leaves to be read one row at a time."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


BENCH_KV_DTYPES = {"llama.cpp": tuple(LLAMA_KV_TYPES)}  # runtime/timing.py


def bench_rows(ctx: BenchContext, variant: str, bundle: Bundle | None, kv_dtype: str | None = None
               ) -> dict[str, BenchRow]:
    import llama_cpp

    s = ctx.settings
    kv = kv_dtype or LLAMA_KV_TYPE
    n = sum(1 for key in ctx.made if key[0] == "gguf")  # files named per config: two densities must not collide
    path = ctx.once(("gguf", id(bundle)), lambda: gguf_for(ctx.lm, ctx.tmp / f"llama.cpp-{n}.gguf", bundle,
                                                           s.gguf_quant, s.threads))
    llm = LlamaCpp(path, ctx.ids[0].tolist(), s.threads, ctx.room, ctx.tmp / "llama.cpp.log", kv)
    info = {"gguf_quant": s.gguf_quant, "llama_cpp_python": llama_cpp.__version__}
    return {"": BenchRow(llm.decode_seconds, path.stat().st_size, info=info, weight_bytes=step_read_bytes(path), kv=kv,
                         kv_label=LLAMA_KV_TYPES[kv])}
