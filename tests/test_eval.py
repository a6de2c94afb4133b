"""The evaluation: metrics on fixed inputs, the log-likelihood against a direct computation,
resume == uninterrupted, the report, and every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from griffin_export.model.arch import ff_blocks, slice_block, spec_for
from griffin_export.evaluation import results, runner
from griffin_export.evaluation.metrics import bootstrap, diff_ci, first_divergence, mean_ci, ratio_ci, rouge
from griffin_export.evaluation.runner import Context, continuation_ids, continuation_logprobs, pruned
from griffin_export.evaluation.settings import EvalSettings
from griffin_export.model.prefill import cache_tensors, prefill
from griffin_export.method.selection import select_all
from tests.helpers import prompt_ids, run, tiny_model

# -- metrics on fixed strings -------------------------------------------------------------------


def test_rouge_known_values_with_stemming():
    # target: the cat sat on the mat (6 tokens); prediction: the cats were sitting on a mat (7).
    # Stemmed, unigram overlap is {the, cat, on, mat} = 4 -> F1 = 2*4/(6+7) = 8/13;
    # bigram overlap {the cat} = 1 of 5 and 6 -> 2/11; LCS "the cat on mat" = 4 -> 8/13.
    # Without stemming "cats" != "cat" and ROUGE-1 would be 6/13.
    r = rouge("the cats were sitting on a mat", "the cat sat on the mat")
    assert r["rouge1"] == pytest.approx(8 / 13)
    assert r["rouge2"] == pytest.approx(2 / 11)
    assert r["rougeL"] == pytest.approx(8 / 13)
    # ROUGE-L differs from ROUGE-1 when order differs: LCS of "mat the cat" vs "the cat mat" is 2
    r = rouge("mat the cat", "the cat mat")
    assert r["rouge1"] == pytest.approx(1.0) and r["rougeL"] == pytest.approx(2 / 3)
    assert rouge("", "the cat") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge("A cat.", "a cat") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert first_divergence([5], [6, 7]) == 0
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped earlier: differs at its end
    assert first_divergence([1, 2, 3], [1, 2, 3]) == 3  # identical: never diverged
    assert first_divergence([], []) == 0


def test_bootstrap_intervals():
    x = np.arange(20.0)
    iv = mean_ci(x)
    assert iv.mean == pytest.approx(9.5) and iv.low < 9.5 < iv.high and iv.n == 20
    assert mean_ci(x) == iv  # seeded
    const = mean_ci([0.3] * 7)
    assert (const.low, const.mean, const.high) == pytest.approx((0.3, 0.3, 0.3))
    # paired: every prompt is exactly 1 below its reference, so the paired interval has no width
    # although each column alone varies a lot
    d = diff_ci(x, x + 1)
    assert (d.low, d.mean, d.high) == pytest.approx((-1, -1, -1))
    r = ratio_ci(2 * x + 2, x + 1)
    assert (r.low, r.mean, r.high) == pytest.approx((2, 2, 2))
    assert np.isnan(mean_ci([]).mean)
    one = bootstrap([[4.0]])
    assert (one.low, one.high) == (4.0, 4.0)


# -- tokenizing the gold continuation --------------------------------------------------------------


class MergingTokenizer:
    """One id per character, except that 'ab' is a single token: merges across boundaries."""

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_continuation_ids_split_after_the_prompt():
    tok = MergingTokenizer()
    c = continuation_ids(tok, "xy", "\n", "abc", tok("xy")["input_ids"])
    assert c.ids.tolist() == [ord("\n"), 1000, ord("c")] and c.scored_from == 1 and not c.split
    # "xa" + "bc": the prompt's last character merges with the target's first -> tokenized apart
    c = continuation_ids(tok, "xa", "", "bc", tok("xa")["input_ids"])
    assert c.ids.tolist() == [ord("b"), ord("c")] and c.scored_from == 0 and c.split


# -- the log-likelihood against a direct computation --------------------------------------------


def direct_logprobs(model, ids, cont, T, masks=None) -> torch.Tensor:
    """One forward over prompt + continuation without a cache, log-softmax gathered; with
    masks, the unselected neurons are zeroed at the continuation positions only (GRIFFIN:
    the prompt goes through the full model)."""
    handles = []
    if masks is not None:
        def hook(mask):
            def pre(module, args):
                z = args[0].clone()
                z[:, T:, :] *= mask
                return (z,)
            return pre

        spec = spec_for(model.config.model_type)
        handles = [b.output.register_forward_pre_hook(hook(m)) for b, m in zip(ff_blocks(model, spec), masks)]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.cat([ids, cont[None, :-1]], dim=1)).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits[T - 1:], dim=-1)  # position T-1+i predicts cont[i]
    return logp.gather(1, cont[:, None])[:, 0]


def test_gold_loglik_equals_direct_computation_full_and_pruned():
    lm = tiny_model("llama")
    model = lm.model
    ids = prompt_ids(24)
    T = ids.shape[1]
    cont = torch.tensor([5, 17, 42, 8, 60, 33])
    cache, last = prefill(model, ids)
    kv = cache_tensors(cache)

    got = continuation_logprobs(model, kv, T, last, cont)
    torch.testing.assert_close(got, direct_logprobs(model, ids, cont, T), rtol=1e-4, atol=1e-4)

    ctx = Context(lm, EvalSettings(data="unused", warmup=0))
    before = [dict(b.owner.named_children()) for b in ctx.blocks]
    indices = select_all(torch.rand(lm.num_layers, lm.d_ff, generator=torch.Generator().manual_seed(3)),
                         lm.d_ff // 2, "topk", 0)
    tensors = {k: v for b, idx in zip(ctx.blocks, indices) for k, v in slice_block(b, idx, lm.spec, lm.d_ff).items()}
    with pruned(ctx, tensors):
        assert model.model.layers[0].mlp.down_proj.weight.shape[1] == lm.d_ff // 2
        got = continuation_logprobs(model, kv, T, last, cont)
    masks = []
    for idx in indices:
        m = torch.zeros(lm.d_ff)
        m[idx] = 1.0
        masks.append(m)
    want = direct_logprobs(model, ids, cont, T, masks)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got[0] == pytest.approx(float(direct_logprobs(model, ids, cont, T)[0]), abs=1e-5)  # first: full model
    assert (got[1:] - direct_logprobs(model, ids, cont, T)[1:]).abs().max() > 1e-3  # pruning mattered
    # the full-width linears are back, and the original cache was not consumed
    assert [dict(b.owner.named_children()) for b in ctx.blocks] == before
    torch.testing.assert_close(continuation_logprobs(model, kv, T, last, cont), direct_logprobs(model, ids, cont, T),
                               rtol=1e-4, atol=1e-4)


# -- the command: runs, resume, report ---------------------------------------------------------------


def write_data(path, n=3, **override):
    rows = []
    for r in range(n):
        words = " ".join(f"w{(7 * i + 3 * r) % 90 + 3}" for i in range(24))
        rows.append({"article": words, "summary_gt": "w5 w6 w7 w8", "max_tokens": 6, "stop": ["w9"], **override})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "d.jsonl", n=4)


def eval_args(data, out, model_dir, rows="0:3", methods="full,topk,random", density="0.5"):
    """An eval of the paper's methods as they are (no warm-up: setting keys without +wN)."""
    return ["eval", "--data", data, "--rows", rows, "--methods", methods, "--density", density, "--warmup", "0",
            "--model", model_dir, "-q", "-o", out]


def records(out) -> dict[int, dict]:
    """Per-row results without the timings (which differ run to run)."""
    _, recs = results.read_results(out / results.RESULTS_FILE)
    strip = lambda d: {k: v for k, v in d.items() if "seconds" not in k}  # noqa: E731
    return {row: {**strip(r), "results": {k: strip(v) for k, v in r["results"].items()}} for row, r in recs.items()}


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted(tmp_path, data, tiny_dir, capsys, monkeypatch):
    model_dir = tiny_dir("llama")
    code, _, err = run(eval_args(data, tmp_path / "a", model_dir), capsys)
    assert code == 0, err
    whole = records(tmp_path / "a")
    assert sorted(whole) == [0, 1, 2] and set(whole[0]["results"]) == {"full", "topk@0.5", "random@0.5"}

    calls = []
    real = runner.evaluate_prompt

    def interrupted(ctx, row, settings, **kw):
        calls.append(row.index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ctx, row, settings, **kw)

    monkeypatch.setattr(runner, "evaluate_prompt", interrupted)
    code, _, err = run(eval_args(data, tmp_path / "b", model_dir), capsys)
    assert code == 130, err
    assert sorted(records(tmp_path / "b")) == [0]
    assert not (tmp_path / "b" / "results.json").exists()
    with open(tmp_path / "b" / results.RESULTS_FILE, "ab") as f:  # a record cut off mid-write
        f.write(b'{"row": 1, "prompt_tokens": 2')

    calls.clear()
    def counted(ctx, row, settings, **kw):
        calls.append(row.index)
        return real(ctx, row, settings, **kw)

    monkeypatch.setattr(runner, "evaluate_prompt", counted)
    code, _, err = run(eval_args(data, tmp_path / "b", model_dir), capsys)
    assert code == 0, err
    assert calls == [1, 2]  # finished prompts are not redone
    assert records(tmp_path / "b") == whole
    qa = json.loads((tmp_path / "a" / "results.json").read_text())["quality"]["settings"]
    qb = json.loads((tmp_path / "b" / "results.json").read_text())["quality"]["settings"]
    drop = lambda s: [{k: v for k, v in x.items() if k != "seconds"} for x in s]  # noqa: E731
    assert drop(qa) == drop(qb)

    # extending the row range reuses the finished rows
    calls.clear()
    code, _, err = run(eval_args(data, tmp_path / "b", model_dir, rows="0:4"), capsys)
    assert code == 0, err
    assert calls == [3]
    header, _ = results.read_results(tmp_path / "b" / results.RESULTS_FILE)
    assert "--rows 0:4" in header["command"]  # the command that asked for the new range
    # other settings: refused, unless --force
    code, _, err = run(eval_args(data, tmp_path / "b", model_dir, density="0.25"), capsys)
    assert code == 2 and "holds results for other settings (differs in: densities)" in err and "--force" in err
    calls.clear()
    code, _, err = run([*eval_args(data, tmp_path / "b", model_dir, density="0.25"), "--force"], capsys)
    assert code == 0, err
    assert calls == [0, 1, 2]
    header, _ = results.read_results(tmp_path / "b" / results.RESULTS_FILE)
    assert "--density 0.25" in header["command"] and "--force" not in header["command"]  # rerun, it resumes


def test_report_from_a_two_prompt_run_and_bench(tmp_path, data, tiny_dir, capsys):
    out = tmp_path / "report"
    code, stdout, err = run(eval_args(data, out, tiny_dir("llama"), rows="0:2", methods="full,topk,magnitude",
                                      density="0.25,0.5"), capsys)
    assert code == 0, err
    for name in ("results.json", "results.md", "rouge_l.png", "gold_ll.png", "agreement.png"):
        assert (out / name).is_file() and f"wrote {out / name}" in stdout
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "speed.png").exists()
    rep = json.loads((out / "results.json").read_text())
    # the command as given, in the options' order, defaults (and --quiet, which changes no result) left out
    assert rep["command"] == (f"griffin-export eval --data {data} --rows 0:2 --methods full,topk,magnitude "
                              f"--density 0.25,0.5 --output {out} --model {tiny_dir('llama')} --warmup 0")
    assert rep["model"]["fingerprint"] and rep["machine"]["cpu"] and rep["versions"]["torch"]
    assert rep["quality"]["done"] == 2 and len(rep["per_prompt"]) == 2
    keys = [s["key"] for s in rep["quality"]["settings"]]
    assert keys == ["full", "topk@0.25", "topk@0.5", "magnitude@0.25", "magnitude@0.5"]
    topk = rep["quality"]["settings"][2]
    assert topk["k"] == 32 and topk["n"] == 2
    for metric in ("rouge1", "rouge2", "rougeL", "gold_ll", "gold_ll_vs_full", "agree_rougeL", "first_divergence"):
        assert topk[metric]["low"] <= topk[metric]["mean"] <= topk[metric]["high"]
    per = rep["per_prompt"][0]["results"]["topk@0.5"]
    assert topk["gold_ll"]["mean"] == pytest.approx(
        (per["gold_ll"] + rep["per_prompt"][1]["results"]["topk@0.5"]["gold_ll"]) / 2)
    md = (out / "results.md").read_text()
    assert "| `topk` | 0.5 | 32 |" in md and "![ROUGE-L vs density](rouge_l.png)" in md
    assert "griffin-export eval --data" in md and "## Speed" not in md

    bench = {"machine": {"cpu": "x"}, "rows": [
        {"runtime": rt, "config": c, "k": k, "decode_tok_s": t, "speedup": t / 100, "bound": b, "bundle_bytes": 0}
        for rt in ("torch", "onnx") for c, k, t, b in (("full", 64, 100.0, 1.0), ("0.5", 32, 150.0, 1.6))]}
    (out / "bench.json").write_text(json.dumps(bench))
    code, stdout, err = run(["eval", "--report-only", "-o", out], capsys)
    assert code == 0, err
    assert (out / "speed.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "## Speed" in md and "| onnx | 0.5 | 32 | 150.0 | 1.50× | 1.60× |" in md and "## Quality" in md
    assert json.loads((out / "results.json").read_text())["bench"]["rows"][3]["runtime"] == "onnx"

    only_bench = tmp_path / "speed-only"
    only_bench.mkdir()
    (only_bench / "bench.json").write_text(json.dumps(bench))
    code, _, err = run(["eval", "--report-only", "-o", only_bench], capsys)
    assert code == 0, err
    assert (only_bench / "speed.png").is_file() and not (only_bench / "rouge_l.png").exists()


def test_a_run_from_python_reports_no_command(tmp_path, data, tiny_dir, capsys):
    """Nor does a CLI run resumed from Python over more rows: its command named the old rows."""
    from griffin_export.evaluation.report import NOT_RECORDED, write_report
    from griffin_export.model.load import load_model

    code, _, err = run(eval_args(data, tmp_path / "out", tiny_dir("llama"), rows="0:1", methods="full") + ["--ll-only"],
                       capsys)
    assert code == 0, err
    assert "--rows 0:1" in json.loads((tmp_path / "out" / "results.json").read_text())["command"]
    settings = EvalSettings(data=str(data), rows=(0, 2), methods=("full",), densities=(0.5,), generate=False, warmup=0)
    runner.run_eval(load_model(tiny_dir("llama")), settings, tmp_path / "out", progress=False)
    write_report(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["command"] == NOT_RECORDED


@pytest.mark.slow
def test_ll_only_gives_the_same_likelihoods_without_generating(tmp_path, data, tiny_dir, capsys):
    model_dir = tiny_dir("llama")
    code, _, err = run(eval_args(data, tmp_path / "full", model_dir, rows="0:2"), capsys)
    assert code == 0, err
    code, _, err = run([*eval_args(data, tmp_path / "ll", model_dir, rows="0:2"), "--ll-only"], capsys)
    assert code == 0, err
    whole, ll = records(tmp_path / "full"), records(tmp_path / "ll")
    for row in (0, 1):
        for key, res in ll[row]["results"].items():
            assert res["gold_ll"] == whole[row]["results"][key]["gold_ll"]
            assert res["rougeL"] is None and res["text"] is None
    assert (tmp_path / "ll" / "gold_ll.png").is_file() and not (tmp_path / "ll" / "rouge_l.png").exists()
    md = (tmp_path / "ll" / "results.md").read_text()
    assert "--ll-only" in md and "Agreement" not in md and "| `topk` | 0.5 | 32 | — | — | — | — |" in md


def test_bundle_method_applies_fixed_experts(tmp_path, tiny_dir, capsys):
    """A bundle exported from row 0 with topk at 0.5, applied as fixed experts to row 0,
    is exactly that prompt's own topk@0.5 setting."""
    model_dir = tiny_dir("llama")
    data = write_data(tmp_path / "d.jsonl", n=2)
    prompt = tmp_path / "p.txt"
    prompt.write_text(json.loads(data.read_text().splitlines()[0])["article"], encoding="utf-8")
    bundle = tmp_path / "e.safetensors"
    code, _, err = run([prompt, "-o", bundle, "--model", model_dir, "-q", "--no-kv", "--warmup", "0"], capsys)
    assert code == 0, err
    out = tmp_path / "r"
    code, _, err = run(eval_args(data, out, model_dir, rows="0:2", methods=f"full,topk,bundle:{bundle}"), capsys)
    assert code == 0, err
    recs = records(out)
    for name in ("gold_ll", "text", "rougeL", "first_divergence"):
        assert recs[0]["results"][f"bundle:{bundle}"][name] == recs[0]["results"]["topk@0.5"][name]
    assert recs[0]["results"][f"bundle:{bundle}"]["density"] == 0.5
    assert "| `e.safetensors` | 0.5 | 32 |" in (out / "results.md").read_text()
    # with the default warm-up the selection methods get it and say so; fixed experts and the full model
    # have none, and each row records which it used
    warm = tmp_path / "w"
    argv = [a for a in eval_args(data, warm, model_dir, rows="0:1", methods=f"full,topk,bundle:{bundle}")]
    i = argv.index("--warmup")
    del argv[i:i + 2]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    rows = records(warm)[0]["results"]
    assert set(rows) == {"full", "topk@0.5+w8", f"bundle:{bundle}"}
    assert (rows["full"]["warmup"], rows["topk@0.5+w8"]["warmup"], rows[f"bundle:{bundle}"]["warmup"]) == (0, 8, 0)
    assert rows[f"bundle:{bundle}"]["text"] == recs[0]["results"][f"bundle:{bundle}"]["text"]  # as without warm-up


def test_warm_up_settings_are_what_an_export_with_warmup_generates(tmp_path, tiny_dir, capsys):
    """eval --warmup N: the text of `topk@0.5+wN` is `generate` from a bundle exported with --warmup N,
    its gold likelihood that bundle's experts scored from the prompt; at density 1 the full model's."""
    model_dir = tiny_dir("llama")
    data = write_data(tmp_path / "d.jsonl", n=1, max_tokens=8, stop=[])
    prompt = tmp_path / "p.txt"
    prompt.write_text(json.loads(data.read_text())["article"], encoding="utf-8")
    bundle = tmp_path / "w.safetensors"
    code, _, err = run([prompt, "-o", bundle, "--model", model_dir, "-q", "--warmup", "3"], capsys)
    assert code == 0, err
    code, generated, err = run(["generate", bundle, "--max-new-tokens", "8", "-q"], capsys)
    assert code == 0, err
    out = tmp_path / "r"
    code, _, err = run([*eval_args(data, out, model_dir, rows="0:1", methods="full,topk", density="0.5,1"),
                        "--warmup", "3"], capsys)
    assert code == 0, err
    rec = records(out)[0]
    res = rec["results"]
    assert set(res) == {"full", "topk@0.5+w3", "topk@1+w3"} and rec["warmup_tokens"] == 3
    assert res["topk@0.5+w3"]["text"] == generated.rstrip("\n") and res["topk@0.5+w3"]["warmup"] == 3
    assert res["topk@1+w3"]["text"] == res["full"]["text"] and res["topk@1+w3"]["identical"]
    assert res["topk@0.5+w3"]["first_divergence"] is None or res["topk@0.5+w3"]["first_divergence"] >= 3
    code, _, err = run(eval_args(data, tmp_path / "b", model_dir, rows="0:1", methods=f"full,bundle:{bundle}"), capsys)
    assert code == 0, err
    assert records(tmp_path / "b")[0]["results"][f"bundle:{bundle}"]["gold_ll"] == res["topk@0.5+w3"]["gold_ll"]
    report = (out / "results.md").read_text()
    assert "| `topk` +3 warm-up | 0.5 |" in report and f"--model {model_dir} --warmup 3\n" in report


def test_pruned_prefill_method_decodes_like_the_runtime_with_pruned_prefill(tmp_path, tiny_dir, capsys):
    """`pruned-prefill:PATH` generates what `generate --pruned-prefill` does with that bundle,
    and its first-token likelihood differs from `bundle:PATH` (whose prefill is full)."""
    from griffin_export.bundle.format import read_bundle
    from griffin_export.settings import DecodeOptions
    from griffin_export.model.load import load_model
    from griffin_export.runtime.pytorch import TorchRuntime

    model_dir = tiny_dir("llama")
    data = write_data(tmp_path / "d.jsonl", n=2)
    article = json.loads(data.read_text().splitlines()[1])["article"]
    (tmp_path / "p.txt").write_text(json.loads(data.read_text().splitlines()[0])["article"], encoding="utf-8")
    bundle = tmp_path / "e.safetensors"
    code, _, err = run([tmp_path / "p.txt", "-o", bundle, "--model", model_dir, "-q", "--no-kv"], capsys)
    assert code == 0, err
    out = tmp_path / "r"
    code, _, err = run(eval_args(data, out, model_dir, rows="0:2",
                                 methods=f"full,bundle:{bundle},pruned-prefill:{bundle}"), capsys)
    assert code == 0, err
    rec = records(out)[1]["results"]
    rt = TorchRuntime(load_model(str(model_dir), quiet=True), read_bundle(bundle, load_kv=False), pruned_prefill=True)
    want = rt.generate(DecodeOptions(max_new_tokens=6, stop=["w9"]), prompt=article)
    assert rec[f"pruned-prefill:{bundle}"]["text"] == want.text
    assert rec[f"pruned-prefill:{bundle}"]["gold_ll"] != rec[f"bundle:{bundle}"]["gold_ll"]
    assert "e.safetensors (pruned prefill)" in (out / "results.md").read_text()


@pytest.mark.slow
def test_merged_halves_and_settings_equal_one_run(tmp_path, data, tiny_dir, capsys):
    """Rows 0:1 and 1:3 run apart, plus `random` run apart on all rows, merge into what one run
    of every setting over 0:3 records; a merge that would mix settings or rows is refused."""
    model_dir = tiny_dir("llama")
    for name, rows, methods in [("one", "0:3", "full,topk,random"), ("a", "0:1", "full,topk"),
                                ("b", "1:3", "full,topk"), ("r", "0:3", "full,random")]:
        code, _, err = run(eval_args(data, tmp_path / name, model_dir, rows=rows, methods=methods), capsys)
        assert code == 0, err
    code, _, err = run(["eval", "--merge", tmp_path / "a", "--merge", tmp_path / "b", "--merge", tmp_path / "r",
                        "-o", tmp_path / "m"], capsys)
    assert code == 0, err
    assert records(tmp_path / "m") == records(tmp_path / "one")
    header, _ = results.read_results(tmp_path / "m" / results.RESULTS_FILE)
    assert header["settings"]["rows"] == [0, 3] and header["key"]["methods"] == ["full", "topk", "random"]
    merge_cmd = (f"griffin-export eval --output {tmp_path / 'm'} --merge {tmp_path / 'a'} --merge {tmp_path / 'b'} "
                 f"--merge {tmp_path / 'r'}")
    assert header["command"] == merge_cmd and merge_cmd in (tmp_path / "m" / "results.md").read_text()
    # a merge rerun over its file needs --force, so its command keeps it (a run's leaves it out: it resumes)
    code, _, err = run(["eval", "--merge", tmp_path / "a", "--merge", tmp_path / "b", "--merge", tmp_path / "r",
                        "-o", tmp_path / "m", "--force"], capsys)
    assert code == 0, err
    forced = merge_cmd.replace(f"--output {tmp_path / 'm'}", f"--output {tmp_path / 'm'} --force")
    assert results.read_results(tmp_path / "m" / results.RESULTS_FILE)[0]["command"] == forced
    code, _, err = run(["eval", "--merge", tmp_path / "a", "--merge", tmp_path / "r", "-o", tmp_path / "x"], capsys)
    assert code == 2 and "row 1 lacks settings other rows have" in err and err.count("\n") == 1
    code, _, err = run(["eval", "--merge", tmp_path / "a", "--merge", tmp_path / "r", "--rows", "0:1",
                        "-o", tmp_path / "x"], capsys)  # only the row both cover
    assert code == 0, err
    assert records(tmp_path / "x") == {0: records(tmp_path / "one")[0]}
    code, _, err = run([*eval_args(data, tmp_path / "s", model_dir, rows="0:1", methods="full,topk"), "--seed", "5",
                        "--max-tokens", "3"], capsys)
    assert code == 0, err
    code, _, err = run(["eval", "--merge", tmp_path / "a", "--merge", tmp_path / "s", "-o", tmp_path / "y"], capsys)
    assert code == 2 and "cannot be merged: they differ in seed, max_tokens" in err


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/nope.jsonl"], "data file {tmp}/nope.jsonl does not exist"),
    (["--rows", "5:2"], "bad row range '5:2': need 0 <= START < STOP"),
    (["--rows", "0:10"], "rows 0:10 are out of range: {tmp}/d.jsonl has 4 rows"),
    (["--rows", "first"], "bad row range 'first': expected START:STOP"),
    (["--rows", "1:2:3"], "bad row range '1:2:3'"),
    (["--methods", "full,bogus"], "unknown method 'bogus'; known: full, topk, sample, topk_sample, random, "
                                  "magnitude, topk_refit, topk_refit_edges, topk_refit_alloc, bundle:PATH, pruned-prefill:PATH"),
    (["--methods", "topk,topk"], "names one more than once"),
    (["--density", "0.5,1.5"], "density must be in (0, 1], got 1.5"),
    (["--density", "0"], "density must be in (0, 1], got 0.0"),
    (["--density", "half"], "density 'half' is not a number"),
    (["--methods", "bundle:{tmp}/missing.safetensors"], "bundle {tmp}/missing.safetensors does not exist"),
    (["--methods", "pruned-prefill:{tmp}/gone.safetensors"], "bundle {tmp}/gone.safetensors does not exist"),
    (["--warmup", "-1"], "warm-up must be >= 0 tokens, got -1"),
])
def test_bad_input(tmp_path, data, tiny_dir, capsys, args, message):
    argv = [a.format(tmp=tmp_path) for a in ["--data", str(data), "--rows", "0:2", *args]]
    code, _, err = run(["eval", *argv, "--model", tiny_dir("llama"), "-q", "-o", tmp_path / "out"], capsys)
    assert code == 2
    assert err.startswith("griffin-export: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()  # refused before any output or model work


def test_an_output_that_cannot_be_a_folder_is_refused_before_the_model_loads(tmp_path, data, capsys, monkeypatch):
    from griffin_export.model import load as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "taken").write_text("x")
    for out, message in ((tmp_path / "taken", "exists and is not a directory"),
                         (tmp_path / "no" / "out", f"output directory {tmp_path / 'no'} does not exist")):
        code, _, err = run(eval_args(data, out, "unused-model-dir"), capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_bad_rows_in_the_data_file(tmp_path, tiny_dir, capsys):
    data = write_data(tmp_path / "d.jsonl", n=2)
    lines = data.read_text().splitlines()
    for bad, message in (('{"article": "w5 w6"}', "d.jsonl:2: no field 'summary_gt' (fields: article); choose one with"),
                         ("not json", "d.jsonl:2: not valid JSON"),
                         ('{"article": "w5", "summary_gt": "w6", "max_tokens": 0}', "max_tokens must be a positive")):
        data.write_text(lines[0] + "\n" + bad + "\n")
        code, _, err = run(eval_args(data, tmp_path / "out", tiny_dir("llama"), rows="0:2"), capsys)
        assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_report_only_errors(tmp_path, capsys):
    code, _, err = run(["eval", "--report-only", "-o", tmp_path], capsys)
    assert code == 2 and "holds neither eval.jsonl" in err
    (tmp_path / "bench.json").write_text('{"rows": [{"config": "full"}]}')
    code, _, err = run(["eval", "--report-only", "-o", tmp_path], capsys)
    assert code == 2 and "bench.json: row 0 lacks config / speedup / bound" in err
    code, _, err = run(["eval", "--report-only", "-o", tmp_path / "missing"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["eval", "-o", tmp_path], capsys)
    assert code == 2 and "--data FILE.jsonl is required" in err


@pytest.mark.real_model
def test_default_model_one_prompt(real_lm, tmp_path):
    """The default model on one dev prompt (8 tokens): prompt and gold text tokenize apart
    cleanly, and the full model finds the gold summary far likelier than a pruned random FF."""
    from tests.helpers import DATA

    row = json.loads(DATA.read_text(encoding="utf-8").splitlines()[0])
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({**row, "max_tokens": 8}) + "\n", encoding="utf-8")
    settings = EvalSettings(data=str(data), rows=(0, 1), methods=("full", "topk", "random"), densities=(0.5,), warmup=0)
    runner.run_eval(real_lm, settings, tmp_path / "out", progress=False)
    _, recs = results.read_results(tmp_path / "out" / results.RESULTS_FILE)
    rec = recs[0]
    assert not rec["split_tokenization"] and rec["target_tokens"] >= 10
    res = rec["results"]
    assert -5 < res["full"]["gold_ll"] < -1
    assert res["random@0.5"]["gold_ll"] < res["topk@0.5"]["gold_ll"] < res["full"]["gold_ll"] + 0.5
    assert res["full"]["tokens"] == 8


def test_paired_script_differences_match_the_records(tmp_path, data, tiny_dir, capsys):
    """bench/paired.py: per-prompt A − B of the gold likelihood (and A ÷ B of ROUGE-L), averaged."""
    from bench import paired as script  # the repository root is on pytest's path

    out = tmp_path / "r"
    code, _, err = run(eval_args(data, out, tiny_dir("llama"), density="0.5,0.75"), capsys)
    assert code == 0, err
    recs = records(out).values()
    [(d, ll, rl)] = script.paired(str(out), "topk", "random", [0.75])
    want = sum(r["results"]["topk@0.75"]["gold_ll"] - r["results"]["random@0.75"]["gold_ll"] for r in recs) / len(recs)
    assert d == 0.75 and ll.mean == pytest.approx(want) and ll.low <= ll.mean <= ll.high and rl is not None
    assert script.paired(str(out), "topk", "topk", [0.5])[0][1].mean == 0.0
    assert "| 0.5 | " in script.main([str(out), "topk", "random", "0.5"])
    assert script.key("topk_refit", 0.5) == "topk_refit@0.5" and script.key("topk+w8", 0.25) == "topk@0.25+w8"
    assert script.key("pruned-prefill:a/n.safetensors", 0.5) == "pruned-prefill:a/n.safetensors"  # a bundle's own key
    assert script.key("bundle:n+w8.safetensors", 0.5) == "bundle:n+w8.safetensors"
