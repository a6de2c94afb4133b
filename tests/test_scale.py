"""Scaling out a class: shards + merge, Ray workers, batched prefill, offloaded models."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers import class_texts, one_line, run, same, tiny_prompt, write_jsonl
from griffin_export import ExportSettings, export_prompt, read_bundle
from griffin_export.classes.aggregate import Shard, merge
from griffin_export.registry import AGGREGATIONS
from griffin_export.files.inputs import Prompt
from griffin_export.classes.build import class_bundle
from griffin_export.classes.counting import class_statistic, shard_of
from griffin_export.settings import ClassSettings
from griffin_export.errors import GriffinError
from griffin_export.method.export import batch_statistic, prompt_statistic
from griffin_export.model.tokens import tokenize
from griffin_export.model.load import Offload, load_model, parse_max_memory

# 7 prompts split 3 ways: shards of 2, 2 and 3 (uneven)
N_PROMPTS = 7


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_model(str(tiny_dir("llama")), quiet=True)


def prompts(n: int = N_PROMPTS) -> list[Prompt]:
    return [Prompt(t, f"p{i}") for i, t in enumerate(class_texts(n))]


def sharded(lm, settings, count: int, order=None):
    parts = [class_statistic(lm, shard_of(prompts(), Shard(i, count), N_PROMPTS), settings)[:2]
             for i in range(1, count + 1)]
    for i, (info, _) in enumerate(parts, start=1):
        info.shard, info.inputs_digest = f"{i}/{count}", "same-inputs"
    return merge(parts[j] for j in (order or range(count)))


# -- shards and merge ----------------------------------------------------------------------


def test_shards_are_contiguous_disjoint_and_cover_every_prompt():
    for total in (0, 1, 7, 100):
        for count in (1, 3, 8):
            rows = [Shard(i, count).rows(total) for i in range(1, count + 1)]
            assert [r for rs in rows for r in rs] == list(range(total))
            assert max(map(len, rows)) - min(map(len, rows)) <= 1
    assert [len(Shard(i, 3).rows(7)) for i in (1, 2, 3)] == [2, 2, 3]


@pytest.mark.parametrize("method", ["topk", "topk_refit"])
@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_sharded_and_merged_equals_one_process(lm, aggregation, method):
    settings = ClassSettings("c", aggregation=aggregation, method=method)
    info, stat, _ = class_statistic(lm, prompts(), settings)
    whole = class_bundle(lm, info, stat, settings)
    for count, order in ((1, None), (3, None), (3, (2, 0, 1))):
        m_info, m_stat = sharded(lm, settings, count, order)
        assert (m_info.prompts, m_info.tokens) == (info.prompts, info.tokens)
        # float64 sums of sums: equal to rounding (1e-12 relative), so the selections are identical
        for name, t in stat.terms().items():
            torch.testing.assert_close(m_stat.terms()[name], t, rtol=1e-12, atol=1e-9)
        merged = class_bundle(lm, m_info, m_stat, settings)
        assert same(merged.indices, whole.indices)
    # and the check can fail: the first shard alone selects differently
    first = class_statistic(lm, shard_of(prompts(), Shard(1, 3), N_PROMPTS), settings)
    assert not same(class_bundle(lm, first[0], first[1], settings).indices, whole.indices)


def test_every_class_method_and_aggregation_from_merged_shards():
    """One counted statistic (with the Gram) serves every method; on a 4-layer model, so that
    topk_refit_edges can favour its edge layers, the merged shards select what one process does."""
    from tests.helpers import tiny_tokenizer
    from griffin_export.registry import CLASS_METHODS
    from griffin_export.model.load import from_model
    from tests.helpers import tiny_model

    lm4 = from_model(tiny_model("llama", lean=True).model, tiny_tokenizer(), "tiny-llama-4-layers")
    counted = ClassSettings("c", method="topk_refit", density=0.9)  # topk_freq counts its top-k at 0.9
    info, stat, _ = class_statistic(lm4, prompts(), counted)
    m_info, m_stat = sharded(lm4, counted, 3, (1, 2, 0))
    for method in CLASS_METHODS:
        for aggregation in sorted(AGGREGATIONS):
            settings = ClassSettings("c", method=method, aggregation=aggregation, density=0.9)
            a, b = class_bundle(lm4, info, stat, settings), class_bundle(lm4, m_info, m_stat, settings)
            assert same(a.indices, b.indices), (method, aggregation)
            for n in a.weights:
                torch.testing.assert_close(b.weights[n], a.weights[n], rtol=1e-5, atol=1e-6)
    assert len(set(class_bundle(lm4, info, stat, ClassSettings("c", method="topk_refit_edges", density=0.9)).info.k)) > 1


def test_class_shard_and_class_merge_commands(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "x.jsonl", class_texts(N_PROMPTS))
    model = tiny_dir("llama")
    code, out, err = run(["class", data, "--name", "c", "--model", model, "-o", tmp_path / "whole.safetensors",
                          "-q"], capsys)
    assert code == 0, err
    for i in (1, 2, 3):
        code, out, err = run(["class", data, "--name", "c", "--model", model, "--shard", f"{i}/3",
                              "-o", tmp_path / f"part-{i}.st", "-q"], capsys)
        assert code == 0, err
        assert f"shard {i}/3 of class 'c', {(2, 2, 3)[i - 1]} prompts" in out
    parts = [tmp_path / f"part-{i}.st" for i in (3, 1, 2)]
    code, out, err = run(["inspect", parts[0]], capsys)  # what a part file is, from its header
    assert code == 0, err
    assert "(partial statistic, shard 3/3 of the 7 prompts)" in out and "counted      3 prompts" in out
    assert "method topk, aggregation pooled" in out and "no Gram" in out
    code, out, err = run(["class-merge", *parts, "-o", tmp_path / "merged.safetensors", "-q"], capsys)  # model from the parts
    assert code == 0, err
    assert f"class 'c' from {N_PROMPTS} prompts" in out
    a, b = read_bundle(tmp_path / "whole.safetensors"), read_bundle(tmp_path / "merged.safetensors")
    assert same(a.indices, b.indices) and all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    # the shards hold no density: the same parts give the 0.25 bundle a whole run gives
    code, _, err = run(["class-merge", *parts, "--density", "0.25", "-o", tmp_path / "m25.safetensors", "-q"], capsys)
    assert code == 0, err
    code, _, err = run(["class", data, "--name", "c", "--model", model, "--density", "0.25",
                        "-o", tmp_path / "w25.safetensors", "-q"], capsys)
    assert code == 0, err
    assert same(read_bundle(tmp_path / "m25.safetensors").indices, read_bundle(tmp_path / "w25.safetensors").indices)


@pytest.fixture(scope="module")
def shard_files(tiny_dir, tmp_path_factory):
    """Partial statistics of one run (3 shards), plus odd ones out for the bad-input tests."""
    d = tmp_path_factory.mktemp("shards")
    data = write_jsonl(d / "x.jsonl", class_texts(N_PROMPTS))
    other = write_jsonl(d / "y.jsonl", class_texts(N_PROMPTS + 1))
    model = str(tiny_dir("llama"))

    def part(name, *argv, source=data, shard="1/3"):
        from griffin_export_cli.main import main

        with pytest.raises(SystemExit) as e:
            main(["class", str(source), "--name", "c", "--model", model, "--shard", shard, "-o", str(d / name),
                  "-q", *argv])
        assert e.value.code == 0
        return d / name

    files = {f"{i}": part(f"part-{i}.st", shard=f"{i}/3") for i in (1, 2, 3)}
    files["refit"] = part("refit.st", "--method", "topk_refit", shard="2/3")
    files["mean"] = part("mean.st", "--aggregation", "mean", shard="2/3")
    files["other-inputs"] = part("other.st", source=other, shard="2/3")
    files["other-model"] = part("model.st", "--model", str(tiny_dir("llama", seed=1)), shard="2/3")
    files["4ways"] = part("four.st", shard="2/4")
    return files


@pytest.mark.parametrize("names, message", [
    (("1", "refit", "3"), "was counted on another --method"),
    (("1", "mean", "3"), "was counted on another --aggregation"),
    (("1", "other-inputs", "3"), "was counted on other prompts"),
    (("1", "other-model", "3"), "model.st was counted on .*tiny-llama-1.*statistics of different models do not add up"),
    (("1", "2", "2", "3"), r"shard 2/3 is given twice \(.*part-2.st and .*part-2.st\)"),
    (("1", "3"), "shard 2/3 is missing: the merge would leave out their prompts"),
    (("1", "4ways", "3"), "the shards split the prompts 3 ways and 4 ways"),
])
def test_mismatched_or_incomplete_shards_are_refused(shard_files, tmp_path, capsys, names, message):
    import re

    code, out, err = run(["class-merge", *(shard_files[n] for n in names), "-o", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_shard_options_and_files(shard_files, tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "x.jsonl", class_texts(3))
    for shard, message in (("0/3", "shard 0/3: I/N needs 1 <= I <= N"), ("4/3", "shard 4/3: I/N needs 1 <= I <= N"),
                           ("two", "--shard 'two': write it as I/N"), ("1/0", "I/N needs 1 <= I <= N")):
        code, _, err = run(["class", data, "--name", "c", "--shard", shard, "-o", tmp_path / "p.st"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
    code, _, err = run(["class", data, "--name", "c", "--shard", "1/2", "--save-statistic", tmp_path / "s.st",
                        "-o", tmp_path / "p.st"], capsys)
    assert code == 2 and "do not go with it" in err
    truncated = tmp_path / "t.st"
    truncated.write_bytes(shard_files["1"].read_bytes()[:-50])
    whole = tmp_path / "whole.st"
    code, _, err = run(["class", data, "--name", "c", "--model", tiny_dir("llama"), "-o", tmp_path / "c.safetensors",
                        "--save-statistic", whole, "-q"], capsys)
    assert code == 0, err
    bundle = tmp_path / "c.safetensors"
    code, _, err = run(["class", "--statistic", whole, "--statistic", whole, "--name", "c", "-o", tmp_path / "x.st"],
                       capsys)
    assert code == 2 and "were counted on the same prompts: merging them would count every prompt twice" in err
    for files, message in (([truncated, shard_files["2"]], "t.st is not a readable class statistic"),
                           ([whole], "whole.st is a whole statistic, not a shard"),
                           ([bundle], "is not a griffin-export class statistic (format='griffin-expert')"),
                           ([tmp_path / "none.st"], "none.st does not exist")):
        code, _, err = run(["class-merge", *files, "-o", tmp_path / "m.safetensors"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "p.st").exists() and not (tmp_path / "m.safetensors").exists()


# -- batched prefill -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_batched_prefill_gives_each_prompts_own_statistic(tiny_dir, arch):
    lm = load_model(str(tiny_dir(arch)), quiet=True)
    ids = [tokenize(lm, t) for t in class_texts(5)]  # 8 to 20 tokens: much padding in one batch
    many = batch_statistic(lm, ids, chunk_size=7, gram=True)  # chunks cut through the padding too
    gram = torch.zeros_like(many.gram)
    for one_ids, row in zip(ids, many.rows):
        one, _, _ = prompt_statistic(lm, one_ids, gram=True)
        # float32 rounding of the batched matmuls: relative 1e-5
        torch.testing.assert_close(row.sumsq, one.sumsq, rtol=1e-5, atol=1e-6)
        assert row.tokens == one.tokens == one_ids.shape[1]
        gram += one.gram
    torch.testing.assert_close(many.gram, gram, rtol=1e-4, atol=1e-4)


def test_batched_class_equals_unbatched(lm):
    for method in ("topk", "topk_refit"):
        settings = ClassSettings("c", method=method)
        _, one, _ = class_statistic(lm, prompts(), settings)
        b_info, batched, _ = class_statistic(lm, prompts(), settings, batch_size=3)
        assert (batched.prompts, batched.tokens) == (one.prompts, one.tokens)
        for name, t in one.terms().items():
            torch.testing.assert_close(batched.terms()[name], t, rtol=1e-5, atol=1e-4)
        assert same(class_bundle(lm, b_info, batched, settings).indices,
                    class_bundle(lm, *class_statistic(lm, prompts(), settings)[:2], settings).indices)


# -- Ray -------------------------------------------------------------------------------------


def _need_ray():
    if importlib.util.find_spec("ray") is None:
        import os

        if os.environ.get("CI"):
            pytest.fail("ray is not installed; CI installs the [ray] extra")
        pytest.skip('ray is not installed: pip install -e ".[ray]"')


@pytest.mark.slow
def test_ray_workers_give_the_single_process_bundle_and_a_dead_worker_fails_cleanly(tmp_path, tiny_dir, capsys,
                                                                                       monkeypatch):
    _need_ray()
    data = write_jsonl(tmp_path / "x.jsonl", class_texts(N_PROMPTS))
    model = tiny_dir("llama")
    common = ["class", data, "--name", "c", "--model", model, "--method", "topk_refit", "-q"]
    code, _, err = run([*common, "-o", tmp_path / "one.safetensors"], capsys)
    assert code == 0, err
    code, out, err = run([*common, "--engine", "ray", "--workers", "2", "-o", tmp_path / "ray.safetensors"], capsys)
    assert code == 0, err
    a, b = read_bundle(tmp_path / "one.safetensors"), read_bundle(tmp_path / "ray.safetensors")
    assert same(a.indices, b.indices)
    for n in a.weights:  # refit columns solved on Grams summed in another order: float rounding
        torch.testing.assert_close(b.weights[n], a.weights[n], rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("GRIFFIN_EXPORT_RAY_FAULT", "2")
    code, _, err = run([*common, "--engine", "ray", "--workers", "2", "-o", tmp_path / "dead.safetensors"], capsys)
    assert code == 2 and "a Ray worker died while counting prompts" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "dead.safetensors").exists()


def test_ray_options_without_ray_or_without_the_engine(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "x.jsonl", class_texts(2))
    code, _, err = run(["class", data, "--name", "c", "--workers", "3", "-o", tmp_path / "c.st"], capsys)
    assert code == 2 and "--address, --workers and --gpus-per-worker are for --engine ray" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    code, _, err = run(["class", data, "--name", "c", "--engine", "ray", "-o", tmp_path / "c.st"], capsys)
    assert code == 2 and 'ray is not installed: --engine ray needs the [ray] extra (pip install -e ".[ray]")' in err
    assert "loading model" not in err and not (tmp_path / "c.st").exists()


# -- models larger than the device ---------------------------------------------------------------


def test_an_offloaded_model_exports_the_same_bundle(tiny_dir, tmp_path):
    d = tiny_dir("llama")
    whole = load_model(str(d), quiet=True)
    # 20 kB of CPU memory for a ~60 kB model: some layers on the CPU, the rest read from disk per forward
    off = load_model(str(d), quiet=True, offload=Offload(max_memory={"cpu": 20_000}, folder=str(tmp_path / "off")))
    assert "disk" in set(off.model.hf_device_map.values())
    assert any(p.device.type == "meta" for p in off.model.parameters())
    assert off.fingerprint == whole.fingerprint and off.device == torch.device("cpu")
    for method in ("topk", "topk_refit", "magnitude"):
        settings = ExportSettings(method=method, warmup=3)
        a, b = export_prompt(whole, tiny_prompt(30), settings), export_prompt(off, tiny_prompt(30), settings)
        assert same(a.indices, b.indices)
        assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
        assert torch.equal(a.warmup_ids, b.warmup_ids)
        for (ka, va), (kb, vb) in zip(a.kv, b.kv):
            torch.testing.assert_close(kb, ka, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(vb, va, rtol=1e-6, atol=1e-6)
    settings = ClassSettings("c")
    assert same(class_bundle(off, *class_statistic(off, prompts(3), settings)[:2], settings).indices,
                class_bundle(whole, *class_statistic(whole, prompts(3), settings)[:2], settings).indices)


def test_offload_options(tmp_path, tiny_dir, capsys):
    assert parse_max_memory("cpu=2GiB, 0=20GB") == {"cpu": 2 << 30, 0: 20 * 10**9}
    assert parse_max_memory("cpu=123") == {"cpu": 123}
    for text, message in (("cpu", "each entry is DEVICE=SIZE"), ("gpu=1GB", "each entry is DEVICE=SIZE"),
                          ("cpu=lots", "'lots' is not a size"), ("cpu=0", "'0' is not a size"), (",", "is empty")):
        with pytest.raises(GriffinError, match=message):
            parse_max_memory(text)
    prompt = tmp_path / "p.txt"
    prompt.write_text(tiny_prompt(20))
    code, _, err = run(["export", prompt, "-o", tmp_path / "e.safetensors", "--max-memory", "cpu=1GB"], capsys)
    assert code == 2 and "--max-memory and --offload-folder need --device-map auto" in err
    code, out, err = run(["export", prompt, "-o", tmp_path / "e.safetensors", "--model", tiny_dir("llama"),
                          "--device-map", "auto", "--max-memory", "cpu=20000", "--offload-folder", tmp_path / "off",
                          "-q"], capsys)
    assert code == 0, err
    code, out, err = run(["export", prompt, "-o", tmp_path / "w.safetensors", "--model", tiny_dir("llama"), "-q"],
                         capsys)
    assert code == 0, err
    a, b = read_bundle(tmp_path / "e.safetensors"), read_bundle(tmp_path / "w.safetensors")
    assert same(a.indices, b.indices) and a.info.base_fingerprint == b.info.base_fingerprint


# -- resuming an interrupted count ----------------------------------------------------------------


def test_an_interrupted_count_resumes_where_it_stopped(tmp_path, tiny_dir, monkeypatch):
    """A count checkpointed as it goes and stopped at its fourth prompt continues from the checkpoint:
    the three prompts it holds are not prefilled again, and the statistic is the one an uninterrupted
    count gives (the same sums in the same order). The checkpoint goes once the count completes."""
    from griffin_export.classes import counting
    from griffin_export.classes.build import count_class
    from griffin_export.model.load import ModelSource
    from griffin_export.settings import CountSettings

    data = write_jsonl(tmp_path / "x.jsonl", class_texts(6))
    settings, source = ClassSettings("c", method="topk_refit"), ModelSource(str(tiny_dir("llama")))
    whole = count_class([data], settings, source)
    checkpoint = counting.Checkpoint(tmp_path / ".c.partial", every_s=0)  # saved after every prompt
    calls, real = [], counting.prompt_statistic

    def stop_at_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(counting, "prompt_statistic", stop_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        count_class([data], settings, source, CountSettings(resume=True), checkpoint=checkpoint)
    assert counting.read_statistic(checkpoint.path)[0].prompts == 3
    calls.clear()
    monkeypatch.setattr(counting, "prompt_statistic", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = count_class([data], settings, source, CountSettings(resume=True), checkpoint=checkpoint)
    assert len(calls) == 3 and not checkpoint.path.exists()
    assert (resumed.info.prompts, resumed.info.tokens) == (whole.info.prompts, whole.info.tokens)
    for name, t in whole.stat.terms().items():
        assert torch.equal(resumed.stat.terms()[name], t), name


def test_a_checkpoint_of_another_count_is_refused(tmp_path, tiny_dir, capsys):
    from griffin_export.classes import counting
    from griffin_export.classes.build import count_class
    from griffin_export.model.load import ModelSource
    from griffin_export.settings import CountSettings

    a, b = write_jsonl(tmp_path / "a.jsonl", class_texts(3)), write_jsonl(tmp_path / "b.jsonl", class_texts(4))
    source, checkpoint = ModelSource(str(tiny_dir("llama"))), counting.Checkpoint(tmp_path / ".c.partial", every_s=0)
    counted = count_class([a], ClassSettings("c"), source)
    counting.write_statistic(counted.info, counted.stat, checkpoint.path)
    with pytest.raises(GriffinError, match="holds a count of other prompts"):
        count_class([b], ClassSettings("c"), source, CountSettings(resume=True), checkpoint=checkpoint)
    # on the command line: a first `class --resume` leaves nothing once it completes
    out = tmp_path / "c.safetensors"
    code, _, err = run(["class", a, "--name", "c", "-o", out, "--model", tiny_dir("llama"), "--resume", "-q"], capsys)
    assert code == 0 and out.is_file() and not (tmp_path / ".c.safetensors.partial").exists(), err
    one_line(["class", "--statistic", tmp_path / "x.st", "--name", "c", "-o", tmp_path / "d.st", "--resume"], capsys,
             "--resume count INPUTs")
