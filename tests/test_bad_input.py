"""The reliability issue's table, row by row, as a new user hits it: one line, exit 2, no
traceback, nothing left behind; generation streams; --help lists every registered method."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from griffin_export.errors import GriffinError
from griffin_export.files.inputs import iter_prompts, read_prompt
from griffin_export.settings import DecodeOptions
from tests.helpers import DATA, one_line, run, tiny_prompt


@pytest.fixture
def prompt(tmp_path):
    p = tmp_path / "prompt.txt"
    p.write_text(tiny_prompt(), encoding="utf-8")
    return p


@pytest.fixture
def bundle(tmp_path, prompt, tiny_dir, capsys):
    out = tmp_path / "e.safetensors"
    code, _, err = run([prompt, "-o", out, "--model", tiny_dir("llama"), "-q"], capsys)
    assert code == 0, err
    return out


def leftovers(tmp_path, before: set) -> set:
    return {p.name for p in tmp_path.iterdir()} - before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has the device")
@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available here"), ("cuda:3", "CUDA"),
                                             ("foo", "unknown device 'foo'"), ("meta", "runs on cpu or cuda")])
def test_devices_are_checked_before_loading(tmp_path, prompt, tiny_dir, capsys, monkeypatch, device, message):
    from griffin_export.model import load as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("load_model was called"))
    before = {p.name for p in tmp_path.iterdir()}
    one_line([prompt, "-o", tmp_path / "x.safetensors", "--model", tiny_dir("llama"), "--device", device, "-q"],
             capsys, message)
    assert not leftovers(tmp_path, before)


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "temperature must be a finite number"),
    ("--temperature", "inf", "temperature must be a finite number"),
    ("--temperature", "-1", "temperature must be a finite number >= 0"),
    ("--top-p", "nan", "--top-p must be in (0, 1]"),  # the command line's word for top_p
    ("--stop", "", "empty stop string"),
])
def test_sampling_options_are_checked(bundle, capsys, flag, value, message):
    one_line(["generate", bundle, flag, value, "-q"], capsys, message)


def test_a_missing_extra_is_named_before_any_work(tmp_path, tiny_dir, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    data = tmp_path / "d.jsonl"
    data.write_text('{"article": "w1 w2", "summary_gt": "w3"}\n', encoding="utf-8")
    out = tmp_path / "report"
    one_line(["eval", "--data", data, "--rows", "0:1", "--model", tiny_dir("llama"), "-o", out, "-q"], capsys,
             "rouge-score", 'pip install -e ".[eval]"')
    assert not out.exists()


def test_a_bundle_holding_nan_is_refused(bundle, capsys):
    import copy

    from griffin_export.bundle.format import read_bundle, write_bundle

    good = read_bundle(bundle)
    b = copy.deepcopy(good)
    b.kv[1][0][0, 0, 3, 2] = float("nan")
    write_bundle(b, bundle, force=True)
    one_line(["generate", bundle, "-q"], capsys, "griffin.kv.1.key holds 1 non-finite value")
    b = copy.deepcopy(good)  # the weights are checked too
    b.weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    write_bundle(b, bundle, force=True)
    one_line(["generate", bundle, "-q"], capsys, "model.layers.0.mlp.up_proj.weight holds 1 non-finite value")


def test_directories_are_named_as_directories(tmp_path, bundle, tiny_dir, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    one_line([folder, "-o", tmp_path / "x.safetensors", "--model", tiny_dir("llama")], capsys,
             f"prompt file {folder} is a directory")
    one_line(["generate", folder], capsys, f"bundle {folder} is a directory")
    one_line(["generate", bundle, "--prompt-file", folder, "-q"], capsys, "is a directory")


def test_a_density_that_keeps_no_neuron_is_refused_from_the_config(tmp_path, prompt, tiny_dir, capsys, monkeypatch):
    from griffin_export.model import load as models

    def never(*a, **k):
        raise AssertionError("load_model was called")

    monkeypatch.setattr(models, "load_model", never)
    for argv in ([prompt, "-o", tmp_path / "x.safetensors"], ["class", prompt, "--name", "c", "-o", tmp_path / "c.st"]):
        one_line([*argv, "--model", tiny_dir("llama"), "--density", "0.001", "-q"], capsys, "keeps k=0 of 64")


def test_the_default_models_gguf_header_says_its_ff_width(real_model_available):
    from griffin_export.model.load import peek_architecture

    facts = peek_architecture(None)
    assert (facts.architecture, facts.d_ff, facts.context_length) == ("llama", 1536, 8192)


def test_max_new_tokens_past_the_context_is_refused_up_front(bundle, capsys):
    one_line(["generate", bundle, "--max-new-tokens", "100000", "-q"], capsys,
             "--max-new-tokens 100000 is past the model's context of 256 tokens")


def test_generate_streams_and_an_interrupt_keeps_what_was_printed(tmp_path, prompt, tiny_dir, capsys, monkeypatch):
    bundle = tmp_path / "w0.safetensors"  # no warm-up: here the full model's 8th token would be EOS
    assert run([prompt, "-o", bundle, "--model", tiny_dir("llama"), "-q", "--warmup", "0"], capsys)[0] == 0
    code, whole, err = run(["generate", bundle, "--max-new-tokens", "30", "-q", "--eager"], capsys)
    assert code == 0 and len(whole.split()) >= 20, (whole, err)
    from griffin_export.runtime.pytorch import TorchRuntime

    calls = {"n": 0}
    real_step = TorchRuntime.step

    def step(self, cache, token):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return real_step(self, cache, token)

    monkeypatch.setattr(TorchRuntime, "step", step)
    code, partial, err = run(["generate", bundle, "--max-new-tokens", "30", "-q", "--eager"], capsys)
    assert code == 130 and "interrupted" in err
    assert partial.strip() and whole.startswith(partial.rstrip()), (partial, whole)
    assert len(partial.split()) < len(whole.split())


def test_decode_streams_pieces_that_add_up_and_never_print_a_stop_string():
    from griffin_export.model.decoding import decode

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join("ab#"[i % 3] for i in ids)

    logits = [torch.nn.functional.one_hot(torch.tensor(i), 3).float() for i in (0, 1, 0, 2, 2, 1, 0)]
    it = iter(logits[1:])
    pieces = []
    out = decode(lambda tok: next(it), logits[0], DecodeOptions(max_new_tokens=7, stop=["##"]), tokenizer=Tok(),
                 on_text=pieces.append)
    assert out.text == "aba" and "".join(pieces) == "aba" and out.stop_reason == "stop"


def test_a_stop_string_after_text_lets_an_answer_open_with_it():
    """eval's answers: a "\n" stop ends the answer's first line, not the newline it opens with."""
    from griffin_export.model.decoding import decode

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join("\n a"[i] for i in ids)

    tokens = [0, 1, 0, 2, 2, 0, 2]  # "\n \naa\na"
    for after, want in ((False, ""), (True, "\n \naa")):
        it = iter(torch.nn.functional.one_hot(torch.tensor(t), 3).float() for t in tokens[1:])
        first = torch.nn.functional.one_hot(torch.tensor(tokens[0]), 3).float()
        out = decode(lambda tok: next(it), first, DecodeOptions(max_new_tokens=7, stop=["\n"], stop_after_text=after),
                     tokenizer=Tok())
        assert out.text == want and out.stop_reason == "stop", (after, out.text)


@pytest.mark.slow
def test_outputs_are_ordinary_files_that_respect_the_umask(bundle, tmp_path, capsys):
    import os
    import stat

    from griffin_export.files.outputs import _umask

    want = 0o666 & ~_umask()
    assert stat.S_IMODE(os.stat(bundle).st_mode) == want  # safetensors writes private files; we fix that
    code, _, err = run(["onnx", bundle, "-o", tmp_path / "g", "-q"], capsys)
    assert code == 0, err
    for f in (tmp_path / "g").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == want, f


def test_sigterm_during_an_export_leaves_nothing(bundle, tmp_path, capsys, monkeypatch):
    import os
    import signal

    from griffin_export.targets.onnx import export as onnx_export

    real = onnx_export._trace

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(onnx_export, "_trace", killed)
    before = {p.name for p in tmp_path.iterdir()}
    code, _, err = run(["onnx", bundle, "-o", tmp_path / "g", "-q", "--graph", "traced"], capsys)
    assert code == 143 and "terminated" in err, err
    assert not leftovers(tmp_path, before)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_the_warm_up_counts_once_towards_the_context(tmp_path, prompt, tiny_dir, capsys):
    """A bundle with W warm-up tokens: prompt + --max-new-tokens must fit the context (the
    warm-up tokens are part of --max-new-tokens), in both runtimes alike."""
    b = tmp_path / "w.safetensors"
    assert run([prompt, "-o", b, "--model", tiny_dir("llama"), "-q", "--warmup", "4"], capsys)[0] == 0
    from griffin_export.bundle.format import read_info

    info = read_info(b)
    assert info.warmup_tokens == 4 and info.prompt_tokens == 20
    code, out, err = run(["generate", b, "--max-new-tokens", str(256 - 20), "-q"], capsys)
    assert code == 0, err
    one_line(["generate", b, "--max-new-tokens", str(256 - 19), "-q"], capsys, "past the model's context of 256")


def test_onnx_runtime_refuses_torch_only_options(bundle, capsys):
    one_line(["generate", bundle, "--runtime", "onnx", "--onnx", "x", "--device", "foo"], capsys,
             "--device is not an option of the onnx runtime")
    one_line(["generate", bundle, "--runtime", "onnx", "--onnx", "x", "--model", "/nowhere", "--eager"], capsys,
             "--model, --eager are not options of the onnx runtime")


@pytest.mark.parametrize("argv, message", [
    (["generate", "{b}", "--kv-dtype", "int8"], "--kv-dtype int8 is not a KV type of the lean PyTorch step; it takes "
                                                  "float32, float16"),
    (["generate", "{b}", "--kv-dtype", "float16", "--eager"], "--kv-dtype is the lean step's; --eager decodes"),
    (["generate", "{b}", "--kv-dtype", "bf16"], "Invalid value for '--kv-dtype'"),
    (["onnx", "{b}", "-o", "{tmp}/g", "--graph", "traced", "--kv-dtype", "float16", "-q"],
     "--kv-dtype float16 is the lean graph's choice; the traced graph's cache keeps the weights' dtype (float32)"),
    (["onnx", "{b}", "-o", "{tmp}/g", "--kv-dtype", "half"], "Invalid value for '--kv-dtype'"),
    (["bench", "--kv-dtype", "bf16"], "unknown --kv-dtype 'bf16'; known: float32, float16, int8"),
    (["bench", "--kv-dtype", ","], "no KV types given"),
])
def test_bad_kv_types_are_refused_in_one_line(bundle, tmp_path, capsys, argv, message):
    """Before any model loads: the library's RuntimeOptions / export_graph / BenchSettings refuse them."""
    from griffin_export.model import load as models

    before = {p.name for p in tmp_path.iterdir()}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(models, "load_model", lambda *a, **k: pytest.fail("load_model was called"))
        one_line([a.format(b=bundle, tmp=tmp_path) for a in argv], capsys, message)
    assert not leftovers(tmp_path, before)


def test_streaming_holds_back_only_what_could_begin_a_stop_string():
    from griffin_export.model.decoding import decode

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join("ab#"[i % 3] for i in ids)

    seq = [0, 1, 0, 1, 0, 2, 2]
    logits = [torch.nn.functional.one_hot(torch.tensor(i), 3).float() for i in seq]
    it = iter(logits[1:])
    pieces = []
    out = decode(lambda tok: next(it), logits[0], DecodeOptions(max_new_tokens=7, stop=["##"]), tokenizer=Tok(),
                 on_text=pieces.append)
    assert out.text == "ababa" and "".join(pieces) == "ababa"
    assert pieces[:5] == ["a", "b", "a", "b", "a"]  # nothing held back: no end of the text begins "##"


# -- prompts that are not text ---------------------------------------------------------------------


def test_a_file_of_nul_bytes_is_not_a_prompt(tmp_path, tiny_dir, capsys):
    prompt = tmp_path / "zeros.txt"
    prompt.write_bytes(b"\0" * 3000)
    out = tmp_path / "x.safetensors"
    one_line([prompt, "-o", out, "--model", tiny_dir("llama"), "-q"], capsys,
             f"prompt {prompt} looks binary: 100% of its characters are control characters")
    assert not out.exists()


def test_a_binary_line_of_a_jsonl_file_is_named(tmp_path):
    data = tmp_path / "in.jsonl"
    rows = [{"prompt": tiny_prompt()}, {"prompt": "\x01\x02\x03 w1 \x1b\x1b\x1b\x1b"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(GriffinError, match=rf"prompt {data}:2 looks binary: 64% of its characters"):
        list(iter_prompts([data]))


def test_prompts_with_tabs_newlines_and_a_few_escapes_are_text(tmp_path, tiny_dir, capsys):
    text = "\t" + tiny_prompt().replace(" ", "\t", 5) + "\r\n\n\tw3\n" + "\x1b[1mw4\x1b[0m\n"
    prompt = tmp_path / "p.txt"
    prompt.write_text(text, encoding="utf-8")
    assert read_prompt(prompt) == text
    code, _, err = run([prompt, "-o", tmp_path / "e.safetensors", "--model", tiny_dir("llama"), "--warmup", "0",
                        "-q"], capsys)
    assert code == 0, err


def test_the_xsum_data_is_text():
    assert sum(1 for _ in iter_prompts([DATA], field="article")) == 300


# -- JSON errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "w1\tw2"}', "invalid control character at column 15"),
    ('{"prompt": "w1', "unterminated string starting at column 12"),
    ('{"prompt": "w1",}', "expecting property name enclosed in double quotes at column 17"),
])
def test_a_bad_jsonl_line_says_where(tmp_path, line, message):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "w1"}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(GriffinError) as e:
        list(iter_prompts([data]))
    assert str(e.value) == f"{data}:2: not valid JSON ({message})"
    assert ", column" not in str(e.value)
