"""Hand-labeled classes, the baseline discovery is measured against: one class bundle per kind of a
mixed log, each counted on that kind's prompts only (what a user who sorted the log by hand would
build with `griffin-export class`).

    python -m bench.labeled_classes bench/data/mixed_dev.jsonl --method topk_refit -o LABELED/

Writes LABELED/{kind}.safetensors, one per value of the rows' `kind` field: the folder that
`griffin-export eval --methods labeled:LABELED` reads. With `--statistics STATS` (what `discover
--save-statistics` kept for the same log) a method without a refit sums the kind's prompts'
statistics instead of prefilling them again: the same class statistic.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from griffin_export.bundle.format import write_bundle
from griffin_export.classes.build import class_bundle, count_class
from griffin_export.model.load import ModelSource, use_threads
from griffin_export.registry import CLASS_METHODS
from griffin_export.settings import ClassSettings, CountSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=Path)
    p.add_argument("--label-field", default="kind")
    p.add_argument("--method", choices=CLASS_METHODS, default="topk_refit")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--model", default=None, help="the base model [default: the default model]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--statistics", type=Path, default=None, help="the log's statistics (discover --save-statistics)")
    p.add_argument("-o", "--output", type=Path, required=True)
    a = p.parse_args()
    use_threads(a.threads)
    rows = [json.loads(line) for line in a.log.read_text().splitlines() if line.strip()]
    kinds = sorted({r[a.label_field] for r in rows})
    a.output.mkdir(parents=True, exist_ok=True)
    if a.statistics is not None:
        return from_statistics(a, rows, kinds)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            part = Path(tmp) / f"{kind}.jsonl"
            part.write_text("".join(json.dumps(r) + "\n" for r in rows if r[a.label_field] == kind))
            settings = ClassSettings(kind, density=a.density, method=a.method)
            counted = count_class([part], settings, ModelSource(a.model), CountSettings(), progress=True)
            path = write_bundle(class_bundle(counted.lm, counted.info, counted.stat, settings, source=a.log.name),
                                a.output / f"{kind}.safetensors", force=True)
            print(f"wrote {path}: {counted.stat.prompts} prompts of {kind}")


def from_statistics(a: argparse.Namespace, rows: list[dict], kinds: list[str]) -> None:
    """The kinds' class statistics summed from the saved per-prompt statistics (no prefill)."""
    import numpy as np

    from griffin_export.classes.aggregate import StatisticInfo
    from griffin_export.classes.discover import class_of, read_log_statistics
    from griffin_export.files.inputs import iter_prompts, survey_prompts

    lm = ModelSource(a.model).load()
    log = read_log_statistics(a.statistics, lm, list(iter_prompts([a.log])), survey_prompts([a.log]).digest)
    by_where = {f"{a.log}:{i + 1}": r[a.label_field] for i, r in enumerate(rows)}
    labels = np.array([by_where[p.where] for p in log.prompts])
    for kind in kinds:
        settings = ClassSettings(kind, density=a.density, method=a.method)
        if settings.refit:
            raise SystemExit(f"{a.method} needs the Gram of the kind's prompts: count them (leave out --statistics)")
        stat = class_of(lm, log, np.flatnonzero(labels == kind), settings)
        info = StatisticInfo(base_model=lm.identity, base_fingerprint=lm.fingerprint, architecture=lm.architecture,
                             num_layers=lm.num_layers, d_ff=lm.d_ff, k=stat.k, prompts=stat.prompts, tokens=stat.tokens,
                             name=kind, method=a.method, aggregation=settings.aggregation)
        path = write_bundle(class_bundle(lm, info, stat, settings, source=a.log.name), a.output / f"{kind}.safetensors",
                            force=True)
        print(f"wrote {path}: {stat.prompts} prompts of {kind}")


if __name__ == "__main__":
    main()
