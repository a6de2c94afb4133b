"""Per-layer budgets: how many neurons each layer keeps. The rules `uniform`, `edges` and
`refit_error` are the methods' (registry.METHODS names them: `topk_refit_edges` uses edges,
`topk_refit_alloc` refit_error, the others uniform).

`topk_refit_edges` keeps the first two and the last layer at full width and spreads the rest of
the same total evenly over the other layers: those layers write the most into the residual
stream relative to its size on the default model (layer 0's FF output is as large as the stream
itself), and dropping their neurons cost the most in dev-row measurements.

`topk_refit_alloc` allocates per prompt from the refit error, as follows.

The paper keeps the same k in every layer. Layers differ in how much of their FF output the
top neurons (plus the refit, refit.py) can reproduce on the prompt, so the same total spent
unevenly loses less. For layer l with raw-activation Gram matrix G = ZᵀZ (from the prefill)
and down projection W, the refit of the top-k prefix S of the score order leaves

    err_l(k) = tr(W G Wᵀ) − tr(W G_{:,S} (G_SS + ρI)⁻¹ G_{S,:} Wᵀ)

of the output energy tr(W G Wᵀ) unexplained. The prefixes are nested, so one Cholesky
factor L of the permuted G + ρI gives the curve for every k at once: with X = L⁻¹ G_{P,:} Wᵀ,
the explained energy of the first k neurons is the sum of X's first k squared row norms.
The allocation then hands out neurons greedily, a step at a time, to the layer whose
relative error err_l / tr(W G Wᵀ) drops most, from a floor of `min_fraction`·D_ff per layer,
until the total is what a uniform k would keep.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..errors import GriffinError
from ..model.arch import ff_blocks
from ..model.load import LoadedModel
from ..model.offload import param_values

MIN_FRACTION = 0.125  # no layer keeps fewer than this fraction of its neurons
STEP = 16  # neurons handed out at a time


EDGE_LAYERS = (0, 1, -1)  # kept at full width by topk_refit_edges


def widths_text(k: list[int], d_ff: int | None = None) -> str:
    """Per-layer FF widths in words, the one spelling of every message and summary line:
    '768 in every layer' / '682..1536 per layer (total 23040)'; with d_ff (summary lines, followed
    by '× N layers'): '768/1536 per layer' / '682..1536/1536 per layer (total 23040)'."""
    of = f"/{d_ff}" if d_ff else ""
    if len(set(k)) == 1:
        return f"{k[0]}{of} {'per layer' if d_ff else 'in every layer'}"
    return f"{min(k)}..{max(k)}{of} per layer (total {sum(k)})"


def ff_width_text(width: int | list | None, layers: int | None, base: object = None) -> str:
    """'32/64 per layer × 2 layers', or for per-layer widths the range and then every width."""
    if width is None:
        return "?"
    widths = [int(w) for w in width] if isinstance(width, list) else [int(width)] * int(layers or 1)
    if base not in (None, ""):  # ours: the base model's width is known
        text = widths_text(widths, int(base))
    else:  # widths_text's "64 in every layer" would read badly before "× N layers"
        text = f"{widths[0]} per layer" if len(set(widths)) == 1 else widths_text(widths)
    text += f" × {len(widths)} layers"
    return text + (f": {','.join(map(str, widths))}" if len(set(widths)) > 1 else "")


def k_text(row: dict) -> str:
    """A results row's FF width per layer, compact for a table cell (widths_text is for sentences):
    '768', or '768 (682..1536)' for per-layer widths."""
    ks = row.get("k_per_layer")
    return f"{row['k']} ({min(ks)}..{max(ks)})" if ks else str(row.get("k", "—"))


def edge_budgets(num_layers: int, d_ff: int, k: int) -> list[int]:
    """Full width for the EDGE_LAYERS, the rest of num_layers·k spread evenly over the others
    (the remainder one neuron at a time from the first); uniform k when that cannot be met."""
    edges = sorted({i % num_layers for i in EDGE_LAYERS})
    rest = num_layers * k - len(edges) * d_ff
    others = num_layers - len(edges)
    if k >= d_ff or others <= 0 or rest < others:
        return [k] * num_layers  # too few layers or too small a total to favour the edges
    base, extra = divmod(rest, others)
    ks, j = [], 0
    for i in range(num_layers):
        if i in edges:
            ks.append(d_ff)
        else:
            ks.append(base + (1 if j < extra else 0))
            j += 1
    return ks


def refit_error_curve(w_down: torch.Tensor, gram: torch.Tensor, order: torch.Tensor, lam: float) -> torch.Tensor:
    """Relative unexplained FF-output energy after refitting the first k neurons of `order`,
    for k = 0..D_ff: [D_ff + 1], starting at 1.0, non-increasing (up to rounding)."""
    g = gram.float()[order][:, order]  # G_{P,P}: rows and columns in score order
    w = w_down.detach().float()[:, order]  # [hidden, D_ff], columns in score order
    gw = g @ w.T  # G_{P,P} W_Pᵀ: [D_ff, hidden]
    total = float((w @ gw).diagonal().sum().clamp_min(1e-30))  # tr(W G Wᵀ)
    g.diagonal().add_(lam * float(g.diagonal().mean().clamp_min(1e-12)))  # the ridge, after gw used G itself
    chol = torch.linalg.cholesky(g)
    x = torch.linalg.solve_triangular(chol, gw, upper=False)
    explained = torch.cat([torch.zeros(1), (x * x).sum(1).cumsum(0)])
    return (1.0 - explained / total).clamp_min(0.0)


def allocate(curves: list[torch.Tensor], total: int, *, min_k: int, step: int = STEP) -> list[int]:
    """Per-layer k summing to `total`: greedy on the largest drop of error per neuron."""
    n = len(curves)
    d = curves[0].numel() - 1
    if not n * min_k <= total <= n * d:
        raise GriffinError(f"cannot keep {total} neurons in {n} layers with {min_k}..{d} per layer")
    ks = [min_k] * n
    left = total - n * min_k

    def gain(layer: int) -> tuple[float, int, int]:
        k = ks[layer]
        g = min(step, d - k)
        return -(float(curves[layer][k] - curves[layer][k + g]) / g), layer, g

    heap = [gain(i) for i in range(n) if ks[i] < d]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, layer, g = heapq.heappop(heap)
        g = min(g, left)
        ks[layer] += g
        left -= g
        if ks[layer] < d:
            heapq.heappush(heap, gain(layer))
    return ks


def refit_budgets(w_downs: list[torch.Tensor], gram: torch.Tensor, scores: torch.Tensor, k: int, lam: float,
                  min_fraction: float = MIN_FRACTION) -> list[int]:
    """Per-layer budgets with the same total as k in every layer (see the module docstring)."""
    d = scores.shape[1]
    if k >= d:
        return [d] * len(w_downs)
    orders = torch.argsort(scores, dim=1, descending=True, stable=True)
    curves = [refit_error_curve(w, gram[i], orders[i], lam) for i, w in enumerate(w_downs)]
    return allocate(curves, k * len(w_downs), min_k=min(k, max(1, round(min_fraction * d))))


# -- the rules: (BudgetInputs) -> per-layer k ----------------------------------------------------


@dataclass(frozen=True)
class BudgetInputs:
    lm: LoadedModel
    density: float
    k: int  # the uniform k of the density
    scores: torch.Tensor  # [L, D_ff]: what the method ranks by
    gram: torch.Tensor | None  # [L, D_ff, D_ff]: the prefill's Gram, for refit methods
    refit_lambda: float
    ids: torch.Tensor | None = None  # [1, T] the prompt (None for a class): for a rule that needs more of it
    # refuse a rule that cannot be met instead of falling back to uniform widths: a class bundle is
    # made one at a time and its user asked for the rule; evaluation grids must run through
    strict: bool = False


def uniform(b: BudgetInputs) -> int:
    return b.k


def edges(b: BudgetInputs) -> list[int]:
    ks = edge_budgets(b.lm.num_layers, b.lm.d_ff, b.k)
    if b.strict and b.k < b.lm.d_ff and len(set(ks)) == 1:
        raise GriffinError(f"topk_refit_edges cannot keep layers 0, 1 and the last whole at density {b.density}: "
                           f"{b.lm.num_layers} layers × k={b.k} leave too few neurons for the others; use a larger "
                           "density or topk_refit")
    return ks


def refit_error(b: BudgetInputs) -> list[int]:
    if b.gram is None:
        raise ValueError("refit_error budgets need the prefill's Gram matrices")
    w_downs = [param_values(blk.output) for blk in ff_blocks(b.lm.model, b.lm.spec)]
    return refit_budgets(w_downs, b.gram, b.scores, b.k, b.refit_lambda)
