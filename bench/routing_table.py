"""The routing issue's table from one eval run over a mixed report log: per setting and per kind,
ROUGE-L against the references (and as a fraction of the full model's), gold-text likelihood (and its
difference from the full model's), agreement with the full model's text; the router's accuracy
against the oracle class and against the prompt's kind; how often the guard fires. 95 % bootstrap
intervals over prompts, paired against the full model where a column is a difference or a ratio.

    python -m bench.routing_table EVAL_DIR --data bench/data/mixed_report.jsonl [-o table.md]

EVAL_DIR is `griffin-export eval`'s output folder with the settings `full`, per-prompt experts
(e.g. `topk@0.5+w8`), `labeled:DIR`, `routed:ROUTER`, `guarded:ROUTER` and `oracle:ROUTER`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from griffin_export.evaluation.metrics import diff_ci, mean_ci, ratio_ci
from griffin_export.evaluation.results import RESULTS_FILE, read_results


def interval(i) -> str:
    return f"{i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]" if i.n else "—"


def label(key: str) -> str:
    for prefix, name in (("labeled:", "hand-labeled classes"), ("routed:", "discovered classes + router"),
                         ("guarded:", "discovered + router + guard"), ("oracle:", "oracle class")):
        if key.startswith(prefix):
            return name
    return "full model" if key == "full" else f"per-prompt `{key}`"


def table(records: dict[int, dict], kinds: dict[int, str], keys: list[str], kind: str | None) -> list[str]:
    rows = [r for i, r in sorted(records.items()) if kind is None or kinds[i] == kind]
    full = [r["results"]["full"] for r in rows]
    lines = [f"### {kind or 'all kinds'} ({len(rows)} prompts)", "",
             "| setting | ROUGE-L | × full | gold ll (nats/token) | − full | agreement with full (ROUGE-L) |",
             "|---|---|---|---|---|---|"]
    for key in keys:
        res = [r["results"][key] for r in rows]
        rouge = [x["rougeL"] for x in res]
        ll = [x["gold_ll"] for x in res]
        agree = [x["agree_rougeL"] for x in res if x.get("agree_rougeL") is not None]
        lines.append(f"| {label(key)} | {interval(mean_ci(rouge))} | "
                     + ("—" if key == "full" else interval(ratio_ci(rouge, [f["rougeL"] for f in full]))) + " | "
                     + f"{interval(mean_ci(ll))} | "
                     + ("—" if key == "full" else interval(diff_ci(ll, [f["gold_ll"] for f in full]))) + " | "
                     + ("—" if key == "full" else interval(mean_ci(agree))) + " |")
    return lines + [""]


def routing(records: dict[int, dict], kinds: dict[int, str], keys: list[str]) -> list[str]:
    """Router accuracy against the oracle class, the kind each class is mostly of, the guard's rate."""
    routed = next((k for k in keys if k.startswith("routed:")), None)
    guarded = next((k for k in keys if k.startswith("guarded:")), None)
    oracle = next((k for k in keys if k.startswith("oracle:")), None)
    lines = ["### routing", "", "| kind | prompts | router = oracle class | router = the kind's class | guard fires |",
             "|---|---|---|---|---|"]
    if not routed:
        return []
    by_class: dict[str, dict[str, int]] = {}
    for i, r in records.items():
        by_class.setdefault(kinds[i], {}).setdefault(r["results"][routed]["class"], 0)
        by_class[kinds[i]][r["results"][routed]["class"]] += 1
    kind_class = {k: max(v, key=v.get) for k, v in by_class.items()}  # the class most of a kind goes to
    for kind in [None, *sorted(set(kinds.values()))]:
        rows = [(i, r) for i, r in sorted(records.items()) if kind is None or kinds[i] == kind]
        hit_oracle = [float(r["results"][routed]["class"] == r["results"][oracle]["class"]) for _, r in rows] if oracle else []
        hit_kind = [float(r["results"][routed]["class"] == kind_class[kinds[i]]) for i, r in rows]
        fires = [float(bool(r["results"][guarded].get("guarded"))) for _, r in rows] if guarded else []
        lines.append(f"| {kind or 'all'} | {len(rows)} | {interval(mean_ci(hit_oracle)) if oracle else '—'} | "
                     f"{interval(mean_ci(hit_kind))} | {interval(mean_ci(fires)) if guarded else '—'} |")
    return lines + ["", f"Each kind's class (where most of its prompts go): {kind_class}", ""]


def paired(records: dict[int, dict], kinds: dict[int, str], keys: list[str]) -> list[str]:
    """The targets' comparisons, paired per prompt: discovered classes (+ router, + guard) against the
    hand-labeled classes, per kind; and what the guard recovers on the prompts it fires on."""
    find = lambda prefix: next((k for k in keys if k.startswith(prefix)), None)  # noqa: E731
    labeled, routed, guarded = find("labeled:"), find("routed:"), find("guarded:")
    if not (labeled and routed):
        return []
    lines = ["### against the hand-labeled classes (paired differences)", "",
             "| kind | setting | ROUGE-L − labeled | gold ll − labeled | agreement − labeled |", "|---|---|---|---|---|"]
    for kind in [None, *sorted(set(kinds.values()))]:
        rows = [r["results"] for i, r in sorted(records.items()) if kind is None or kinds[i] == kind]
        for key in (k for k in (routed, guarded) if k):
            cells = [interval(diff_ci([r[key][m] for r in rows], [r[labeled][m] for r in rows]))
                     for m in ("rougeL", "gold_ll", "agree_rougeL")]
            lines.append(f"| {kind or 'all'} | {label(key)} | " + " | ".join(cells) + " |")
    if guarded:
        fired = [r["results"] for r in records.values() if r["results"][guarded].get("guarded")]
        if fired:
            lines += ["", f"On the {len(fired)} prompts the guard fired on (they run the full model), guard − router:"]
            for m, what in (("rougeL", "ROUGE-L"), ("gold_ll", "gold ll"), ("agree_rougeL", "agreement")):
                d = diff_ci([r[guarded][m] for r in fired], [r[routed][m] for r in fired])
                lines.append(f"- {what}: {interval(d)}")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("eval_dir", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--label-field", default="kind")
    p.add_argument("-o", "--output", type=Path, default=None)
    a = p.parse_args()
    header, records = read_results(a.eval_dir / RESULTS_FILE)
    kinds = {i: json.loads(line)[a.label_field] for i, line in enumerate(a.data.read_text().splitlines())}
    keys = list(next(iter(records.values()))["results"])
    lines = [f"## {len(records)} prompts of {a.data.name}", ""]
    for kind in [None, *sorted({kinds[i] for i in records})]:
        lines += table(records, kinds, keys, kind)
    lines += routing(records, kinds, keys)
    lines += paired(records, kinds, keys)
    text = "\n".join(lines)
    print(text)
    if a.output:
        a.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
