"""inspect on every file the tool writes: bundles and statistics (test_bundle.py, test_scale.py),
ONNX graphs (test_onnx.py), and here GGUF files and checkpoint directories, read from their headers."""

from __future__ import annotations

import json

import numpy as np

from tests.helpers import one_line, run, tiny_prompt


# -- inspect: GGUF files ---------------------------------------------------------------------------


def write_gguf(path, ff, griffin: dict[str, str] | None = None) -> None:
    """A GGUF header like checkpoint --gguf writes (per-layer FF widths, griffin.* keys), one tensor."""
    from gguf import GGUFWriter, LlamaFileType

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_feed_forward_length(ff)
    w.add_file_type(LlamaFileType.ALL_F32)
    for key, value in (griffin or {}).items():
        w.add_string(f"griffin.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


PROVENANCE = {"base_model": "base.gguf", "base_fingerprint": "0123abcd", "method": "topk", "density": "0.5",
              "kind": "prompt", "base_d_ff": "24"}


def test_inspect_a_pruned_gguf_from_its_header(tmp_path, capsys):
    path = tmp_path / "pruned.gguf"
    write_gguf(path, [12, 20], PROVENANCE)
    code, out, err = run(["inspect", path], capsys)
    assert code == 0, err
    assert out.startswith(f"{path}: GGUF v3 (pruned by griffin-export), ")
    assert "architecture llama, file type F32, 2 layers, hidden 8, context 256" in out
    assert "FF width     12..20/24 per layer (total 32) × 2 layers: 12,20" in out
    assert "tensors      1 tensors, 128 bytes (F32 1)" in out
    assert "base model   base.gguf" in out and "fingerprint  0123abcd" in out
    assert "selection    topk, density 0.5 (prompt bundle)" in out
    code, out, err = run(["inspect", path, "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert (s["format"], s["architecture"], s["file_type"], s["layers"], s["context_length"]) == \
        ("gguf", "llama", "F32", 2, 256)
    assert s["feed_forward_length"] == [12, 20] and s["tensors"] == {"count": 1, "bytes": 128, "types": {"F32": 1}}
    assert s["griffin"] == PROVENANCE


def test_inspect_a_gguf_that_is_not_ours(tmp_path, capsys):
    path = tmp_path / "base.gguf"
    write_gguf(path, 24)
    code, out, err = run(["inspect", path], capsys)
    assert code == 0, err
    assert "pruned" not in out and "base model" not in out and "FF width     24 per layer × 2 layers" in out
    code, out, _ = run(["inspect", path, "--json"], capsys)
    s = json.loads(out)
    assert s["griffin"] is None and s["feed_forward_length"] == 24


def test_inspect_a_corrupt_gguf(tmp_path, capsys):
    path = tmp_path / "bad.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    one_line(["inspect", path], capsys, f"{path} is not a valid GGUF file")
    one_line(["inspect", tmp_path / "none.gguf"], capsys, "does not exist")


# -- inspect: checkpoint directories ---------------------------------------------------------------


def test_inspect_a_checkpoint_directory(tmp_path, tiny_dir, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text(tiny_prompt(), encoding="utf-8")
    bundle, model = tmp_path / "b.safetensors", tmp_path / "model"
    code, _, err = run([prompt, "-o", bundle, "--model", tiny_dir("llama"), "--warmup", "0", "-q"], capsys)
    assert code == 0, err
    code, _, err = run(["checkpoint", bundle, "-o", model, "-q"], capsys)
    assert code == 0, err
    fingerprint = json.loads(run(["inspect", bundle, "--json"], capsys)[1])["metadata"]["base_fingerprint"]

    code, out, err = run(["inspect", model], capsys)
    assert code == 0, err
    assert out.startswith(f"{model}: Hugging Face checkpoint (pruned by griffin-export), ")
    assert "architecture llama, float32, 2 layers, hidden 32, context 256" in out
    assert "FF width     intermediate_size 32/64 per layer × 2 layers" in out
    assert "weights      model.safetensors " in out and "tokenizer    tokenizer.json" in out
    assert f"base model   {tiny_dir('llama')}" in out and f"fingerprint  {fingerprint}" in out
    assert "bundle       b.safetensors: prompt bundle, topk, density 0.5, 20 prompt tokens" in out
    code, out, err = run(["inspect", model, "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert (s["format"], s["architecture"], s["dtype"], s["layers"], s["ff_attr"], s["ff_width"]) == \
        ("hf-checkpoint", "llama", "float32", 2, "intermediate_size", 32)
    assert s["weights"]["files"]["model.safetensors"] == (model / "model.safetensors").stat().st_size
    assert s["griffin"]["base_fingerprint"] == fingerprint and s["griffin"]["bundle"]["k"] == "32,32"

    code, out, err = run(["inspect", tiny_dir("llama")], capsys)  # a model folder that is not ours
    assert code == 0, err
    assert "pruned" not in out and "base model" not in out and "intermediate_size 64 per layer × 2 layers" in out


def test_inspect_per_layer_widths_in_a_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                      "intermediate_size": [12, 20]}), encoding="utf-8")
    code, out, err = run(["inspect", tmp_path], capsys)
    assert code == 0, err
    assert "intermediate_size 12..20 per layer (total 32) × 2 layers: 12,20" in out and "weights      none found" in out


def test_inspect_a_folder_that_is_neither_checkpoint_nor_graph(tmp_path, capsys):
    one_line(["inspect", tmp_path], capsys, "no export target's output (onnx, hf, gguf)", "inspect reads")
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    one_line(["inspect", tmp_path], capsys, "config.json is not a readable JSON config")
