"""What each job is asked to do: export, class export, decoding, 4-bit quantization, the
benchmark. Each dataclass validates its fields once, where it is made. No torch here: the CLI
takes its options' defaults from these fields (`defaults`), so `--help` shows what the library
does without loading anything heavy, and there is one place for each default.
(The evaluation's settings live beside it, in evaluation/settings.py, on the same terms.)"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

from .choices import (
    AGGREGATION_SUMMARIES,
    CHUNK_SIZE,
    CLASS_METHODS,
    DEFAULT_AGGREGATION,
    DENSITY,
    GGUF_QUANT,
    GGUF_QUANTS,
    METHODS,
    QUANT_ACCURACY_LEVEL,
    QUANT_ALGORITHM,
    QUANT_ALGORITHMS,
    QUANT_BLOCK_SIZE,
    QUANT_SCHEMES,
    REFIT,
    REFIT_LAMBDA,
    RUNTIMES,
)
from .errors import GriffinError


def defaults(cls) -> dict[str, object]:
    """{field: default} of a settings dataclass (factories called; fields without one left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# -- the checks the settings share ---------------------------------------------------------


def check_density(density: float) -> float:
    if not 0.0 < density <= 1.0:
        raise GriffinError(f"density must be in (0, 1], got {density}")
    return density


def one_of(value: str, known, what: str) -> str:
    """`value` if it is one of `known`, else a one-line error naming what was asked for."""
    if value not in known:
        raise GriffinError(f"unknown {what} {value!r}; known: {', '.join(known)}")
    return value


def check_method(method: str) -> str:
    return one_of(method, METHODS, "method")


def check_aggregation_name(name: str) -> str:
    return one_of(name, AGGREGATION_SUMMARIES, "aggregation")


def check_gguf_quant(quant: str) -> str:
    return one_of(quant, GGUF_QUANTS, "--quant")


def require_llama_cpp():
    """llama-cpp-python's module, or a one-line error naming the extra."""
    try:
        import llama_cpp
    except ImportError:
        raise GriffinError("quantizing a GGUF needs llama-cpp-python: pip install -e \".[llama]\" "
                           "(or --quant F32, written without it)") from None
    return llama_cpp


# -- export and class export ---------------------------------------------------------------


@dataclass
class ExportSettings:
    density: float = DENSITY
    method: str = "topk"
    seed: int = 0
    chunk_size: int = CHUNK_SIZE  # prefill chunk; the statistic is the same for any chunking
    keep_kv: bool = True
    chat: bool = False
    refit_lambda: float = REFIT_LAMBDA  # ridge strength of topk_refit
    # Tokens decoded greedily by the FULL model at export, after the prompt: their activations join
    # the statistic (and the refit's Gram), the bundle stores them and their KV, and generation from
    # the bundle's own prompt starts with them (issue 8: pruned outputs drift in their first tokens).
    warmup: int = 0

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.warmup < 0:
            raise GriffinError(f"warm-up must be >= 0 tokens, got {self.warmup}")
        check_density(self.density)
        if self.chunk_size < 1:
            raise GriffinError(f"chunk size must be >= 1, got {self.chunk_size}")
        if not self.refit_lambda > 0:
            raise GriffinError(f"refit lambda must be > 0, got {self.refit_lambda}")


@dataclass
class ClassSettings:
    name: str
    aggregation: str = DEFAULT_AGGREGATION
    density: float = DENSITY
    method: str = "topk"
    seed: int = 0
    chunk_size: int = CHUNK_SIZE  # prefill chunk; the statistic is the same for any chunking
    chat: bool = False
    refit_lambda: float = REFIT_LAMBDA  # ridge strength of the refit methods (refit.py)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise GriffinError("a class needs a name (--name)")
        check_aggregation_name(self.aggregation)
        if self.method not in CLASS_METHODS:
            raise GriffinError(f"method {self.method!r} does not use the prompts; a class takes one of "
                               f"{', '.join(CLASS_METHODS)}")
        self.export_settings()  # density, chunk size, lambda: checked where export checks them

    @property
    def refit(self) -> bool:
        return self.method in REFIT

    def export_settings(self) -> ExportSettings:
        return ExportSettings(density=self.density, method=self.method, seed=self.seed, chunk_size=self.chunk_size,
                              keep_kv=False, chat=self.chat, refit_lambda=self.refit_lambda)


# -- decoding ------------------------------------------------------------------------------


@dataclass
class DecodeOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise GriffinError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise GriffinError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise GriffinError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(s == "" for s in self.stop):
            raise GriffinError("an empty stop string would stop before the first token; give a non-empty --stop")


# -- 4-bit ONNX graphs ---------------------------------------------------------------------

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0 = unset (the kernel's default: float32), 1 fp32, 2 fp16, 3 bf16, 4 int8


@dataclass(frozen=True)
class QuantSettings:
    """How `griffin-export onnx --quantize int4` quantizes (onnx_quant.py)."""

    scheme: str = "int4"
    block_size: int = QUANT_BLOCK_SIZE
    accuracy_level: int = QUANT_ACCURACY_LEVEL
    symmetric: bool = False  # asymmetric (a zero point per block), like Q4_1
    lm_head: bool = True
    algorithm: str = QUANT_ALGORITHM

    def __post_init__(self) -> None:
        one_of(self.scheme, QUANT_SCHEMES, "quantization")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise GriffinError(f"--block-size must be a power of 2, at least 16; got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise GriffinError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))}; "
                               f"got {self.accuracy_level}")
        one_of(self.algorithm, QUANT_ALGORITHMS, "--algorithm")
        if self.algorithm == "hqq" and self.symmetric:
            raise GriffinError("hqq fits a float zero point per block; it has no symmetric form")


# -- the benchmark -------------------------------------------------------------------------


@dataclass
class BenchSettings:
    densities: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    methods: list[str] = field(default_factory=lambda: ["topk"])  # selection methods, each at every density
    data: str | None = None  # JSONL with an `article` field; None: bench.DEFAULT_DATA in this folder or one above
    row: int = 0
    new_tokens: int = 64
    repeats: int = 5
    threads: int | None = None
    runtimes: list[str] = field(default_factory=lambda: ["torch"])  # of choices.RUNTIMES
    onnx_provider: str = "cpu"  # ONNX Runtime provider, of choices.PROVIDERS
    quantize: QuantSettings = field(default_factory=QuantSettings)  # the -int4 rows' quantization
    gguf_quant: str = GGUF_QUANT  # the llama.cpp rows' file type, base and pruned alike
    time_export: bool = True  # also time export vs a plain prefill (writes the bundle each repeat)

    def __post_init__(self) -> None:
        if not self.runtimes:
            raise GriffinError(f"bench needs at least one runtime; known: {', '.join(RUNTIMES)}")
        for r in self.runtimes:
            one_of(r, RUNTIMES, "runtime")
        if "genai" in self.runtimes:
            import importlib.util

            if importlib.util.find_spec("onnxruntime_genai") is None:
                raise GriffinError("--runtime genai needs onnxruntime-genai: pip install --no-deps onnxruntime-genai")
        if "llama.cpp" in self.runtimes:
            check_gguf_quant(self.gguf_quant)
            require_llama_cpp()
        if not self.methods or not self.densities:
            raise GriffinError("bench needs at least one selection method and one density")
        if self.row < 0 or self.new_tokens < 1 or self.repeats < 1:
            raise GriffinError(f"bench needs --row >= 0, --new-tokens >= 1 and --repeats >= 1; got {self.row}, "
                               f"{self.new_tokens}, {self.repeats}")
        for m in self.methods:
            check_method(m)
        for d in self.densities:  # refused here, before the model loads, not after the first timings
            check_density(d)
