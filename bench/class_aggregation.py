"""Which class aggregation keeps quality best: gold-summary log-likelihood on held-out rows.

    python bench/class_aggregation.py --train 0:200 --eval 200:300 --density 0.5,0.75

Builds one class from the --train rows of a JSONL file (XSum: prompt in `article`, gold text
in `summary_gt`) with every aggregation at every density; one full prefill per training row
feeds all of them. Each --eval row then gets one full-model prefill (the GRIFFIN regime),
and the gold text is teacher-forced through each variant from a fresh copy of that KV:
  full         the unpruned model
  per-prompt   GRIFFIN top-k from the row's own prompt (what `export` makes)
  class:AGG    the class experts of each aggregation
  magnitude    the static weight-norm baseline
  AGG+pruned   (--pruned-prefill) the default aggregation, with the prompt prefill pruned too
Prints a markdown table of the mean log-likelihood per gold token (higher is better), its
standard error over rows, and the gap to the full model; --json writes every number.
The first gold token is scored by the full model's last prompt logits for every variant
(the first new token needs no pruned forward); the separator ("\\n") is fed, not scored.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from griffin_export.model.arch import ff_blocks, magnitude_scores
from griffin_export.classes.aggregate import ClassStatistic
from griffin_export.registry import AGGREGATIONS, DEFAULT_AGGREGATION
from griffin_export.method.classify import experts
from griffin_export.errors import GriffinError
from griffin_export.method.export import layer_scores
from griffin_export.settings import ExportSettings
from griffin_export.model.tokens import tokenize
from griffin_export.model.load import load_model
from griffin_export.model.prefill import cache_tensors, forward, prefill, restore_cache
from griffin_export.method.selection import k_for, select_all

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "xsum_dev.jsonl"


def rows(path: Path, span: str) -> list[dict]:
    start, _, stop = span.partition(":")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, int(start), int(stop))]


def prompt_ids(lm, text: str) -> torch.Tensor | None:
    try:
        return tokenize(lm, text)
    except GriffinError:  # over the context: skipped (counted by the caller)
        return None


def gold_ids(lm, prompt: str, ids: torch.Tensor, separator: str, gold: str) -> tuple[torch.Tensor, int]:
    """(tokens fed after the prompt [n], index of the first scored one): the separator is fed, not scored."""
    tok, p = lm.tokenizer, ids.shape[1]
    joint = tok(prompt + separator + gold)["input_ids"]
    head = tok(prompt + separator)["input_ids"]
    if joint[:p] == ids[0].tolist() and joint[: len(head)] == head and len(joint) > len(head):
        return torch.tensor(joint[p:]), len(head) - p
    sep = tok(separator, add_special_tokens=False)["input_ids"]
    return torch.tensor(sep + tok(gold, add_special_tokens=False)["input_ids"]), len(sep)


def mean_logprob(lm, cache, last_logits: torch.Tensor, cont: torch.Tensor, first: int) -> float:
    """Mean log p of cont[first:] after a prompt whose KV is `cache` (consumed), model as it is now."""
    logits = [last_logits.float()[None]]
    if cont.numel() > 1:
        logits.append(forward(lm.model, cont[None, :-1].to(lm.device), cache, last_only=False))
    logp = torch.log_softmax(torch.cat(logits), dim=-1).gather(1, cont[:, None].to(lm.device))[:, 0]
    return float(logp[first:].mean())


def build_classes(lm, train: list[dict], field: str, densities: list[float]) -> tuple[dict, int]:
    """{density: ClassStatistic} from one prefill per training row; (stats, skipped)."""
    stats = {d: ClassStatistic(lm.num_layers, lm.d_ff, k_for(d, lm.d_ff)) for d in densities}
    skipped = 0
    for row in tqdm(train, desc="class", unit="prompt"):
        ids = prompt_ids(lm, row[field])
        if ids is None:
            skipped += 1
            continue
        scores, _, _ = layer_scores(lm, ids, ExportSettings())
        for st in stats.values():
            st.add(scores, ids.shape[1])
    return stats, skipped


def run(args) -> dict:
    lm = load_model(args.model, device=args.device, quiet=True)
    densities = [float(d) for d in args.density.split(",")]
    aggregations = args.aggregations.split(",")
    for a in aggregations:
        if a not in AGGREGATIONS:
            raise GriffinError(f"unknown aggregation {a!r}; known: {', '.join(AGGREGATIONS)}")
    t0 = time.perf_counter()
    stats, train_skipped = build_classes(lm, rows(args.data, args.train), args.field, densities)
    class_seconds = time.perf_counter() - t0
    blocks = ff_blocks(lm.model, lm.spec)
    magnitude = torch.stack([magnitude_scores(b, lm.spec, lm.d_ff) for b in blocks])
    fixed: dict[str, list[torch.Tensor]] = {}  # variant name -> indices, for the class and static variants
    for d in densities:
        k = k_for(d, lm.d_ff)
        for a in aggregations:
            fixed[f"class:{a}@{d}"] = select_all(AGGREGATIONS[a].score(stats[d]).float(), k, "topk", 0)
        fixed[f"magnitude@{d}"] = select_all(magnitude, k, "topk", 0)

    results: dict[str, list[float]] = {"full": []}
    eval_skipped = 0
    for row in tqdm(rows(args.data, args.eval), desc="eval", unit="prompt"):
        ids = prompt_ids(lm, row[args.field])
        if ids is None:
            eval_skipped += 1
            continue
        cont, first = gold_ids(lm, row[args.field], ids, args.separator, row[args.target])
        scores, cache, last = layer_scores(lm, ids, ExportSettings())
        kv, T = cache_tensors(cache), ids.shape[1]

        def fresh():
            return restore_cache(lm.model, [(k.clone(), v.clone()) for k, v in kv], T)

        results["full"].append(mean_logprob(lm, fresh(), last, cont, first))
        for d in densities:
            variants = {f"per-prompt@{d}": select_all(scores, k_for(d, lm.d_ff), "topk", 0)}
            variants.update({name: idx for name, idx in fixed.items() if name.endswith(f"@{d}")})
            for name, idx in variants.items():
                with experts(lm, idx):
                    results.setdefault(name, []).append(mean_logprob(lm, fresh(), last, cont, first))
            if args.pruned_prefill:
                with experts(lm, fixed[f"class:{DEFAULT_AGGREGATION}@{d}"]):
                    pcache, plast = prefill(lm.model, ids)
                    results.setdefault(f"class:{DEFAULT_AGGREGATION}+pruned-prefill@{d}", []).append(
                        mean_logprob(lm, pcache, plast, cont, first))
    return {"data": str(args.data), "train": args.train, "eval": args.eval, "model": lm.identity,
            "train_prompts": stats[densities[0]].prompts, "train_skipped": train_skipped,
            "eval_prompts": len(results["full"]), "eval_skipped": eval_skipped, "class_seconds": class_seconds,
            "densities": densities, "results": results}


def paired(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """Mean and standard error of a - b over the same rows, and the rows where a > b."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    return m, math.sqrt(sum((v - m) ** 2 for v in d) / max(len(d) - 1, 1) / len(d)), sum(v > 0 for v in d)


def table(report: dict) -> str:
    full = report["results"]["full"]
    lines = [f"class from rows {report['train']} ({report['train_prompts']} prompts, {report['train_skipped']} "
             f"skipped), evaluated on rows {report['eval']} ({report['eval_prompts']} prompts, "
             f"{report['eval_skipped']} skipped): mean log-likelihood per gold token",
             "", "| variant | density | log-lik | ± s.e. | vs full |", "|---|---|---|---|---|"]
    for name, values in report["results"].items():
        variant, _, density = name.partition("@")
        m = sum(values) / len(values)
        se = math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1) / len(values))
        gap = m - sum(full) / len(full)
        lines.append(f"| {variant} | {density or '1.0'} | {m:.4f} | {se:.4f} | {gap:+.4f} |")
    n = len(full)
    for d in report["densities"]:  # the aggregations ranked, each against the next, paired by row
        ranked = sorted(((k.split("@")[0][len("class:"):], v) for k, v in report["results"].items()
                         if k.startswith("class:") and "+" not in k and k.endswith(f"@{d}")), key=lambda kv: -sum(kv[1]))
        steps = [f"{a} > {b} by {m:.4f} ± {se:.4f} ({wins}/{n} rows)"
                 for (a, va), (b, vb) in zip(ranked, ranked[1:]) for m, se, wins in [paired(va, vb)]]
        if steps:
            lines.append(f"\ndensity {d}, paired: " + "; ".join(steps))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL file [%(default)s]")
    p.add_argument("--train", default="0:200", help="rows START:STOP that make the class [%(default)s]")
    p.add_argument("--eval", default="200:300", help="held-out rows START:STOP [%(default)s]")
    p.add_argument("--density", default="0.5,0.75", help="comma-separated densities [%(default)s]")
    p.add_argument("--aggregations", default=",".join(AGGREGATIONS), help="[%(default)s]")
    p.add_argument("--field", default="article", help="prompt key [%(default)s]")
    p.add_argument("--target", default="summary_gt", help="gold text key [%(default)s]")
    p.add_argument("--separator", default="\n", help="fed between prompt and gold text, not scored [newline]")
    p.add_argument("--pruned-prefill", action="store_true", help="also the default aggregation with pruned prefill")
    p.add_argument("--model", default=None, help="model dir or GGUF [default model]")
    p.add_argument("--device", default="cpu", help="torch device [%(default)s]")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    try:
        report = run(args)
    except GriffinError as e:
        sys.exit(f"class_aggregation: error: {e}")
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
