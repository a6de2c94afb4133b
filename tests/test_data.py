"""The offline prompt data in bench/data/ (bench/make_data.py), without a model: every file parses and
carries the common fields, dev and report share nothing, prompts stay under the limit, the mixed logs
trace back to their kinds' files, and pydoc.jsonl rebuilds byte for byte."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys

import pytest

from bench import make_data

DATA = make_data.DATA_DIR
ROOT = DATA.parents[1]
KIND_FILES = [f"{kind}.jsonl" for kind in make_data.KINDS]
LOGS = {"dev": "mixed_dev.jsonl", "report": "mixed_report.jsonl"}
XSUM_SHA256 = "84591f3e2b1e7ab7965ece9465f765d2ddbf8fcf663beae1fec4a42237823f4f"  # the GRIFFIN authors' rows 0-299, as copied


@functools.cache
def rows(name: str) -> list[dict]:
    return make_data.xsum_rows() if name == "xsum" else make_data.read_jsonl(DATA / name)


def test_every_data_file_is_covered():
    assert {p.name for p in DATA.glob("*.jsonl")} == {*KIND_FILES, *LOGS.values(), "xsum_dev.jsonl"}


def test_xsum_is_the_shared_copy():
    assert hashlib.sha256(make_data.XSUM_FILE.read_bytes()).hexdigest() == XSUM_SHA256
    raw = make_data.read_jsonl(make_data.XSUM_FILE)
    assert len(raw) == 300 and all(set(r) == {"article", "summary_gt", "max_tokens", "stop"} for r in raw)


@pytest.mark.parametrize("name", [*KIND_FILES, *LOGS.values()])
def test_rows_carry_the_common_fields(name):
    for i, r in enumerate(rows(name), 1):
        where = f"{name}:{i}"
        assert isinstance(r["prompt"], str) and r["prompt"].strip(), where
        assert isinstance(r["reference"], str) and r["reference"].strip(), where
        assert r["kind"] in (*make_data.KINDS, "xsum") and r["split"] in ("dev", "report"), where
        assert isinstance(r["source"], str) and ":" in r["source"] and isinstance(r["group"], str), where
        assert r["max_tokens"] == 64, where
        assert isinstance(r["stop"], list) and all(isinstance(s, str) and s for s in r["stop"]), where
        assert len(r["prompt"]) <= make_data.MAX_PROMPT_CHARS, where


@pytest.mark.parametrize("name", KIND_FILES)
def test_kind_files_hold_dev_rows_first(name):
    """So that `--rows 0:N` of `griffin-export eval` is the dev split and the rest is report."""
    rs = rows(name)
    assert {r["kind"] for r in rs} == {name.removesuffix(".jsonl")}
    splits = [r["split"] for r in rs]
    assert splits == sorted(splits)  # "dev" < "report"
    assert splits.count("dev") >= 100 and splits.count("report") >= 50


@pytest.mark.parametrize("name", [*KIND_FILES, "xsum"])
def test_dev_and_report_share_no_source_or_group(name):
    for field in ("source", "group"):
        dev = {r[field] for r in rows(name) if r["split"] == "dev"}
        report = {r[field] for r in rows(name) if r["split"] == "report"}
        assert dev and report and not dev & report, field


def test_mixed_logs():
    dev, report = rows(LOGS["dev"]), rows(LOGS["report"])
    assert len(dev) >= 400 and len(report) >= 200
    for split, log in (("dev", dev), ("report", report)):
        assert {r["split"] for r in log} == {split}
        assert len({r["kind"] for r in log}) >= 4
    for field in ("source", "group"):
        assert not {r[field] for r in dev} & {r[field] for r in report}, field
    for r in dev + report:  # `row` is the line in the kind's own file, without the log's `row` field
        own = rows("xsum" if r["kind"] == "xsum" else f"{r['kind']}.jsonl")[r["row"]]
        assert own == {k: v for k, v in r.items() if k != "row"}


def test_pydoc_rebuilds_byte_for_byte(tmp_path):
    built = rows("pydoc.jsonl")[0]["python"]
    if built != make_data.python_version():
        pytest.skip(f"pydoc.jsonl was built on Python {built}, this is {make_data.python_version()}: "
                    "pydoc_data.topics is regenerated for every release")
    out = tmp_path / "pydoc.jsonl"
    subprocess.run([sys.executable, "-m", "bench.make_data", "pydoc", "-o", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    assert out.read_bytes() == (DATA / "pydoc.jsonl").read_bytes()
