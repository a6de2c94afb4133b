"""Quality of 4-bit experts: int4 ONNX graphs against the float32 one, same bundles.

    python bench/int4_quality.py --data bench/data/xsum_dev.jsonl --rows 200:300 -o reports/int4_quality
    python bench/int4_quality.py --data bench/data/xsum_dev.jsonl --rows 0:40 --no-full-int4 \
        --variant level=4 --variant level=0 --variant level=4,head=float --variant level=0,head=float -o dev/

Per XSum row: one export (the default `topk`, density 0.5, warm-up 8, as `griffin-export`
writes it), then ONNX Runtime decodes that bundle on lean graphs exported once from the
first row's bundle, every later bundle swapped in: float32, and one `--quantize int4` graph
per --variant (its FF weights quantized at load, as the runtime does for any swapped bundle;
a variant is `algorithm=rtn|hqq,level=L,block=B,head=int4|float`, unset keys from --accuracy-level,
--block-size and int4). The full model (float32, and int4 with the first variant unless
--no-full-int4) gives the reference output. Per setting: ROUGE-L against the gold summary,
ROUGE-L agreement with the float32 full model's output, and the gold summary's mean
log-likelihood per token (teacher-forced after a full-model prefill of the prompt, pruned
decode steps, as `griffin-export eval` scores it). Each row is appended to OUT/rows.jsonl
(resumable with the same arguments); OUT/summary.json and OUT/summary.md hold the means with
95 % bootstrap intervals and the paired differences of each int4 setting - pruned float32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.xsum_quality import (
    add_common_args,
    fmt,
    gold_ll,
    intervals,
    open_rows,
    paired_diffs,
    read_recs,
    write_summary,
)
from griffin_export.evaluation.metrics import ratio_ci, rouge
from griffin_export.evaluation.runner import continuation_ids
from griffin_export.method.export import export_ids
from griffin_export.model.load import load_model
from griffin_export.model.tokens import tokenize
from griffin_export.runtime.onnx import OnnxRuntime
from griffin_export.settings import DecodeOptions, QuantSettings
from griffin_export.targets.onnx.export import export_onnx


def parse_variant(text: str, block_size: int, level: int) -> QuantSettings:
    """'level=0,block=32,head=float' -> QuantSettings (unset keys from the defaults given)."""
    keys = dict(item.split("=", 1) for item in text.split(",") if item)
    unknown = set(keys) - {"level", "block", "head", "algorithm"}
    if unknown or keys.get("head", "int4") not in ("int4", "float"):
        raise SystemExit(f"bad --variant {text!r}: keys algorithm=rtn|hqq, level=, block=, head=int4|float")
    return QuantSettings(block_size=int(keys.get("block", block_size)), accuracy_level=int(keys.get("level", level)),
                         lm_head=keys.get("head", "int4") == "int4", algorithm=keys.get("algorithm", QuantSettings().algorithm))


def variant_name(q: QuantSettings) -> str:
    return (f"int4 {q.algorithm + ' ' if q.algorithm != 'rtn' else ''}L{q.accuracy_level} b{q.block_size}"
            + ("" if q.lm_head else " float head"))


def onnx_gold_ll(rt: OnnxRuntime, ids: torch.Tensor, cont) -> float:
    """Mean log p of the gold tokens: full-model prefill of the prompt, then the runtime's steps."""
    state, first = rt.start(ids)
    return gold_ll(lambda t: rt.step(state, t), first, cont)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, threads=2)
    ap.add_argument("--block-size", type=int, default=QuantSettings().block_size)
    ap.add_argument("--accuracy-level", type=int, default=QuantSettings().accuracy_level)
    ap.add_argument("--variant", action="append", default=None,
                    help="an int4 setting, level=L,block=B,head=int4|float (repeatable) [default: the defaults]")
    ap.add_argument("--no-full-int4", action="store_true", help="skip the full model's int4 graph")
    a = ap.parse_args(argv)
    rows, rows_path, done, export = open_rows(a)
    out = rows_path.parent
    lm = load_model(None, quiet=True)
    variants = [parse_variant(v, a.block_size, a.accuracy_level) for v in (a.variant or [""])]
    tmp = Path(tempfile.mkdtemp(prefix="int4-quality."))
    first = export_ids(lm, tokenize(lm, rows[0].prompt), export)
    graphs = {"full fp32": export_onnx(lm, tmp / "full", None)}
    if not a.no_full_int4:
        graphs[f"full {variant_name(variants[0])}"] = export_onnx(lm, tmp / "full4", None, quantize=variants[0])
    graphs["pruned fp32"] = export_onnx(lm, tmp / "p", first)
    for i, q in enumerate(variants):
        graphs[f"pruned {variant_name(q)}"] = export_onnx(lm, tmp / f"p4-{i}", first, quantize=q)
    full_graph = graphs["full fp32"]
    with rows_path.open("a") as f:
        for row in tqdm([r for r in rows if r.index not in done], desc="int4 quality", unit="prompt"):
            t0 = time.perf_counter()
            ids = tokenize(lm, row.prompt)
            cont = continuation_ids(lm.tokenizer, row.prompt, "\n", row.target, ids[0].tolist())
            bundle = export_ids(lm, ids, export)
            opts = DecodeOptions(max_new_tokens=row.max_tokens, stop=row.stop)
            rec = {"row": row.index, "prompt_tokens": ids.shape[1], "results": {}}
            full_text = None
            for name in graphs:
                pruned = name.startswith("pruned")
                rt = OnnxRuntime(graphs[name], bundle if pruned else None, full=full_graph, provider="cpu",
                                 threads=a.threads, pruned_prefill=not pruned)
                gen = rt.generate(opts) if pruned else rt.generate(opts, ids=ids)
                if name == "full fp32":
                    full_text = gen.text
                rec["results"][name] = {"rougeL": rouge(gen.text, row.target)["rougeL"],
                                        "agree_rougeL": rouge(gen.text, full_text)["rougeL"],
                                        "gold_ll": onnx_gold_ll(rt, ids, cont), "text": gen.text}
            rec["seconds"] = time.perf_counter() - t0
            f.write(json.dumps(rec) + "\n")
            f.flush()
    summarize(out, a)


def summarize(out: Path, a) -> None:
    recs, names, col = read_recs(out)
    summary = {"rows": len(recs), "args": vars(a), "settings": {}}
    lines = [f"{len(recs)} XSum rows ({a.rows}), {a.method} density {a.density:g}, warm-up {a.warmup}; "
             "int4 Ln bB: accuracy_level n, block B; 95 % bootstrap intervals", "",
             "| setting | ROUGE-L | vs full fp32 ROUGE-L | agreement with full fp32 (ROUGE-L) | gold log-lik / token |",
             "|---|---|---|---|---|"]
    for name in names:
        s = {**intervals(col, name), "ratio": ratio_ci(col(name, "rougeL"), col("full fp32", "rougeL"))}
        summary["settings"][name] = {k: v.as_dict() for k, v in s.items()}
        lines.append(f"| {name} | {fmt(s['rougeL'])} | {fmt(s['ratio'])} | {fmt(s['agree'])} | {fmt(s['gold_ll'])} |")
    for name in (n for n in names if n.startswith("pruned int4")):
        summary.setdefault("diffs", {})[name], diff_lines = paired_diffs(col, name, "pruned fp32")
        lines += ["", *diff_lines]
    write_summary(out, summary, lines)


if __name__ == "__main__":
    sys.exit(main())
