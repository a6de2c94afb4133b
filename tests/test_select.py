from __future__ import annotations

import pytest
import torch

from griffin_export.errors import GriffinError
from griffin_export.registry import METHODS
from griffin_export.method.selection import k_for, select_all


def scores(layers=3, d=50, seed=0):
    return torch.rand(layers, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gives_k_sorted_unique_indices_deterministically(method):
    s = scores()
    a = select_all(s, 20, method, seed=3)
    b = select_all(s, 20, method, seed=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert x.numel() == 20 and x.dtype == torch.int64
        assert bool((x[1:] > x[:-1]).all()) and 0 <= int(x.min()) and int(x.max()) < 50


def test_topk_keeps_the_highest_scores():
    s = scores()
    for layer, idx in zip(s, select_all(s, 10, "topk", 0)):
        assert set(idx.tolist()) == set(torch.topk(layer, 10).indices.tolist())


def test_topk_sample_keeps_the_top_half_and_samples_the_rest():
    s = scores(d=200)
    for layer, idx in zip(s, select_all(s, 40, "topk_sample", 0)):
        assert set(torch.topk(layer, 20).indices.tolist()) <= set(idx.tolist())
    assert not all(torch.equal(a, b) for a, b in zip(select_all(s, 40, "topk_sample", 0), select_all(s, 40, "topk_sample", 1)))


def test_sample_prefers_high_scores():
    s = torch.zeros(1, 100)
    s[0, :10] = 1000.0  # ten neurons hold nearly all the mass
    idx = select_all(s, 10, "sample", 0)[0]
    assert idx.tolist() == list(range(10))


def test_random_ignores_scores():
    a = select_all(scores(seed=0), 20, "random", 7)
    b = select_all(scores(seed=1), 20, "random", 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range_is_refused(density):
    with pytest.raises(GriffinError, match="density"):
        k_for(density, 64)


def test_density_that_keeps_nothing_is_refused():
    with pytest.raises(GriffinError, match="k=0"):
        k_for(0.001, 64)


def test_unknown_method_is_refused():
    with pytest.raises(GriffinError, match="unknown method 'best'"):
        select_all(scores(), 5, "best", 0)
