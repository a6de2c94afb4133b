"""Experiment (not shipped): topk_refit_alloc with each layer's refit error weighted by its FF-output
energy over the residual-stream energy it writes into. Registered as one more method,
`topk_refit_stream`, and evaluated like any other:

    python -m bench.research.alloc_stream_experiment MIN_FRACTION eval --methods topk_refit_stream ARGS...
"""

import sys

import torch

from griffin_export.method import budget
from griffin_export.method.budget import BudgetInputs
from griffin_export.model.offload import param_values
from griffin_export.model.arch import ff_blocks
from griffin_export.model.prefill import forward, new_cache
from griffin_export.registry import METHODS, Method, Ref

MIN_FRACTION = float(sys.argv.pop(1))


def stream_energy(b: BudgetInputs) -> list[float]:
    """Each layer's output energy over the prompt (one more full-model prefill: research, not speed)."""
    layers = [b.lm.model.get_submodule(block.prefix.rstrip(".")) for block in ff_blocks(b.lm.model, b.lm.spec)]
    acc = [0.0] * len(layers)

    def hook(i):
        def add(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            acc[i] += float(h.float().pow(2).sum())
        return add

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        forward(b.lm.model, b.ids, new_cache(b.lm.model))
    finally:
        for h in handles:
            h.remove()
    return acc


def stream_budgets(b: BudgetInputs) -> list[int]:
    d = b.scores.shape[1]
    if b.k >= d:
        return [d] * len(b.scores)
    stream = stream_energy(b)
    w_downs = [param_values(block.output) for block in ff_blocks(b.lm.model, b.lm.spec)]
    orders = torch.argsort(b.scores, dim=1, descending=True, stable=True)
    curves = []
    for i, w in enumerate(w_downs):
        c = budget.refit_error_curve(w, b.gram[i], orders[i], b.refit_lambda)
        wf = w.detach().float()
        energy = float((wf @ b.gram[i] @ wf.T).diagonal().sum())
        curves.append(c * energy / stream[i])
    return budget.allocate(curves, b.k * len(w_downs), min_k=min(b.k, max(1, round(MIN_FRACTION * d))))


METHODS["topk_refit_stream"] = Method(
    "topk_refit_stream", "topk_refit_alloc with each layer's error weighted by its share of the residual stream",
    Ref("method.selection:topk"), budget=stream_budgets, refit=True)

if __name__ == "__main__":
    from griffin_export_cli.main import main

    main(sys.argv[1:])
