"""Experiment (not shipped): topk_refit_alloc with each layer's error weighted by its FF-output energy
over the residual-stream energy it writes into. Usage: python -m bench.research.alloc_stream_experiment MIN_FRACTION eval ARGS..."""
import sys, torch
from griffin_export.method import export as ex
import griffin_export.evaluation.runner as rn
from griffin_export.method import budget
from griffin_export.model.arch import ff_blocks

MINF = float(sys.argv.pop(1))
STREAM = []

orig_stat = ex.prompt_statistic
def prompt_statistic(lm, ids, **kw):
    STREAM.clear()
    layers = [lm.model.get_submodule(b.prefix.rstrip('.')) for b in ff_blocks(lm.model, lm.spec)]
    acc = [0.0] * len(layers)
    def hook(i):
        def f(m, inp, out):
            h = out[0] if isinstance(out, tuple) else out
            acc[i] += float(h.float().pow(2).sum())
        return f
    hs = [l.register_forward_hook(hook(i)) for i, l in enumerate(layers)]
    try:
        r = orig_stat(lm, ids, **kw)
    finally:
        for h in hs: h.remove()
    STREAM.extend(acc)
    return r
ex.prompt_statistic = prompt_statistic
rn.prompt_statistic = prompt_statistic

def refit_budgets(w_downs, gram, scores, k, lam, min_fraction=MINF):
    d = scores.shape[1]
    if k >= d:
        return [d] * len(w_downs)
    orders = torch.argsort(scores, dim=1, descending=True, stable=True)
    curves = []
    for i, w in enumerate(w_downs):
        c = budget.refit_error_curve(w, gram[i], orders[i], lam)
        wf = w.detach().float()
        energy = float((wf @ gram[i] @ wf.T).diagonal().sum())
        curves.append(c * energy / STREAM[i])
    return budget.allocate(curves, k * len(w_downs), min_k=min(k, max(1, round(min_fraction * d))))
ex.refit_budgets = refit_budgets

from griffin_export_cli.main import main
main(sys.argv[1:])
