"""Batched generation (runtime.generate_batch, generate --prompts): each prompt's output is its
output alone; finished sequences leave the batch; answers are appended and resumable."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import ARCHS, DATA, LEAN_ARCHS, VOCAB, run, tiny_model, tiny_tokenizer
from griffin_export import ExportSettings, export_prompt
from griffin_export.settings import ClassSettings, DecodeOptions
from griffin_export.errors import GriffinError
from griffin_export.model.load import from_model
from griffin_export.runtime.pytorch import TorchRuntime


def texts(n: int = 7) -> list[str]:
    """Prompts of 4 to 58 tokens: very different lengths in one batch."""
    return [" ".join(f"w{(5 * i + 11 * j) % (VOCAB - 3)}" for j in range(4 + 9 * i)) for i in range(n)]


def runtime(arch: str, **kw) -> TorchRuntime:
    lm = from_model(tiny_model(arch).model, tiny_tokenizer(), f"tiny-{arch}")
    bundle = export_prompt(lm, texts()[2], ExportSettings(warmup=0))
    return TorchRuntime(lm, bundle, keep_full=not kw.get("pruned_prefill"), **kw)


def early_stopper(rt: TorchRuntime, prompts: list[str], opts: DecodeOptions) -> None:
    """Make some sequences stop early: the eos becomes a token that some outputs reach midway."""
    outs = [rt.generate(opts, prompt=p).token_ids for p in prompts]
    counts: dict[int, int] = {}
    for out in outs:
        for tok in set(out[1:]):
            counts[tok] = counts.get(tok, 0) + 1
    tok = next(t for t, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c < len(outs))
    rt.eos = {tok}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_each_prompt_alone(arch):
    rt = runtime(arch)
    prompts, opts = texts(), DecodeOptions(max_new_tokens=10)
    early_stopper(rt, prompts, opts)
    alone = [rt.generate(opts, prompt=p) for p in prompts]
    assert {g.stop_reason for g in alone} == {"eos", "length"}  # some stop early, some run to the limit
    finished = []
    batched = rt.generate_batch(prompts, opts, batch_size=3, on_done=lambda i, g: finished.append(i))  # 3 + 3 + 1
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.stop_reason for g in batched] == [g.stop_reason for g in alone]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert sorted(finished) == list(range(len(prompts)))


def test_pruned_prefill_batches_and_stop_strings():
    rt = runtime("llama", pruned_prefill=True)
    prompts = texts()
    first = rt.generate(DecodeOptions(max_new_tokens=6), prompt=prompts[0]).text.split()
    opts = DecodeOptions(max_new_tokens=8, stop=(first[2],))  # a word some outputs reach
    alone = [rt.generate(opts, prompt=p) for p in prompts]
    assert "stop" in {g.stop_reason for g in alone}
    batched = rt.generate_batch(prompts, opts, batch_size=4)
    assert [(g.token_ids, g.text, g.stop_reason) for g in batched] == [(g.token_ids, g.text, g.stop_reason)
                                                                       for g in alone]


def test_sampling_is_reproducible_for_a_batch():
    rt = runtime("qwen2")
    opts = DecodeOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    a = [g.token_ids for g in rt.generate_batch(texts(), opts, batch_size=4)]
    b = [g.token_ids for g in rt.generate_batch(texts(), opts, batch_size=4)]
    c = [g.token_ids for g in rt.generate_batch(texts(), DecodeOptions(**{**opts.__dict__, "seed": 4}), batch_size=4)]
    assert a == b and a != c


def test_bad_batch_arguments():
    rt = runtime("llama")
    with pytest.raises(GriffinError, match="batch size must be >= 1"):
        rt.generate_batch(texts(2), batch_size=0)
    long = " ".join(["w5"] * 300)  # the tiny models' context is 256
    with pytest.raises(GriffinError, match="q.jsonl:2: .*no prompt was generated"):
        rt.generate_batch([texts(1)[0], long], names=["q.jsonl:1", "q.jsonl:2"])



def decode_with_arrivals(rt, prompts: list[str], opts: DecodeOptions, arrivals: dict[int, list[int]],
                         before=lambda i: None) -> list[list[int]]:
    """What serve/engine.py does: prompts join the running batch at the steps `arrivals` names
    (step -> prompt indices), each row leaves when it is done; every prompt's tokens. `before(i)` is
    called before prompt i's prefill (to put a class's experts in, say)."""
    import torch

    from griffin_export.model.decoding import Continuation

    ids = [rt.tokenize(p) for p in prompts]
    rows, seqs, state, logits = [], {}, None, None
    for step in range(60):
        if step in arrivals:
            before(arrivals[step][0])
            new, first = rt.start_batch([ids[i] for i in arrivals[step]], opts.max_new_tokens)
            seqs.update({i: Continuation(opts, tokenizer=rt.tokenizer, eos=rt.eos) for i in arrivals[step]})
            state = new if not rows else rt.join_batch(state, new, opts.max_new_tokens)
            logits = first if not rows else torch.cat([logits, first])
            rows += arrivals[step]
        keep, tokens = [], []
        for j, i in enumerate(rows):
            tok = seqs[i].advance(logits[j])
            if tok is not None:
                keep.append(j)
                tokens.append(tok)
        if keep:
            logits = rt.step_batch(state, tokens, keep)
        rows = [rows[j] for j in keep]
    return [seqs[i].result.token_ids for i in range(len(prompts))]


ARRIVALS = {0: [0, 1], 2: [5], 4: [2, 3], 7: [4]}  # step -> prompts that join then: longer and shorter ones


@pytest.mark.parametrize("arch", LEAN_ARCHS)
def test_rows_that_join_a_running_batch_decode_as_each_alone(arch):
    """Continuous batching (serve/): prompts that join a running batch between its steps, some longer
    than what the batch holds and some shorter, while others finish; every row decodes as it would alone
    (Mistral's sliding window of 8 is shorter than the prompts)."""
    lm = from_model(tiny_model(arch, lean=True).model, tiny_tokenizer(), f"tiny-{arch}")
    rt = TorchRuntime(lm, export_prompt(lm, texts()[2], ExportSettings(warmup=0)), keep_full=True)
    prompts, opts = texts(6), DecodeOptions(max_new_tokens=9)
    early_stopper(rt, prompts, opts)
    alone = [rt.generate(opts, prompt=p).token_ids for p in prompts]
    assert rt.joins_batches and decode_with_arrivals(rt, prompts, opts, ARRIVALS) == alone


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_rows_that_join_a_running_onnx_batch_decode_as_each_alone(arch, tmp_path):
    """The same on ONNX Runtime's lean graph (rows stacked, each keeping its buffer row)."""
    from griffin_export.runtime.onnx import OnnxRuntime
    from griffin_export.targets.onnx.export import export_onnx

    lm = from_model(tiny_model(arch, lean=True).model, tiny_tokenizer(), f"tiny-{arch}")
    bundle = export_prompt(lm, texts()[2], ExportSettings(warmup=0))
    rt = OnnxRuntime(export_onnx(lm, tmp_path / "g", bundle), bundle, provider="cpu", pruned_prefill=True)
    prompts, opts = texts(6), DecodeOptions(max_new_tokens=9)
    early_stopper(rt, prompts, opts)
    alone = [rt.generate(opts, prompt=p).token_ids for p in prompts]
    assert rt.joins_batches and decode_with_arrivals(rt, prompts, opts, ARRIVALS) == alone


@pytest.mark.real_model
def test_batched_greedy_equals_alone_on_the_default_model(real_lm, tmp_path):
    from griffin_export.files.inputs import Prompt
    from griffin_export.classes.build import export_class
    from griffin_export.runtime.pytorch import load_runtime

    with open(DATA) as f:
        rows = [json.loads(next(f))["article"] for _ in range(4)]
    prompts = [r[: 200 + 400 * i] for i, r in enumerate(rows)]  # ~50 to ~350 tokens
    bundle = export_class(real_lm, [Prompt(p, str(i)) for i, p in enumerate(prompts)], ClassSettings("news")).bundle
    from griffin_export.model.load import load_model

    rt = load_runtime(bundle, load_model(quiet=True), new_prompts=True)  # the lean step
    opts = DecodeOptions(max_new_tokens=12)
    alone = [rt.generate(opts, prompt=p).token_ids for p in prompts]
    assert [g.token_ids for g in rt.generate_batch(prompts, opts, batch_size=4)] == alone
    assert rt.lean is not None
    # ONNX Runtime's lean graph, prefilling through the experts (one graph to export)
    from griffin_export.targets.onnx.export import export_onnx
    from griffin_export.runtime.onnx import OnnxRuntime

    ort = OnnxRuntime(export_onnx(real_lm, tmp_path / "class_onnx", bundle, max_length=512), bundle,
                      provider="cpu", pruned_prefill=True)
    alone = [ort.generate(opts, prompt=p).token_ids for p in prompts]
    assert [g.token_ids for g in ort.generate_batch(prompts, opts, batch_size=4)] == alone


# -- generate --prompts ---------------------------------------------------------------------


@pytest.fixture
def bundle_file(tmp_path, tiny_dir, capsys):
    (tmp_path / "p.txt").write_text(texts()[2])
    code, _, err = run(["export", tmp_path / "p.txt", "-o", tmp_path / "e.safetensors", "--model", tiny_dir("llama"),
                        "-q"], capsys)
    assert code == 0, err
    return tmp_path / "e.safetensors"


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answers(path) -> dict[int, dict]:
    return {row["index"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_generate_prompts_writes_every_answer_and_resumes(tmp_path, tiny_dir, bundle_file, capsys):
    queue = write_prompts(tmp_path / "q.jsonl", [{"q": t} for t in texts()])
    out = tmp_path / "a.jsonl"
    argv = ["generate", bundle_file, "--prompts", queue, "--field", "q", "-o", out, "--max-new-tokens", "6",
            "--batch-size", "3", "--model", tiny_dir("llama")]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert "generate: 100%" in err and "prompt/s" in err and "tok/s" in err
    full = answers(out)
    assert sorted(full) == list(range(7)) and full[4]["where"] == f"{queue}:5"
    # each answer is that prompt's own generation
    from griffin_export.runtime.pytorch import load_runtime

    rt = load_runtime(str(bundle_file), str(tiny_dir("llama")), new_prompts=True, lean=False)
    assert full[5]["text"] == rt.generate(DecodeOptions(max_new_tokens=6), prompt=texts()[5]).text
    # an interrupted run: three rows kept, the fourth cut mid-line
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:10])
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert "7 prompts, 3 answered already" in err and "4 answers" in err
    # the summary times the run, and its speed is the decoding's (the prefills are not in it)
    assert re.search(r"4 answers \(\d+ tokens\) in [\d.]+ s: prefill [\d.]+ s, decoding [\d.]+ tok/s; 3 kept", err), err
    assert answers(out) == full
    # the same prompts under another path resume; other settings do not
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_text(queue.read_text())
    code, _, err = run([*argv, "--resume", "--prompts", moved], capsys)
    assert code == 0 and "7 answered already" in err, err
    code, _, err = run([*argv, "--resume", "--max-new-tokens", "3"], capsys)
    assert code == 2 and "with another bundle or other decoding settings" in err
    code, _, err = run(argv, capsys)
    assert code == 2 and "exists; pass --force to overwrite" in err
    code, _, err = run([*argv, "--force"], capsys)
    assert code == 0 and answers(out) == full


@pytest.mark.parametrize("rows, extra, message", [
    ([], [], r"q.jsonl has no prompts \(the file is empty\)"),
    (["{oops"], [], "q.jsonl:1: not valid JSON"),
    ([{"text": "w1"}], [], "q.jsonl:1: no field 'prompt'"),
    ([{"prompt": "w1 w2"}, {"prompt": " ".join(["w3"] * 300)}], [],
     r"q.jsonl:2: .*context.*no prompt was generated"),
    ([{"prompt": "w1"}], ["--batch-size", "0"], "Invalid value for '--batch-size'"),
    ([{"prompt": "w1"}], ["--prompt-file", "x.txt"], "--prompt-file is one prompt, --prompts many"),
    ([{"prompt": "w1"}], ["--runtime", "onnx"], "the onnx runtime needs --onnx DIR"),
    ([{"prompt": "w1"}], ["--compile"], "--compile compiles the batch-1 lean step"),
    ([{"prompt": "w1"}], ["other.safetensors"], "generate takes one BUNDLE, got 2: .*mixing bundles would mix weights"),
])
def test_generate_prompts_bad_input(tmp_path, tiny_dir, bundle_file, capsys, rows, extra, message):
    import re

    path = tmp_path / "q.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    out = tmp_path / "a.jsonl"
    code, _, err = run(["generate", bundle_file, "--prompts", path, "-o", out, "--model", tiny_dir("llama"), "-q",
                        *extra], capsys)
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err
    assert not out.exists()


def test_resume_refuses_the_answers_of_other_inputs(tmp_path, tiny_dir, bundle_file, capsys):
    out = tmp_path / "a.jsonl"
    out.write_text(json.dumps({"index": 0, "where": "other.jsonl:1", "text": "x"}) + "\n")
    queue = write_prompts(tmp_path / "q.jsonl", [{"prompt": t} for t in texts(2)])
    code, _, err = run(["generate", bundle_file, "--prompts", queue, "-o", out, "--resume", "-q"], capsys)
    assert code == 2 and "the answers file of other inputs" in err
    assert json.loads(out.read_text())["where"] == "other.jsonl:1"  # left as it was
    # the same file name holding other prompts is refused too: answers are tied to the texts
    code, _, err = run(["generate", bundle_file, "--prompts", queue, "-o", out, "--force", "-q",
                        "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    write_prompts(queue, [{"prompt": t} for t in reversed(texts(2))])
    code, _, err = run(["generate", bundle_file, "--prompts", queue, "-o", out, "--resume", "-q",
                        "--max-new-tokens", "3"], capsys)
    assert code == 2 and "answers another text as prompt" in err


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
def test_onnx_runtime_batches_like_each_prompt_alone(arch, tmp_path):
    """The traced graph has a batch axis: batched ONNX Runtime output equals each prompt alone
    (greedy), and the PyTorch runtime's batched output."""
    from griffin_export.targets.onnx.export import export_onnx
    from griffin_export.runtime.onnx import OnnxRuntime

    rt = runtime(arch)
    lm, bundle = rt.lm, rt.bundle
    fresh = from_model(tiny_model(arch).model, tiny_tokenizer(), f"tiny-{arch}")
    export_onnx(fresh, tmp_path / "full")
    export_onnx(fresh, tmp_path / "pruned", bundle)
    ort = OnnxRuntime(tmp_path / "pruned", bundle, full=tmp_path / "full")
    ort.tokenizer = lm.tokenizer  # the tiny tokenizer (the graphs of an in-memory model carry none)
    prompts, opts = texts(), DecodeOptions(max_new_tokens=8)
    early_stopper(rt, prompts, opts)
    ort.eos = rt.eos
    alone = [ort.generate(opts, prompt=p).token_ids for p in prompts]
    assert [g.token_ids for g in ort.generate_batch(prompts, opts, batch_size=3)] == alone
    assert [g.token_ids for g in rt.generate_batch(prompts, opts, batch_size=3)] == alone


@pytest.mark.slow
def test_generate_prompts_on_onnx_runtime_answers_as_torch(tmp_path, tiny_dir, bundle_file, capsys):
    queue = write_prompts(tmp_path / "q.jsonl", [{"prompt": t} for t in texts(5)])
    model = tiny_dir("llama")
    for argv in (["onnx", bundle_file, "-o", tmp_path / "g", "--model", model, "-q"],
                 ["onnx", "--full", "-o", tmp_path / "f", "--model", model, "-q"]):
        code, _, err = run(argv, capsys)
        assert code == 0, err
    common = ["generate", bundle_file, "--prompts", queue, "--max-new-tokens", "6", "--batch-size", "2", "-q"]
    code, _, err = run([*common, "-o", tmp_path / "t.jsonl", "--model", model], capsys)
    assert code == 0, err
    code, _, err = run([*common, "-o", tmp_path / "o.jsonl", "--runtime", "onnx", "--onnx", tmp_path / "g",
                        "--onnx-full", tmp_path / "f"], capsys)
    assert code == 0, err
    t, o = answers(tmp_path / "t.jsonl"), answers(tmp_path / "o.jsonl")
    assert sorted(o) == list(range(5)) and all(o[i]["text"] == t[i]["text"] for i in t)


@pytest.mark.parametrize("arch", LEAN_ARCHS)
def test_lean_decoders_batch_like_each_prompt_alone(arch, tmp_path, monkeypatch):
    """The lean decoders batch too: the lean PyTorch step's batch buffers (left-padded, as the
    prefill) and the lean ONNX graph's (right-padded, per-row lengths) give each prompt's greedy
    output alone, as transformers' forward batched does; rows that stop early leave the buffers.
    Mistral's sliding window (8) is shorter than most prompts."""
    import griffin_export.runtime.onnx as onnx_runtime
    from griffin_export.targets.onnx.export import export_onnx
    from griffin_export.runtime.onnx import OnnxRuntime, read_graph

    def lean_runtime(**kw) -> TorchRuntime:
        lm = from_model(tiny_model(arch, lean=True).model, tiny_tokenizer(), f"tiny-{arch}")
        return TorchRuntime(lm, bundle, keep_full=True, **kw)

    lm = from_model(tiny_model(arch, lean=True).model, tiny_tokenizer(), f"tiny-{arch}")
    bundle = export_prompt(lm, texts()[2], ExportSettings(warmup=0))
    rt, eager = lean_runtime(), lean_runtime(lean=False)
    prompts, opts = texts(), DecodeOptions(max_new_tokens=10)
    early_stopper(eager, prompts, opts)
    rt.eos = eager.eos
    alone = [eager.generate(opts, prompt=p).token_ids for p in prompts]
    assert len({len(a) for a in alone}) > 1  # some stop early
    rt.prepare()
    calls = []
    step_batch = rt.lean.step_batch
    rt.lean.step_batch = lambda *a: calls.append(len(a[2])) or step_batch(*a)
    assert [g.token_ids for g in rt.generate_batch(prompts, opts, batch_size=4)] == alone
    assert calls and min(calls) < max(calls) <= 4  # through the lean step, rows dropped as they finish
    assert [g.token_ids for g in eager.generate_batch(prompts, opts, batch_size=4)] == alone

    fresh = from_model(tiny_model(arch, lean=True).model, tiny_tokenizer(), f"tiny-{arch}")
    export_onnx(fresh, tmp_path / "full", max_length=128)
    export_onnx(fresh, tmp_path / "pruned", bundle, max_length=128)
    assert read_graph(tmp_path / "pruned").info.layout == "lean"
    for pruned_prefill, budget in ((False, 1), (True, onnx_runtime.PREFILL_LOGITS)):
        # budget 1: every prompt prefilled alone, its buffers stacked into the batch's
        monkeypatch.setattr(onnx_runtime, "PREFILL_LOGITS", budget)
        ort = OnnxRuntime(tmp_path / "pruned", bundle, full=tmp_path / "full", provider="cpu",
                          pruned_prefill=pruned_prefill)
        ort.tokenizer, ort.eos = lm.tokenizer, eager.eos
        want = alone if not pruned_prefill else [ort.generate(opts, prompt=p).token_ids for p in prompts]
        assert [g.token_ids for g in ort.generate_batch(prompts, opts, batch_size=4)] == want
    static = OnnxRuntime(tmp_path / "pruned", bundle, full=tmp_path / "full", provider="cpu", static=True)
    static.tokenizer = lm.tokenizer
    with pytest.raises(GriffinError, match="capture the batch-1 decode step"):
        static.generate_batch(prompts, opts)
