from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from griffin_export import (DecodeOptions, ExportSettings, TorchRuntime, export_ids, from_model, read_bundle,
                            write_bundle)
from griffin_export.bundle.format import FORMAT_VERSION, read_metadata
from griffin_export.errors import GriffinError
from tests.helpers import ARCHS, prompt_ids, rewrite, tiny_model


@pytest.fixture
def exported(tmp_path):
    lm = tiny_model("llama")
    base = copy.deepcopy(lm.model)
    bundle = export_ids(lm, prompt_ids(), ExportSettings(density=0.5, method="topk", warmup=0))
    path = write_bundle(bundle, tmp_path / "e.safetensors")
    return base, bundle, path


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_keeps_every_tensor_and_the_metadata(arch, tmp_path):
    lm = tiny_model(arch)
    bundle = export_ids(lm, prompt_ids(), ExportSettings(density=0.5, warmup=0))
    path = write_bundle(bundle, tmp_path / "b.safetensors")
    back = read_bundle(path)
    assert back.info == bundle.info
    want, got = bundle.tensors(), back.tensors()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # tensors are named after the base model's own parameters
    params = dict(lm.model.named_parameters())
    assert back.weights.keys() <= params.keys()


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_from_a_bundle_file_equals_prefill_and_pruned_decode_in_one_process(arch, tmp_path):
    lm = tiny_model(arch)
    base = copy.deepcopy(lm.model)
    opts = DecodeOptions(max_new_tokens=12, stop_at_eos=False)
    ids = prompt_ids()
    bundle = export_ids(lm, ids, ExportSettings(density=0.5, keep_kv=False, warmup=0))  # in process: re-prefill
    in_process = TorchRuntime(lm, bundle, keep_full=True).generate(opts, ids=ids).token_ids
    with_kv = export_ids(from_model(copy.deepcopy(base)), ids, ExportSettings(density=0.5, warmup=0))
    path = write_bundle(with_kv, tmp_path / "kv.safetensors")
    from_file = TorchRuntime(from_model(base), read_bundle(path)).generate(opts).token_ids
    assert len(from_file) == 12
    assert from_file == in_process


def test_sampling_is_reproducible_for_a_seed(exported):
    base, bundle, path = exported
    opts = DecodeOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4, stop_at_eos=False)
    a = TorchRuntime(from_model(copy.deepcopy(base)), read_bundle(path)).generate(opts).token_ids
    b = TorchRuntime(from_model(copy.deepcopy(base)), read_bundle(path)).generate(opts).token_ids
    assert a == b and len(a) == 10


def test_magnitude_selection_does_not_depend_on_the_prompt():
    lm = tiny_model("qwen2")
    a = export_ids(lm, prompt_ids(seed=1), ExportSettings(method="magnitude", warmup=0))
    b = export_ids(lm, prompt_ids(seed=2), ExportSettings(method="magnitude", warmup=0))
    c = export_ids(lm, prompt_ids(seed=2), ExportSettings(method="topk", warmup=0))
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert not all(torch.equal(x, y) for x, y in zip(b.indices, c.indices))


def test_no_kv_bundle_holds_no_cache(tmp_path):
    lm = tiny_model("llama")
    path = write_bundle(export_ids(lm, prompt_ids(), ExportSettings(keep_kv=False, warmup=0)), tmp_path / "n.safetensors")
    _, entries = read_metadata(path)
    assert not any(n.startswith("griffin.kv.") for n in entries)
    assert read_bundle(path).info.has_kv is False


# -- bad bundles ---------------------------------------------------------------------------


def test_existing_output_needs_force(exported, tmp_path):
    _, bundle, path = exported
    with pytest.raises(GriffinError, match="exists; pass force=True"):
        write_bundle(bundle, path)
    write_bundle(bundle, path, force=True)


def test_truncated_bundle(exported, tmp_path):
    _, _, path = exported
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GriffinError, match="truncated or corrupt"):
        read_bundle(cut)


@pytest.mark.parametrize("content", [b"", b"hello world, not safetensors", struct.pack("<Q", 10) + b"not json!!"])
def test_not_a_safetensors_file(tmp_path, content):
    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    with pytest.raises(GriffinError, match="not a safetensors file"):
        read_bundle(p)


def test_safetensors_that_is_not_a_bundle(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(GriffinError, match="not a griffin-export bundle"):
        read_bundle(p)


def test_unknown_format_version(exported, tmp_path):
    _, _, path = exported
    bad = rewrite(path, tmp_path / "v.safetensors", meta={"format_version": "99"})
    with pytest.raises(GriffinError, match=f"version '99'.*reads version {FORMAT_VERSION} or 2"):
        read_bundle(bad)


def test_bundle_from_a_different_model_names_both(exported):
    _, _, path = exported
    other = tiny_model("llama", seed=1)
    with pytest.raises(GriffinError, match="belongs to base model tiny-llama .*not to other"):
        TorchRuntime(from_model(other.model, identity="other"), read_bundle(path))


def test_bundle_of_another_architecture(exported):
    _, _, path = exported
    with pytest.raises(GriffinError, match="llama model .* but the base model is qwen2"):
        TorchRuntime(tiny_model("qwen2"), read_bundle(path))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: torch.cat([i[:-1], torch.tensor([64])]), "outside 0..63"),
        (lambda i: torch.cat([i[:1], i[:-1]]), "not strictly increasing"),
        (lambda i: i.flip(0), "not strictly increasing"),
    ],
)
def test_bad_indices(exported, tmp_path, change, message):
    _, bundle, path = exported
    bad = rewrite(path, tmp_path / "i.safetensors", tensors={"griffin.indices.1": change(bundle.indices[1])})
    with pytest.raises(GriffinError, match=message):
        read_bundle(bad)


def test_tensor_shape_that_disagrees(exported, tmp_path):
    _, bundle, path = exported
    name = "model.layers.0.mlp.up_proj.weight"
    bad = rewrite(path, tmp_path / "s.safetensors", tensors={name: torch.zeros(5, 32)})
    with pytest.raises(GriffinError, match=f"{name} has shape \\[5, 32\\], expected \\[32, 32\\]"):
        read_bundle(bad)


def test_missing_tensor(exported, tmp_path):
    _, _, path = exported
    t = load_file(str(path))
    del t["model.layers.1.mlp.down_proj.weight"]
    m, _ = read_metadata(path)
    save_file(t, str(tmp_path / "m.safetensors"), metadata=m)
    with pytest.raises(GriffinError, match="down_proj.weight is missing"):
        read_bundle(tmp_path / "m.safetensors")


def test_k_that_disagrees_with_the_model(exported, tmp_path):
    _, _, path = exported
    bad = rewrite(path, tmp_path / "k.safetensors", meta={"d_ff": "128"})
    with pytest.raises(GriffinError, match="d_ff 128 .* has 2 × 64"):
        TorchRuntime(tiny_model("llama"), read_bundle(bad))


def test_an_interrupted_write_leaves_nothing(exported, tmp_path, monkeypatch):
    import safetensors.torch

    _, bundle, _ = exported

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(bundle, tmp_path / "new.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]


def test_header_is_read_without_the_data(exported):
    _, bundle, path = exported
    meta, entries = read_metadata(path)
    assert meta["format"] == "griffin-expert" and json.loads(json.dumps(meta)) == meta
    assert entries["griffin.indices.0"] == ("I64", [bundle.info.k[0]])
