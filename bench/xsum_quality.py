"""What the per-row quality scripts share (bench/int4_quality.py, bench/kv_quality.py): their common
options, the XSum rows and the resumable OUT/rows.jsonl, and the gold summary's likelihood."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from griffin_export.evaluation.data import read_rows
from griffin_export.evaluation.metrics import diff_ci, mean_ci
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


def read_recs(out: Path) -> tuple[list[dict], list[str], object]:
    """(OUT/rows.jsonl's records, their settings' names, col(name, key): one metric of one setting over
    the rows)."""
    recs = [json.loads(line) for line in (out / "rows.jsonl").open()]
    return recs, list(recs[0]["results"]), lambda name, key: [r["results"][name][key] for r in recs]


def fmt(i) -> str:
    """An interval as the tables print it: mean [low, high]."""
    return f"{i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]"


def intervals(col, name: str) -> dict:
    """ROUGE-L, agreement and gold log-likelihood of one setting, each with its bootstrap interval."""
    return {"rougeL": mean_ci(col(name, "rougeL")), "agree": mean_ci(col(name, "agree_rougeL")),
            "gold_ll": mean_ci(col(name, "gold_ll"))}


def paired_diffs(col, name: str, ref: str, digits: int = 3) -> tuple[dict, list[str]]:
    """name − ref per row, paired (ROUGE-L, agreement, gold log-likelihood): the summary's dict and lines."""
    out, lines = {}, [f"paired difference, {name} − {ref}:"]
    for key in ("rougeL", "agree_rougeL", "gold_ll"):
        d = diff_ci(col(name, key), col(ref, key))
        out[key] = d.as_dict()
        lines.append(f"- {key}: {d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]")
    return out, lines


def write_summary(out: Path, summary: dict, lines: list[str]) -> None:
    """OUT/summary.json and summary.md, and the table printed."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
