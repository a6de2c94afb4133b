from __future__ import annotations

import json

import pytest
import torch

from griffin_export.method.refit import refit_down


def activations(t=200, d=48, rank=12, seed=0):
    """Correlated activations (low rank + noise), like real FF activations."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.1 * torch.randn(t, d, generator=g)


def test_refit_reduces_the_prompt_reconstruction_error():
    z = activations()
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))  # [hidden, D_ff]
    kept = torch.arange(0, 48, 2)
    target = z @ w.T
    plain = (z[:, kept] @ w[:, kept].T - target).norm()
    refit = (z[:, kept] @ refit_down(w, z.T @ z, kept, lam=1e-3).T - target).norm()
    assert refit < 0.5 * plain


def test_more_ridge_moves_towards_the_plain_slice():
    z = activations()
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))
    kept = torch.arange(0, 48, 3)
    strong = refit_down(w, z.T @ z, kept, lam=1e6)
    torch.testing.assert_close(strong, w[:, kept], rtol=0, atol=1e-3)


def test_keeping_every_neuron_changes_nothing():
    z = activations()
    w = torch.randn(16, 48)
    torch.testing.assert_close(refit_down(w, z.T @ z, torch.arange(48)), w)


# -- as an export method ------------------------------------------------------------------

import copy  # noqa: E402


from griffin_export import (DecodeOptions, ExportSettings, TorchRuntime, export_ids, from_model, read_bundle,
                            write_bundle)  # noqa: E402
from griffin_export.errors import GriffinError  # noqa: E402
from tests.helpers import ARCHS, prompt_ids, tiny_model  # noqa: E402


@pytest.mark.parametrize("arch", ARCHS)
def test_topk_refit_keeps_topk_neurons_and_only_changes_the_down_columns(arch):
    lm = tiny_model(arch)
    ids = prompt_ids(40)
    plain = export_ids(lm, ids, ExportSettings(method="topk", warmup=0))
    refit = export_ids(lm, ids, ExportSettings(method="topk_refit", warmup=0))
    assert all(map(torch.equal, plain.indices, refit.indices))
    out = f".{lm.spec.output}.weight"
    for name, t in plain.weights.items():
        if name.endswith(out):
            assert not torch.allclose(t, refit.weights[name]), name
        else:
            assert torch.equal(t, refit.weights[name]), name
    assert refit.info.method == "topk_refit" and refit.info.extra["refit_lambda"] == "1.0"


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_topk_refit_at_density_one_is_the_full_model(arch):
    lm = tiny_model(arch)
    ids = prompt_ids()
    full = export_ids(lm, ids, ExportSettings(method="topk", density=1.0, warmup=0))
    refit = export_ids(lm, ids, ExportSettings(method="topk_refit", density=1.0, warmup=0))
    for name, t in full.weights.items():
        torch.testing.assert_close(refit.weights[name], t)


def test_topk_refit_bundle_round_trips_and_decodes(tmp_path):
    lm = tiny_model("qwen2")
    base = copy.deepcopy(lm.model)
    b = export_ids(lm, prompt_ids(), ExportSettings(method="topk_refit", seed=1, warmup=0))
    path = write_bundle(b, tmp_path / "r.safetensors")
    opts = DecodeOptions(max_new_tokens=8, stop_at_eos=False)
    want = TorchRuntime(lm, b).generate(opts).token_ids
    got = TorchRuntime(from_model(base, identity="tiny-qwen2"), read_bundle(path)).generate(opts).token_ids
    assert got == want and len(got) == 8


def onnx_and_torch_tokens(model, bundle, tmp_path, n=8):
    """Greedy tokens of `bundle` (exported from `model`, written to a file) through ONNX Runtime
    and through the PyTorch runtime, each from a fresh copy of the base model."""
    from griffin_export.targets.onnx.export import export_onnx
    from griffin_export.runtime.onnx import load_onnx_runtime

    path = write_bundle(bundle, tmp_path / "r.safetensors")
    opts = DecodeOptions(max_new_tokens=n, stop_at_eos=False)
    graph = export_onnx(from_model(copy.deepcopy(model), identity=bundle.info.base_model), tmp_path / "g",
                        read_bundle(path))
    via_onnx = load_onnx_runtime(graph, path, provider="cpu").generate(opts).token_ids
    via_torch = TorchRuntime(from_model(model, identity=bundle.info.base_model), read_bundle(path)).generate(opts)
    return via_onnx, via_torch.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("method", ["topk_refit", "topk_refit_alloc"])
def test_refit_bundles_decode_the_same_tokens_through_onnx(tmp_path, method):
    lm = tiny_model("llama")
    base = copy.deepcopy(lm.model)
    via_onnx, via_torch = onnx_and_torch_tokens(base, export_ids(lm, prompt_ids(), ExportSettings(method=method, warmup=0)),
                                                tmp_path)
    assert via_onnx == via_torch and len(via_torch) == 8


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_refit_lambda_must_be_positive(lam):
    with pytest.raises(GriffinError, match="refit lambda must be > 0"):
        ExportSettings(method="topk_refit", refit_lambda=lam, warmup=0)


# -- per-layer budgets (topk_refit_edges, topk_refit_alloc) ----------------------------------------------------

from griffin_export.method.budget import allocate, edge_budgets, refit_error_curve  # noqa: E402
from griffin_export.settings import BenchSettings  # noqa: E402


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75, 0.9])
def test_edge_budgets_keep_the_edge_layers_whole_and_the_total(density):
    k = round(density * 1536)
    ks = edge_budgets(30, 1536, k)
    assert sum(ks) == 30 * k and ks[0] == ks[1] == ks[29] == 1536
    assert max(ks[2:29]) - min(ks[2:29]) <= 1


@pytest.mark.slow
def test_topk_refit_edges_bundle_has_full_edge_layers_and_decodes_through_onnx(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.helpers import COMMON

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "num_hidden_layers": 5})).eval()
    base = copy.deepcopy(model)
    b = export_ids(from_model(model, identity="tiny-llama5"), prompt_ids(),
                   ExportSettings(method="topk_refit_edges", density=0.75, warmup=0))
    assert b.info.k == [64, 64, 24, 24, 64]
    via_onnx, via_torch = onnx_and_torch_tokens(base, b, tmp_path, n=6)
    assert via_onnx == via_torch and len(via_torch) == 6


def test_bench_times_each_method_and_reads_the_same_total_for_per_layer_widths(tmp_path):
    """`bench --method topk,topk_refit_edges`: one row per method and density; the edges
    bundle keeps as many neurons in all as topk's, so both read the same bytes per token."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from griffin_export.evaluation.speed import format_table, run_bench
    from griffin_export.evaluation.report import write_report
    from tests.helpers import COMMON

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "num_hidden_layers": 5})).eval()
    lm = from_model(model, identity="tiny-llama5")
    s = BenchSettings(densities=[0.75], methods=["topk", "topk_refit_edges"], new_tokens=3, repeats=1,
                      time_export=False)
    r = run_bench(lm=lm, ids=prompt_ids(), prompt_source="random tokens", settings=s)
    rows = {(row["runtime"], row["config"]): row for row in r["rows"]}
    assert set(rows) == {("torch", c) for c in ("full", "0.75", "topk_refit_edges@0.75")}
    topk, edges = rows[("torch", "0.75")], rows[("torch", "topk_refit_edges@0.75")]
    assert topk["k"] == edges["k"] == 48 and "k_per_layer" not in topk
    assert edges["k_per_layer"] == [64, 64, 24, 24, 64]
    assert edges["bound"] == pytest.approx(topk["bound"]) and topk["bound"] > 1.0
    table = format_table(r)
    assert ("| torch | float32 | topk_refit_edges density 0.75 | 48 (24..64) |" in table
            and "| torch | float32 | density 0.75 | 48 |" in table)
    (tmp_path / "bench.json").write_text(json.dumps(r))
    write_report(tmp_path)  # the report reads such rows: table and one speed curve per runtime and method
    assert (tmp_path / "speed.png").is_file() and "topk_refit_edges@0.75 | 48 (24..64)" in (tmp_path / "results.md").read_text()


def test_bench_refuses_an_unknown_method():
    from griffin_export.errors import GriffinError

    with pytest.raises(GriffinError, match="unknown method 'nope'"):
        BenchSettings(methods=["topk", "nope"])


def test_edge_budgets_fall_back_to_uniform_when_the_edges_would_take_everything():
    assert edge_budgets(4, 64, 40) == [40] * 4  # 3 full layers (192) > 4·40 - 1
    assert edge_budgets(3, 64, 32) == [32] * 3  # no other layer to shrink
    assert edge_budgets(30, 1536, 1536) == [1536] * 30


def test_error_curve_is_the_refit_residual_of_each_prefix():
    z = activations(d=48)
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(2))
    order = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    curve = refit_error_curve(w, z.T @ z, order, lam=1e-7)
    target = z @ w.T
    assert curve[0] == 1.0 and curve[-1] < 1e-4 and bool((curve[1:] <= curve[:-1] + 1e-5).all())
    for k in (5, 12, 30):
        kept = order[:k].sort().values
        residual = z[:, kept] @ refit_down(w, z.T @ z, kept, lam=1e-7).T - target
        torch.testing.assert_close(curve[k], (residual.norm() ** 2 / target.norm() ** 2), atol=1e-3, rtol=1e-2)


def test_allocation_spends_the_total_where_the_error_falls_slowest():
    d = 64
    k = torch.arange(d + 1, dtype=torch.float32)
    fast, slow = torch.exp(-k / 4), 1 - k / d  # layer 0 is explained by few neurons, layer 1 needs all
    ks = allocate([fast, slow], 64, min_k=8, step=4)
    assert sum(ks) == 64 and ks[1] > ks[0] >= 8
    assert allocate([fast, slow], 128, min_k=8) == [64, 64]


@pytest.mark.parametrize("total, min_k", [(10, 8), (200, 8)])
def test_a_budget_that_cannot_be_met_is_refused(total, min_k):
    curve = torch.linspace(1, 0, 65)
    with pytest.raises(GriffinError, match=f"cannot keep {total} neurons in 2 layers with {min_k}..64 per layer"):
        allocate([curve, curve], total, min_k=min_k)


@pytest.mark.parametrize("arch", ["llama", "phi3", "opt"])
def test_topk_refit_alloc_spends_the_uniform_total_unevenly(arch):
    lm = tiny_model(arch)
    ids = prompt_ids(40)
    uniform = export_ids(lm, ids, ExportSettings(method="topk_refit", density=0.5, warmup=0))
    alloc = export_ids(lm, ids, ExportSettings(method="topk_refit_alloc", density=0.5, warmup=0))
    assert sum(alloc.info.k) == sum(uniform.info.k) and len(set(alloc.info.k)) > 1
    again = export_ids(lm, ids, ExportSettings(method="topk_refit_alloc", density=0.5, warmup=0))
    assert again.info.k == alloc.info.k and all(map(torch.equal, again.indices, alloc.indices))
    # each layer keeps a prefix of the same score order, longer or shorter than the uniform one
    for small, big, ku, ka in zip(uniform.indices, alloc.indices, uniform.info.k, alloc.info.k):
        a, b = set(small.tolist()), set(big.tolist())
        assert (a <= b) if ka >= ku else (b <= a)


@pytest.mark.parametrize("arch, method", [("llama", "topk_refit_alloc"), ("opt", "topk_refit_alloc"),
                                          ("llama", "topk_refit_edges")])
def test_budgeted_methods_at_density_one_are_the_full_model(arch, method):
    lm = tiny_model(arch)
    ids = prompt_ids()
    full = export_ids(lm, ids, ExportSettings(method="topk", density=1.0, warmup=0))
    alloc = export_ids(lm, ids, ExportSettings(method=method, density=1.0, warmup=0))
    assert alloc.info.k == full.info.k
    for name, t in full.weights.items():
        torch.testing.assert_close(alloc.weights[name], t)
