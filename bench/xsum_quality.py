"""What the per-row quality scripts share (bench/int4_quality.py, bench/kv_quality.py): their common
options, the XSum rows and the resumable OUT/rows.jsonl, and the gold summary's likelihood."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from griffin_export.evaluation.data import read_rows
from griffin_export.evaluation.settings import EvalSettings
from griffin_export.settings import ExportSettings


def add_common_args(ap: argparse.ArgumentParser, threads: int) -> None:
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", default="200:300")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--method", default="topk")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("-o", "--output", required=True)


def open_rows(a) -> tuple[list, Path, set[int], ExportSettings]:
    """(the rows asked for, OUT/rows.jsonl, the rows it already holds, the export settings); torch's threads set."""
    start, stop = (int(x) for x in a.rows.split(":"))
    torch.set_num_threads(a.threads)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {json.loads(line)["row"] for line in rows_path.open()} if rows_path.exists() else set()
    rows = read_rows(EvalSettings(data=a.data, rows=(start, stop), methods=("full",)))
    return rows, rows_path, done, ExportSettings(density=a.density, method=a.method, warmup=a.warmup)


def gold_ll(step, first: torch.Tensor, cont) -> float:
    """Mean log p of the gold tokens: `first` the logits after the prompt (a full-model prefill), `step`
    one teacher-forced token through the setting's decode step, as `griffin-export eval` scores it."""
    logits = [first]
    for tok in cont.ids[:-1].tolist():
        logits.append(step(tok))
    logp = torch.log_softmax(torch.stack(logits).float(), -1).gather(1, cont.ids[:, None])[:, 0]
    return float(logp[cont.scored_from:].mean())
