"""ONNX export + ONNX Runtime loader: parity with the PyTorch runtime on every architecture,
bundle swapping, graph layout, inspection and every bad input of the issue.

Tolerance: ORT and PyTorch run the same fp32 math in a different operation order; logits
agree to ~1e-6 here, asserted at atol = rtol = 1e-4 (the logits are O(1)).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import ARCHS, ROOT, VOCAB, decode_tokens, prompt_ids, refused, run, steps, tiny_model, tiny_prompt
from griffin_export import DecodeOptions, ExportSettings, TorchRuntime, export_ids, from_model
from griffin_export.targets.onnx.export import DATA_FILE, MODEL_FILE, export_onnx
from griffin_export.model.prefill import prefill
from griffin_export.runtime.onnx import CPU, CUDA, OnnxRuntime, gpu_answers, load_onnx_runtime, read_graph

ATOL = RTOL = 1e-4
STEPS = 20

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> the tiny model, its bundles (density 0.5 and 1.0) and two graphs: the full
    model's and the 0.5 bundle's. Exported once per module (tracing is the slow part)."""
    made = {}

    def get(arch: str):
        if arch not in made:
            root = tmp_path_factory.mktemp(f"onnx-{arch}")
            lm, ids = tiny_model(arch), prompt_ids()
            half = export_ids(lm, ids, ExportSettings(density=0.5, warmup=0))
            one = export_ids(lm, ids, ExportSettings(density=1.0, warmup=0))
            full = export_onnx(lm, root / "full")
            pruned = export_onnx(lm, root / "pruned", half)
            made[arch] = SimpleNamespace(lm=lm, ids=ids, half=half, one=one, full=full, pruned=pruned)
        return made[arch]

    return get


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_logits_equal_the_torch_runtime(exported, arch, density):
    e = exported(arch)
    bundle, graph = (e.one, e.full) if density == 1.0 else (e.half, e.pruned)
    if arch in ("gemma2", "gemma3_text"):  # window 16 < 24 prompt tokens: the windowed KV really gets left-padded
        assert min(k.shape[2] for k, _ in bundle.kv) < e.ids.shape[1]
    ort_rt = OnnxRuntime(graph, bundle, full=e.full, provider="cpu")
    torch_rt = TorchRuntime(tiny_model(arch), bundle, keep_full=True)
    tokens = decode_tokens(STEPS)

    # from the bundle's KV cache
    got = steps(ort_rt, ort_rt.start(), tokens)
    torch.testing.assert_close(got, steps(torch_rt, torch_rt.start(), tokens), atol=ATOL, rtol=RTOL)
    # a new prompt: prefill through the full graph, then decode with the experts
    state, first = ort_rt.start(e.ids)
    _, want_first = prefill(tiny_model(arch).model, e.ids)
    torch.testing.assert_close(first, want_first, atol=ATOL, rtol=RTOL)
    got_new = steps(ort_rt, (state, first), tokens)
    torch.testing.assert_close(got_new, steps(torch_rt, torch_rt.start(e.ids), tokens), atol=ATOL, rtol=RTOL)
    if density < 1:  # the experts really changed the decode, so the comparisons above can fail
        full_rt = TorchRuntime(tiny_model(arch), e.one)
        assert (got[1:] - steps(full_rt, full_rt.start(), tokens)[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_a_swapped_in_bundle_gives_its_own_logits(exported, arch):
    e = exported(arch)
    other = export_ids(tiny_model(arch), prompt_ids(seed=7), ExportSettings(density=0.5, method="random", seed=3, warmup=0))
    assert other.info.k == e.half.info.k
    assert any(not torch.equal(a, b) for a, b in zip(other.indices, e.half.indices))
    tokens = decode_tokens(STEPS, seed=9)
    swapped = OnnxRuntime(e.pruned, other, provider="cpu")
    got = steps(swapped, swapped.start(), tokens)
    torch_rt = TorchRuntime(tiny_model(arch), other)
    want = steps(torch_rt, torch_rt.start(), tokens)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # the same KV with the graph's own (exported) weights decodes differently: the swap is real
    own = OnnxRuntime(e.pruned, None, provider="cpu")
    stale = steps(own, (own.state_from_kv(other.kv, other.info.prompt_tokens), other.last_logits), tokens)
    assert (stale[1:] - got[1:]).abs().max() > 1e-3


def test_pruned_prefill_runs_the_prompt_through_the_experts(exported):
    e = exported("llama")
    ort_rt = OnnxRuntime(e.pruned, e.half, provider="cpu", pruned_prefill=True)
    torch_rt = TorchRuntime(tiny_model("llama"), e.half, pruned_prefill=True)
    tokens = decode_tokens(STEPS)
    torch.testing.assert_close(steps(ort_rt, ort_rt.start(), tokens), steps(torch_rt, torch_rt.start(), tokens),
                               atol=ATOL, rtol=RTOL)


def test_a_class_refit_bundle_decodes_alike_in_both_runtimes(exported, tiny_dir):
    """A class bundle refit on its prompts' Gram swaps into the pruned graph: a new prompt, with the
    full prefill and with the prefill through the experts, generates the PyTorch runtime's tokens."""
    from griffin_export.files.inputs import Prompt
    from griffin_export.classes.build import export_class
    from griffin_export.settings import ClassSettings
    from griffin_export.model.load import load_model

    e = exported("llama")
    lm = load_model(str(tiny_dir("llama")), quiet=True)  # the same weights as tiny_model("llama"), with a tokenizer
    assert lm.fingerprint == e.lm.fingerprint
    prompts = [Prompt(tiny_prompt(12 + 5 * i), str(i)) for i in range(3)]
    refit = export_class(lm, prompts, ClassSettings("c", method="topk_refit")).bundle
    plain = export_class(lm, prompts, ClassSettings("c")).bundle
    opts = DecodeOptions(max_new_tokens=12)
    ids = prompt_ids(18, seed=4)
    for pruned in (False, True):
        want = TorchRuntime(tiny_model("llama"), refit, keep_full=not pruned, pruned_prefill=pruned)
        got = OnnxRuntime(e.pruned, refit, full=None if pruned else e.full, provider="cpu", pruned_prefill=pruned)
        tokens = want.generate(opts, ids=ids).token_ids
        assert got.generate(opts, ids=ids).token_ids == tokens and len(tokens) > 3
        # the refit columns are in play: the same neurons unrefit give other logits
        other = OnnxRuntime(e.pruned, plain, full=None if pruned else e.full, provider="cpu", pruned_prefill=pruned)
        assert (steps(got, got.start(ids), decode_tokens(STEPS)) - steps(other, other.start(ids), decode_tokens(STEPS))
                ).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text"])
def test_a_warm_up_bundle_generates_like_the_torch_runtime(exported, arch):
    """export --warmup: the ONNX runtime resumes after the warm-up tokens and starts its output with them
    (gemma2: the windowed KV of prompt + warm-up); with and without the bundle's KV."""
    e = exported(arch)
    warm = export_ids(tiny_model(arch), e.ids, ExportSettings(density=0.5, warmup=5))
    assert warm.info.k == e.half.info.k and warm.warmup()
    opts = DecodeOptions(max_new_tokens=12, stop_at_eos=False)
    want = TorchRuntime(tiny_model(arch), warm).generate(opts).token_ids
    assert want[:len(warm.warmup())] == warm.warmup()
    assert OnnxRuntime(e.pruned, warm, provider="cpu").generate(opts).token_ids == want
    no_kv = dataclasses.replace(warm, kv=None, last_logits=None)
    assert OnnxRuntime(e.pruned, no_kv, full=e.full, provider="cpu").generate(opts).token_ids == want


def test_generate_uses_the_shared_decoding_loop(exported):
    e = exported("qwen2")
    opts = DecodeOptions(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=4, stop_at_eos=False)
    got = OnnxRuntime(e.pruned, e.half, provider="cpu").generate(opts)
    want = TorchRuntime(tiny_model("qwen2"), e.half).generate(opts)
    assert got.token_ids == want.token_ids and len(got.token_ids) == 12


@pytest.mark.slow
def test_a_standalone_pruned_checkpoint_exports_with_full(exported, tiny_dir, tmp_path, capsys):
    """`griffin-export onnx --full --model DIR` on a checkpoint whose intermediate_size is k."""
    from griffin_export.targets.checkpoint import save_checkpoint
    from griffin_export.model.load import load_model

    e = exported("llama")
    base = load_model(str(tiny_dir("llama")), quiet=True)
    bundle = export_ids(base, e.ids, ExportSettings(density=0.5, warmup=0))
    ckpt = save_checkpoint(base, bundle, tmp_path / "ckpt")
    out = tmp_path / "ckpt_onnx"
    out.mkdir()
    (out / MODEL_FILE).write_bytes(b"an older export")  # --force replaces an earlier export
    code, stdout, err = run(["onnx", "--full", "--model", ckpt, "-o", out, "--force", "-q"], capsys)
    assert code == 0, err
    assert "full llama graph, k=32/32 per layer × 2 layers" in stdout
    ref = load_model(str(ckpt), quiet=True)
    rt = OnnxRuntime(out, None, full=out, provider="cpu")
    tokens = decode_tokens(STEPS)
    cache, first = prefill(ref.model, e.ids)
    ref_steps = steps(SimpleNamespace(step=lambda c, t: _torch_step(ref.model, c, t)), (cache, first), tokens)
    torch.testing.assert_close(steps(rt, rt.start(e.ids), tokens), ref_steps, atol=ATOL, rtol=RTOL)


def _torch_step(model, cache, token):
    from griffin_export.model.prefill import forward

    return forward(model, torch.tensor([[token]]), cache)[-1]


# -- the graph -----------------------------------------------------------------------------------


def test_graph_io_names_dynamic_axes_metadata_and_external_weights(exported):
    import onnx

    e = exported("llama")
    path = e.pruned / MODEL_FILE
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    inputs = {v.name: shape(v) for v in proto.graph.input}
    outputs = {v.name: shape(v) for v in proto.graph.output}
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                            "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 8]
    assert list(outputs) == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert outputs["present.0.key"] == ["batch_size", 2, "past_sequence_length + sequence_length", 8]
    meta = {p.key: p.value for p in proto.metadata_props}
    info = e.half.info
    assert meta["base_fingerprint"] == info.base_fingerprint and meta["k"] == "32,32"
    assert (meta["density"], meta["method"], meta["kind"]) == ("0.5", "topk", "pruned")
    assert meta["bundle_format_version"] == info.format_version and meta["format_version"] == "1"
    # the FF weights are external, named as in the bundle, with the bundle's shapes
    inits = {t.name: t for t in proto.graph.initializer}
    for name, t in e.half.weights.items():
        assert list(inits[name].dims) == list(t.shape)
        assert inits[name].data_location == onnx.TensorProto.EXTERNAL
    assert (e.pruned / DATA_FILE).stat().st_size > 0
    assert (e.pruned / MODEL_FILE).stat().st_size < 200_000  # no stack traces in the node metadata


def test_one_graph_serves_any_batch_and_empty_past(exported):
    """Dynamic batch: two copies of the prompt in one batch give the single prompt's logits."""
    import onnxruntime as ort

    e = exported("mistral")
    info = read_graph(e.full).info
    sess = ort.InferenceSession(str(e.full / MODEL_FILE), providers=[CPU])
    T = e.ids.shape[1]

    def run_batch(b: int):
        feed = {"input_ids": e.ids.repeat(b, 1).numpy(), "attention_mask": np.ones((b, T), np.int64),
                "position_ids": np.arange(T)[None].repeat(b, 0)}
        for i in range(info.num_layers):
            for t in ("key", "value"):
                feed[f"past_key_values.{i}.{t}"] = np.zeros((b, info.kv_heads, 0, info.head_dim), np.float32)
        return sess.run(["logits"], feed)[0]

    one, two = run_batch(1), run_batch(2)
    assert two.shape == (2, T, VOCAB)
    np.testing.assert_allclose(two[0], one[0], atol=ATOL)
    np.testing.assert_allclose(two[1], one[0], atol=ATOL)


# -- bad input -----------------------------------------------------------------------------------


def test_graph_and_bundle_that_disagree_are_refused_naming_both(exported):
    e = exported("llama")
    g = str(e.pruned)
    with_info = lambda **kw: dataclasses.replace(e.half, info=dataclasses.replace(e.half.info, **kw))  # noqa: E731
    refused(lambda: OnnxRuntime(e.pruned, e.one, provider="cpu", source="one.safetensors"),
            g, "k=32 in every layer", "one.safetensors", "k=64 in every layer")
    refused(lambda: OnnxRuntime(e.pruned, with_info(num_layers=3), provider="cpu", source="b"),
            g, "2 layers", "bundle b has 3")
    refused(lambda: OnnxRuntime(e.pruned, with_info(dtype="float16"), provider="cpu", source="b"),
            g, "float32", "bundle b holds float16")
    stranger = export_ids(tiny_model("llama", seed=1), e.ids, ExportSettings(density=0.5, warmup=0))
    refused(lambda: OnnxRuntime(e.pruned, stranger, provider="cpu", source="b"),
            g, e.half.info.base_fingerprint[:16], "bundle b", stranger.info.base_fingerprint[:16])
    refused(lambda: OnnxRuntime(e.pruned, e.half, full=e.pruned, provider="cpu"), "needs a graph of the full model")


def test_missing_or_truncated_external_data_and_corrupt_graphs_are_refused(exported, tmp_path):
    e = exported("llama")
    broken = tmp_path / "g"
    shutil.copytree(e.pruned, broken)
    data = (broken / DATA_FILE).read_bytes()
    (broken / DATA_FILE).write_bytes(data[: len(data) // 2])
    refused(lambda: OnnxRuntime(broken, e.half, provider="cpu"), "model.onnx.data is truncated")
    (broken / DATA_FILE).unlink()
    refused(lambda: OnnxRuntime(broken, e.half, provider="cpu"), "external data file model.onnx.data is missing")
    (broken / MODEL_FILE).write_bytes(b"\x08\x07garbage" * 100)
    refused(lambda: OnnxRuntime(broken, e.half, provider="cpu"), "not a valid ONNX file")
    refused(lambda: OnnxRuntime(tmp_path / "nowhere", e.half, provider="cpu"), "does not exist")


def test_new_prompt_without_a_full_graph_names_the_fix(exported):
    e = exported("llama")
    no_kv = dataclasses.replace(e.half, kv=None)
    rt = OnnxRuntime(e.pruned, no_kv, provider="cpu")
    refused(lambda: rt.start(), "griffin-export onnx --full", "pruned_prefill")


def test_existing_output_needs_force_and_never_wipes_other_folders(exported, tmp_path):
    e = exported("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused(lambda: export_onnx(e.lm, out), "exists; pass force=True")
    refused(lambda: export_onnx(e.lm, out, force=True), "holds no model.onnx", "not replacing it")
    assert (out / "notes.txt").read_text() == "keep me"
    refused(lambda: export_onnx(e.lm, tmp_path / "missing" / "out"), "does not exist")


def test_an_interrupted_export_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    """Interrupted after the graph is written into the temp directory: neither a new output
    directory nor temp files remain, and an earlier export being replaced stays intact."""
    import onnx_ir as ir

    from griffin_export.targets.onnx import export as ox

    e = exported("llama")
    # skip the slow trace: the "traced" program is the already exported full graph
    monkeypatch.setattr(ox, "_trace", lambda lm, info: SimpleNamespace(model=ir.load(e.full / MODEL_FILE)))
    written = []

    def interrupt(path):
        written.append(sorted(p.name for p in path.parent.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(ox, "check_graph", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(e.lm, tmp_path / "new")
    assert written == [[MODEL_FILE, DATA_FILE]]  # it was interrupted with the files half-way in place
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    old = tmp_path / "old"
    shutil.copytree(e.full, old)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(e.lm, old, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (old / MODEL_FILE).read_bytes() == (e.full / MODEL_FILE).read_bytes()


# -- providers -----------------------------------------------------------------------------------

_GPU, _WHY = gpu_answers()


def test_provider_auto_picks_cpu_here_and_says_why_only_when_a_gpu_was_asked_for(exported):
    if _GPU:
        pytest.skip("a GPU answers here: the CUDA tests below cover this machine")
    e = exported("llama")
    rt = OnnxRuntime(e.pruned, e.half)
    assert rt.provider == CPU and rt._decoder.sess.get_providers() == [CPU]
    # auto: the CPU is no news on a machine without a GPU; the reason is kept for who asks
    assert rt.describe().endswith("CPUExecutionProvider") and rt.provider_reason == _WHY
    refused(lambda: OnnxRuntime(e.pruned, e.half, provider="cuda"), "CUDA provider requested", _WHY)


@pytest.mark.skipif(not _GPU, reason=f"no GPU for the CUDA provider: {_WHY}")
def test_cuda_provider_keeps_the_cache_on_the_gpu_and_matches_torch(exported):
    e = exported("llama")
    rt = OnnxRuntime(e.pruned, e.half, full=e.full)  # auto
    assert rt.provider == CUDA and rt._decoder.sess.get_providers()[0] == CUDA
    state, first = rt.start()
    rt.step(state, 5)
    assert all(v.device_name().lower() == "cuda" for v in state.past)
    tokens = decode_tokens(STEPS)
    torch_rt = TorchRuntime(tiny_model("llama"), e.half)
    torch.testing.assert_close(steps(rt, rt.start(), tokens), steps(torch_rt, torch_rt.start(), tokens),
                               atol=1e-3, rtol=1e-3)


# -- inspection and the command line ---------------------------------------------------------------


def test_inspect_a_graph_without_its_weights(exported, tmp_path, capsys):
    e = exported("opt")
    graph = tmp_path / "g"
    shutil.copytree(e.pruned, graph)
    (graph / DATA_FILE).unlink()  # inspecting never needs the weights
    code, out, err = run(["inspect", graph / MODEL_FILE], capsys)
    assert code == 0, err
    assert "FF width     32 in every layer × 2 layers (opt names)" in out
    assert "past_key_values.{i}.key      float    [batch_size, 4, past_sequence_length, 8]  × 2 layers" in out
    assert "model.onnx.data: MISSING" in out and "MatMul" in out
    code, out, err = run(["inspect", graph, "--json"], capsys)
    s = json.loads(out)
    assert s["ff_width_per_layer"] == [32, 32] and s["opset"] == {"ai.onnx": 23}
    assert s["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
    assert s["initializers"]["external"]["bytes"] > 0 and s["metadata"]["architecture"] == "opt"
    assert s["operators"]["MatMul"] > 0
    (graph / MODEL_FILE).write_bytes(b"not protobuf at all")
    code, _, err = run(["inspect", graph / MODEL_FILE], capsys)
    assert code == 2 and err.startswith("griffin-export: error:") and "not a valid ONNX file" in err


@pytest.mark.slow
def test_cli_export_generate_with_onnx_runtime(tmp_path, tiny_dir, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text(tiny_prompt(), encoding="utf-8")
    bundle = tmp_path / "e.safetensors"
    code, _, err = run([prompt, "-o", bundle, "--model", tiny_dir("phi3"), "-q"], capsys)
    assert code == 0, err
    code, out, err = run(["onnx", bundle, "-o", tmp_path / "g", "-q"], capsys)
    assert code == 0, err
    assert "pruned phi3 graph, k=32/64 per layer × 2 layers" in out
    args = ["generate", bundle, "--max-new-tokens", "6", "-q"]
    code, want, err = run(args, capsys)
    assert code == 0, err
    code, got, err = run([*args, "--runtime", "onnx", "--onnx", tmp_path / "g"], capsys)
    assert code == 0, err
    assert got == want and got.strip()
    code, got, err = run(["generate", bundle, "--max-new-tokens", "6", "--runtime", "onnx", "--onnx",
                          tmp_path / "g"], capsys)
    assert "CPUExecutionProvider" in err or "CUDAExecutionProvider" in err


@pytest.mark.parametrize("argv, message", [
    (["onnx", "-o", "{tmp}/x"], "give a BUNDLE, or --full"),
    (["onnx", "{tmp}/b.safetensors", "--full", "-o", "{tmp}/x"], "give a BUNDLE, or --full"),
    (["onnx", "--full", "-o", "{tmp}"], "exists; pass --force"),
    (["generate", "{tmp}/b.safetensors", "--runtime", "onnx"], "the onnx runtime needs --onnx DIR"),
    (["bench", "--density", "abc"], "density 'abc' is not a number"),
    (["bench", "--density", "0.5,1.5"], "density must be in (0, 1], got 1.5"),
    (["bench", "--method", "topk,nope"], "unknown method 'nope'"),
    (["bench", "--method", ","], "no methods given"),
    (["bench", "--runtime", "torch,tvm"], "unknown runtime 'tvm'"),
    (["bench", "--repeats", "0"], "--repeats >= 1; got 0, 64, 0"),
    (["bench", "--threads", "0"], "Invalid value for '--threads'"),
])
def test_cli_bad_input_is_one_line(exported, tmp_path, capsys, argv, message):
    from griffin_export import write_bundle

    write_bundle(exported("llama").half, tmp_path / "b.safetensors")
    code, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_bench_results_are_written_as_json_and_markdown(tmp_path):
    from griffin_export.evaluation.speed import format_table, write_results

    row = lambda rt, cfg, k, tps: {"runtime": rt, "kv_dtype": "float32", "config": cfg, "k": k,  # noqa: E731
                                   "decode_tok_s": tps, "speedup": 1.0, "bound": 1.0, "bundle_bytes": 0,
                                   "weight_read_bytes": 1e6, "kv_read_bytes": 1e6, "limit_tok_s": 10.0,
                                   "memory_fraction": 1.25}
    r = {"model": "m", "dtype": "float32", "device": "cpu", "machine": {"cpu": "c", "torch_threads": 2},
         "prompt": "row 0 of d.jsonl", "prompt_tokens": 9, "new_tokens": 8, "repeats": 1, "export_s": 1.0,
         "prefill_s": 1.0, "export_over_prefill": 1.0, "peak_rss_bytes": 1, "onnxruntime": "1.x",
         "onnx_provider": CPU, "rows": [row("torch", "full", 64, 10.0), row("onnx", "full", 64, 12.5)]}
    js, md = write_results(r, tmp_path / "out")
    assert json.loads(js.read_text())["rows"][1]["runtime"] == "onnx"
    assert "| onnx | float32 | full model | 64 | 12.5 |" in md.read_text() and md.read_text() == format_table(r) + "\n"
    assert "| 2.0 | 1.00× | — | 10 | 125 % |" in md.read_text()  # MB read, bounds, the memory limit and its fraction
    refused(lambda: write_results(r, tmp_path / "out"), "exists; pass force=True")
    write_results(r, tmp_path / "out", force=True)


# -- the default model -----------------------------------------------------------------------------


@pytest.mark.real_model
def test_default_model_onnx_greedy_tokens_equal_torch(real_lm, tmp_path):
    from griffin_export import export_prompt, read_bundle, write_bundle

    text = (ROOT / "samples" / "prompt.txt").read_text()
    bundle = export_prompt(real_lm, text, ExportSettings(density=0.5, warmup=0))
    path = write_bundle(bundle, tmp_path / "expert.safetensors")
    graph = export_onnx(real_lm, tmp_path / "expert_onnx", bundle)  # the lean graph (Llama)
    traced = export_onnx(real_lm, tmp_path / "traced_onnx", bundle, graph="traced")
    assert (read_graph(graph).info.layout, read_graph(traced).info.layout) == ("lean", "traced")
    opts = DecodeOptions(max_new_tokens=24)
    got = load_onnx_runtime(graph, path, provider="cpu").generate(opts)

    def torch_runtime(**kw):
        lm = from_model(copy.deepcopy(real_lm.model), real_lm.tokenizer, real_lm.identity)
        lm._fingerprint = real_lm.fingerprint
        return TorchRuntime(lm, read_bundle(path), **kw)

    want = torch_runtime(lean=False).generate(opts)  # transformers' forward every step
    assert got.token_ids == want.token_ids and got.text.strip()
    assert load_onnx_runtime(traced, path, provider="cpu").generate(opts).token_ids == want.token_ids
    lean = torch_runtime()
    assert lean.generate(opts).token_ids == want.token_ids and lean.lean is not None
    # the deployment sample, as the README runs it
    r = subprocess.run([sys.executable, str(ROOT / "samples" / "deploy_onnx.py"), str(graph), str(path),
                        "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and want.text.strip().startswith(r.stdout.strip()), (r.stdout, want.text)
