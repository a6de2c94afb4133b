"""What each job is asked to do: export, class export, decoding, 4-bit quantization, the
benchmark. Each dataclass validates its fields once, where it is made. No torch here: the CLI
takes its options' defaults from these fields (`defaults`), so `--help` shows what the library
does without loading anything heavy, and there is one place for each default. The choices they
validate against are the registries' (registry.py).
(The evaluation's settings live beside it, in evaluation/settings.py, on the same terms.)"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

from .errors import GriffinError
from .registry import (AGGREGATIONS, BENCH_RUNTIMES, CLASS_METHODS, DEFAULT_AGGREGATION, DEFAULT_METHOD,
                       DEFAULT_SERVE_BACKEND, GENERATE_RUNTIMES, METHODS, RUNTIMES, SERVE_BACKENDS, bench_runtime,
                       method, one_of)

__all__ = ["BenchSettings", "ClassSettings", "CountSettings", "DecodeOptions", "ExportSettings", "QuantSettings",
           "RuntimeOptions", "ServeSettings"]

DENSITY = 0.5  # fraction of FF neurons kept per layer
CHUNK_SIZE = 512  # prefill chunk (tokens); the statistic is the same for any chunking
REFIT_LAMBDA = 1.0  # the refit's ridge strength relative to the mean activation energy; chosen on dev rows 0-5
# Tokens the full model writes at export before the experts take over: the best measured setting whose export
# cost scales to large models (docs/methods.md, "Which method"); 0 = the paper's method exactly
WARMUP = 8

# the XSum prompts shipped with the repository (bench/data/README.md): eval's and bench's data when none is given
DEFAULT_DATA = "bench/data/xsum_dev.jsonl"

# `griffin-export onnx --graph`: auto = lean where the adapter table covers the architecture
LAYOUTS = ("auto", "lean", "traced")
# ONNX Runtime execution providers (runtime/onnx.choose_provider): auto = CUDA where it answers, else the CPU
PROVIDERS = ("auto", "cpu", "cuda")

# `griffin-export onnx --quantize` (targets/onnx/int4.py): schemes, and the defaults measured in the docs
QUANT_SCHEMES = ("int4",)
# how the 4-bit values are chosen, both ONNX Runtime's: rtn = round to nearest (an integer zero point
# per block), hqq = half-quadratic quantization (a float zero point per block, iteratively fitted)
QUANT_ALGORITHMS = ("rtn", "hqq")
QUANT_ALGORITHM = "rtn"
QUANT_BLOCK_SIZE = 32  # as llama.cpp's Q4_0/Q4_1 blocks
QUANT_ACCURACY_LEVEL = 4  # MatMulNBits with int8 activations: ONNX Runtime's fast CPU path

# The lean decode paths' KV cache type (`griffin-export onnx/generate/bench --kv-dtype`): float32, float16
# (half the bytes a step reads from the cache), int8 (a quarter: ONNX Runtime's GroupQueryAttention with a
# float32 scale per KV head and channel; the lean ONNX graphs only). Each path's default was chosen by
# measuring speed and quality (docs/speed.md, "KV cache types").
KV_DTYPES = ("float32", "float16", "int8")
KV_DTYPE = "float32"  # the lean ONNX graphs' (`griffin-export onnx`), for a float32 model (a float16 one keeps its own)
TORCH_KV_DTYPES = ("float32", "float16")  # the lean PyTorch step's (runtime/lean.py)
TORCH_KV_DTYPE = "float32"  # for a float32 model; a half-precision model's cache keeps its dtype
# what llama.cpp calls them (its context's type_k / type_v): the bench's llama.cpp rows take the same names
LLAMA_KV_TYPES = {"float32": "F32", "float16": "F16", "int8": "Q8_0"}
LLAMA_KV_TYPE = "float16"  # llama.cpp's own default (F16)

# `griffin-export checkpoint --gguf --quant` (targets/gguf_export.py): llama.cpp file types (F32: no quantizer)
GGUF_QUANTS = ("Q4_1", "Q4_K_M", "Q8_0", "F16", "F32")
GGUF_QUANT = "Q4_1"  # the default model's own type


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


def check_gguf_quant(quant: str) -> str:
    return one_of(quant, GGUF_QUANTS, "`quant`")


def check_kv_dtype(kv_dtype: str, where: tuple[str, ...] = KV_DTYPES, what: str = "") -> str:
    """kv_dtype if it is one of KV_DTYPES (and of `where`, the ones a path takes: `what` names it)."""
    one_of(kv_dtype, KV_DTYPES, "`kv_dtype`")
    if kv_dtype not in where:
        raise GriffinError(f"kv_dtype={kv_dtype!r} is not a KV type of {what}; it takes {', '.join(where)}")
    return kv_dtype


def default_threads() -> int:
    """torch's threads when none are asked for: every core but one (one on two cores). Measured on the
    2-core machine (bench/threads.py, docs/speed.md#threads): with another job running, one thread decoded
    1.10x as fast as two and exported as fast; two threads that spin between parallel regions fell to
    0.52x; on a quiet machine one thread decoded 1.13x as fast as two passive ones and exported 0.90x.
    Leaving a core to the rest of the machine is what kept the busy case from collapsing."""
    return max(1, (os.cpu_count() or 1) - 1)


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 prompt', '3 prompts' ('1 class', '3 classes' with nouns='classes')."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def require_runtime(name: str, what: str) -> None:
    """Refuse in one line, before any work, a runtime whose package is not installed."""
    import importlib.util

    rt = RUNTIMES[name]
    if rt.needs and importlib.util.find_spec(rt.needs) is None:
        raise GriffinError(f"{what} needs {rt.install}")


def require_llama_cpp():
    """llama-cpp-python's module, or a one-line error naming the extra."""
    try:
        import llama_cpp
    except ImportError:
        raise GriffinError("quantizing a GGUF needs llama-cpp-python: pip install -e \".[llama]\" "
                           "(or quant='F32', written without it)") from None
    return llama_cpp


# -- export and class export ---------------------------------------------------------------


@dataclass
class ExportSettings:
    """How a prompt's experts are chosen (export_prompt, `griffin-export export`): the fraction of FF
    neurons kept per layer, the selection method (registry.METHODS), the warm-up tokens the full model
    writes first, whether the bundle keeps the prompt's KV cache.

        ExportSettings(density=0.25, method="topk_refit", warmup=0)   # warmup=0: the paper's method exactly
    """

    density: float = DENSITY
    method: str = DEFAULT_METHOD  # of registry.METHODS
    seed: int = 0
    chunk_size: int = CHUNK_SIZE  # prefill chunk; the statistic is the same for any chunking
    keep_kv: bool = True
    chat: bool = False
    refit_lambda: float = REFIT_LAMBDA  # ridge strength of topk_refit
    # Tokens decoded greedily by the FULL model at export, after the prompt: their activations join
    # the statistic (and the refit's Gram), the bundle stores them and their KV, and generation from
    # the bundle's own prompt starts with them (issue 8: pruned outputs drift in their first tokens).
    warmup: int = WARMUP

    def __post_init__(self) -> None:
        method(self.method)
        if self.warmup < 0:
            raise GriffinError(f"warm-up must be >= 0 tokens, got {self.warmup}")
        check_density(self.density)
        if self.chunk_size < 1:
            raise GriffinError(f"chunk size must be >= 1, got {self.chunk_size}")
        if not self.refit_lambda > 0:
            raise GriffinError(f"refit lambda must be > 0, got {self.refit_lambda}")


@dataclass
class ClassSettings:
    """How a class's experts are chosen (export_class, `griffin-export class`): its name, how the
    prompts' statistics are aggregated (registry.AGGREGATIONS), the density and the method.

        ClassSettings("news", aggregation="pooled", density=0.5, method="topk_refit_edges")
    """

    name: str
    aggregation: str = DEFAULT_AGGREGATION  # of registry.AGGREGATIONS
    density: float = DENSITY
    method: str = DEFAULT_METHOD  # of registry.CLASS_METHODS
    seed: int = 0
    chunk_size: int = CHUNK_SIZE  # prefill chunk; the statistic is the same for any chunking
    chat: bool = False
    refit_lambda: float = REFIT_LAMBDA  # ridge strength of the refit methods (refit.py)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise GriffinError("a class needs a name (`name`)")
        one_of(self.aggregation, AGGREGATIONS, "aggregation")
        if self.method not in CLASS_METHODS:
            raise GriffinError(f"method {self.method!r} does not use the prompts; a class takes one of "
                               f"{', '.join(CLASS_METHODS)}")
        self.export_settings()  # density, chunk size, lambda: checked where export checks them

    @property
    def refit(self) -> bool:
        return METHODS[self.method].refit

    def export_settings(self) -> ExportSettings:
        """The per-prompt export these settings describe; a class bundle has no prompt of its own, so no
        KV and no warm-up."""
        return ExportSettings(density=self.density, method=self.method, seed=self.seed, chunk_size=self.chunk_size,
                              keep_kv=False, chat=self.chat, refit_lambda=self.refit_lambda, warmup=0)


@dataclass
class CountSettings:
    """Which of a class's prompts are counted, and where: here (in right-padded batches), or on a Ray
    cluster (classes/ray_engine.py), or only one shard of them for class-merge."""

    field: str = "prompt"  # the JSONL key holding the prompt
    limit: int | None = None  # only the first N prompts
    shard: str | None = None  # "I/N": the I-th of N slices, counted into a partial statistic
    batch_size: int = 1
    engine: str = "local"  # local | ray
    address: str | None = None  # ray: the cluster to join (None: a local cluster for this run)
    workers: int = 2  # ray: actors, each loading the model once
    gpus_per_worker: float = 0.0  # ray: 0 = CPU workers
    resume: bool = False  # local: continue an interrupted count from its checkpoint

    def __post_init__(self) -> None:
        one_of(self.engine, ENGINES, "engine")
        if self.limit is not None and self.limit < 1:
            raise GriffinError(f"`limit` must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise GriffinError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.engine != "ray" and (self.address or self.workers != 2 or self.gpus_per_worker):
            raise GriffinError("`address`, `workers` and `gpus_per_worker` are for engine='ray'")
        if self.workers < 1:
            raise GriffinError(f"`workers` must be >= 1, got {self.workers}")
        if not self.gpus_per_worker >= 0:
            raise GriffinError(f"`gpus_per_worker` must be >= 0, got {self.gpus_per_worker}")
        if self.resume and self.engine == "ray":
            raise GriffinError("resume=True continues a count made here; a Ray count is not checkpointed (count it in "
                               "shards to split a long run)")


ENGINES = ("local", "ray")


@dataclass
class DiscoverSettings:
    """How classes are found in a mixed log (classes/discover.py): how many (k, or None to choose it by
    `k_criterion` among 1..k_max), by which clustering of the prompts' statistics, and the router that
    sends a new prompt to its class from the first `router_layers` layers of a prefill. `guard_quantile`:
    a new prompt less like its class than this fraction of the class's own prompts falls back."""

    k: int | None = None
    k_max: int = 8
    # how k is chosen: `coverage`, the fewest classes past which one more keeps less than `min_gain` more of
    # each prompt's own experts (measured on dev rows: it found the five kinds of the mixed log, where the
    # silhouette lumped four of them together; bench/discovery_dev.py); or the cosine `silhouette`'s best
    k_criterion: str = "coverage"  # of K_CRITERIA
    min_gain: float = 0.003
    clustering: str = "kmeans"  # of CLUSTERINGS
    router_layers: int = 2
    guard_quantile: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        one_of(self.clustering, CLUSTERINGS, "clustering")
        one_of(self.k_criterion, K_CRITERIA, "`k_criterion`")
        if not 0 <= self.min_gain < 1:
            raise GriffinError(f"`min_gain` must be in [0, 1), got {self.min_gain}")
        if self.k is not None and self.k < 1:
            raise GriffinError(f"`k` must be >= 1 classes, got {self.k}")
        if self.k is None and self.k_max < 2:
            raise GriffinError(f"`k_max` must be >= 2 to choose among, got {self.k_max}")
        if self.router_layers < 1:
            raise GriffinError(f"`router_layers` must be >= 1, got {self.router_layers}")
        if not 0 <= self.guard_quantile < 1:
            raise GriffinError(f"`guard_quantile` must be in [0, 1), got {self.guard_quantile}")


# k-means on the unit-normalized statistics (cosine), or average-linkage agglomeration by cosine distance
CLUSTERINGS = ("kmeans", "agglomerative")
K_CRITERIA = ("coverage", "silhouette")


# -- decoding ------------------------------------------------------------------------------


@dataclass
class DecodeOptions:
    """How a runtime generates: greedy by default (temperature 0), else temperature + nucleus sampling
    seeded by `seed`; stop strings end the text (they are cut off), as end of sequence does.

        rt.generate(DecodeOptions(max_new_tokens=64, temperature=0.7, top_p=0.9, stop=["###"]))
    """

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int = 0
    stop_at_eos: bool = True
    # stop strings count only once the text has begun (past its leading whitespace): `eval` answers
    # this way, since a model often opens its answer with a newline that a "\n" stop would end at once
    stop_after_text: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise GriffinError(f"`max_new_tokens` must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise GriffinError(f"`temperature` must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise GriffinError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if any(s == "" for s in self.stop):
            raise GriffinError("an empty stop string would stop before the first token; give a non-empty stop=STRING")


@dataclass
class RuntimeOptions:
    """Which runtime decodes a bundle (registry.RUNTIMES, those that generate), and how. Each runtime
    takes its own options; one given to another runtime is refused rather than ignored."""

    runtime: str = "torch"
    # torch: the base model (None: the one the bundle records), the device, and the decode step: the
    # lean step where it covers the architecture (lean=None), transformers' forward (False), compiled
    model: str | None = None
    gguf_file: str | None = None
    device: str = "cpu"
    lean: bool | None = None
    compile: bool = False
    # onnx: the bundle's graph directory (griffin-export onnx), a graph of the full model for new
    # prompts' prefill (griffin-export onnx --full), and ONNX Runtime's execution provider
    graph_dir: str | None = None
    full_graph_dir: str | None = None
    provider: str = "auto"
    # torch: class experts chosen per prompt by a router (discover), beside its class bundles, instead of
    # one bundle; the guard sends a prompt that fits no class to the full model
    router: str | None = None
    guard: bool = True
    # both: prefill prompts through the experts too (what a standalone pruned checkpoint computes)
    pruned_prefill: bool = False
    threads: int | None = None  # torch threads (None: default_threads()); ONNX Runtime's (None: its own choice)
    # the KV cache's type: torch, the lean step's (None: TORCH_KV_DTYPE); onnx, the graph's own (exported
    # with it: a different one given here is refused)
    kv_dtype: str | None = None

    def __post_init__(self) -> None:
        one_of(self.runtime, GENERATE_RUNTIMES, "runtime")
        one_of(self.provider, PROVIDERS, "provider")
        if self.kv_dtype is not None:
            if self.runtime == "torch":
                check_kv_dtype(self.kv_dtype, TORCH_KV_DTYPES, "the lean PyTorch step")
            else:
                check_kv_dtype(self.kv_dtype)
            if self.lean is False:
                raise GriffinError("`kv_dtype` is the lean step's; lean=False decodes through transformers' forward, "
                                   "whose cache keeps the weights' dtype")
        if self.threads is not None and self.threads < 1:
            raise GriffinError(f"`threads` must be >= 1, got {self.threads}")
        if self.runtime == "onnx" and self.graph_dir is None:
            raise GriffinError("the onnx runtime needs graph_dir=DIR (a graph from `griffin-export onnx BUNDLE -o DIR`)")
        torch_only = {"model": self.model, "gguf_file": self.gguf_file, "lean": self.lean, "router": self.router,
                      "compile": self.compile or None, "device": None if self.device == "cpu" else self.device}
        onnx_only = {"graph_dir": self.graph_dir, "full_graph_dir": self.full_graph_dir,
                     "provider": None if self.provider == "auto" else self.provider}
        other = onnx_only if self.runtime == "torch" else torch_only
        given = [f"lean={value}" if name == "lean" else f"`{name}`" for name, value in other.items() if value is not None]
        if given:
            raise GriffinError(f"{', '.join(given)} {'is not an option' if len(given) == 1 else 'are not options'} of "
                               f"the {self.runtime} runtime")
        if self.router is not None and (self.compile or self.pruned_prefill):
            raise GriffinError("a router's classes prefill through their experts and decode in batches: compile=True "
                               "and pruned_prefill=True do not go with `router`")
        if self.lean is False and self.compile:
            raise GriffinError("compile=True compiles the lean step; lean=False turns it off: choose one")


# -- serving -------------------------------------------------------------------------------

SERVE_ENGINES = ("local", "ray")


@dataclass
class ServeSettings:
    """What `griffin-export serve` serves, on which backend (registry.SERVE_BACKENDS), and how: a router
    with its class bundles (model "auto" routes) or class bundles named per request; the full model is
    always served too. Loopback only unless `host` says otherwise; an optional API key (a Bearer token);
    a request body limit; SIGTERM drains: in-flight requests finish within `drain_s`, new ones get 503.

        ServeSettings(router="classes/router.safetensors", port=8000, api_key="...")
    """

    router: str | None = None
    bundles: Sequence[str] = ()
    backend: str = DEFAULT_SERVE_BACKEND
    model: str | None = None  # the base model (None: the one the router or bundles record)
    gguf_file: str | None = None
    device: str = "cpu"
    guard: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_batch: int = 16  # rows one class decodes together
    max_waiting: int = 256  # requests admitted but not decoding yet; past it: 429
    prefill_tokens: int = 2048  # prompt tokens one class prefills at a step boundary (at least one prompt)
    max_tokens: int = DecodeOptions.max_new_tokens  # a request that says none: this many, within the context
    drain_s: float = 30.0
    threads: int | None = None
    gguf_dir: str | None = None  # llama.cpp: where the classes' GGUF files are written, or found again
    gguf_quant: str = GGUF_QUANT
    onnx_dir: str | None = None  # onnx: where the classes' lean graphs are written, or found again
    engine: str = "local"  # local | ray (Ray Serve: `replicas` copies, on `address` or a local cluster)
    replicas: int = 2
    address: str | None = None

    def __post_init__(self) -> None:
        one_of(self.backend, SERVE_BACKENDS, "backend")
        one_of(self.engine, SERVE_ENGINES, "engine")
        if (self.router is None) == (not self.bundles):
            raise GriffinError("serve a `router` (griffin-export discover) or class `bundles`: one of the two")
        if not 0 <= self.port <= 65535:
            raise GriffinError(f"`port` must be in 0..65535 (0: any free port), got {self.port}")
        for name in ("max_body_bytes", "max_batch", "max_waiting", "prefill_tokens", "max_tokens", "replicas"):
            if getattr(self, name) < 1:
                raise GriffinError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not self.drain_s >= 0:
            raise GriffinError(f"`drain_s` must be >= 0 seconds, got {self.drain_s}")
        if self.threads is not None and self.threads < 1:
            raise GriffinError(f"`threads` must be >= 1, got {self.threads}")
        if self.api_key is not None and not self.api_key.strip():
            raise GriffinError("an empty `api_key` would let anyone in; give a key or none")
        check_gguf_quant(self.gguf_quant)
        if self.engine != "ray" and (self.address is not None or self.replicas != 2):
            raise GriffinError("`replicas` and `address` are for engine='ray'")
        if self.backend != "llama.cpp" and (self.gguf_dir is not None or self.gguf_quant != GGUF_QUANT):
            raise GriffinError("`gguf_dir` and `gguf_quant` are for backend='llama.cpp'")
        if self.backend != "onnx" and self.onnx_dir is not None:
            raise GriffinError("`onnx_dir` is for backend='onnx'")


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
            raise GriffinError(f"`block_size` must be a power of 2, at least 16; got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise GriffinError(f"`accuracy_level` must be one of {', '.join(map(str, ACCURACY_LEVELS))}; "
                               f"got {self.accuracy_level}")
        one_of(self.algorithm, QUANT_ALGORITHMS, "`algorithm`")
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
    runtimes: list[str] = field(default_factory=lambda: ["torch"])  # of registry.BENCH_RUNTIMES
    onnx_provider: str = "cpu"  # ONNX Runtime provider, of PROVIDERS
    quantize: QuantSettings = field(default_factory=QuantSettings)  # the -int4 rows' quantization
    gguf_quant: str = GGUF_QUANT  # the llama.cpp rows' file type, base and pruned alike
    time_export: bool = True  # also time export vs a plain prefill (writes the bundle each repeat)
    # the KV types the rows that have a choice are timed at (torch-lean, onnx-lean[-int4], llama.cpp), each
    # where the runtime takes it; None: each at its default. llama.cpp's default (F16) is always timed too:
    # every row's "vs llama.cpp" compares with it
    kv_dtypes: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.runtimes:
            raise GriffinError(f"bench needs at least one runtime; known: {', '.join(BENCH_RUNTIMES)}")
        for r in self.runtimes:
            require_runtime(bench_runtime(r).name, f"runtime {r}")
        if "llama.cpp" in self.runtimes:
            check_gguf_quant(self.gguf_quant)
            require_llama_cpp()
        if not self.methods or not self.densities:
            raise GriffinError("bench needs at least one selection method and one density")
        if self.row < 0 or self.new_tokens < 1 or self.repeats < 1:
            raise GriffinError(f"bench needs `row` >= 0, `new_tokens` >= 1 and `repeats` >= 1; got {self.row}, "
                               f"{self.new_tokens}, {self.repeats}")
        for m in self.methods:
            method(m)
        for d in self.densities:  # refused here, before the model loads, not after the first timings
            check_density(d)
        if self.kv_dtypes is not None:
            if not self.kv_dtypes:
                raise GriffinError(f"`kv_dtypes` names no KV type; known: {', '.join(KV_DTYPES)}")
            for kv in self.kv_dtypes:
                check_kv_dtype(kv)
