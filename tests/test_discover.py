"""Classes discovered in an unlabeled log, the router and the guard, on a tiny model with planted
classes: prompts of each kind are drawn from a few tokens of their own, so which prompts belong
together is known, and so is the class a new prompt of a kind belongs to."""

from __future__ import annotations

import json
import random

import pytest
import torch

from griffin_export.classes.discover import discover, write_discovery
from griffin_export.classes.router import first_layers, read_router, route
from griffin_export.method.export import prompt_statistic
from griffin_export.model.load import ModelSource, load_model
from griffin_export.runtime.routed import load_routed
from griffin_export.settings import ClassSettings, DecodeOptions, DiscoverSettings
from tests.helpers import ARCHS, greedy, one_line, prompt_ids, refused, run, tiny_model

KINDS = {"a": [5, 6, 7, 8], "b": [70, 71, 72, 73]}  # each kind's few tokens


def kind_prompt(kind: str, rng: random.Random) -> str:
    return " ".join(f"w{rng.choice(KINDS[kind])}" for _ in range(rng.randint(20, 40)))


def planted_log(path, n: int = 8, seed: int = 0) -> list[str]:
    """A shuffled JSONL log of n prompts of each kind; returns each line's kind."""
    rng = random.Random(seed)
    rows = [(kind, kind_prompt(kind, rng)) for kind in KINDS for _ in range(n)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for _, p in rows))
    return [k for k, _ in rows]


@pytest.fixture(scope="module")
def found(tiny_dir, tmp_path_factory):
    """The planted log discovered once, written to a folder. K by the silhouette: on a 64-neuron model
    one neuron is 3 % of a layer's experts, too coarse for the coverage criterion's default step (its
    own test below plants classes in the statistics themselves)."""
    root = tmp_path_factory.mktemp("discover")
    kinds = planted_log(root / "log.jsonl")
    result = discover([root / "log.jsonl"], ClassSettings("c"), DiscoverSettings(k_criterion="silhouette"),
                      ModelSource(str(tiny_dir())))
    out = write_discovery(result, root / "classes")
    return root, kinds, result, out


def test_planted_classes_are_found(found):
    root, kinds, result, out = found
    assert result.report["k"] == 2  # the silhouette's choice among 2..8
    labels = [row["class"] for row in result.report["labels"]]
    assert len({(k, c) for k, c in zip(kinds, labels)}) == 2  # the partition is the kinds'
    assert sorted(p.name for p in out.iterdir()) == ["c-1.safetensors", "c-2.safetensors", "report.json", "report.md",
                                                   "router.safetensors"]
    assert [c["prompts"] for c in result.report["classes"]] == [8, 8]


def test_a_class_found_is_the_class_its_prompts_make(found, tiny_dir):
    """A discovered class's bundle is the one `class` makes from the same prompts (its statistic is
    the sum of theirs, kept from the one prefill each)."""
    from griffin_export.classes.build import export_class
    from griffin_export.files.inputs import Prompt

    root, kinds, result, _ = found
    lm = load_model(str(tiny_dir()), quiet=True)
    texts = [json.loads(line)["prompt"] for line in (root / "log.jsonl").read_text().splitlines()]
    labels = [row["class"] for row in result.report["labels"]]
    members = [Prompt(t, str(i)) for i, (t, c) in enumerate(zip(texts, labels)) if c == "c-1"]
    want = export_class(lm, members, ClassSettings("c-1")).bundle
    assert all(torch.equal(a, b) for a, b in zip(result.bundles[0].indices, want.indices))


def test_the_coverage_criterion_finds_the_planted_number_of_classes():
    """Statistics planted in three groups, each group's prompts sharing most of their top neurons: one
    class per group keeps nearly all of each prompt's own experts, and a fourth class adds nothing."""
    from griffin_export.classes.discover import cluster

    g = torch.Generator().manual_seed(0)
    groups = [torch.rand(2, 400, generator=g) for _ in range(3)]
    stats = torch.stack([groups[i % 3] * (1 + 0.05 * torch.rand(2, 400, generator=g)) for i in range(30)])
    found = cluster(stats, DiscoverSettings(k_max=6), k_neurons=200)
    assert found.k == 3 and len(set(zip(found.labels.tolist(), [i % 3 for i in range(30)]))) == 3
    assert found.scores[3] - found.scores[2] > 0.003 > found.scores[4] - found.scores[3]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_router_reads_the_first_layers_as_a_full_prefill_does(arch):
    lm, ids = tiny_model(arch), prompt_ids()
    full = prompt_statistic(lm, ids)[0].scores()
    assert torch.equal(first_layers(lm, ids, 1), full[:1])


def test_a_new_prompt_of_a_planted_class_is_routed_to_it(found, tiny_dir):
    root, kinds, result, out = found
    lm = load_model(str(tiny_dir()), quiet=True)
    router = read_router(out / "router.safetensors")
    labels = {k: c["class"] for k, c in zip(kinds, result.report["labels"])}  # each kind's class
    rng = random.Random(7)
    for kind in KINDS:
        for _ in range(5):
            ids = lm.tokenizer(kind_prompt(kind, rng), return_tensors="pt")["input_ids"]
            assert route(lm, router, ids).name == labels[kind]


def test_the_guard_sends_a_prompt_of_no_class_to_the_full_model(found, tiny_dir):
    root, kinds, result, out = found
    rt = load_routed(out / "router.safetensors", str(tiny_dir()))
    stranger = " ".join(f"w{40 + i % 7}" for i in range(24))  # tokens of neither kind
    gen = rt.generate(DecodeOptions(max_new_tokens=6), prompt=stranger)
    assert gen.extra["guarded"] and gen.extra["class"] == "full"
    full = load_model(str(tiny_dir()), quiet=True)
    assert gen.token_ids == greedy(full.model, rt.tokenize(stranger), 6, eos=2)


def test_prompts_batched_by_class_answer_as_each_alone(found, tiny_dir):
    root, kinds, result, out = found
    rt = load_routed(out / "router.safetensors", str(tiny_dir()))
    rng = random.Random(3)
    prompts = [kind_prompt(k, rng) for k in ("a", "b", "a", "b", "b")] + [" ".join(["w44"] * 20)]
    opts = DecodeOptions(max_new_tokens=5)
    together = rt.generate_batch(prompts, opts, batch_size=2)
    alone = [rt.generate(opts, prompt=p) for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.extra for g in together] == [g.extra for g in alone]


def test_generate_with_a_router_writes_each_answers_class(found, tiny_dir, tmp_path, capsys):
    root, kinds, result, out = found
    code, _, err = run(["generate", "--router", out / "router.safetensors", "--prompts", root / "log.jsonl",
                        "-o", tmp_path / "a.jsonl", "--max-new-tokens", "3", "-q"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    labels = [row["class"] for row in result.report["labels"]]
    assert sorted(r["index"] for r in rows) == list(range(16))
    assert all(r["routed"] == labels[r["index"]] and "guarded" in r for r in rows)
    code, out_text, _ = run(["inspect", out / "router.safetensors"], capsys)
    assert code == 0 and "c-1" in out_text and "bundle ok" in out_text


def test_every_class_is_exported_in_one_command_with_the_router_beside(found, tiny_dir, tmp_path, capsys):
    """checkpoint ROUTER -o DIR: each class's HF directory under its name, made from its own bundle, and
    the router and bundles copied beside them, so the folder routes as it is; onnx ROUTER likewise."""
    from griffin_export.targets.onnx.graph import read_graph

    root, kinds, result, out = found
    code, text, err = run(["checkpoint", out / "router.safetensors", "-o", tmp_path / "deploy", "--model", tiny_dir(),
                           "-q"], capsys)
    assert code == 0, err
    assert "2 classes as hf (c-1, c-2)" in text
    deploy = tmp_path / "deploy"
    assert sorted(p.name for p in deploy.iterdir()) == ["c-1", "c-1.safetensors", "c-2", "c-2.safetensors",
                                                      "router.safetensors"]
    for name in ("c-1", "c-2"):
        config = json.loads((deploy / name / "config.json").read_text())
        assert config["griffin"]["bundle_file"] == f"{name}.safetensors"
        assert (deploy / f"{name}.safetensors").read_bytes() == (out / f"{name}.safetensors").read_bytes()
    routed = load_routed(deploy / "router.safetensors", str(tiny_dir()))  # the copied router finds its bundles
    assert routed.router.info.classes == ["c-1", "c-2"]
    code, text, err = run(["onnx", out / "router.safetensors", "-o", tmp_path / "deploy_onnx", "--model", tiny_dir(),
                           "-q"], capsys)
    assert code == 0, err
    for name in ("c-1", "c-2"):
        assert read_graph(tmp_path / "deploy_onnx" / name).info.extra["class"] == name


def test_a_class_set_is_refused_before_anything_is_written(found, tiny_dir, tmp_path, capsys):
    import shutil

    from griffin_export.classes.router import write_router

    root, kinds, result, out = found
    moved = tmp_path / "classes"
    shutil.copytree(out, moved)
    shutil.copy(moved / "c-1.safetensors", moved / "c-2.safetensors")
    one_line(["checkpoint", moved / "router.safetensors", "-o", tmp_path / "d", "--model", tiny_dir()], capsys,
             "was not made with", "c-2.safetensors")
    router = read_router(out / "router.safetensors")
    router.info.classes = ["../up", "c-2"]
    write_router(router, tmp_path / "bad.safetensors")
    for b in ("c-1.safetensors", "c-2.safetensors"):
        shutil.copy(out / b, tmp_path / b)
    one_line(["checkpoint", tmp_path / "bad.safetensors", "-o", tmp_path / "d", "--model", tiny_dir()], capsys,
             "'../up' cannot name a file")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("keep")
    one_line(["checkpoint", out / "router.safetensors", "-o", tmp_path / "d", "--model", tiny_dir()], capsys,
             "exists; pass --force")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x"]


# -- bad input ---------------------------------------------------------------------------------


def test_the_command_chooses_k_by_the_criterion_it_is_given(tmp_path, tiny_dir, capsys):
    """--k-criterion reaches the library: the silhouette finds the two planted kinds, and the report says
    which criterion chose K."""
    planted_log(tmp_path / "log.jsonl")
    code, _, err = run(["discover", tmp_path / "log.jsonl", "--k-criterion", "silhouette", "-o", tmp_path / "c",
                        "--model", tiny_dir(), "-q"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["k_criterion"] == "silhouette" and report["k"] == 2


def test_a_log_counted_in_shards_discovers_as_one_run(tmp_path, tiny_dir, capsys):
    """discover --shard I/N on each slice, then --statistics every shard's file: the same statistics, so
    the same classes and router as one run over the whole log (the shards given in any order)."""
    from safetensors.torch import load_file

    planted_log(tmp_path / "log.jsonl", n=5)  # 10 prompts: shards of 4 and 3 and 3
    common = ["--model", tiny_dir(), "-q", "--k-criterion", "silhouette"]
    assert run(["discover", tmp_path / "log.jsonl", "--save-statistics", tmp_path / "whole.safetensors",
                "-o", tmp_path / "one", *common], capsys)[0] == 0
    for i in (1, 2, 3):
        code, out, err = run(["discover", tmp_path / "log.jsonl", "--shard", f"{i}/3",
                              "--save-statistics", tmp_path / f"part{i}.safetensors", *common], capsys)
        assert code == 0 and f"shard {i}/3" in out, err
    parts = [x for i in (3, 1, 2) for x in ("--statistics", tmp_path / f"part{i}.safetensors")]
    assert run(["discover", tmp_path / "log.jsonl", *parts, "-o", tmp_path / "sharded", *common], capsys)[0] == 0
    whole = load_file(tmp_path / "whole.safetensors")
    joined = torch.cat([load_file(tmp_path / f"part{i}.safetensors")["scores"] for i in (1, 2, 3)])
    assert torch.equal(whole["scores"], joined)
    a, b = load_file(tmp_path / "one" / "router.safetensors"), load_file(tmp_path / "sharded" / "router.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_incomplete_or_mixed_set_of_shards_is_refused(tmp_path, tiny_dir, capsys):
    planted_log(tmp_path / "log.jsonl", n=2)
    model = ["--model", tiny_dir(), "-q"]
    for i in (1, 2):
        run(["discover", tmp_path / "log.jsonl", "--shard", f"{i}/2", "--save-statistics", tmp_path / f"p{i}", *model],
            capsys)
    run(["discover", tmp_path / "log.jsonl", "--shard", "1/3", "--save-statistics", tmp_path / "q1", *model], capsys)
    log, out = tmp_path / "log.jsonl", tmp_path / "c"
    stats = lambda *names: [x for n in names for x in ("--statistics", tmp_path / n)]  # noqa: E731
    one_line(["discover", log, *stats("p1"), "-o", out, *model], capsys, "shard 2/2 is missing")
    one_line(["discover", log, *stats("p1", "p1", "p2"), "-o", out, *model], capsys, "shard 1/2 is given twice")
    one_line(["discover", log, *stats("p1", "p2", "q1"), "-o", out, *model], capsys, "2 ways and 3 ways")
    one_line(["discover", log, "--shard", "1/2", "-o", out, *model], capsys, "--shard", "--save-statistics")
    one_line(["discover", log, "--shard", "5/5", "--save-statistics", tmp_path / "r", *model], capsys,
             "the log has 4 prompts")
    one_line(["discover", log, "--shard", "0/2", "--save-statistics", tmp_path / "r", *model], capsys, "1 <= I <= N")
    assert not out.exists() and not (tmp_path / "r").exists()


def test_k_past_the_prompts_or_below_one_is_refused(tmp_path, tiny_dir, capsys):
    planted_log(tmp_path / "log.jsonl", n=2)
    one_line(["discover", tmp_path / "log.jsonl", "-k", "5", "-o", tmp_path / "c", "--model", tiny_dir()], capsys,
             "`k` is 5 classes; the log has 4 prompts".replace("`k`", "--classes"))
    one_line(["discover", tmp_path / "log.jsonl", "-k", "0", "-o", tmp_path / "c", "--model", tiny_dir()], capsys,
             "-k")
    assert not (tmp_path / "c").exists()


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # scikit-learn's own word for it
def test_a_cluster_left_empty_is_refused(tmp_path, tiny_dir, capsys):
    """Four copies of one prompt cannot make two classes: k-means leaves one empty; refused, nothing written."""
    (tmp_path / "log.jsonl").write_text((json.dumps({"prompt": "w5 w6 w7 w8 w5"}) + "\n") * 4)
    one_line(["discover", tmp_path / "log.jsonl", "-k", "2", "-o", tmp_path / "c", "--model", tiny_dir(), "-q"], capsys,
             "left 1 of 2 classes empty", "smaller --classes")
    assert not (tmp_path / "c").exists()


def test_over_context_prompts_are_skipped_and_counted(tmp_path, tiny_dir):
    kinds = planted_log(tmp_path / "log.jsonl", n=3)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"prompt": " ".join(["w5"] * 300)}) + "\n")  # past the tiny model's 256 positions
    result = discover([tmp_path / "log.jsonl"], ClassSettings("c"), DiscoverSettings(k=2), ModelSource(str(tiny_dir())))
    assert result.report["prompts"] == len(kinds) and result.report["skipped"] == [f"{tmp_path / 'log.jsonl'}:7"]


def test_a_router_goes_with_its_model_and_its_bundles_only(found, tiny_dir, tmp_path):
    import shutil

    root, kinds, result, out = found
    refused(lambda: load_routed(out / "router.safetensors", str(tiny_dir("llama", seed=1))), "was made on",
            "not on")
    moved = tmp_path / "classes"
    shutil.copytree(out, moved)
    shutil.copy(moved / "c-1.safetensors", moved / "c-2.safetensors")  # another class's bundle in its place
    refused(lambda: load_routed(moved / "router.safetensors", str(tiny_dir())), "was not made with",
            "c-2.safetensors")
    (moved / "c-1.safetensors").unlink()
    refused(lambda: load_routed(moved / "router.safetensors", str(tiny_dir())), "c-1.safetensors does not exist")


def test_a_damaged_router_is_refused_in_one_line(found, tmp_path):
    """Truncations, garbage, and metadata that disagrees with the centroids: each one line, nothing run."""
    from safetensors.torch import load_file, save_file

    from griffin_export.bundle.format import read_metadata

    root, kinds, result, out = found
    raw = (out / "router.safetensors").read_bytes()
    meta, _ = read_metadata(out / "router.safetensors")
    centroids = load_file(str(out / "router.safetensors"))["centroids"]
    bad = tmp_path / "r.safetensors"
    cases = [raw[: len(raw) // 2], raw[:7], b"not a router at all" * 10]
    for case in cases:
        bad.write_bytes(case)
        refused(lambda: read_router(bad))
    for change, tensor in ((("classes", '["x"]'), centroids), (("thresholds", "[2.0, 0.5]"), centroids),
                           (("layers", "9"), centroids), (("format", "griffin-expert"), centroids),
                           (("bundles", '["../x.safetensors", "y.safetensors"]'), centroids),
                           (("classes", '["c-1", 3]'), centroids), ((None, None), centroids * 2),
                           ((None, None), centroids.to(torch.float16)), ((None, None), centroids.nan_to_num(0) * float("nan"))):
        m = dict(meta)
        if change[0]:
            m[change[0]] = change[1]
        save_file({"centroids": tensor.contiguous()}, str(bad), metadata=m)
        refused(lambda: read_router(bad))


def test_eval_scores_class_experts_chosen_per_prompt(found, tiny_dir, tmp_path, capsys):
    """eval's routed:, guarded:, oracle: and labeled: settings: each row records its class; the oracle's
    gold likelihood is the best of the classes'; a guarded prompt's row is the full model's; a setting
    that lands on experts another already ran with reuses its results (the same as computed alone)."""
    import shutil

    root, kinds, result, out = found
    texts = [json.loads(line)["prompt"] for line in (root / "log.jsonl").read_text().splitlines()]
    labels = {k: c["class"] for k, c in zip(kinds, result.report["labels"])}
    rows = [{"prompt": t, "reference": t.split()[0], "kind": k, "max_tokens": 3} for t, k in zip(texts, kinds)][:6]
    rows.append({"prompt": " ".join(["w44"] * 24), "reference": "w44", "kind": "a", "max_tokens": 3})  # fits no class
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labeled = tmp_path / "labeled"
    labeled.mkdir()
    for kind, name in labels.items():
        shutil.copy(out / f"{name}.safetensors", labeled / f"{kind}.safetensors")
    router = out / "router.safetensors"

    def ev(methods, o):
        code, _, err = run(["eval", "--data", data, "--rows", f"0:{len(rows)}", "--prompt-field", "prompt",
                            "--target-field", "reference", "--methods", methods, "--model", tiny_dir(), "-q", "-o", o],
                           capsys)
        assert code == 0, err
        return [json.loads(line)["results"] for line in (o / "eval.jsonl").read_text().splitlines()[1:]]

    both = ev(f"full,routed:{router},guarded:{router},oracle:{router},labeled:{labeled}", tmp_path / "a")
    alone = ev(f"full,guarded:{router}", tmp_path / "b")
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    for i, (r, g) in enumerate(zip(both, alone)):
        assert strip(r[f"guarded:{router}"]) == strip(g[f"guarded:{router}"])
        assert r[f"labeled:{labeled}"]["class"] == rows[i]["kind"]
        lls = r[f"oracle:{router}"]["class_gold_ll"]
        assert r[f"oracle:{router}"]["gold_ll"] == pytest.approx(max(lls.values()), abs=1e-5)
        if r[f"guarded:{router}"]["guarded"]:
            assert r[f"guarded:{router}"]["text"] == r["full"]["text"] and r[f"guarded:{router}"]["identical"]
    assert both[-1][f"guarded:{router}"]["guarded"]  # the stranger


def test_class_experts_are_checked_against_the_model_as_loaded():
    """A tied embedding (the default model's): building the lean step packs the head into a new buffer; the
    embedding becomes the same view, so the model's fingerprint read afterwards is the one it had as loaded
    (it had untied them: serving bundles without a router was refused, 'belongs to base model X, not to X')."""
    import copy

    from transformers import AutoModelForCausalLM, LlamaConfig

    from griffin_export.method.export import export_ids
    from griffin_export.model.load import from_model
    from griffin_export.runtime.routed import ExpertSet
    from griffin_export.settings import ExportSettings
    from tests.helpers import COMMON

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "tie_word_embeddings": True}),
                                             dtype=torch.float32).eval()
    exporter = from_model(copy.deepcopy(model), identity="tiny-tied")
    bundle = export_ids(exporter, prompt_ids(), ExportSettings(density=0.5, warmup=0))
    fresh = from_model(model, identity="tiny-tied")  # its fingerprint not taken yet
    experts = ExpertSet(fresh, {"c": bundle}, lean=True)
    assert experts.lean is not None and fresh.fingerprint == exporter.fingerprint


@pytest.mark.slow
def test_ray_workers_discover_what_one_process_does(tmp_path, tiny_dir, capsys):
    """discover --engine ray: each worker prefills a slice of the log; the statistics, and so the
    classes and the router, are the single process's."""
    from safetensors.torch import load_file

    from tests.test_scale import _need_ray

    _need_ray()
    planted_log(tmp_path / "log.jsonl", n=5)
    common = ["discover", tmp_path / "log.jsonl", "--model", tiny_dir(), "-q", "--k-criterion", "silhouette"]
    for name, extra in (("one", []), ("ray", ["--engine", "ray", "--workers", "2"])):
        code, _, err = run([*common, *extra, "--save-statistics", tmp_path / f"{name}.safetensors",
                            "-o", tmp_path / name], capsys)
        assert code == 0, err
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "ray.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in ("scores", "tokens", "positions"))
    a, b = load_file(tmp_path / "one" / "router.safetensors"), load_file(tmp_path / "ray" / "router.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one_line([*common, "--engine", "ray", "--shard", "1/2", "--save-statistics", tmp_path / "p"], capsys,
             "--engine ray prefills the INPUTs")
