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

from ..model.arch import FFBlock


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


class BatchStatistic:
    """The statistic of each prompt of a right-padded batch, from one batched prefill.

    Row b holds a prompt of lengths[b] tokens followed by padding; causal attention means a
    real token never sees the padding after it, so its activations are the unbatched ones (up
    to float rounding of the batched matmuls), and the padded positions are left out here.
    The prefill sets `start` to the first position of each chunk it feeds. With gram=True one
    Gram summed over the batch's real tokens is kept (a class only needs the sum)."""

    def __init__(self, num_layers: int, d_ff: int, lengths: list[int], *, gram: bool = False):
        self.rows = [FFStatistic(num_layers, d_ff) for _ in lengths]
        self.lengths = lengths
        self.gram = torch.zeros(num_layers, d_ff, d_ff) if gram else None
        self.start = 0

    def add(self, layer: int, z: torch.Tensor) -> None:
        # z: [B, t, D_ff] for positions start .. start + t (OPT's FF sees it flattened to [B·t, D_ff])
        z = z.reshape(len(self.rows), -1, z.shape[-1])
        t = z.shape[1]
        real = []
        for row, n, zb in zip(self.rows, self.lengths, z):
            valid = min(max(n - self.start, 0), t)
            if valid:
                row.add(layer, zb[:valid])
                real.append(zb[:valid])
        if self.gram is not None and real:
            zr = torch.cat(real).detach().float()
            self.gram[layer] += zr.T @ zr


@contextmanager
def recording(blocks: list[FFBlock], stat: FFStatistic | BatchStatistic) -> Iterator[FFStatistic | BatchStatistic]:
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
