"""export --warmup: the full model's first greedy tokens join the statistic, the bundle stores them
and their KV, and generation from the bundle's own prompt starts with them."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from tests.helpers import greedy, masked, prompt_ids, rewrite, run, tiny_model, tiny_prompt
from griffin_export import DecodeOptions, ExportSettings, TorchRuntime, export_ids, read_bundle, write_bundle
from griffin_export.bundle.format import read_metadata
from griffin_export.model.decoding import decode
from griffin_export.errors import GriffinError
from griffin_export.model.prefill import forward, prefill

WARM = 6


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt", "phi3"])
@pytest.mark.parametrize("method", ["topk", "topk_refit"])
def test_warm_up_is_the_export_of_prompt_plus_the_full_models_tokens(arch, method):
    lm = tiny_model(arch)
    ref = copy.deepcopy(lm.model)
    ids = prompt_ids()
    warm_bundle = export_ids(lm, ids, ExportSettings(density=0.5, method=method, warmup=WARM))
    warm = warm_bundle.warmup()
    assert warm == greedy(ref, ids, WARM, lm.config.eos_token_id)
    assert len(warm) == warm_bundle.info.warmup_tokens > 0
    assert warm_bundle.info.prompt_tokens == ids.shape[1] and warm_bundle.cached_tokens == ids.shape[1] + len(warm)
    # the same statistic, Gram, KV and last logits as exporting prompt + warm-up as one prompt
    plain = export_ids(tiny_model(arch), torch.cat([ids, torch.tensor([warm])], 1), ExportSettings(density=0.5,
                                                                                                     method=method, warmup=0))
    for a, b in zip(warm_bundle.indices, plain.indices):
        assert torch.equal(a, b)
    for name, w in plain.weights.items():
        torch.testing.assert_close(warm_bundle.weights[name], w, rtol=1e-4, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(warm_bundle.kv, plain.kv):
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(warm_bundle.last_logits, plain.last_logits, rtol=1e-5, atol=1e-5)
    # and not the prompt's own selection: the warm-up tokens change it
    own = export_ids(tiny_model(arch), ids, ExportSettings(density=0.5, method=method, warmup=0))
    assert any(not torch.equal(a, b) for a, b in zip(warm_bundle.indices, own.indices))


def test_density_one_generates_the_full_models_text():
    lm = tiny_model("llama")
    ref = copy.deepcopy(lm.model)
    ids = prompt_ids()
    bundle = export_ids(lm, ids, ExportSettings(density=1.0, warmup=WARM))
    got = TorchRuntime(lm, bundle).generate(DecodeOptions(max_new_tokens=15, stop_at_eos=False)).token_ids
    assert got == greedy(ref, ids, 15)


def test_pruned_continuation_after_the_warm_up_is_the_masked_full_model():
    lm = tiny_model("llama")
    ref = copy.deepcopy(lm.model)
    ids = prompt_ids()
    bundle = export_ids(lm, ids, ExportSettings(density=0.5, warmup=WARM))
    warm = bundle.warmup()
    got = TorchRuntime(lm, bundle).generate(DecodeOptions(max_new_tokens=15, stop_at_eos=False)).token_ids
    assert got[:len(warm)] == warm
    # prompt + warm-up through the full model, then the kept neurons only
    cache, logits = prefill(ref, torch.cat([ids, torch.tensor([warm])], 1))
    want = []
    with masked(ref, bundle.indices):
        for _ in range(15 - len(warm)):
            want.append(int(torch.argmax(logits)))
            logits = forward(ref, torch.tensor([[want[-1]]]), cache)[-1]
    assert got[len(warm):] == want


def test_round_trip_and_format_version(tmp_path):
    lm = tiny_model("llama")
    bundle = export_ids(lm, prompt_ids(), ExportSettings(density=0.5, warmup=WARM))
    path = write_bundle(bundle, tmp_path / "w.safetensors")
    meta, _ = read_metadata(path)
    assert meta["format_version"] == "2" and meta["warmup_tokens"] == str(len(bundle.warmup()))
    back = read_bundle(path)
    assert back.warmup() == bundle.warmup() and back.info.warmup_tokens == bundle.info.warmup_tokens
    plain = write_bundle(export_ids(lm, prompt_ids(), ExportSettings(density=0.5, warmup=0)), tmp_path / "p.safetensors")
    assert read_metadata(plain)[0]["format_version"] == "1" and read_bundle(plain).warmup() == []
    # the runtime from the file generates what the in-memory bundle does
    opts = DecodeOptions(max_new_tokens=12)
    assert (TorchRuntime(tiny_model("llama"), back).generate(opts).token_ids
            == TorchRuntime(tiny_model("llama"), bundle).generate(opts).token_ids)


def test_without_kv_the_runtime_prefills_prompt_and_warm_up():
    ids = prompt_ids()
    with_kv = export_ids(tiny_model("llama"), ids, ExportSettings(density=0.5, warmup=WARM))
    no_kv = export_ids(tiny_model("llama"), ids, ExportSettings(density=0.5, warmup=WARM, keep_kv=False))
    assert no_kv.kv is None and no_kv.warmup() == with_kv.warmup()
    opts = DecodeOptions(max_new_tokens=14)
    want = TorchRuntime(tiny_model("llama"), with_kv).generate(opts).token_ids
    assert TorchRuntime(tiny_model("llama"), no_kv, keep_full=True).generate(opts).token_ids == want
    pruned = TorchRuntime(tiny_model("llama"), no_kv, pruned_prefill=True).generate(opts).token_ids
    assert pruned[:WARM] == with_kv.warmup()
    # a new prompt has no warm-up tokens of its own
    new = TorchRuntime(tiny_model("llama"), with_kv, keep_full=True).generate(opts, ids=prompt_ids(seed=7))
    assert new.token_ids[:WARM] != with_kv.warmup()


def test_eos_as_the_first_token_leaves_no_warm_up(tmp_path):
    """The full model ends its output at once: nothing to store, a plain version-1 bundle."""
    lm = tiny_model("llama")
    ids = prompt_ids()
    lm.config.eos_token_id = int(torch.argmax(prefill(copy.deepcopy(lm.model), ids)[1]))
    bundle = export_ids(lm, ids, ExportSettings(density=0.5, warmup=WARM))
    assert bundle.warmup_ids is None and bundle.info.warmup_tokens == 0 and bundle.info.format_version == "1"
    back = read_bundle(write_bundle(bundle, tmp_path / "e.safetensors"))
    assert back.warmup() == [] and TorchRuntime(lm, back).generate().stop_reason == "eos"


def test_eos_inside_the_warm_up_ends_it_there(tmp_path):
    """The full model ends its output after two tokens: the bundle holds those two, its KV covers
    prompt + 2 positions (not one more) and its logits are those after them."""
    lm = tiny_model("llama")
    ids, first3 = next((i, f) for i in (prompt_ids(seed=s) for s in range(20))
                       if len(set(f := greedy(copy.deepcopy(lm.model), i, 3))) == 3)  # the third token is new
    lm.config.eos_token_id = first3[2]
    bundle = export_ids(lm, ids, ExportSettings(density=0.5, warmup=WARM))
    assert bundle.warmup() == first3[:2] and bundle.cached_tokens == ids.shape[1] + 2
    assert all(k.shape[2] == ids.shape[1] + 2 for k, _ in bundle.kv)
    _, want = prefill(copy.deepcopy(tiny_model("llama").model), torch.cat([ids, torch.tensor([first3[:2]])], 1))
    torch.testing.assert_close(bundle.last_logits, want, rtol=1e-5, atol=1e-5)
    assert read_bundle(write_bundle(bundle, tmp_path / "e.safetensors")).warmup() == first3[:2]


@pytest.mark.parametrize("meta, tensors, message", [
    ({"warmup_tokens": "3"}, {}, "griffin.warmup_ids should have shape [3]"),
    ({"warmup_tokens": "0"}, {}, "griffin.warmup_ids is there but metadata warmup_tokens is 0"),
    ({"warmup_tokens": "-1"}, {}, "warmup_tokens=-1 is negative"),
    ({"kind": "class"}, {}, "a class bundle cannot have warm-up tokens"),
    ({"format_version": "1"}, {}, "format version 1 cannot hold warm-up tokens"),
    ({"prompt_tokens": "20"}, {}, "griffin.prompt_ids has shape [24], metadata prompt_tokens is 20"),
    ({"warmup_tokens": "2"}, {"griffin.warmup_ids": torch.tensor([5, 6])},
     "the KV cache holds 30 positions; prompt + warm-up tokens are 26"),
    ({}, {"griffin.warmup_ids": torch.arange(WARM, dtype=torch.float32)}, "griffin.warmup_ids has dtype F32"),
    ({}, {"griffin.warmup_ids": torch.full((WARM,), 96)}, "griffin.warmup_ids has token ids outside the vocabulary"),
])
def test_inconsistent_warm_up_is_refused(tmp_path, meta, tensors, message):
    bundle = export_ids(tiny_model("llama"), prompt_ids(), ExportSettings(density=0.5, warmup=WARM))
    assert bundle.info.warmup_tokens == WARM  # the cases above assume a full warm-up
    path = write_bundle(bundle, tmp_path / "w.safetensors")
    bad = rewrite(path, tmp_path / "bad.safetensors", meta=meta, tensors=tensors)
    with pytest.raises(GriffinError, match=re.escape(message)):
        read_bundle(bad)


def test_warm_up_beyond_the_context_is_named():
    lm = tiny_model("llama")  # context 256
    with pytest.raises(GriffinError, match="prompt has 24 tokens \\+ 300 warm-up tokens; the model's context is 256"):
        export_ids(lm, prompt_ids(), ExportSettings(warmup=300))


class WordTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_decode_counts_the_warm_up_towards_the_limit_and_the_stop_strings():
    calls = []

    def step(tok):
        calls.append(tok)
        return torch.nn.functional.one_hot(torch.tensor(9), 16).float()

    first = torch.nn.functional.one_hot(torch.tensor(8), 16).float()
    out = decode(step, first, DecodeOptions(max_new_tokens=3), prefix=[1, 2, 3, 4])
    assert out.token_ids == [1, 2, 3] and calls == []  # the warm-up is in the cache already
    out = decode(step, first, DecodeOptions(max_new_tokens=6), prefix=[1, 2])
    assert out.token_ids == [1, 2, 8, 9, 9, 9] and calls == [8, 9, 9]
    out = decode(step, first, DecodeOptions(max_new_tokens=6, stop=["w2"]), prefix=[1, 2, 3],
                 tokenizer=WordTokenizer())
    assert (out.text, out.stop_reason) == ("w1 ", "stop") and calls == [8, 9, 9]


def test_negative_warm_up_is_refused():
    with pytest.raises(GriffinError, match="warm-up must be >= 0 tokens, got -2"):
        ExportSettings(warmup=-2)


def test_cli_export_inspect_generate(tmp_path, tiny_dir, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text(tiny_prompt(), encoding="utf-8")
    out_file = tmp_path / "w.safetensors"
    code, out, err = run([prompt, "-o", out_file, "--model", tiny_dir("llama"), "-q", "--warmup", "4"], capsys)
    assert code == 0, err
    n = read_bundle(out_file).info.warmup_tokens
    assert f"20 prompt tokens + {n} warm-up tokens" in out
    code, out, _ = run(["inspect", out_file], capsys)
    assert code == 0 and f"+ {n} warm-up tokens (full model" in out
    code, out, err = run(["generate", out_file, "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    assert f"[{6 - n} tokens in " in err and f"after {n} warm-up tokens from the bundle" in err
    code, out, err = run([prompt, "-o", tmp_path / "x.safetensors", "--model", tiny_dir("llama"), "--warmup", "-1"],
                         capsys)
    assert code == 2 and "warm-up must be >= 0 tokens" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()
