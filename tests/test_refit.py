from __future__ import annotations

import torch

from griffin_export.refit import refit_down


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

import pytest  # noqa: E402

from griffin_export import DecodeOptions, ExportSettings, TorchRuntime, export_ids, from_model, read_bundle, write_bundle  # noqa: E402
from griffin_export.errors import GriffinError  # noqa: E402
from tiny import ARCHS, prompt_ids, tiny_model  # noqa: E402


@pytest.mark.parametrize("arch", ARCHS)
def test_topk_refit_keeps_topk_neurons_and_only_changes_the_down_columns(arch):
    lm = tiny_model(arch)
    ids = prompt_ids(40)
    plain = export_ids(lm, ids, ExportSettings(method="topk"))
    refit = export_ids(lm, ids, ExportSettings(method="topk_refit"))
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
    full = export_ids(lm, ids, ExportSettings(method="topk", density=1.0))
    refit = export_ids(lm, ids, ExportSettings(method="topk_refit", density=1.0))
    for name, t in full.weights.items():
        torch.testing.assert_close(refit.weights[name], t)


def test_topk_refit_bundle_round_trips_and_decodes(tmp_path):
    lm = tiny_model("qwen2")
    base = copy.deepcopy(lm.model)
    b = export_ids(lm, prompt_ids(), ExportSettings(method="topk_refit", seed=1))
    path = write_bundle(b, tmp_path / "r.safetensors")
    opts = DecodeOptions(max_new_tokens=8, stop_at_eos=False)
    want = TorchRuntime(lm, b).generate(opts).token_ids
    got = TorchRuntime(from_model(base, identity="tiny-qwen2"), read_bundle(path)).generate(opts).token_ids
    assert got == want and len(got) == 8


def test_topk_refit_bundle_decodes_the_same_tokens_through_onnx(tmp_path):
    from griffin_export.onnx_export import export_onnx
    from griffin_export.runtime.onnx import load_onnx_runtime

    lm = tiny_model("llama")
    base = copy.deepcopy(lm.model)
    b = export_ids(lm, prompt_ids(), ExportSettings(method="topk_refit"))
    path = write_bundle(b, tmp_path / "r.safetensors")
    opts = DecodeOptions(max_new_tokens=8, stop_at_eos=False)
    graph = export_onnx(from_model(copy.deepcopy(base), identity="tiny-llama"), tmp_path / "g", read_bundle(path))
    via_onnx = load_onnx_runtime(graph, path, provider="cpu").generate(opts).token_ids
    via_torch = TorchRuntime(from_model(base, identity="tiny-llama"), read_bundle(path)).generate(opts).token_ids
    assert via_onnx == via_torch and len(via_torch) == 8


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_refit_lambda_must_be_positive(lam):
    with pytest.raises(GriffinError, match="refit lambda must be > 0"):
        ExportSettings(method="topk_refit", refit_lambda=lam)
