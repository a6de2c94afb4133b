"""What a runtime gives the speed benchmark (evaluation/speed.py): for one configuration (the full
model, or a bundle), a decoder that times n greedy steps from the prompt's KV cache. Every runtime
module has `bench_rows(ctx, variant, bundle) -> {config suffix: BenchRow}`; the benchmark builds
the context once and interleaves every row's repeats, so the runtimes only say how they decode.

A runtime whose variants keep their KV cache in a type of their choosing lists them in
`BENCH_KV_DTYPES` ({variant: the KV types it takes}) and takes `kv_dtype=` in bench_rows (None: its
default); each row says what one decode step reads (its weights at their own precision, its KV
type), so the benchmark can bound each row by what it reads."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..model.load import LoadedModel
from ..settings import BenchSettings


@dataclass
class BenchContext:
    """The prompt and model every row decodes from, and where rows may write their files."""

    lm: LoadedModel  # the full model, never modified (rows copy it)
    ids: torch.Tensor  # [1, T] the prompt
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # the full model's KV of the prompt, per layer
    first: int  # the first decoded token (the full model's greedy choice after the prompt)
    settings: BenchSettings
    tmp: Path  # a folder that lives as long as the benchmark
    # files a row made that another row may reuse (e.g. an exported graph), by key
    made: dict[tuple, object] = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def room(self) -> int:
        """Positions a decoder needs: the prompt, the timed tokens, a little spare."""
        return self.prompt_len + self.settings.new_tokens + 8

    def once(self, key: tuple, make: Callable[[], object]):
        """make() the first time `key` is asked for, the same object after."""
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]


# bytes one cached key or value element takes, by KV type (llama.cpp's Q8_0: 32 int8 and a float16 scale)
KV_VALUE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "F32": 4.0, "F16": 2.0, "Q8_0": 34 / 32}


@dataclass
class BenchRow:
    decode_seconds: Callable[[int], float]  # n greedy steps from the prompt's KV -> seconds
    file_bytes: int | None = None  # the graph or GGUF the row runs, where it runs one
    prefill: Callable[[], object] | None = None  # one prefill of the prompt, where the row's prefill is timed
    vs: str = "full"  # the config this row's speed-up is measured against (the same runtime's)
    info: dict[str, object] = field(default_factory=dict)  # what ran it (versions, provider), for the header
    # what one decode step reads: the weights at their own precision (None: the model's parameters at its
    # dtype, as PyTorch holds them), and the KV cache's type ("": the model's dtype) and bytes per value
    weight_bytes: int | None = None
    kv: str = ""
    kv_label: str = ""  # the KV type in the runtime's own words, where they differ (llama.cpp: F16, Q8_0)


def greedy_seconds(step: Callable[[int], torch.Tensor], first: int, n: int, device: torch.device | None = None) -> float:
    """Seconds of n greedy steps (step: token -> logits [vocab]), the GPU's queue drained at the end."""
    tok = first
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(step(tok).argmax())
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median time of `repeats` calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
