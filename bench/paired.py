"""Paired differences between two settings of one evaluation run, prompt by prompt:
gold log-likelihood A − B, and ROUGE-L A ÷ B when both were generated, with 95 % bootstrap intervals.

    python bench/paired.py RUN_DIR METHOD_A METHOD_B DENSITY...
    python bench/paired.py reports/ll_edges_200_299 topk_refit_edges topk_refit 0.25 0.5 0.75 0.9
    python bench/paired.py reports/warmup_200_299 topk_refit_edges+w8 topk 0.5    # eval --warmup 8 settings
    python bench/paired.py RUN pruned-prefill:news_refit.safetensors pruned-prefill:news.safetensors 0.5  # bundles
"""

from __future__ import annotations

import sys
from pathlib import Path

from griffin_export.evaluation.metrics import Interval, diff_ci, ratio_ci
from griffin_export.evaluation.results import RESULTS_FILE, read_results
from griffin_export.evaluation.runner import setting_key
from griffin_export.evaluation.settings import bundle_path


def key(method: str, density: float) -> str:
    """`topk` -> `topk@0.5`; a warm-up run's `topk+w8` -> `topk@0.5+w8`; a bundle's setting
    (`bundle:PATH`, `pruned-prefill:PATH`) is its own key, at its own density."""
    if bundle_path(method) is not None:
        return method
    name, _, warmup = method.partition("+w")
    return setting_key(name, density, int(warmup) if warmup else 0)


def paired(run: str, a: str, b: str, densities: list[float]) -> list[tuple[float, Interval, Interval | None]]:
    """Per density: (density, gold LL difference A − B, ROUGE-L ratio A ÷ B or None)."""
    _, records = read_results(Path(run) / RESULTS_FILE)
    out = []
    for d in densities:
        ra = [r["results"][key(a, d)] for r in records.values()]
        rb = [r["results"][key(b, d)] for r in records.values()]
        ll = diff_ci([x["gold_ll"] for x in ra], [x["gold_ll"] for x in rb])
        generated = all(x["rougeL"] is not None for x in ra + rb)
        rl = ratio_ci([x["rougeL"] for x in ra], [x["rougeL"] for x in rb]) if generated else None
        out.append((d, ll, rl))
    return out


def main(argv: list[str] | None = None) -> str:
    run, a, b, *densities = sys.argv[1:] if argv is None else argv
    lines = [f"| density | Δ gold LL {a} − {b} (paired, 95 % CI) | ROUGE-L {a} ÷ {b} |", "|---|---|---|"]
    for d, ll, rl in paired(run, a, b, [float(x) for x in densities]):
        ratio = "—" if rl is None else f"{rl.mean:.2f} [{rl.low:.2f}, {rl.high:.2f}]"
        lines.append(f"| {d} | {ll.mean:+.3f} [{ll.low:+.3f}, {ll.high:+.3f}] | {ratio} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
