"""Prompt classes: one set of experts for every prompt of a kind ("news summaries").

Each prompt of the class gets one full-model prefill (`export.prompt_statistic`), which gives
its GRIFFIN scores s_p [L, D_ff] (and, for the refit methods, its activations' Gram matrix).
A `ClassStatistic` (aggregate.py) keeps running float64 sums of a few per-prompt terms, and
every aggregation is a function of those sums, so memory is O(L × D_ff) (O(L × D_ff²) with
the Gram) whatever the number of prompts, the prompts are read as a stream, and the result
does not depend on their order. The refit methods solve once, on the class's Gram.

    lm = load_model()
    result = export_class(lm, iter_prompts(["xsum.jsonl"], field="article"), ClassSettings("news"))
    write_bundle(result.bundle, "news.safetensors")      # then: load_runtime(..., new_prompts=True)
    write_statistic(result.info, result.statistic, "news.stat.safetensors")   # class_bundle() from it later
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .. import registry
from ..bundle.format import Bundle
from ..errors import GriffinError
from ..files.inputs import Prompt, iter_prompts, survey_prompts
from ..method.export import bundle_from_indices, choose_experts
from ..method.selection import k_for
from ..model.load import LoadedModel, ModelSource
from ..settings import ClassSettings, CountSettings, plural
from .aggregate import ClassStatistic, Shard, StatisticInfo, merge, read_statistic
from .counting import Checkpoint, class_statistic, shard_of
from .ray_engine import ray_class_statistic, require_ray

__all__ = ["ClassCount", "ClassResult", "class_bundle", "count_class", "export_class", "merge_statistics"]

# -- the class export --------------------------------------------------------------------


@dataclass
class ClassResult:
    bundle: Bundle
    statistic: ClassStatistic
    info: StatisticInfo  # what the statistic was counted on; write_statistic saves both
    first_skipped: str | None  # where the first over-context prompt was

    @property
    def skipped(self) -> int:  # prompts longer than the context
        return self.info.skipped


def class_bundle(lm: LoadedModel, info: StatisticInfo, stat: ClassStatistic, settings: ClassSettings, *,
                 source: str = "") -> Bundle:
    """A counted class (class_statistic, or read_statistic/merge of saved shards) -> its bundle."""
    where = info.extra.get("file", "the statistic")
    if stat.prompts == 0:
        many = "its one prompt is" if info.skipped == 1 else f"all {info.skipped} prompts are"
        why = f"{many} longer than the model's context" if info.skipped else "no prompts"
        raise GriffinError(f"class {settings.name!r}: {why}; nothing to export")
    if info.base_fingerprint != lm.fingerprint:
        raise GriffinError(f"{where} was counted on {info.base_model} (fingerprint {info.base_fingerprint[:16]}), "
                           f"not on {lm.identity}; pass that model as model=DIR_OR_GGUF")
    if info.chat != settings.chat:
        raise GriffinError(f"{where} was counted {'with' if info.chat else 'without'} chat=True; "
                           f"{'pass' if info.chat else 'drop'} chat=True so new prompts are read the same way")
    if settings.refit and stat.gram is None:
        raise GriffinError(f"{settings.method} solves on the class's Gram matrices, and {where} has none (it was "
                           "counted for a method without a refit); count the prompts again with a refit `method`")
    aggregation = registry.aggregation(settings.aggregation)
    k = k_for(settings.density, lm.d_ff)
    if aggregation.uses_k and k != stat.k:
        raise GriffinError(f"aggregation {aggregation.name} counts each prompt's top-k, and {where} counted it at "
                           f"k={stat.k} of {lm.d_ff} (density {stat.k / lm.d_ff:.4g}); use that density, or pooled / "
                           "mean, which hold at any density")
    scores = aggregation.score(stat).float()
    # strict: a class bundle is made one at a time, and a user who asked for a per-layer budget the
    # method cannot meet is told (per prompt it falls back to uniform widths, so evaluation grids run through)
    indices, weights = choose_experts(lm, settings.method, scores, settings.density, settings.seed,
                                      gram=stat.gram, refit_lambda=settings.refit_lambda, strict=True)
    extra = {"class": settings.name, "prompts": str(stat.prompts), "skipped": str(info.skipped),
             "aggregation": settings.aggregation}
    if settings.refit:
        extra["refit_lambda"] = str(settings.refit_lambda)
    if source:
        extra["source"] = source
    # prompt_tokens of a class bundle: the tokens its statistic was computed from
    return bundle_from_indices(lm, indices, settings.export_settings(), prompt_tokens=stat.tokens,
                               kind="class", extra=extra, weights=weights)


def export_class(lm: LoadedModel, prompts: Iterable[Prompt], settings: ClassSettings, *,
                 total: int | None = None, progress: bool = False, source: str = "", batch_size: int = 1
                 ) -> ClassResult:
    """Many prompts -> one class bundle (experts only: no KV, prompt ids or logits), with the statistic
    it came from (write_statistic saves it; class_bundle makes bundles at other densities from it).
    The prompts are read as a stream, one full prefill each.

        result = export_class(lm, iter_prompts(["news.jsonl"], field="article"), ClassSettings("news"))
        write_bundle(result.bundle, "news.safetensors")
    """
    info, stat, first = class_statistic(lm, prompts, settings, total=total, progress=progress, batch_size=batch_size)
    if source:
        info.extra["source"] = source
    return ClassResult(class_bundle(lm, info, stat, settings, source=source), stat, info, first)


# -- counting a class from its inputs or its saved statistics ------------------------------------


@dataclass
class ClassCount:
    """A class counted (or its saved statistics merged), ready for class_bundle or write_statistic."""

    lm: LoadedModel
    info: StatisticInfo
    stat: ClassStatistic
    first_skipped: str | None = None  # where the first over-context prompt was
    rows: int = 0  # prompts this count read (a shard's, or all of them)


def count_class(inputs: Sequence[str | os.PathLike], settings: ClassSettings, source: ModelSource | None = None,
                count: CountSettings | None = None, *, checkpoint: Checkpoint | None = None, progress: bool = False,
                report: Callable[[str], None] | None = None) -> ClassCount:
    """A class's prompts counted into its statistic: every input read once first (a bad line fails
    here, not after an hour), the model checked and loaded, then the prompts of `count` (all of them,
    or one shard) counted here or on Ray. `checkpoint`: where a local count keeps its progress; with
    count.resume a count continues from it. `report` gets a line before each long step."""
    source, count = source or ModelSource(), count or CountSettings()
    report = report or (lambda line: None)
    if count.engine == "ray":
        require_ray()
    survey = survey_prompts(inputs, count.field, count.limit)
    part = Shard.parse(count.shard) if count.shard else None
    rows = part.rows(survey.prompts) if part else range(survey.prompts)
    facts = source.peek()  # the device and the architecture, before any weights
    if facts.d_ff:
        k_for(settings.density, facts.d_ff)
    report(f"{plural(survey.prompts, 'prompt')}{f', shard {part}: {len(rows)} of them' if part else ''}; loading "
           f"model {source.model or 'default (SmolLM2-135M-Instruct)'} ...")
    lm = source.load(quiet=not progress)
    info = StatisticInfo(base_model=lm.identity, base_fingerprint=lm.fingerprint, architecture=lm.architecture,
                         num_layers=lm.num_layers, d_ff=lm.d_ff, k=k_for(settings.density, lm.d_ff),
                         inputs_prompts=survey.prompts, inputs_digest=survey.digest, shard=str(part) if part else "",
                         extra={"source": ", ".join(Path(i).name for i in inputs)})
    prompts = iter_prompts(inputs, count.field, count.limit)
    if part:
        prompts = shard_of(prompts, part, survey.prompts)
    if count.engine == "ray":
        counted = ray_class_statistic(source.portable(), prompts, settings, count, fingerprint=lm.fingerprint,
                                      total=len(rows), progress=progress)
        counted[0].inputs_prompts, counted[0].inputs_digest, counted[0].shard = survey.prompts, survey.digest, info.shard
        counted[0].extra.update(info.extra)
    else:
        counted = class_statistic(lm, prompts, settings, total=len(rows), progress=progress,
                                  batch_size=count.batch_size, info=info,
                                  checkpoint=checkpoint, resume=count.resume)
    return ClassCount(lm, counted[0], counted[1], counted[2], len(rows))


def merge_statistics(paths: Sequence[str | os.PathLike], source: ModelSource | None = None, *, shards: bool = False,
                     report: Callable[[str], None] | None = None) -> ClassCount:
    """Saved statistics (class --save-statistic) or, with `shards`, the complete set of one run's
    partial statistics (class --shard), summed; the model they were counted on (or `source`'s) loaded."""
    report = report or (lambda line: None)
    read = [read_statistic(p) for p in paths]
    if shards:
        whole = next((p for p, (info, _) in zip(paths, read) if not info.shard), None)
        if whole is not None:
            raise GriffinError(f"{whole} is a whole statistic, not a shard of `class --shard I/N`; build from it with "
                               "griffin-export class --statistic")
    info, stat = merge(read)  # bad or mismatched files fail here
    source = dataclasses.replace(source or ModelSource(), model=(source and source.model) or info.base_model)
    source.peek()
    report(f"{plural(len(paths), 'statistic')} of {plural(info.prompts, 'prompt')}; loading model {source.model} ...")
    return ClassCount(source.load(), info, stat, rows=info.prompts + info.skipped)
