"""Prompt classes: aggregation, streaming input, bad input, class bundles, classification mode."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import ARCHS, class_texts, masked, prompt_ids, run, same, tiny_model, tiny_prompt, write_jsonl
from griffin_export import ExportSettings, TorchRuntime, export_ids, read_bundle
from griffin_export.model.arch import ff_blocks
from griffin_export.registry import AGGREGATIONS, DEFAULT_AGGREGATION
from griffin_export.classes.build import ClassSettings, class_bundle, export_class
from griffin_export.files.inputs import Prompt, iter_prompts, survey_prompts
from griffin_export.method.classify import choice_loglik, classification_logits, experts
from griffin_export.errors import GriffinError
from griffin_export.method.export import layer_scores
from griffin_export.model.tokens import tokenize
from griffin_export.model.load import load_model
from griffin_export.model.prefill import forward, prefill
from griffin_export.method.selection import select_all


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_model(str(tiny_dir("llama")), quiet=True)


# -- aggregation -------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("density", [0.25, 0.5])
def test_n_copies_of_one_prompt_select_what_the_prompt_selects(lm, aggregation, density):
    text = tiny_prompt(30)
    own = export_ids(lm, tokenize(lm, text), ExportSettings(density=density, warmup=0)).indices
    result = export_class(lm, [Prompt(text, f"copy{i}") for i in range(4)],
                          ClassSettings("same", aggregation=aggregation, density=density))
    assert same(result.bundle.indices, own)
    # and a different prompt would not have selected the same: the check can fail
    other = export_ids(lm, tokenize(lm, class_texts(3)[2]), ExportSettings(density=density, warmup=0)).indices
    assert not same(other, own)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_prompt_order_does_not_change_the_class(lm, aggregation):
    prompts = [Prompt(t, str(i)) for i, t in enumerate(class_texts(6))]
    settings = ClassSettings("c", aggregation=aggregation)
    forward_order = export_class(lm, prompts, settings)
    shuffled = export_class(lm, [prompts[i] for i in (3, 0, 5, 1, 4, 2)], settings)
    assert same(forward_order.bundle.indices, shuffled.bundle.indices)
    score = AGGREGATIONS[aggregation].score
    torch.testing.assert_close(score(forward_order.statistic), score(shuffled.statistic), rtol=1e-12, atol=1e-12)


def in_memory_class_score(all_scores: torch.Tensor, aggregation: str, k: int) -> torch.Tensor:
    """The aggregations written directly on all prompts' scores [N, L, D_ff] at once."""
    s = all_scores.double()
    mean = (s / s.norm(dim=-1, keepdim=True)).mean(0)
    if aggregation == "mean":
        return mean
    if aggregation == "pooled":
        return s.square().sum(0).sqrt()
    member = torch.zeros_like(s).scatter_(-1, s.topk(k, dim=-1).indices, 1.0)
    return member.mean(0) + 0.5 * mean / s.shape[0]


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_streaming_equals_in_memory_aggregation(lm, tmp_path, aggregation):
    prompts = class_texts(7)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(prompts)))
    settings = ClassSettings("c", aggregation=aggregation, density=0.25)
    streamed = export_class(lm, iter_prompts([path]), settings)

    all_scores = torch.stack([layer_scores(lm, tokenize(lm, t), settings.export_settings())[0] for t in prompts])
    k = streamed.statistic.k
    want = in_memory_class_score(all_scores, aggregation, k)
    torch.testing.assert_close(AGGREGATIONS[aggregation].score(streamed.statistic), want, rtol=1e-6, atol=1e-9)
    assert same(streamed.bundle.indices, select_all(want.float(), k, "topk", 0))
    assert streamed.statistic.prompts == 7
    assert streamed.statistic.tokens == sum(tokenize(lm, t).shape[1] for t in prompts)


def test_aggregations_disagree_on_mixed_prompts(lm):
    """The registry's entries are really different functions (so choosing one matters)."""
    prompts = [Prompt(t, str(i)) for i, t in enumerate(class_texts(6))]
    out = {a: export_class(lm, prompts, ClassSettings("c", aggregation=a, density=0.25)).bundle.indices
           for a in AGGREGATIONS}
    assert not same(out["mean"], out["pooled"]) or not same(out["mean"], out["topk_freq"])


def test_prompts_are_streamed_one_at_a_time(lm, monkeypatch):
    """Each prompt is prefilled before the next is read: nothing collects the input."""
    from griffin_export.classes import counting as classes

    calls = []
    real = classes.prompt_statistic
    monkeypatch.setattr(classes, "prompt_statistic", lambda *a, **k: calls.append(1) or real(*a, **k))

    def source():
        for i, t in enumerate(class_texts(5)):
            assert len(calls) == i, "the next prompt was read before the previous one was prefilled"
            yield Prompt(t, str(i))

    result = export_class(lm, source(), ClassSettings("c"))
    assert result.statistic.prompts == 5 and len(calls) == 5


# -- the class bundle --------------------------------------------------------------------


def test_class_bundle_metadata_and_no_kv(lm, tmp_path):
    from griffin_export import write_bundle

    result = export_class(lm, [Prompt(t, str(i)) for i, t in enumerate(class_texts(3))],
                          ClassSettings("news", aggregation="topk_freq", density=0.75), source="a.jsonl")
    path = write_bundle(result.bundle, tmp_path / "news.safetensors")
    b = read_bundle(path)
    assert b.info.kind == "class" and not b.info.has_kv
    assert b.kv is None and b.prompt_ids is None and b.last_logits is None
    assert b.info.extra == {"class": "news", "prompts": "3", "skipped": "0", "aggregation": "topk_freq",
                            "source": "a.jsonl"}
    assert b.info.k == [48, 48] and b.info.method == "topk" and b.info.density == 0.75
    assert b.info.prompt_tokens == result.statistic.tokens


def test_class_bundle_decodes_a_new_prompt_after_a_full_prefill(lm, tiny_dir):
    result = export_class(lm, [Prompt(t, str(i)) for i, t in enumerate(class_texts(3))], ClassSettings("c"))
    fresh = load_model(str(tiny_dir("llama")), quiet=True)
    ids = tokenize(fresh, tiny_prompt(12))
    _, want_first = prefill(fresh.model, ids)

    rt = TorchRuntime(load_model(str(tiny_dir("llama")), quiet=True), result.bundle, keep_full=True)
    cache, first = rt.start(ids)
    torch.testing.assert_close(first, want_first)  # the new prompt went through the full model
    pruned = TorchRuntime(load_model(str(tiny_dir("llama")), quiet=True), result.bundle, pruned_prefill=True)
    _, first_pruned = pruned.start(ids)
    assert (first_pruned - want_first).abs().max() > 1e-3  # --pruned-prefill really prunes the prefill
    with pytest.raises(GriffinError, match="class bundle"):
        TorchRuntime(load_model(str(tiny_dir("llama")), quiet=True), result.bundle).start()


# -- class refit: the Gram of all the class's tokens, saved statistics, shards -------------------


def refit_class(lm, prompts, method="topk_refit", density=0.5, **kw):
    return export_class(lm, prompts, ClassSettings("c", method=method, density=density, **kw))


def test_class_gram_is_the_sum_of_the_prompts_grams_in_any_order(lm):
    from griffin_export.method.export import prompt_statistic

    prompts = [Prompt(t, str(i)) for i, t in enumerate(class_texts(5))]
    forward_order = refit_class(lm, prompts)
    want = sum(prompt_statistic(lm, tokenize(lm, p.text), gram=True)[0].gram.double() for p in prompts)
    torch.testing.assert_close(forward_order.statistic.gram, want, rtol=1e-12, atol=1e-9)
    assert forward_order.statistic.gram.dtype == torch.float64
    shuffled = refit_class(lm, [prompts[i] for i in (4, 2, 0, 3, 1)])
    torch.testing.assert_close(shuffled.statistic.gram, forward_order.statistic.gram, rtol=1e-12, atol=1e-9)
    assert same(shuffled.bundle.indices, forward_order.bundle.indices)
    for name, t in forward_order.bundle.weights.items():
        torch.testing.assert_close(shuffled.bundle.weights[name], t, rtol=1e-6, atol=1e-7)


def test_class_refit_solves_on_the_class_gram(lm):
    from griffin_export.method.refit import refit_down

    prompts = [Prompt(t, str(i)) for i, t in enumerate(class_texts(4))]
    refit = refit_class(lm, prompts)
    plain = export_class(lm, prompts, ClassSettings("c"))
    assert same(refit.bundle.indices, plain.bundle.indices)  # topk's neurons, refit columns
    assert refit.bundle.info.method == "topk_refit" and refit.bundle.info.extra["refit_lambda"] == "1.0"
    for i, (block, idx) in enumerate(zip(ff_blocks(lm.model, lm.spec), refit.bundle.indices)):
        name = f"{block.prefix}{lm.spec.output}.weight"
        want = refit_down(block.output.weight, refit.statistic.gram[i], idx)
        torch.testing.assert_close(refit.bundle.weights[name], want)
        assert (refit.bundle.weights[name] - plain.bundle.weights[name]).abs().max() > 1e-4  # the refit changed them
        for other in set(refit.bundle.weights) - {name}:
            if other.startswith(block.prefix):  # gate/up rows: sliced, not refit
                assert torch.equal(refit.bundle.weights[other], plain.bundle.weights[other])


@pytest.mark.parametrize("method", ["topk_refit", "topk_refit_edges", "topk_refit_alloc"])
def test_class_refit_at_density_one_is_the_full_model(lm, tiny_dir, method):
    result = refit_class(lm, [Prompt(t, str(i)) for i, t in enumerate(class_texts(3))], method=method, density=1.0)
    assert result.bundle.info.k == [lm.d_ff] * lm.num_layers
    ids = tokenize(lm, tiny_prompt(14))
    _, want = prefill(load_model(str(tiny_dir("llama")), quiet=True).model, ids)
    rt = TorchRuntime(load_model(str(tiny_dir("llama")), quiet=True), result.bundle, pruned_prefill=True)
    cache, first = rt.start(ids)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)


def test_per_layer_budgets_for_a_class():
    from tests.helpers import tiny_tokenizer
    from griffin_export.method.budget import edge_budgets

    lm = tiny_model("llama", lean=True)  # 4 layers, D_ff 64
    lm.tokenizer = tiny_tokenizer()
    prompts = [Prompt(t, str(i)) for i, t in enumerate(class_texts(4))]
    edges = export_class(lm, prompts, ClassSettings("c", method="topk_refit_edges", density=0.8)).bundle
    assert edges.info.k == edge_budgets(4, 64, round(0.8 * 64)) == [64, 64, 12, 64]
    alloc = export_class(lm, prompts, ClassSettings("c", method="topk_refit_alloc", density=0.8)).bundle
    assert sum(alloc.info.k) == 4 * round(0.8 * 64) and len(set(alloc.info.k)) > 1
    with pytest.raises(GriffinError, match="topk_refit_edges cannot keep layers 0, 1 and the last whole"):
        export_class(lm, prompts, ClassSettings("c", method="topk_refit_edges", density=0.5))


def test_a_saved_statistic_gives_the_same_bundles_and_shards_merge_exactly(lm, tmp_path):
    from griffin_export.classes.aggregate import merge, read_statistic, write_statistic

    prompts = [Prompt(t, str(i)) for i, t in enumerate(class_texts(6))]
    whole = refit_class(lm, prompts)
    path = write_statistic(whole.info, whole.statistic, tmp_path / "all.stat")
    info, stat = read_statistic(path)
    assert (info.prompts, info.tokens) == (6, whole.statistic.tokens)
    for method, density in (("topk_refit", 0.5), ("topk_refit_alloc", 0.25), ("topk", 0.75)):
        settings = ClassSettings("c", method=method, density=density)
        again = class_bundle(lm, info, stat, settings)
        direct = export_class(lm, prompts, settings).bundle
        assert same(again.indices, direct.indices)
        for name, t in direct.weights.items():
            torch.testing.assert_close(again.weights[name], t, rtol=1e-6, atol=1e-7)
    halves = [refit_class(lm, part) for part in (prompts[:2], prompts[2:])]
    files = [write_statistic(h.info, h.statistic, tmp_path / f"s{i}.stat") for i, h in enumerate(halves)]
    m_info, m_stat = merge(read_statistic(f) for f in reversed(files))
    assert (m_info.prompts, m_info.tokens) == (info.prompts, info.tokens)
    for name, t in stat.terms().items():
        torch.testing.assert_close(m_stat.terms()[name], t, rtol=1e-12, atol=1e-9)
    merged = class_bundle(lm, m_info, m_stat, ClassSettings("c", method="topk_refit"))
    assert same(merged.indices, whole.bundle.indices)


def test_bad_class_refit_settings_are_one_line_errors(lm, tiny_dir, tmp_path):
    from griffin_export.classes.aggregate import merge, read_statistic, write_statistic

    prompts = [Prompt(t, str(i)) for i, t in enumerate(class_texts(3))]
    plain = export_class(lm, prompts, ClassSettings("c", aggregation="topk_freq"))
    with pytest.raises(GriffinError, match="topk_refit solves on the class's Gram matrices, and .* has none"):
        class_bundle(lm, plain.info, plain.statistic, ClassSettings("c", method="topk_refit"))
    with pytest.raises(GriffinError, match="aggregation topk_freq counts each prompt's top-k, and .* k=32"):
        class_bundle(lm, plain.info, plain.statistic, ClassSettings("c", aggregation="topk_freq", density=0.25))
    with pytest.raises(GriffinError, match="counted without chat=True; drop chat=True"):
        class_bundle(lm, plain.info, plain.statistic, ClassSettings("c", chat=True))
    other = load_model(str(tiny_dir("llama", seed=1)), quiet=True)
    with pytest.raises(GriffinError, match="was counted on .*, not on .*llama-1.*; pass that model as model="):
        class_bundle(other, plain.info, plain.statistic, ClassSettings("c"))
    refit = refit_class(lm, prompts)
    a = write_statistic(plain.info, plain.statistic, tmp_path / "a.stat")
    b = write_statistic(refit.info, refit.statistic, tmp_path / "b.stat")
    with pytest.raises(GriffinError, match="b.stat has the Gram matrices the first lacks"):
        merge([read_statistic(a), read_statistic(b)])
    quarter = export_class(lm, prompts, ClassSettings("c", density=0.25))
    c = write_statistic(quarter.info, quarter.statistic, tmp_path / "c.stat")
    with pytest.raises(GriffinError, match="count every shard at one density"):
        merge([read_statistic(a), read_statistic(c)])
    with pytest.raises(GriffinError, match="unknown aggregation|does not use the prompts"):
        ClassSettings("c", method="magnitude")


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "is not a readable class statistic"),
    (lambda p: __import__("safetensors.torch").torch.save_file({"x": torch.zeros(1)}, str(p), metadata={
        "format": "griffin-expert"}), r"is not a griffin-export class statistic \(format='griffin-expert'\)"),
    (lambda p: p.unlink(), "does not exist"),
])
def test_damaged_statistic_files_are_refused(lm, tmp_path, damage, message):
    from griffin_export.classes.aggregate import read_statistic, write_statistic

    result = export_class(lm, [Prompt(t, str(i)) for i, t in enumerate(class_texts(2))], ClassSettings("c"))
    path = write_statistic(result.info, result.statistic, tmp_path / "s.stat")
    damage(path)
    with pytest.raises(GriffinError, match=message):
        read_statistic(path)


def test_statistic_with_bad_tensors_is_refused(lm, tmp_path):
    from safetensors.torch import save_file

    from griffin_export.classes.aggregate import read_statistic, write_statistic
    from griffin_export.bundle.format import str_metadata

    result = export_class(lm, [Prompt(t, str(i)) for i, t in enumerate(class_texts(2))], ClassSettings("c"))
    path = write_statistic(result.info, result.statistic, tmp_path / "s.stat")
    terms = result.statistic.terms()
    for name, bad, message in (("squared", terms["squared"].float(), "should be float64"),
                               ("in_topk", terms["in_topk"][:1], "should be float64"),
                               ("normalized", terms["normalized"] * float("nan"), "holds non-finite")):
        save_file({**terms, name: bad}, str(path), metadata=str_metadata(result.info))
        with pytest.raises(GriffinError, match=f"tensor {name} {message}"):
            read_statistic(path)


def test_class_command_saves_and_reuses_a_statistic(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "x.jsonl", class_texts(4))
    model = tiny_dir("llama")
    code, out, err = run(["class", data, "--name", "c", "-o", tmp_path / "a.safetensors", "--model", model,
                          "--method", "topk_refit", "--save-statistic", tmp_path / "c.stat", "-q"], capsys)
    assert code == 0, err
    assert "(topk_refit, density 0.5)" in out
    code, out, err = run(["class", "--statistic", tmp_path / "c.stat", "--name", "c", "-o", tmp_path / "b.safetensors",
                          "--method", "topk_refit", "--density", "0.5", "-q"], capsys)  # the model from the file
    assert code == 0, err
    assert "class 'c' from 4 prompts" in out
    a, b = read_bundle(tmp_path / "a.safetensors"), read_bundle(tmp_path / "b.safetensors")
    assert same(a.indices, b.indices) and all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    for argv, message in (
        ([], "give the prompts (INPUT...) or saved statistics (--statistic), one of the two"),
        ([data, "--statistic", tmp_path / "c.stat"], "one of the two"),
        (["--statistic", tmp_path / "c.stat", "--save-statistic", tmp_path / "d.stat"], "nothing new to save"),
        (["--statistic", tmp_path / "nope.stat"], "nope.stat does not exist"),
        (["--statistic", data], "is not a readable class statistic"),
    ):
        code, _, err = run(["class", *argv, "--name", "c", "-o", tmp_path / "e.safetensors", "-q"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "d.stat").exists()


# -- input ---------------------------------------------------------------------------------


def test_inputs_jsonl_field_folder_and_text_files(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"article": "one", "summary_gt": "s"}\n\n{"article": "two"}\n')
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("bee")
    (folder / "a.txt").write_text("ay")
    (folder / "skip.md").write_text("not a prompt")
    (tmp_path / "single.txt").write_text("single")
    prompts = list(iter_prompts([tmp_path / "x.jsonl", folder, tmp_path / "single.txt"], field="article"))
    assert [p.text for p in prompts] == ["one", "two", "ay", "bee", "single"]
    assert prompts[1].where == f"{tmp_path / 'x.jsonl'}:3"
    assert survey_prompts([tmp_path / "x.jsonl", folder], field="article", limit=3).prompts == 3
    assert [p.text for p in iter_prompts([folder, folder], limit=3)] == ["ay", "bee", "ay"]


def test_the_shipped_xsum_file_reads_with_field_article():
    from tests.helpers import DATA

    prompts = list(iter_prompts([DATA], field="article", limit=5))
    assert len(prompts) == 5 and all(p.text.startswith("###\nArticle:") for p in prompts)


@pytest.mark.parametrize("content, message", [
    ("", "has no prompts (the file is empty)"),
    ("\n\n", "has no prompts (the file is empty)"),
    ('{"prompt": "ok"}\nnot json\n', "p.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n', "p.jsonl:1: no field 'prompt' (fields: text); choose one with `field`"),
    ('{"prompt": "ok"}\n[1, 2]\n', "p.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": 3}\n', "p.jsonl:1: field 'prompt' holds int 3, not a string"),
    ('{"prompt": "ok"}\n{"prompt": "  "}\n', "p.jsonl:2: field 'prompt' is empty"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(GriffinError, match="^" + str(tmp_path).replace("\\", "\\\\")) as e:
        survey_prompts([path])
    assert message in str(e.value)


def test_non_utf8_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(GriffinError, match=r"p.jsonl:2: not valid UTF-8"):
        survey_prompts([path])


def test_folder_without_text_files_and_missing_input(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(GriffinError, match=f"folder {tmp_path} has no .txt files"):
        survey_prompts([tmp_path])
    with pytest.raises(GriffinError, match="input .*nope.jsonl does not exist"):
        survey_prompts([tmp_path / "nope.jsonl"])


# -- the command line ----------------------------------------------------------------------


def written(path, text):
    path.write_text(text)
    return path


def test_class_command_then_generate_with_a_new_prompt(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "x.jsonl", class_texts(4), field="article")
    code, out, err = run(["class", data, "--field", "article", "--name", "news", "-o", tmp_path / "news.safetensors",
                          "--model", tiny_dir("llama"), "--limit", "3", "--aggregation", "pooled"], capsys)
    assert code == 0, err
    assert "class 'news' from 3 prompts" in out and "0 skipped), pooled, k=32/64" in out
    assert "class news: 100%" in err and "3/3 [" in err and "prompt/s]" in err  # progress: rate and ETA
    info = read_bundle(tmp_path / "news.safetensors").info
    assert info.extra["prompts"] == "3" and info.extra["aggregation"] == "pooled"

    code, out, err = run(["inspect", tmp_path / "news.safetensors"], capsys)
    assert code == 0 and "(class bundle)" in out and "class        news" in out

    (tmp_path / "new.txt").write_text(tiny_prompt(15))
    for extra in ([], ["--pruned-prefill"]):
        code, out, err = run(["generate", tmp_path / "news.safetensors", "--prompt-file", tmp_path / "new.txt",
                              "--max-new-tokens", "4", "-q", *extra], capsys)
        assert code == 0, err
    code, out, err = run(["generate", tmp_path / "news.safetensors"], capsys)
    assert code == 2 and "is a class bundle (news): it has no prompt of its own; give one with --prompt-file" in err


def test_over_context_prompts_are_skipped_and_counted(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "x.jsonl", [class_texts(1)[0], tiny_prompt(300), class_texts(2)[1], tiny_prompt(400)])
    code, out, err = run(["class", data, "--name", "c", "-o", tmp_path / "c.safetensors", "--model",
                          tiny_dir("llama"), "-q"], capsys)
    assert code == 0, err
    assert f"warning: skipped 2 of 4 prompts longer than the model's context (first: {data}:2)" in err
    info = read_bundle(tmp_path / "c.safetensors").info
    assert info.extra["prompts"] == "2" and info.extra["skipped"] == "2"

    only_long = write_jsonl(tmp_path / "long.jsonl", [tiny_prompt(300)])
    code, out, err = run(["class", only_long, "--name", "c", "-o", tmp_path / "l.safetensors", "--model",
                          tiny_dir("llama"), "-q"], capsys)
    assert code == 2 and "its one prompt is longer than the model's context; nothing to export" in err
    assert not (tmp_path / "l.safetensors").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: write_jsonl(d / "e.jsonl", []), "e.jsonl has no prompts"),
    (lambda d: written(d / "b.jsonl", '{"prompt": "w1"}\n{oops\n'), "b.jsonl:2: not valid JSON"),
    (lambda d: write_jsonl(d / "m.jsonl", ["w1"], field="text"), "m.jsonl:1: no field 'prompt'"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no .txt files"),
])
def test_class_command_bad_input(tmp_path, tiny_dir, capsys, make, message):
    source = make(tmp_path)
    code, out, err = run(["class", source, "--name", "c", "-o", tmp_path / "c.safetensors", "--model",
                          tiny_dir("llama")], capsys)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("griffin-export: error: ")
    assert "loading model" not in err  # refused before any model work
    assert not (tmp_path / "c.safetensors").exists()


def test_class_command_bad_options(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "x.jsonl", class_texts(2))
    code, _, err = run(["class", data, "--name", " ", "-o", tmp_path / "c.safetensors"], capsys)
    assert code == 2 and "a class needs a name" in err
    code, _, err = run(["class", data, "--name", "c", "-o", tmp_path / "c.safetensors", "--method", "random"], capsys)
    assert code == 2 and "Invalid value for '--method'" in err
    (tmp_path / "c.safetensors").write_bytes(b"keep")
    code, _, err = run(["class", data, "--name", "c", "-o", tmp_path / "c.safetensors"], capsys)
    assert code == 2 and "exists; pass --force" in err
    assert (tmp_path / "c.safetensors").read_bytes() == b"keep"


def test_interrupted_class_run_leaves_no_partial_output(tmp_path, tiny_dir, capsys, monkeypatch):
    from griffin_export.classes import counting as classes

    data = write_jsonl(tmp_path / "x.jsonl", class_texts(4))
    calls = []
    real = classes.prompt_statistic

    def interrupt_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(classes, "prompt_statistic", interrupt_third)
    code, _, err = run(["class", data, "--name", "c", "-o", tmp_path / "c.safetensors", "--model",
                        tiny_dir("llama"), "-q"], capsys)
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]


# -- classification mode --------------------------------------------------------------------


def masked_last_position(model, ids, indices) -> torch.Tensor:
    """Reference: full prefill of ids[:-1], then the last token with unselected neurons zeroed."""
    cache, _ = prefill(model, ids[:, :-1])
    with masked(model, indices):
        return forward(model, ids[:, -1:], cache)[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_classification_mode(arch):
    lm = tiny_model(arch)
    ids = prompt_ids(24)
    with torch.inference_mode():
        full = lm.model(input_ids=ids).logits[0].float()  # [T, vocab]
    got = classification_logits(lm, ids, density=0.5)
    # positions before the last: the full model
    torch.testing.assert_close(got[:-1], full[:-1], rtol=1e-4, atol=1e-4)
    # the last position: experts from tokens 0..T-2 (what a per-prompt export of them selects)
    indices = export_ids(lm, ids[:, :-1], ExportSettings(density=0.5, keep_kv=False, warmup=0)).indices
    torch.testing.assert_close(got[-1], masked_last_position(lm.model, ids, indices), rtol=1e-4, atol=1e-4)
    assert (got[-1] - full[-1]).abs().max() > 1e-3  # it really is pruned
    # the model is whole again afterwards
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(input_ids=ids).logits[0].float(), full)


def test_classification_mode_at_density_one_is_the_full_model():
    lm = tiny_model("llama")
    ids = prompt_ids(16)
    with torch.inference_mode():
        full = lm.model(input_ids=ids).logits[0].float()
    torch.testing.assert_close(classification_logits(lm, ids, density=1.0), full, rtol=1e-4, atol=1e-4)


def test_choice_loglik_scores_the_choice_tokens():
    lm = tiny_model("qwen2")
    context, choice = prompt_ids(12, seed=3), prompt_ids(3, seed=4)
    ids = torch.cat([context, choice], dim=1)[:, :-1]
    logp = torch.log_softmax(classification_logits(lm, ids), dim=-1)[-3:]
    want = float(sum(logp[i, choice[0, i]] for i in range(3)))
    assert choice_loglik(lm, context, choice) == pytest.approx(want, rel=1e-5)
    with pytest.raises(GriffinError, match="at least 2 tokens"):
        classification_logits(lm, prompt_ids(1))


def test_experts_context_restores_the_full_model():
    lm = tiny_model("phi3")
    ids = prompt_ids(10)
    with torch.inference_mode():
        before = lm.model(input_ids=ids).logits
    indices = [torch.arange(0, 64, 2)] * lm.num_layers
    with experts(lm, indices):
        assert ff_blocks(lm.model, lm.spec)[0].output.weight.shape == (32, 32)
        with torch.inference_mode():
            assert (lm.model(input_ids=ids).logits - before).abs().max() > 1e-3
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, before)


# -- the aggregation benchmark script ------------------------------------------------------


def test_aggregation_bench_script_on_a_tiny_model(tmp_path, tiny_dir, capsys):
    from bench import class_aggregation as script  # the repository root is on pytest's path

    data = tmp_path / "x.jsonl"
    rows = [{"article": t, "summary_gt": class_texts(7)[6 - i][:20]} for i, t in enumerate(class_texts(6))]
    rows.insert(2, {"article": tiny_prompt(300), "summary_gt": "w1"})  # over the context: skipped
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = script.main(["--data", str(data), "--train", "0:4", "--eval", "4:7", "--density", "1.0,0.5",
                          "--model", str(tiny_dir("llama")), "--pruned-prefill"])
    assert report["train_prompts"] == 3 and report["train_skipped"] == 1 and report["eval_prompts"] == 3
    res = report["results"]
    assert set(res) == {"full", *(f"{v}@{d}" for d in (1.0, 0.5) for v in
                                  ("per-prompt", "class:mean", "class:topk_freq", "class:pooled", "magnitude",
                                   f"class:{DEFAULT_AGGREGATION}+pruned-prefill"))}
    for name, values in res.items():  # density 1.0 keeps every neuron: every variant is the full model
        if name.endswith("@1.0"):
            assert values == pytest.approx(res["full"], abs=1e-4), name
    assert res["per-prompt@0.5"] != pytest.approx(res["full"], abs=1e-4)
    out = capsys.readouterr().out
    assert "| class:topk_freq | 0.5 |" in out and "density 0.5, paired: " in out


def test_stdlib_functions_make_a_code_class(tmp_path):
    import ast
    from bench import stdlib_functions as script  # the repository root is on pytest's path

    out = tmp_path / "code.jsonl"
    assert script.main(["-o", str(out), "--limit", "6"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and len({r["source"] for r in rows}) == 6
    for r in rows:  # prompt + "\n" + body is the whole function again, docstring at the prompt's end
        tree = ast.parse(r["prompt"] + "\n" + r["body"])
        assert len(tree.body) == 1 and ast.get_docstring(tree.body[0]) is not None
        first = next(line for line in r["body"].split("\n") if line.strip())
        indent = first[: len(first) - len(first.lstrip())]
        head = ast.parse(r["prompt"] + "\n" + indent + "pass").body[0]  # the prompt ends after the docstring
        assert ast.get_docstring(head) == ast.get_docstring(tree.body[0])
    assert [p.text for p in iter_prompts([out])] == [r["prompt"] for r in rows]  # `class` reads it as is


def test_eval_reports_a_class_settings_density_from_its_experts(lm, tmp_path):
    """eval's labeled:/routed: rows say the classes' density: k of d_ff (0.75 here, not hidden/d_ff)."""
    from griffin_export import write_bundle
    from griffin_export.evaluation.runner import _class_setting
    from griffin_export.evaluation.settings import EvalSettings

    result = export_class(lm, [Prompt(t, str(i)) for i, t in enumerate(class_texts(3))],
                          ClassSettings("news", density=0.75), source="a.jsonl")
    write_bundle(result.bundle, tmp_path / "news.safetensors")
    setting, _ = _class_setting(lm, f"labeled:{tmp_path}", EvalSettings(data="x.jsonl"), {})
    assert setting.density == 0.75
