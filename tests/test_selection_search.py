"""bench/research/selection_search.py (issue 8's search over selections) on a tiny model: every variant
is the full model when nothing is dropped, and differs from it when half is."""

import json

import pytest
import torch

from tests.helpers import tiny_prompt

VARIANTS = ("topk,topk_refit,topk_refit_edges,budget:0,greedy,target_only,bias,linear,class_gram,glass,wina,"
            "taylor,taylor_mix,warmup,warm_only:4,warm_mix:4:3,oracle,oracle_gold,sequential,stream,lambda:3")


@pytest.fixture
def script(monkeypatch):
    from bench.research import selection_search as module  # the repository root is on pytest's path

    monkeypatch.setattr(module, "CLASS_ROWS", {"gram": range(0, 2), "stat": range(0, 3)})
    return module


@pytest.fixture
def data(tmp_path):
    rows = [{"article": f"{tiny_prompt(12 + 5 * i)} ### {tiny_prompt(9 + i)}", "summary_gt": tiny_prompt(6 + i)}
            for i in range(3)]
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_variant_is_the_full_model_at_density_1(script, data, tiny_dir):
    args = ["--data", str(data), "--model", str(tiny_dir("llama")), "--rows", "0:2", "--variants", VARIANTS]
    full = script.main([*args, "--density", "1.0"])["mean"]
    assert set(full) == set(VARIANTS.split(","))
    for name, delta in full.items():
        assert delta == pytest.approx(0.0, abs=1e-4), name
    half = script.main([*args, "--density", "0.75"])["mean"]
    for name, delta in half.items():
        assert abs(delta) > 1e-4, name  # something was dropped, and it shows


def test_sensitivity_prunes_one_layer_at_a_time(script, data, tiny_dir, tmp_path):
    out = tmp_path / "sens.json"
    res = script.main(["--data", str(data), "--model", str(tiny_dir("llama")), "--rows", "0:2", "--density", "0.5",
                       "--sensitivity", "--json", str(out)])
    assert len(res["mean"]) == 2 and json.loads(out.read_text())["mean"] == res["mean"]
    assert all(abs(x) > 1e-4 for x in res["mean"])
    both = script.main(["--data", str(data), "--model", str(tiny_dir("llama")), "--rows", "0:2", "--density", "0.75",
                        "--variants", "budget:sens", "--sensitivity-file", str(out)])
    assert set(both["mean"]) == {"budget:sens"}


def test_greedy_picks_the_best_single_neuron_first(script):
    """With k = 1 the greedy pick explains the most FF output energy after the refit, by brute force."""
    torch.manual_seed(0)
    z = torch.randn(40, 6) @ torch.randn(6, 6)
    w = torch.randn(5, 6)
    g = z.T @ z
    ridge = float(g.diagonal().mean())
    explained = [float((g[j] @ w.T).square().sum() / (g[j, j] + ridge)) for j in range(6)]
    [pick] = script.greedy_select(g[None], [w], [1])
    assert pick.tolist() == [max(range(6), key=explained.__getitem__)]
    assert script.greedy_select(g[None], [w], [4])[0].numel() == 4


def test_warmup_generation_at_density_1_is_the_full_model(data, tiny_dir, monkeypatch):
    """bench/research/warmup_generation.py: with every neuron kept, each warm-up length gives the full model's
    own text (agreement 1); at 0.5 the unwarmed pruned text differs from it."""
    from bench.research import warmup_generation as module
    args = ["--data", str(data), "--model", str(tiny_dir("llama")), "--rows", "0:2", "--warmup", "0,3"]
    out = module.main([*args, "--density", "1.0"])
    for row in out["per_row"].values():
        for key, res in row.items():
            assert key == "full" or res["agree"] == pytest.approx(1.0), key
            assert res["rougeL"] == row["full"]["rougeL"]
    half = module.main([*args, "--density", "0.5", "--methods", "topk"])
    assert any(r["topk+warm0"]["agree"] < 1 for r in half["per_row"].values())
