"""The GRIFFIN statistic, accumulated during the prefill forward.

For each FF layer with activations Z [T, D_ff]: normalize each token's row to unit L2
norm, then score neuron j by the L2 norm of column j over the tokens. Summing squares is
associative, so the score is kept as a running [D_ff] sum of squares per layer: memory is
O(D_ff) per layer whatever the prompt length, and chunked prefill gives the same result.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .arch import FFBlock


class FFStatistic:
    """Running sum over tokens of the squared, row-normalized FF activations, per layer.

    With gram=True it also keeps the raw activations' Gram matrix ZᵀZ per layer
    ([D_ff, D_ff]: O(D_ff²) memory, only for the refit methods)."""

    def __init__(self, num_layers: int, d_ff: int, *, gram: bool = False):
        self.sumsq = torch.zeros(num_layers, d_ff, dtype=torch.float64)
        self.gram = torch.zeros(num_layers, d_ff, d_ff) if gram else None
        self.tokens = 0

    def add(self, layer: int, z: torch.Tensor) -> None:
        # z: [B, T, D_ff]; float32 so bf16/fp16 activations don't lose the small columns
        z = z.detach().float().flatten(0, -2)
        if self.gram is not None:
            self.gram[layer] += z.T @ z
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.sumsq[layer] += z.square().sum(dim=0).to(self.sumsq)
        if layer == 0:
            self.tokens += z.shape[0]

    def scores(self) -> torch.Tensor:
        """[num_layers, D_ff] neuron scores (column L2 norms)."""
        return self.sumsq.sqrt().float()


@contextmanager
def recording(blocks: list[FFBlock], stat: FFStatistic) -> Iterator[FFStatistic]:
    """Feed every forward's FF activations (the output projection's input) to `stat`."""

    def hook(layer: int):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            stat.add(layer, args[0])

        return pre_hook

    handles = [b.output.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        yield stat
    finally:
        for h in handles:
            h.remove()
