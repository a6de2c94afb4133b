"""The names users choose from, with their one-line summaries: selection methods, class
aggregations, ONNX graph layouts. No torch here, so `--help`, the CLI's choices and the README's
tables (tests/test_cli.py checks them) read one registry without loading anything heavy."""

from __future__ import annotations

METHOD_SUMMARIES = {
    "topk": "the paper's: the k neurons with the largest prompt statistic",
    "sample": "k neurons drawn without replacement, probability ∝ statistic",
    "topk_sample": "the top k/2, then k/2 more drawn ∝ statistic from the rest",
    "random": "k neurons uniformly at random (a baseline)",
    "magnitude": "static, prompt-independent: the largest ‖W_gate row‖·‖W_up row‖ (‖W_fc1 row‖ for OPT)",
    "topk_refit": "topk's neurons, the kept down-projection columns refit on the prompt's own activations",
    "topk_refit_edges": "topk_refit with the same total spread unevenly: layers 0, 1 and the last at full width",
    "topk_refit_alloc": "topk_refit with per-layer k from the prompt's refit error; measured worse, kept for "
                        "reproducibility",
}
METHODS = tuple(METHOD_SUMMARIES)
# Methods that select like another one, then refit the kept down-projection columns on the
# prompt's activations (refit.py); they need the activations' Gram matrix from the prefill.
# topk_refit_edges and topk_refit_alloc also spread the same total unevenly over the layers (budget.py).
REFIT = {"topk_refit": "topk", "topk_refit_edges": "topk", "topk_refit_alloc": "topk"}
# Methods that make sense on a class score (magnitude and random ignore the prompts); the refit
# ones solve the refit on the class's Gram (the sum of its prompts' Grams) and use its budgets.
CLASS_METHODS = ("topk", "sample", "topk_sample", "topk_refit", "topk_refit_edges", "topk_refit_alloc")

AGGREGATION_SUMMARIES = {
    "mean": "mean of the prompts' scores, each normalized to unit L2 norm per layer (every prompt has one equal vote)",
    "topk_freq": "fraction of prompts whose own top-k holds the neuron (ties broken by mean)",
    "pooled": "the GRIFFIN statistic over all the class's tokens as if one long prompt (long prompts weigh more)",
}
# pooled kept the gold summaries' likelihood best in bench/class_aggregation.py (XSum, see README)
DEFAULT_AGGREGATION = "pooled"

# Defaults shared by the settings dataclasses (export, class, eval, bench) and the CLI options that
# fill them, so `--help` shows what the library does without importing torch.
DENSITY = 0.5
CHUNK_SIZE = 512  # prefill chunk (tokens); the statistic is the same for any chunking
REFIT_LAMBDA = 1.0  # the refit's ridge strength relative to the mean activation energy; chosen on dev rows 0-5

LAYOUTS = ("auto", "lean", "traced")

# ONNX Runtime execution providers (runtime/onnx.choose_provider): auto = CUDA where it answers, else the CPU
PROVIDERS = ("auto", "cpu", "cuda")  # onnx --graph: auto = lean where the adapter table covers the architecture

# `griffin-export onnx --quantize` (onnx_quant.py): schemes, and the defaults measured in the README
QUANT_SCHEMES = ("int4",)
# how the 4-bit values are chosen, both ONNX Runtime's: rtn = round to nearest (an integer zero point
# per block), hqq = half-quadratic quantization (a float zero point per block, iteratively fitted)
QUANT_ALGORITHMS = ("rtn", "hqq")
QUANT_ALGORITHM = "rtn"
QUANT_BLOCK_SIZE = 32  # as llama.cpp's Q4_0/Q4_1 blocks
QUANT_ACCURACY_LEVEL = 4  # MatMulNBits with int8 activations: ONNX Runtime's fast CPU path

# `griffin-export bench --runtime`: torch: transformers' forward per step; torch-lean: runtime/lean.py's
# step; onnx: the traced graph; onnx-lean: the lean graph (onnx_lean.py); -int4: the same graph with 4-bit
# MatMuls (onnx_quant.py); genai: onnxruntime-genai's runtime, its "full" row on its own builder's graph of
# the same weights, the others on our lean graphs; llama.cpp: the base GGUF and the pruned GGUF
# (gguf_export.py) at the same file type, through llama-cpp-python
RUNTIMES = ("torch", "torch-lean", "onnx", "onnx-lean", "onnx-int4", "onnx-lean-int4", "genai", "llama.cpp")

# `griffin-export checkpoint --gguf --quant` (gguf_export.py): llama.cpp file types (F32: no quantizer)
GGUF_QUANTS = ("Q4_1", "Q4_K_M", "Q8_0", "F16", "F32")
GGUF_QUANT = "Q4_1"  # the default model's own type


# A bench or eval row's config name: the benchmark writes it, the eval report reads it back.
def config_name(method: str, density: float) -> str:
    """A bench row's config: the density alone for `topk` (the paper's method), else METHOD@DENSITY."""
    return f"{density:g}" if method == "topk" else f"{method}@{density:g}"


def parse_config(config: str) -> tuple[str, float]:
    """(method, density) of a config name; ValueError for one that names no density."""
    method, _, density = config.rpartition("@")
    return method or "topk", 1.0 if config == "full" else float(density)
