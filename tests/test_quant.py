"""4-bit experts: ONNX Runtime int4 graphs (onnx_quant.py) and pruned GGUF files (gguf_export.py).

Tolerance: int4 blocks of 16 weights on the tiny models move logits by up to ~0.25 on a scale
of ~2 (measured); asserted as max |int4 - fp32| < 0.25 * max |fp32| + 0.05.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from griffin_export import ExportSettings, export_ids
from griffin_export.errors import GriffinError
from griffin_export.targets.onnx.export import export_onnx
from griffin_export.settings import BenchSettings, QuantSettings
from griffin_export.runtime.onnx import OnnxRuntime, read_graph
from tests.helpers import VOCAB, prompt_ids, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")
Q = QuantSettings(block_size=16, accuracy_level=0)


def steps(rt, n=10, seed=5):
    toks = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    state, first = rt.start()
    return torch.stack([first, *(rt.step(state, t) for t in toks)])


@pytest.mark.parametrize("arch,lean,algorithm", [("llama", True, "rtn"), ("opt", False, "rtn"),
                                                 ("gemma3_text", False, "rtn"), ("llama", True, "hqq"),
                                                 ("opt", False, "hqq")])
@pytest.mark.slow
def test_int4_graph_is_close_to_fp32_and_a_swapped_bundle_gets_its_own_quantized_weights(tmp_path, arch, lean,
                                                                                          algorithm):
    Q = QuantSettings(block_size=16, accuracy_level=0, algorithm=algorithm)
    lm = tiny_model(arch, lean=lean)
    b = export_ids(lm, prompt_ids(), ExportSettings(density=0.5, warmup=0))
    other = export_ids(lm, prompt_ids(seed=7), ExportSettings(density=0.5, method="random", seed=3, warmup=0))
    fp32 = export_onnx(lm, tmp_path / "f", b)
    q = export_onnx(lm, tmp_path / "q", b, quantize=Q)
    q_other = export_onnx(lm, tmp_path / "qo", other, quantize=Q)
    g = read_graph(q)
    assert g.info.quantization == "int4" and g.packing and g.widths == list(b.info.k)
    assert g.info.quant_settings() == Q
    assert not any(n.endswith("mlp.down_proj.weight") or n.endswith("fc2.weight") for n in g.initializers)
    want, got = steps(OnnxRuntime(fp32, b, provider="cpu")), steps(OnnxRuntime(q, b, provider="cpu"))
    err = (want - got).abs().max()
    assert 0 < err < 0.25 * want.abs().max() + 0.05
    swapped = steps(OnnxRuntime(q, other, provider="cpu"))
    torch.testing.assert_close(swapped, steps(OnnxRuntime(q_other, other, provider="cpu")), atol=1e-5, rtol=1e-5)
    assert (swapped - got).abs().max() > 1e-3  # the swap is real


def test_a_bundle_of_another_k_or_model_is_refused_by_a_quantized_graph(tmp_path):
    lm = tiny_model("llama", lean=True)
    b = export_ids(lm, prompt_ids(), ExportSettings(density=0.5, warmup=0))
    q = export_onnx(lm, tmp_path / "q", b, quantize=Q)
    with pytest.raises(GriffinError, match="k="):
        OnnxRuntime(q, export_ids(lm, prompt_ids(), ExportSettings(density=0.25, warmup=0)), provider="cpu")
    foreign = tiny_model("llama", seed=3, lean=True)
    with pytest.raises(GriffinError, match="fingerprint"):
        OnnxRuntime(q, export_ids(foreign, prompt_ids(), ExportSettings(density=0.5, warmup=0)), provider="cpu")


@pytest.mark.parametrize("kw,needle", [({"block_size": 24}, "power of 2"), ({"accuracy_level": 7}, "accuracy_level"),
                                        ({"scheme": "int3"}, "unknown quantization"),
                                        ({"algorithm": "gptq"}, "unknown `algorithm`"),
                                        ({"algorithm": "hqq", "symmetric": True}, "no symmetric form")])
def test_bad_quant_settings_are_one_line_errors(kw, needle):
    with pytest.raises(GriffinError, match=needle):
        QuantSettings(**kw)


def test_inspect_shows_the_quantization(tmp_path):
    from griffin_export.describe import inspect_path

    lm = tiny_model("llama", lean=True)
    q = export_onnx(lm, tmp_path / "q", export_ids(lm, prompt_ids(), ExportSettings(density=0.5, warmup=0)), quantize=Q)
    data, text = inspect_path(q)
    assert data["quantization"]["scheme"] == "int4" and data["quantization"]["block_size"] == 16
    assert "int4 MatMulNBits" in text and "quant_packing" not in text


@pytest.mark.slow
@pytest.mark.real_model
def test_pruned_gguf_round_trips_through_the_gguf_reader(real_lm, tmp_path):
    import gguf

    from griffin_export.targets.gguf_export import base_gguf, write_pruned_gguf

    b = export_ids(real_lm, prompt_ids(40, seed=2) + 10, ExportSettings(density=0.5, method="topk_refit_edges",
                                                                        warmup=0))
    assert len(set(b.info.k)) > 1
    base = base_gguf(None, None, b.info)
    out = write_pruned_gguf(b, base, tmp_path / "p.gguf", "F32")
    r, src = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(base))
    assert list(r.fields["llama.feed_forward_length"].contents()) == list(b.info.k)
    assert r.fields["tokenizer.chat_template"].contents() == src.fields["tokenizer.chat_template"].contents()
    assert r.fields["griffin.base_fingerprint"].contents() == b.info.base_fingerprint
    t = {x.name: x for x in r.tensors}
    for i in (0, 5):
        gate = b.weights[f"model.layers.{i}.mlp.gate_proj.weight"]
        torch.testing.assert_close(torch.from_numpy(t[f"blk.{i}.ffn_gate.weight"].data.copy()), gate)
        assert list(t[f"blk.{i}.ffn_down.weight"].shape) == [b.info.k[i], 576]
    with pytest.raises(GriffinError, match="exists"):
        write_pruned_gguf(b, base, out, "F32")
    with pytest.raises(GriffinError, match="unknown `quant`"):
        write_pruned_gguf(b, base, tmp_path / "x.gguf", "Q9")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed ([llama])")
def test_llama_cpp_runs_a_pruned_gguf_like_the_pruned_torch_model(real_lm, tmp_path):
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    from griffin_export.bundle.experts import installed
    from griffin_export.targets.gguf_export import base_gguf, write_pruned_gguf
    from griffin_export.model.prefill import prefill

    ids = prompt_ids(40, seed=2) + 10
    b = export_ids(real_lm, ids, ExportSettings(density=0.5, warmup=0))
    out = write_pruned_gguf(b, base_gguf(None, None, b.info), tmp_path / "p.gguf", "F16")
    llm = Llama(str(out), n_ctx=128, n_threads=2, verbose=False)
    llm.eval(ids[0].tolist())
    got = torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).copy())
    with installed(real_lm, b.weights):
        _, want = prefill(real_lm.model, ids)
    # F16 weights and llama.cpp's kernels: same argmax, logits within 0.1 of a ~20 scale
    assert int(got.argmax()) == int(want.argmax())
    assert (got - want.float()).abs().max() < 0.1 * want.abs().max()


@pytest.mark.slow
def test_bench_times_int4_rows_beside_the_float_ones():
    from griffin_export.evaluation.speed import format_table, run_bench

    runtimes = ["onnx-lean", "onnx-int4", "onnx-lean-int4"]
    r = run_bench(lm=tiny_model("llama", lean=True), ids=prompt_ids(40), prompt_source="random tokens",
                  settings=BenchSettings(densities=[0.5], new_tokens=4, repeats=1, runtimes=runtimes,
                                         time_export=False, quantize=Q))
    assert {(row["runtime"], row["config"]) for row in r["rows"]} == {(x, c) for x in runtimes for c in ("full", "0.5")}
    int4 = {row["config"]: row for row in r["rows"] if row["runtime"] == "onnx-lean-int4"}
    lean = {row["config"]: row for row in r["rows"] if row["runtime"] == "onnx-lean"}
    assert int4["0.5"]["vs"] == "full"
    # what a step reads: the 4-bit blocks with their scales, against the float32 weights
    assert int4["full"]["weight_read_bytes"] < 0.5 * lean["full"]["weight_read_bytes"]
    assert 1 < int4["0.5"]["bound"] and int4["0.5"]["weight_read_bytes"] < int4["full"]["weight_read_bytes"]
    assert int4["full"]["graph_bytes"] < lean["full"]["graph_bytes"]  # 4-bit weights are smaller
    assert "block 16" in r["int4"] and "-int4 rows: MatMulNBits int4, rtn, block 16" in format_table(r)


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed ([llama])")
def test_bench_times_llama_cpp_on_the_base_and_the_pruned_gguf(real_lm):
    from griffin_export.evaluation.speed import format_table, run_bench

    # Q8_0: the base (Q4_1) is requantized by llama.cpp for the full row; two densities, two files; the KV
    # cache at Q8_0 (int8) and at llama.cpp's default F16 (every row's "vs llama.cpp" reference)
    r = run_bench(lm=real_lm, ids=prompt_ids(40, seed=2) + 10, prompt_source="random tokens",
                  settings=BenchSettings(densities=[0.25, 0.5], new_tokens=4, repeats=1, runtimes=["llama.cpp"],
                                         time_export=False, gguf_quant="Q8_0", kv_dtypes=["int8"]))
    rows = {(row["kv_label"], row["config"]): row for row in r["rows"]}
    assert set(rows) == {(kv, c) for kv in ("F16", "Q8_0") for c in ("full", "0.25", "0.5")} and r["gguf_quant"] == "Q8_0"
    f16 = {c: rows[("F16", c)] for c in ("full", "0.25", "0.5")}
    assert f16["full"]["vs_llama_cpp"] == 1.0 and f16["0.5"]["vs_llama_cpp"] == pytest.approx(f16["0.5"]["speedup"])
    # the pruned GGUFs are smaller; Q8_0 is larger than the Q4_1 base (~105 MB)
    assert f16["0.25"]["graph_bytes"] < f16["0.5"]["graph_bytes"] < f16["full"]["graph_bytes"]
    assert f16["full"]["graph_bytes"] > 130e6
    # what a step reads: every tensor but the token embedding, which the output head leaves to one row (or,
    # tied, is the head); a Q8_0 cache reads 34 bytes per 32 values, F16 64
    assert 0.5 * f16["full"]["graph_bytes"] < f16["full"]["weight_read_bytes"] <= f16["full"]["graph_bytes"]
    assert rows[("Q8_0", "0.5")]["kv_read_bytes"] == pytest.approx(f16["0.5"]["kv_read_bytes"] * 34 / 64)
    table = format_table(r)
    assert "| llama.cpp | F16 | density 0.5 | 768 |" in table and "vs llama.cpp" in table
    assert "flash attention with a Q8_0 cache only" in table  # so the F16 reference runs without it, the faster


@pytest.mark.slow
def test_4bit_bad_inputs_are_one_line_errors_and_leave_nothing(tmp_path, tiny_dir, capsys):
    from tests.helpers import run

    def one_line(argv, *parts):
        code, _, err = run(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert all(p in err for p in parts), err

    prompt = tmp_path / "p.txt"
    prompt.write_text("the cat sat on the mat and then the dog ran to the cat", encoding="utf-8")
    bundles = {}
    for name, arch, density in (("b", "llama", "0.5"), ("quarter", "llama", "0.25"), ("opt", "opt", "0.5")):
        bundles[name] = tmp_path / f"{name}.safetensors"
        assert run([prompt, "-o", bundles[name], "--model", tiny_dir(arch), "--density", density, "-q"], capsys)[0] == 0
    model = ["--model", tiny_dir("llama")]
    q = tmp_path / "q"
    assert run(["onnx", bundles["b"], "-o", q, *model, "--quantize", "int4", "--block-size", "16", "-q"], capsys)[0] == 0
    before = {p.name for p in tmp_path.iterdir()}
    one_line(["checkpoint", bundles["opt"], "--gguf", "-o", tmp_path / "x.gguf"], "llama.cpp does not run 'opt'")
    one_line(["checkpoint", bundles["b"], "--gguf", "-o", tmp_path / "x.gguf", "--quant", "Q9"], "Q9")
    one_line(["checkpoint", bundles["b"], "--gguf", "-o", prompt], "exists", "--force")
    one_line(["checkpoint", bundles["b"], "-o", tmp_path / "d", "--quant", "Q4_1"], "go with --gguf")
    one_line(["onnx", bundles["b"], "-o", q, *model, "--quantize", "int4"], "exists")
    one_line(["onnx", bundles["b"], "-o", tmp_path / "g", *model, "--quantize", "int3"], "int3")
    one_line(["onnx", bundles["b"], "-o", tmp_path / "g", *model, "--block-size", "16"], "go with --quantize")
    one_line(["onnx", bundles["b"], "-o", tmp_path / "g", *model, "--block-size", "48"], "go with --quantize")
    one_line(["onnx", bundles["b"], "-o", tmp_path / "g", *model, "--quantize", "int4", "--block-size", "24"],
             "power of 2")
    one_line(["generate", bundles["quarter"], "--runtime", "onnx", "--onnx", q], "k=")
    one_line(["bench", *model, "--runtime", "onnx-lean-int4", "--accuracy-level", "7"], "accuracy-level")
    assert {p.name for p in tmp_path.iterdir()} == before and prompt.read_text().startswith("the cat")
