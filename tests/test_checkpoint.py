"""Standalone pruned checkpoints: plain transformers loads them and computes what the runtime does."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import ARCHS, ROOT, decode_tokens, prompt_ids, tiny_prompt
from griffin_export import ExportSettings, TorchRuntime, export_ids, read_bundle, write_bundle
from griffin_export.model.arch import ff_blocks
from griffin_export.targets.checkpoint import write_checkpoint
from griffin_export.files.inputs import Prompt
from griffin_export.classes.build import export_class
from griffin_export.settings import ClassSettings
from griffin_export.errors import GriffinError
from griffin_export.method.export import bundle_from_indices
from griffin_export.model.tokens import tokenize
from griffin_export.model.load import load_model
from griffin_export_cli.main import main

STEPS = 8


def runtime_logits(rt: TorchRuntime, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """[1 + len(tokens), vocab]: after the prompt, then after each teacher-forced token."""
    cache, last = rt.start(ids)
    return torch.stack([last, *(rt.step(cache, t) for t in tokens)])


def plain_logits(directory, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The same positions from plain transformers, one forward over prompt + tokens, no griffin code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    full = torch.cat([ids, torch.tensor([tokens])], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=full).logits[0].float()
    return logits[ids.shape[1] - 1:], model


def masked_logits(directory, ids, tokens, indices) -> torch.Tensor:
    """Reference: the unpruned base model with the unselected neurons zeroed at every position."""
    lm = load_model(str(directory), quiet=True)
    handles = []
    for block, idx in zip(ff_blocks(lm.model, lm.spec), indices):
        mask = torch.zeros(lm.d_ff)
        mask[idx] = 1.0
        handles.append(block.output.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
    full = torch.cat([ids, torch.tensor([tokens])], dim=1)
    with torch.inference_mode():
        logits = lm.model(input_ids=full).logits[0].float()
    for h in handles:
        h.remove()
    return logits[ids.shape[1] - 1:]


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_loads_with_plain_transformers_and_matches_the_runtime(arch, tiny_dir, tmp_path):
    base = tiny_dir(arch)
    lm = load_model(str(base), quiet=True)
    # token ids, not text: transformers 5 reads tiny_dir's word-level tokenizer as a Qwen2Tokenizer for qwen2
    bundle = export_ids(lm, prompt_ids(20), ExportSettings(density=0.5, warmup=0))
    path = write_bundle(bundle, tmp_path / "e.safetensors")
    out = write_checkpoint(path, tmp_path / "model", model=str(base))

    ids, tokens = bundle.prompt_ids[None], decode_tokens(STEPS)
    got, model = plain_logits(out, ids, tokens)
    rt = TorchRuntime(load_model(str(base), quiet=True), read_bundle(path), pruned_prefill=True)
    want = runtime_logits(rt, ids, tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a per-prompt bundle's own prompt, re-prefilled through the experts, is the same start
    own = TorchRuntime(load_model(str(base), quiet=True), read_bundle(path, load_kv=False), pruned_prefill=True)
    torch.testing.assert_close(own.start()[1], want[0])
    # both are the base model with the other neurons zeroed, at every position
    torch.testing.assert_close(got, masked_logits(base, ids, tokens, bundle.indices), rtol=1e-4, atol=1e-4)
    # and not the GRIFFIN regime (full prefill), so the comparison above can fail
    full_prefill = TorchRuntime(load_model(str(base), quiet=True), read_bundle(path), keep_full=True)
    assert (runtime_logits(full_prefill, ids, tokens) - got).abs().max() > 1e-3

    attr = lm.spec.d_ff_attr
    config = json.loads((out / "config.json").read_text())
    assert config[attr] == 32 and getattr(model.config, attr) == 32
    assert ff_blocks(model, lm.spec)[0].output.weight.shape[1] == 32
    griffin = config["griffin"]
    assert griffin["base_fingerprint"] == lm.fingerprint and griffin["base_d_ff"] == 64
    assert griffin["bundle"]["kind"] == "prompt" and griffin["bundle_file"] == "e.safetensors"
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


@pytest.mark.parametrize("method", ["topk", "topk_refit"])
def test_checkpoint_tokenizer_and_class_bundle(tiny_dir, tmp_path, capsys, method):
    """A class bundle (refit on the class's Gram or not) becomes a plain checkpoint whose logits are the
    runtime's with --pruned-prefill."""
    from transformers import AutoTokenizer

    base = tiny_dir("llama")
    lm = load_model(str(base), quiet=True)
    result = export_class(lm, [Prompt(tiny_prompt(10 + i), str(i)) for i in range(3)], ClassSettings("news", method=method))
    path = write_bundle(result.bundle, tmp_path / "news.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["checkpoint", str(path), "-o", str(tmp_path / "news-model"), "--model", str(base), "-q"])
    assert e.value.code == 0
    assert "FF width 32 of 64 (class bundle)" in capsys.readouterr().out

    out = tmp_path / "news-model"
    tok = AutoTokenizer.from_pretrained(out)
    text = tiny_prompt(12)
    assert tok(text)["input_ids"] == lm.tokenizer(text)["input_ids"]
    ids, tokens = tokenize(lm, text), decode_tokens(STEPS)
    got, model = plain_logits(out, ids, tokens)
    rt = TorchRuntime(load_model(str(base), quiet=True), read_bundle(path), pruned_prefill=True)
    torch.testing.assert_close(got, runtime_logits(rt, ids, tokens), rtol=1e-4, atol=1e-4)
    assert model.config.griffin["bundle"]["extra.class"] == "news" and model.config.griffin["bundle"]["method"] == method
    # the refit columns are what the checkpoint holds: not the base model's sliced ones
    block = ff_blocks(model, lm.spec)[0]
    sliced = ff_blocks(lm.model, lm.spec)[0].output.weight[:, result.bundle.indices[0]]
    assert torch.equal(block.output.weight, sliced) == (method == "topk")


def test_plain_generate_equals_griffin_generate_with_pruned_prefill(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from griffin_export import DecodeOptions, load_runtime

    base = tiny_dir("llama")
    lm = load_model(str(base), quiet=True)
    path = write_bundle(export_ids(lm, prompt_ids(20), ExportSettings(density=0.25, warmup=0)), tmp_path / "e.safetensors")
    out = write_checkpoint(path, tmp_path / "m", model=str(base))
    rt = load_runtime(path, str(base), pruned_prefill=True)
    assert rt._full is None  # no full FF weights kept: that is the point of --pruned-prefill
    ours = rt.generate(DecodeOptions(max_new_tokens=12)).token_ids  # stops before eos (id 2)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.inference_mode():
        theirs = model.generate(prompt_ids(20), max_new_tokens=12, do_sample=False)[0, 20:].tolist()
    theirs = theirs[:theirs.index(2)] if 2 in theirs else theirs  # HF keeps the eos (then pads)
    assert len(ours) > 3 and ours == theirs


def test_uneven_k_is_refused(tiny_dir, tmp_path, capsys):
    base = tiny_dir("llama")
    lm = load_model(str(base), quiet=True)
    indices = [torch.arange(32), torch.arange(16)]
    bundle = bundle_from_indices(lm, indices, ExportSettings(warmup=0), prompt_tokens=0, kind="class")
    path = write_bundle(bundle, tmp_path / "uneven.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["checkpoint", str(path), "-o", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "k differs between layers (16..32); a Hugging Face config has one intermediate_size" in err
    assert "griffin-export onnx" in err  # where per-layer widths do go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uneven.safetensors"]


@pytest.fixture
def bundle_file(tiny_dir, tmp_path):
    lm = load_model(str(tiny_dir("mistral")), quiet=True)
    return write_bundle(export_ids(lm, tokenize(lm, tiny_prompt()), ExportSettings(keep_kv=False, warmup=0)),
                        tmp_path / "b.safetensors")


def test_existing_output_directory(bundle_file, tiny_dir, tmp_path):
    base = str(tiny_dir("mistral"))
    out = tmp_path / "m"
    out.mkdir()  # an empty directory is fine
    write_checkpoint(bundle_file, out, model=base)
    with pytest.raises(GriffinError, match="exists; pass force=True"):
        write_checkpoint(bundle_file, out, model=base)
    (out / "stale.txt").write_text("from the old checkpoint")
    write_checkpoint(bundle_file, out, model=base, force=True)  # replaced as a whole
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()

    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(GriffinError, match="holds no config.json: not replacing it, even with force=True"):
        write_checkpoint(bundle_file, other, model=base, force=True)
    assert (other / "mine.txt").read_text() == "keep"
    with pytest.raises(GriffinError, match="is not a directory"):
        write_checkpoint(bundle_file, bundle_file, model=base, force=True)
    with pytest.raises(GriffinError, match="output directory .* does not exist"):
        write_checkpoint(bundle_file, tmp_path / "no" / "m", model=base)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_wrong_base_model_is_refused(bundle_file, tiny_dir, tmp_path):
    with pytest.raises(GriffinError, match="belongs to base model"):
        write_checkpoint(bundle_file, tmp_path / "m", model=str(tiny_dir("mistral", seed=1)))
    assert not (tmp_path / "m").exists()


def test_interrupted_checkpoint_leaves_nothing(bundle_file, tiny_dir, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def interrupt(self, directory, *a, **k):
        (directory / "model.safetensors").write_bytes(b"half")  # a partly written directory
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupt)
    with pytest.raises(SystemExit) as e:
        main(["checkpoint", str(bundle_file), "-o", str(tmp_path / "m"), "--model", str(tiny_dir("mistral")), "-q"])
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]


@pytest.mark.real_model
def test_default_model_class_checkpoint_and_generate(real_lm, tmp_path, capsys):
    """On the default model: `class` from two XSum rows, `generate` with a new prompt, `checkpoint`,
    and plain transformers' logits equal the runtime's with --pruned-prefill."""
    import copy

    from tests.helpers import DATA

    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:3]]
    for r in rows:  # real rows, cut short: the shared CPU is slow
        r["article"] = r["article"][:800]
    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))

    def cli(*argv):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        out = capsys.readouterr()
        assert e.value.code == 0, out.err
        return out.out

    news = tmp_path / "news.safetensors"
    assert "class 'news' from 2 prompts" in cli("class", data, "--field", "article", "--name", "news", "-o", news, "-q")
    new_prompt = tmp_path / "new.txt"
    new_prompt.write_text(rows[2]["article"])
    assert cli("generate", news, "--prompt-file", new_prompt, "--max-new-tokens", "8", "-q").strip()
    assert "FF width 768 of 1536" in cli("checkpoint", news, "-o", tmp_path / "news-model", "-q")

    ids = tokenize(real_lm, (ROOT / "samples" / "prompt.txt").read_text())[:, :120]
    tokens = decode_tokens(4, seed=9)
    got, _ = plain_logits(tmp_path / "news-model", ids, tokens)
    lm = copy.deepcopy(real_lm)  # the session's model stays unpruned
    want = runtime_logits(TorchRuntime(lm, read_bundle(news), pruned_prefill=True), ids, tokens)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
