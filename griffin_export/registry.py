"""The axes of change, one declarative table each: selection methods, class aggregations, runtimes
and export targets. Everything that offers a choice (the CLI's options and `--help`, export,
class, eval, bench, inspect, the docs' tables) reads these tables, so a new method, aggregation,
runtime or target is its own code plus one entry here.

Entries name their code by import path (`Ref`), imported on first use: this module imports no
torch and nothing above the ground floor of the house, so `--help` and the settings read it for
free, and the rooms that hold the code sit above everything they need.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypeVar

from .errors import GriffinError

__all__ = ["AGGREGATIONS", "METHODS", "RUNTIMES", "SERVE_BACKENDS", "TARGETS", "Aggregation", "Method", "Ref", "Runtime",
           "ServeBackend", "Target"]

_PACKAGE = __name__.rpartition(".")[0]


@dataclass(frozen=True)
class Ref:
    """A function or class by its path in this package ("method.selection:topk"), imported when first
    used. Calling a Ref calls what it names."""

    path: str

    def resolve(self) -> Any:
        module, _, name = self.path.partition(":")
        return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), name)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)


# -- selection methods ---------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """How a method picks each layer's neurons, and what it needs to do so.

    select: (scores [D_ff], k, torch.Generator) -> k neuron indices, in any order
    scores: None to rank by the prompt's GRIFFIN statistic, else (LoadedModel) -> [L, D_ff] scores
        of its own, computed from the weights (the same for every prompt)
    budget: (BudgetInputs) -> per-layer k, from the uniform k (method/budget.py)
    refit: the kept down-projection columns are refit on the prompt's activations (method/refit.py);
        the prefill then keeps their Gram matrix, D_ff x D_ff per layer
    """

    name: str
    summary: str  # one line: --help and the docs' table
    select: Ref | Callable  # (a method added from outside the package may hold its functions themselves)
    scores: Ref | Callable | None = None
    budget: Ref | Callable = Ref("method.budget:uniform")
    refit: bool = False
    for_classes: bool = True  # meaningful on a class's aggregated statistic (false: ignores the prompts)


_T = TypeVar("_T")


def _table(entries: Iterable[_T]) -> dict[str, _T]:
    table: dict[str, _T] = {}
    for entry in entries:
        if entry.name in table:  # type: ignore[attr-defined]
            raise ValueError(f"two registry entries named {entry.name!r}")  # type: ignore[attr-defined]
        table[entry.name] = entry  # type: ignore[attr-defined]
    return table


_TOPK = Ref("method.selection:topk")

METHODS: dict[str, Method] = _table((
    Method("topk", "the paper's: the k neurons with the largest prompt statistic", _TOPK),
    Method("sample", "k neurons drawn without replacement, probability ∝ statistic", Ref("method.selection:sample")),
    Method("topk_sample", "the top k/2, then k/2 more drawn ∝ statistic from the rest",
           Ref("method.selection:topk_sample")),
    Method("random", "k neurons uniformly at random (a baseline)", Ref("method.selection:uniform"), for_classes=False),
    Method("magnitude", "static, prompt-independent: the largest ‖W_gate row‖·‖W_up row‖ (‖W_fc1 row‖ for OPT)",
           _TOPK, scores=Ref("method.selection:weight_scores"), for_classes=False),
    Method("topk_refit", "topk's neurons, the kept down-projection columns refit on the prompt's own activations",
           _TOPK, refit=True),
    Method("topk_refit_edges", "topk_refit with the same total spread unevenly: layers 0, 1 and the last at full width",
           _TOPK, budget=Ref("method.budget:edges"), refit=True),
    Method("topk_refit_alloc", "topk_refit with per-layer k from the prompt's refit error; measured worse, kept for "
           "reproducibility", _TOPK, budget=Ref("method.budget:refit_error"), refit=True),
))
DEFAULT_METHOD = "topk"
CLASS_METHODS = tuple(name for name, m in METHODS.items() if m.for_classes)


def one_of(value: str, known: Iterable[str], what: str) -> str:
    """`value` if it is one of `known`, else a one-line error naming what was asked for."""
    known = list(known)
    if value not in known:
        raise GriffinError(f"unknown {what} {value!r}; known: {', '.join(known)}")
    return value


def method(name: str) -> Method:
    return METHODS[one_of(name, METHODS, "method")]


# -- class aggregations ----------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregation:
    """How the per-prompt statistics of a class become one class score (classes/aggregate.py)."""

    name: str
    summary: str
    score: Ref  # (ClassStatistic) -> class score [L, D_ff]
    uses_k: bool = False  # depends on the k the statistic was counted at


AGGREGATIONS: dict[str, Aggregation] = _table((
    Aggregation("mean", "mean of the prompts' scores, each normalized to unit L2 norm per layer (every prompt has "
                "one equal vote)", Ref("classes.aggregate:mean_score")),
    Aggregation("topk_freq", "fraction of prompts whose own top-k holds the neuron (ties broken by mean)",
                Ref("classes.aggregate:topk_freq_score"), uses_k=True),
    Aggregation("pooled", "the GRIFFIN statistic over all the class's tokens as if one long prompt (long prompts "
                "weigh more)", Ref("classes.aggregate:pooled_score")),
))
# pooled kept the gold summaries' likelihood best in bench/class_aggregation.py (XSum, docs/classes.md)
DEFAULT_AGGREGATION = "pooled"


def aggregation(name: str) -> Aggregation:
    return AGGREGATIONS[one_of(name, AGGREGATIONS, "aggregation")]


# -- runtimes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """An engine that decodes with a bundle's experts.

    module: the runtime's module; it defines `bench_rows(ctx, variant, bundle)` (evaluation/speed.py
        times what it returns) and, where `generates`, `load(bundle, **options)` -> a runtime.base.Runtime
    variants: the configurations `griffin-export bench --runtime` offers, name -> summary
    """

    name: str
    summary: str
    module: str
    variants: Mapping[str, str] = field(default_factory=dict)
    generates: bool = True  # `griffin-export generate --runtime NAME` decodes with it
    needs: str | None = None  # the Python module it imports: without it, a one-line refusal that says
    install: str = ""  # what to install, e.g. "onnxruntime-genai: pip install --no-deps onnxruntime-genai"

    def code(self):
        return importlib.import_module(f"{_PACKAGE}.{self.module}")


RUNTIMES: dict[str, Runtime] = _table((
    Runtime("torch", "PyTorch: the base model with the bundle's FF layers swapped in", "runtime.pytorch",
            {"torch": "transformers' forward per step (every architecture)",
             "torch-lean": "the lean static-shape step (the Llama family; runtime/lean.py)"}),
    Runtime("onnx", "ONNX Runtime on a graph from `griffin-export onnx`", "runtime.onnx",
            {"onnx": "the traced graph (every architecture)",
             "onnx-lean": "the lean graph: fused ONNX Runtime ops, one KV buffer per layer (the Llama family)",
             "onnx-int4": "the traced graph with 4-bit MatMuls",
             "onnx-lean-int4": "the lean graph with 4-bit MatMuls"},
            needs="onnxruntime", install='onnxruntime: pip install -e ".[onnx]"'),
    Runtime("genai", "onnxruntime-genai's own loop on our lean graph", "runtime.genai",
            {"genai": "onnxruntime-genai: its builder's graph for the full model, our lean graphs for the bundles"},
            generates=False, needs="onnxruntime_genai", install="onnxruntime-genai: pip install --no-deps onnxruntime-genai"),
    Runtime("llama.cpp", "llama.cpp on the bundle's pruned GGUF (llama-cpp-python)", "runtime.llama_cpp",
            {"llama.cpp": "the base GGUF and the pruned GGUF at the same file type"},
            generates=False, needs="llama_cpp", install='llama-cpp-python: pip install -e ".[llama]"'),
))
# bench --runtime NAME: every runtime's variants
BENCH_RUNTIMES: dict[str, Runtime] = {v: r for r in RUNTIMES.values() for v in r.variants}
GENERATE_RUNTIMES = tuple(name for name, r in RUNTIMES.items() if r.generates)


def runtime(name: str) -> Runtime:
    return RUNTIMES[one_of(name, RUNTIMES, "runtime")]


def bench_runtime(variant: str) -> Runtime:
    return BENCH_RUNTIMES[one_of(variant, BENCH_RUNTIMES, "runtime")]


# -- export targets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A standalone output of a bundle: what writes it, what knows one when it sees it, and what
    summarizes one from its own header (griffin-export inspect tries the targets in this table's order)."""

    name: str
    summary: str
    write: Ref  # (bundle path, output, **options) -> the output's path
    owns: Ref  # (Path) -> whether the path is this target's output
    describe: Ref  # (path) -> (summary dict, text)


TARGETS: dict[str, Target] = _table((
    Target("onnx", "an ONNX graph directory: lean or traced, float or 4-bit (griffin-export onnx)",
           Ref("targets.onnx.export:write_graph"), Ref("targets.onnx.graph:owns"), Ref("targets.onnx.graph:describe")),
    Target("hf", "a Hugging Face model directory that plain transformers loads (griffin-export checkpoint)",
           Ref("targets.checkpoint:write_checkpoint"), Ref("targets.checkpoint:owns"),
           Ref("targets.checkpoint:describe")),
    Target("gguf", "one GGUF file that llama.cpp runs (griffin-export checkpoint --gguf)",
           Ref("targets.gguf_export:export_gguf"), Ref("targets.gguf_export:owns"), Ref("targets.gguf_export:describe")),
))


# -- serving backends --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeBackend:
    """An engine `griffin-export serve` decodes with (serve/backends.py: the interface the serving engine asks).

    load: (ServeSettings, report) -> serve.backends.Backend
    batching: how one class's requests decode together: continuous (a request joins the running batch at
        a step boundary), windowed (a batch forms while none runs) or one at a time
    shares_weights: one copy of the base model's shared weights (attention, embeddings, head) for every class
    """

    name: str
    summary: str
    load: Ref
    batching: str
    shares_weights: bool
    needs: str | None = None  # the Python module it imports: without it, a one-line refusal that says
    install: str = ""


SERVE_BACKENDS: dict[str, ServeBackend] = _table((
    ServeBackend("torch", "PyTorch: one base model, each class's FF slices swapped in per step; the router and its "
                 "guard", Ref("serve.backends:load_torch"), "continuous", True),
    ServeBackend("llama.cpp", "llama.cpp on each class's pruned GGUF (llama-cpp-python): one model per class",
                 Ref("serve.llama_backend:load_llama_cpp"), "one at a time", False, needs="llama_cpp",
                 install='llama-cpp-python: pip install -e ".[llama]"'),
    ServeBackend("onnx", "ONNX Runtime on each class's lean graph (CUDA where a GPU answers): one session per class",
                 Ref("serve.onnx_backend:load_onnx"), "windowed", False, needs="onnxruntime",
                 install='onnxruntime: pip install -e ".[onnx]"'),
))
# the one backend with the router, shared weights and continuous batching (docs/serving.md, "Backends")
DEFAULT_SERVE_BACKEND = "torch"


def serve_backend(name: str) -> ServeBackend:
    return SERVE_BACKENDS[one_of(name, SERVE_BACKENDS, "backend")]
