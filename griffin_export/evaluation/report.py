"""The report: OUT/eval.jsonl (+ OUT/bench.json) -> results.json, results.md and PNG plots.

Runnable on its own (`griffin-export eval --report-only -o OUT`): it reads only what the
runner and `griffin-export bench -o OUT` wrote, so a report can be redrawn after a
benchmark is added or while an evaluation is still running.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ..errors import GriffinError
from ..settings import plural
from ..method.budget import k_text
from .metrics import ROUGE_TYPES, Interval, diff_ci, mean_ci, ratio_ci
from .provenance import versions
from .settings import PRUNED_PREFILL_PREFIX, bundle_path, parse_config

BENCH_FILE = "bench.json"
JSON_FILE = "results.json"
MD_FILE = "results.md"
PLOTS = {"rougeL": "rouge_l.png", "gold_ll": "gold_ll.png", "agree_rougeL": "agreement.png", "speed": "speed.png"}
RESAMPLES = 1000


# -- aggregation ----------------------------------------------------------------------------


def _ci(iv: Interval) -> dict:
    return iv.as_dict()


def _column(vals: list[dict], name: str) -> list[float] | None:
    """Per-prompt values of one metric; None when it was not measured (--ll-only)."""
    col = [v.get(name) for v in vals]
    return None if any(x is None for x in col) else [float(x) for x in col]


def summarize(header: dict, records: dict[int, dict], resamples: int = RESAMPLES) -> dict:
    """Per setting: means over the finished prompts of the header's row range, with 95 %
    bootstrap intervals; differences and ratios to `full` are paired over prompts."""
    start, stop = header["settings"]["rows"]
    recs = [records[r] for r in range(start, stop) if r in records]
    kw = {"resamples": resamples}
    settings = []
    if recs:
        full = [r["results"]["full"] for r in recs]
        for key, first in recs[0]["results"].items():
            vals = [r["results"][key] for r in recs]
            tokens = _column(vals, "tokens")
            entry = {"key": key, "method": first["method"], "density": first["density"], "k": first["k"],
                     "warmup": first.get("warmup", 0),
                     "n": len(vals), "tokens": None if tokens is None else sum(tokens) / len(tokens),
                     "seconds": sum(_column(vals, "seconds")) / len(vals)}
            names = [*ROUGE_TYPES, "gold_ll"]
            if first["method"] != "full":
                names += ["agree_rougeL", "first_divergence", "identical"]
            for name in names:
                col = _column(vals, name)
                entry[name] = None if col is None else _ci(mean_ci(col, **kw))
            if first["method"] != "full":  # paired with the full model, prompt by prompt
                for name, fn in (("rougeL", ratio_ci), ("gold_ll", diff_ci)):
                    col, ref = _column(vals, name), _column(full, name)
                    entry[f"{name}_vs_full"] = None if col is None else _ci(fn(col, ref, **kw))
            settings.append(entry)
    n = max(len(recs), 1)
    timing = {
        "prompts": len(recs),
        "mean_prompt_tokens": sum(r["prompt_tokens"] for r in recs) / n,
        "mean_seconds_per_prompt": sum(r["seconds"] for r in recs) / n,
        "mean_prefill_seconds": sum(r["prefill_seconds"] for r in recs) / n,
        "split_tokenization_rows": [r["row"] for r in recs if r.get("split_tokenization")],
    }
    return {"requested": stop - start, "done": len(recs), "settings": settings, "timing": timing}


def per_prompt_numbers(header: dict, records: dict[int, dict]) -> list[dict]:
    """Every per-prompt number (generated texts stay in eval.jsonl)."""
    start, stop = header["settings"]["rows"]
    out = []
    for r in range(start, stop):
        if r in records:
            rec = records[r]
            out.append({**{k: v for k, v in rec.items() if k != "results"},
                        "results": {key: {k: v for k, v in res.items() if k != "text"}
                                    for key, res in rec["results"].items()}})
    return out


def read_bench(path: Path) -> dict | None:
    """OUT/bench.json from `griffin-export bench -o OUT`, or None when there is none."""
    if not path.is_file():
        return None
    try:
        bench = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GriffinError(f"{path} is not valid JSON: {e}") from None
    rows = bench.get("rows") if isinstance(bench, dict) else None
    if not isinstance(rows, list) or not rows:
        raise GriffinError(f"{path} has no benchmark rows (expected a JSON object with a 'rows' list)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(k in row for k in ("config", "speedup", "bound")):
            raise GriffinError(f"{path}: row {i} lacks config / speedup / bound")
    return bench


# eval.jsonl names no command for a run started in Python (run_eval without `command`), nor for one
# written before commands were recorded
NOT_RECORDED = "(no command recorded in eval.jsonl)"


# -- writing --------------------------------------------------------------------------------


def write_report(out: str | os.PathLike, *, resamples: int = RESAMPLES) -> list[Path]:
    """results.json, results.md and the plots in OUT, from OUT/eval.jsonl and/or OUT/bench.json."""
    from .results import RESULTS_FILE, read_results

    out_dir = Path(out)
    if not out_dir.is_dir():
        raise GriffinError(f"report directory {out_dir} does not exist")
    results_path, bench_path = out_dir / RESULTS_FILE, out_dir / BENCH_FILE
    bench = read_bench(bench_path)
    if not results_path.exists() and bench is None:
        raise GriffinError(f"{out_dir} holds neither {RESULTS_FILE} (griffin-export eval) nor {BENCH_FILE} "
                           "(griffin-export bench -o DIR); nothing to report")
    report: dict = {"format": "griffin-eval-report", "format_version": 1}
    if results_path.exists():
        header, records = read_results(results_path)
        report.update(command=header.get("command", NOT_RECORDED), settings=header["settings"], model=header["model"],
                      machine=header["machine"], versions=header["versions"],
                      quality=summarize(header, records, resamples),
                      per_prompt=per_prompt_numbers(header, records))
    else:
        report.update(machine=(bench or {}).get("machine"), versions=versions())
    report["bench"] = bench

    written = [_write_text(out_dir / JSON_FILE, json.dumps(report, indent=1, default=_json_default) + "\n")]
    plots = []
    quality = report.get("quality", {}).get("settings")
    if quality:
        for metric, label, title in (
            ("rougeL", "ROUGE-L vs gold summary", "quality: ROUGE-L"),
            ("gold_ll", "gold log-likelihood (nats/token)", "quality: gold-summary log-likelihood"),
            ("agree_rougeL", "ROUGE-L vs the full model's output", "agreement with the full model"),
        ):
            if any(s.get(metric) for s in quality):
                plots.append(_quality_plot(out_dir / PLOTS[metric], quality, metric, label, title))
    if bench is not None:
        plots.append(_speed_plot(out_dir / PLOTS["speed"], bench["rows"]))
    written += plots
    written.append(_write_text(out_dir / MD_FILE, markdown(report, [p.name for p in plots])))
    return written


def _json_default(obj):
    return float(obj) if hasattr(obj, "__float__") else str(obj)


def _write_text(path: Path, text: str) -> Path:
    from ..files.outputs import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# -- markdown -------------------------------------------------------------------------------


def _fmt(iv: dict | None, digits: int = 3) -> str:
    if iv is None or iv["mean"] is None:
        return "—"
    if iv["low"] is None:
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def _short_name(method: str) -> str:
    """`bundle:dir/news.safetensors` -> `news.safetensors`, `pruned-prefill:...` -> `news.safetensors (pruned prefill)`."""
    path = bundle_path(method)
    if path is None:
        return method
    return Path(path).name + (" (pruned prefill)" if method.startswith(PRUNED_PREFILL_PREFIX) else "")


def _setting_name(s: dict) -> str:
    return f"`{_short_name(s['method'])}`" + (f" +{s['warmup']} warm-up" if s.get("warmup") else "")


def markdown(report: dict, plots: Sequence[str]) -> str:
    lines = ["# Evaluation report", ""]
    m, v = report.get("machine") or {}, report.get("versions") or {}
    if "quality" in report:
        q, s, mod = report["quality"], report["settings"], report["model"]
        lines += [
            f"Model `{mod['identity']}` ({mod['architecture']}, {mod['dtype']} on {mod['device']}, "
            f"{mod['num_layers']} layers, d_ff {mod['d_ff']}, fingerprint `{mod['fingerprint'][:16]}`). "
            f"Data `{Path(s['data']).name}` rows {s['rows'][0]}:{s['rows'][1]}: "
            f"{q['done']} of {plural(q['requested'], 'prompt')} evaluated"
            + ("" if q["done"] == q["requested"] else " (**incomplete run**: resume it with the same command)") + ".",
            "",
            "```",
            report["command"],
            "```",
            "",
        ]
    if m:
        lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('torch_threads')} torch threads, "
                  f"GPU: {m.get('gpu') or 'none'}. Versions: "
                  + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".", ""]
    if "quality" in report and report["quality"]["settings"]:
        lines += _quality_tables(report["quality"], report["settings"].get("target_field", "summary_gt"))
    if report.get("bench"):
        lines += _bench_table(report["bench"])
    if plots:
        lines += ["## Plots", ""]
        titles = {"rouge_l.png": "ROUGE-L vs density", "gold_ll.png": "gold-summary log-likelihood vs density",
                  "agreement.png": "agreement with the full model vs density",
                  "speed.png": "decode speedup vs density"}
        lines += [f"![{titles.get(p, p)}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _quality_tables(q: dict, target: str) -> list[str]:
    t = q["timing"]
    lines = [
        "## Quality",
        "",
        "Means over prompts with 95 % bootstrap intervals in brackets (prompts resampled; "
        "ratios and differences to `full` are paired). ROUGE F-measures use rouge-score with "
        f"stemming; the gold log-likelihood is the mean per token of `{target}` given the prompt.",
        "",
        "| method | density | k / layer | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L ÷ full | gold LL (nats/token) "
        "| Δ gold LL vs full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in q["settings"]:
        lines.append(f"| {_setting_name(s)} | {s['density']:g} | {s['k']:g} | {_fmt(s['rouge1'])} | "
                     f"{_fmt(s['rouge2'])} | {_fmt(s['rougeL'])} | {_fmt(s.get('rougeL_vs_full'), 2)} | {_fmt(s['gold_ll'], 2)} | "
                     f"{_fmt(s.get('gold_ll_vs_full'), 2)} |")
    pruned = [s for s in q["settings"] if s["method"] != "full" and s["agree_rougeL"] is not None]
    lines += [] if not pruned else [
        "",
        "### Agreement with the full model",
        "",
        "Greedy outputs of each setting against the full model's, prompt by prompt: ROUGE-L between the "
        "two texts, the index of the first generated token where they differ, and the fraction of "
        "prompts where they are identical.",
        "",
        "| method | density | ROUGE-L vs full output | first divergence (token) | identical | tokens generated |",
        "|---|---|---|---|---|---|",
    ]
    for s in pruned:
        tokens = "—" if s["tokens"] is None else f"{s['tokens']:.1f}"
        lines.append(f"| {_setting_name(s)} | {s['density']:g} | {_fmt(s['agree_rougeL'])} | "
                     f"{_fmt(s['first_divergence'], 1)} | {_fmt(s['identical'], 2)} | {tokens} |")
    lines += [
        "",
        f"Time: {t['mean_seconds_per_prompt']:.1f} s per prompt on average ({t['mean_prompt_tokens']:.0f} prompt "
        f"tokens; shared full prefill {t['mean_prefill_seconds']:.2f} s), {len(q['settings'])} settings per prompt.",
        "",
    ]
    if t["split_tokenization_rows"]:
        lines += [f"Rows whose gold text was tokenized apart from the prompt (a token merged across the "
                  f"boundary): {t['split_tokenization_rows']}.", ""]
    return lines


def _bench_table(bench: dict) -> list[str]:
    lines = ["## Speed", "",
             "From `bench.json` (`griffin-export bench -o DIR`): decode tokens/s, median over repeats after a "
             "warm-up, full model and bundles side by side in one process and runtime; the bound is full bytes "
             "read per token ÷ pruned bytes read per token, from the model's parameter counts.", "",
             "| runtime | config | k / layer | decode tok/s | speedup | bytes-read bound | bundle size |",
             "|---|---|---|---|---|---|---|"]
    for r in bench["rows"]:
        size = r.get("bundle_bytes")
        tps = r.get("decode_tok_s")
        lines.append(f"| {r.get('runtime', 'torch')} | {r['config']} | {k_text(r)} | "
                     f"{'—' if tps is None else f'{tps:.1f}'} | {r['speedup']:.2f}× | {r['bound']:.2f}× | "
                     f"{f'{size / 1e6:.1f} MB' if size else '—'} |")
    extra = []
    m = bench.get("machine") or {}
    if m:
        extra.append(f"measured on {m.get('cpu')} with {m.get('torch_threads')} torch threads")
    if "onnxruntime" in bench:
        extra.append(f"ONNX Runtime {bench['onnxruntime']} ({bench.get('onnx_provider', '?')})")
    if bench.get("export_s") is not None and bench.get("prefill_s"):  # None when export was not timed
        extra.append(f"export {bench['export_s']:.2f} s vs plain prefill {bench['prefill_s']:.2f} s "
                     f"({bench['export_s'] / bench['prefill_s']:.2f}×)")
    if "peak_rss_bytes" in bench:
        extra.append(f"peak RSS {bench['peak_rss_bytes'] / 1e9:.2f} GB")
    if "prompt_tokens" in bench:
        extra.append(f"{bench['prompt_tokens']} prompt tokens, {bench.get('new_tokens', '?')} decoded per repeat")
    if extra:
        lines += ["", "; ".join(extra) + "."]
    return lines + [""]


# -- plots ----------------------------------------------------------------------------------


def _figure():
    # A bare Figure renders through Agg without touching pyplot's global backend state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    from ..files.outputs import atomic_output

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def _quality_plot(path: Path, settings: list[dict], metric: str, label: str, title: str) -> Path:
    fig, ax = _figure()
    by_method: dict[tuple[str, int], list[dict]] = {}
    for s in settings:
        by_method.setdefault((s["method"], s.get("warmup", 0)), []).append(s)
    for (method, warmup), group in by_method.items():
        group = [s for s in group if s.get(metric) is not None and s[metric]["low"] is not None]
        if not group:
            continue
        if method == "full":
            iv = group[0][metric]
            ax.axhline(iv["mean"], color="black", lw=1.2, label="full model")
            ax.axhspan(iv["low"], iv["high"], color="black", alpha=0.08)
            continue
        group = sorted(group, key=lambda s: s["density"])
        x = [s["density"] for s in group]
        y = [s[metric]["mean"] for s in group]
        err = [[s[metric]["mean"] - s[metric]["low"] for s in group],
               [s[metric]["high"] - s[metric]["mean"] for s in group]]
        name = _short_name(method) + (f" +{warmup} warm-up" if warmup else "")
        ax.errorbar(x, y, yerr=err, marker="o" if len(x) > 1 else "s", capsize=3, label=name)
    ax.set_xlabel("FF density (fraction of neurons kept per layer)")
    ax.set_ylabel(label)
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title} vs FF density (mean over prompts, 95 % CI)", fontsize=10)
    return _save(fig, path)


def _speed_plot(path: Path, rows: list[dict]) -> Path:
    fig, ax = _figure()
    points = []  # (runtime, method, is the full model, density, speedup, bound)
    for r in rows:
        try:
            method, density = parse_config(r["config"])
        except ValueError:  # a configuration that is not a density: in the table only
            continue
        points.append((r.get("runtime", "torch"), method, r["config"] == "full", density, float(r["speedup"]),
                       float(r["bound"])))
    methods = sorted({m for _, m, full, *_ in points if not full}) or ["topk"]
    by_runtime: dict[str, list[tuple[float, float, float]]] = {}
    for runtime, method, full, density, speedup, bound in points:
        for m in methods if full else [method]:  # the full model starts every method's curve
            name = runtime if methods == ["topk"] else f"{runtime} {m}"  # topk alone: one curve per runtime
            by_runtime.setdefault(name, []).append((density, speedup, bound))
    bounds = {rt: sorted((d, b) for d, _, b in pts) for rt, pts in by_runtime.items()}
    one_bound = len({tuple(b) for b in bounds.values()}) == 1
    for rt, pts in by_runtime.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{rt}: measured")
        if not one_bound:
            ax.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", label=f"{rt}: bytes-read bound")
    if one_bound:
        pts = next(iter(bounds.values()))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", color="black", label="bytes-read bound")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("FF density (fraction of neurons kept per layer)")
    ax.set_ylabel("decode speedup vs full model (×)")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("decode speedup vs density", fontsize=10)
    return _save(fig, path)
