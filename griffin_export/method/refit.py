"""Least-squares refit of the kept down-projection columns (method `topk_refit`).

Dropping neurons R removes Z_R·W_Rᵀ from the FF output. Activations of the kept
neurons K are correlated with the dropped ones, so part of that loss is predictable:
choose B [k, hidden] minimizing over the prompt's own tokens

    ‖Z_K·B − Z_R·W_Rᵀ‖² + λ·mean(diag G_KK)·‖B‖²

and decode with W'_K = W_K + Bᵀ. The solution needs only the Gram matrix G = ZᵀZ of the
raw activations (accumulated during the prefill, [D_ff, D_ff] per layer):
B = (G_KK + λ'I)⁻¹ G_KR W_Rᵀ. The bundle format and the runtimes are unchanged: the refit
columns simply replace the sliced ones. With k = D_ff nothing is dropped and nothing changes.
"""

from __future__ import annotations

import torch

from ..settings import REFIT_LAMBDA


def refit_down(w_down: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, lam: float = REFIT_LAMBDA) -> torch.Tensor:
    """w_down [hidden, D_ff], gram [D_ff, D_ff], kept [k] sorted -> refit columns [hidden, k]."""
    d = w_down.shape[1]
    mask = torch.ones(d, dtype=torch.bool)
    mask[kept] = False
    dropped = mask.nonzero()[:, 0]
    if dropped.numel() == 0:
        return w_down[:, kept].clone()
    # float32 + Cholesky: the ridge keeps G_KK + λ'I well conditioned, and this is ~4x faster
    # than a float64 LU solve (k = 1382 at density 0.9 on the default model)
    w = w_down.detach().float()
    g = gram.float()
    g_kk = g[kept][:, kept]  # [k, k]
    g_kr = g[kept][:, dropped]  # [k, r]
    ridge = lam * float(g_kk.diagonal().mean().clamp_min(1e-12))
    g_kk.diagonal().add_(ridge)
    chol = torch.linalg.cholesky(g_kk)
    w_r = w[:, dropped].T  # [r, hidden]
    if dropped.numel() < w.shape[0]:  # solve against the fewer right-hand sides
        b = torch.cholesky_solve(g_kr, chol) @ w_r  # [k, hidden]
    else:
        b = torch.cholesky_solve(g_kr @ w_r, chol)
    return (w[:, kept] + b.T).to(w_down.dtype).contiguous()
