"""The method's definition, checked on tiny random models of every supported architecture."""

from __future__ import annotations

import copy

import pytest
import torch

from griffin_export import ExportSettings, TorchRuntime, export_ids
from griffin_export.model.arch import ff_blocks
from griffin_export.method.export import layer_scores
from griffin_export.model.prefill import forward, prefill
from tests.helpers import ARCHS, decode_tokens, masked, prompt_ids, tiny_model

STEPS = 20


def reference_logits(model, ids, tokens) -> torch.Tensor:
    """Prefill + teacher-forced decode on an unmodified model: [1 + STEPS - 1, vocab]."""
    cache, last = prefill(model, ids)
    return torch.stack([last, *(forward(model, torch.tensor([[t]]), cache)[-1] for t in tokens[:-1])])


def pruned_logits(lm, bundle, tokens) -> torch.Tensor:
    rt = TorchRuntime(lm, bundle)
    cache, last = rt.start()
    out = [last]
    for t in tokens[:-1]:
        out.append(rt.step(cache, t))
    return torch.stack(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_density_one_is_the_full_model(arch):
    lm = tiny_model(arch)
    ref = copy.deepcopy(lm.model)
    ids, tokens = prompt_ids(), decode_tokens(STEPS)
    bundle = export_ids(lm, ids, ExportSettings(density=1.0, warmup=0))
    assert bundle.info.k == [lm.d_ff] * lm.num_layers
    want = reference_logits(ref, ids, tokens)
    got = pruned_logits(lm, bundle, tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_decode_equals_masked_full_model(arch):
    lm = tiny_model(arch)
    ref = copy.deepcopy(lm.model)
    ids, tokens = prompt_ids(), decode_tokens(STEPS)
    bundle = export_ids(lm, ids, ExportSettings(density=0.5, warmup=0))
    want_full = reference_logits(ref, ids, tokens)
    got = pruned_logits(lm, bundle, tokens)
    # the prompt (and its KV) goes through the full model; only decode steps are pruned
    torch.testing.assert_close(got[0], want_full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], _masked_decode(ref, ids, tokens, bundle.indices), rtol=1e-4, atol=1e-4)
    # pruning really changed the logits, so the comparison above can fail
    assert (got[1:] - want_full[1:]).abs().max() > 1e-3


def _masked_decode(model, ids, tokens, indices) -> torch.Tensor:
    """Full-model prefill, then decode steps with the unselected neurons zeroed."""
    cache, _ = prefill(model, ids)
    with masked(model, indices):
        return torch.stack([forward(model, torch.tensor([[t]]), cache)[-1] for t in tokens[:-1]])


@pytest.mark.parametrize("arch", ARCHS)
def test_statistic_matches_direct_computation(arch):
    lm = tiny_model(arch)
    ids = prompt_ids(30)
    stored: list[torch.Tensor] = []
    blocks = ff_blocks(lm.model, lm.spec)
    handles = [b.output.register_forward_pre_hook(lambda m, a: stored.append(a[0].reshape(-1, a[0].shape[-1]).clone())) for b in blocks]
    with torch.no_grad():
        lm.model(ids)
    for h in handles:
        h.remove()
    direct = torch.stack([(z / z.norm(dim=-1, keepdim=True)).norm(dim=0) for z in stored])  # [L, D_ff]
    scores, _, _ = layer_scores(lm, ids, ExportSettings(chunk_size=7, warmup=0))
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_gives_the_same_selection(arch):
    lm = tiny_model(arch)
    ids = prompt_ids(40)
    one = export_ids(lm, ids, ExportSettings(chunk_size=512, warmup=0))
    chunked = export_ids(lm, ids, ExportSettings(chunk_size=9, warmup=0))
    for a, b in zip(one.indices, chunked.indices):
        assert torch.equal(a, b)
    torch.testing.assert_close(one.last_logits, chunked.last_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_shape_from_the_config_is_the_cache_layout(arch):
    """The adapter table's KV layout (arch.attention_shape, read off the config) is what the model
    really caches, so bundle checks and ONNX graphs never need a probing forward."""
    from griffin_export.model.arch import attention_shape

    lm = tiny_model(arch)
    cache, _ = prefill(lm.model, prompt_ids(6))
    k = cache.layers[0].keys
    assert (int(k.shape[1]), int(k.shape[3])) == attention_shape(lm.config)[1:]
    lean = tiny_model("llama", lean=True) if arch == "llama" else None  # a second layout: 64 hidden, 4 heads
    if lean is not None:
        k2 = prefill(lean.model, prompt_ids(6))[0].layers[0].keys
        assert (int(k2.shape[1]), int(k2.shape[3])) == attention_shape(lean.config)[1:] != (k.shape[1], k.shape[3])
