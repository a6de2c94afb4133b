"""The registries (griffin_export/registry.py) point at code that is there and speaks their interface,
and a new entry is one line: a method, a runtime and a target added at test time work end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from griffin_export import registry
from griffin_export.registry import AGGREGATIONS, METHODS, RUNTIMES, TARGETS, Method
from tests.helpers import prompt_ids, run, tiny_model


def test_every_entry_names_code_that_is_there():
    refs = [m.select for m in METHODS.values()] + [m.budget for m in METHODS.values()]
    refs += [m.scores for m in METHODS.values() if m.scores is not None] + [a.score for a in AGGREGATIONS.values()]
    refs += [getattr(t, f) for t in TARGETS.values() for f in ("write", "owns", "describe")]
    for ref in refs:
        assert callable(ref.resolve()), ref.path
    for rt in RUNTIMES.values():
        code = rt.code()
        assert callable(code.bench_rows), rt.name
        assert callable(getattr(code, "load", None)) == rt.generates, rt.name


def test_the_registry_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, griffin_export.registry, griffin_export.settings; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_new_method_is_one_entry(monkeypatch):
    """A bottom-k method added from outside the package as one registry entry, its selector a plain
    function: the export runs it on the prompt's statistic and the bundle records it."""
    from griffin_export import ExportSettings, export_ids
    from griffin_export.method.export import prompt_statistic

    def bottomk(scores, k, gen):
        return torch.topk(-scores, k).indices

    monkeypatch.setitem(METHODS, "bottomk", Method("bottomk", "the k neurons with the smallest statistic", bottomk))
    lm, ids = tiny_model("llama"), prompt_ids()
    b = export_ids(lm, ids, ExportSettings(method="bottomk", warmup=0))
    scores = prompt_statistic(lm, ids)[0].scores()
    assert b.info.method == "bottomk"
    for layer, idx in zip(scores, b.indices):
        assert torch.equal(idx, torch.topk(-layer, lm.d_ff // 2).indices.sort().values)


def test_registry_names_are_unique():
    with pytest.raises(ValueError, match="two registry entries named 'topk'"):
        registry._table([METHODS["topk"], dataclasses.replace(METHODS["topk"])])


def test_inspect_asks_the_targets_in_order(tmp_path, capsys):
    """A folder no target owns is refused naming them all; the registry's order decides who describes."""
    code, _, err = run(["inspect", tmp_path], capsys)
    assert code == 2 and "(onnx, hf, gguf)" in err
