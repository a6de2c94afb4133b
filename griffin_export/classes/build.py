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

import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..bundle.format import Bundle
from ..errors import GriffinError
from ..files.inputs import Prompt
from ..method.budget import edge_budgets
from ..method.export import (
    batch_statistic,
    bundle_from_indices,
    choose_experts,
    prompt_statistic,
)
from ..method.selection import k_for
from ..model.load import LoadedModel
from ..model.tokens import OVER_CONTEXT, tokenize
from ..settings import ClassSettings
from .aggregate import ClassStatistic, Shard, StatisticInfo, check_aggregation


def shard_of(prompts: Iterable[Prompt], shard: Shard, total: int) -> Iterator[Prompt]:
    """The prompts of one shard (a contiguous slice of the `total` prompts)."""
    rows = shard.rows(total)
    return itertools.islice(prompts, rows.start, rows.stop)


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


def _over_context(lm: LoadedModel, e: GriffinError) -> bool:
    # tokenize refuses prompts that do not fit with this message (prompts.check_context)
    return lm.context_length is not None and OVER_CONTEXT in str(e)


class ClassCounter:
    """Folds prompts into a class's statistic: one full prefill per prompt (or per batch of
    `batch_size`, right-padded), the Gram of the raw activations too for refit methods.
    Prompts that do not fit the context are skipped and counted, never truncated. A Ray
    worker holds one of these; `class_statistic` runs one here."""

    def __init__(self, lm: LoadedModel, settings: ClassSettings, *, batch_size: int = 1):
        if batch_size < 1:
            raise GriffinError(f"batch size must be >= 1, got {batch_size}")
        self.lm, self.settings, self.batch_size = lm, settings, batch_size
        self.stat = ClassStatistic(lm.num_layers, lm.d_ff, k_for(settings.density, lm.d_ff), with_gram=settings.refit)
        self.info = StatisticInfo(base_model=lm.identity, base_fingerprint=lm.fingerprint,
                                  architecture=lm.architecture, num_layers=lm.num_layers, d_ff=lm.d_ff,
                                  k=self.stat.k, chat=settings.chat, name=settings.name, method=settings.method,
                                  aggregation=settings.aggregation)
        self.first_skipped: str | None = None

    def feed(self, prompts: Iterable[Prompt], on_prompt=None) -> None:
        """Count these prompts in; `on_prompt()` after each one read (a progress bar)."""
        batch: list[torch.Tensor] = []
        for prompt in prompts:
            try:
                ids = tokenize(self.lm, prompt.text, chat=self.settings.chat)
            except GriffinError as e:
                if not _over_context(self.lm, e):
                    raise GriffinError(f"{prompt.where}: {e}") from e
                self.info.skipped += 1
                self.first_skipped = self.first_skipped or prompt.where
            else:
                batch.append(ids)
                if len(batch) == self.batch_size:
                    self._count(batch)
                    batch = []
            if on_prompt is not None:
                on_prompt()
        if batch:
            self._count(batch)

    def _count(self, batch: list[torch.Tensor]) -> None:
        chunk, gram = self.settings.chunk_size, self.settings.refit
        if len(batch) == 1:
            # the cache is dropped right here; the Gram ([L, D_ff, D_ff] float32) is folded in and dropped too
            one, _, _ = prompt_statistic(self.lm, batch[0], chunk_size=chunk, gram=gram)
            self.stat.add(one.scores(), tokens=batch[0].shape[1], gram=one.gram)
            return
        many = batch_statistic(self.lm, batch, chunk_size=chunk, gram=gram)
        for row, n in zip(many.rows, many.lengths):
            self.stat.add_scores(row.scores(), n)
        if many.gram is not None:
            self.stat.add_gram(many.gram)

    def result(self) -> tuple[StatisticInfo, ClassStatistic, str | None]:
        self.info.prompts, self.info.tokens = self.stat.prompts, self.stat.tokens
        return self.info, self.stat, self.first_skipped


def class_statistic(lm: LoadedModel, prompts: Iterable[Prompt], settings: ClassSettings, *,
                    total: int | None = None, progress: bool = False, batch_size: int = 1
                    ) -> tuple[StatisticInfo, ClassStatistic, str | None]:
    """The prompts folded into a ClassStatistic here, in this process (ClassCounter).
    Returns (info, statistic, where the first skipped prompt was)."""
    counter = ClassCounter(lm, settings, batch_size=batch_size)
    bar = tqdm(total=total, desc=f"class {settings.name}", unit="prompt", disable=not progress)

    def on_prompt() -> None:
        if counter.info.skipped:
            bar.set_postfix(skipped=counter.info.skipped, refresh=False)
        bar.update(1)

    try:
        counter.feed(prompts, on_prompt=on_prompt)
    finally:
        bar.close()
    return counter.result()


def class_bundle(lm: LoadedModel, info: StatisticInfo, stat: ClassStatistic, settings: ClassSettings, *,
                 source: str = "") -> Bundle:
    """A counted class (class_statistic, or read_statistic/merge of saved shards) -> its bundle."""
    where = info.extra.get("file", "the statistic")
    if stat.prompts == 0:
        why = f"all {info.skipped} prompts are longer than the model's context" if info.skipped else "no prompts"
        raise GriffinError(f"class {settings.name!r}: {why}; nothing to export")
    if info.base_fingerprint != lm.fingerprint:
        raise GriffinError(f"{where} was counted on {info.base_model} (fingerprint {info.base_fingerprint[:16]}), "
                           f"not on {lm.identity}; pass that model with --model")
    if info.chat != settings.chat:
        raise GriffinError(f"{where} was counted {'with' if info.chat else 'without'} --chat; "
                           f"{'pass' if info.chat else 'drop'} --chat so new prompts are read the same way")
    if settings.refit and stat.gram is None:
        raise GriffinError(f"{settings.method} solves on the class's Gram matrices, and {where} has none (it was "
                           "counted for a method without a refit); count the prompts again with a refit --method")
    aggregation = check_aggregation(settings.aggregation)
    k = k_for(settings.density, lm.d_ff)
    if aggregation.uses_k and k != stat.k:
        raise GriffinError(f"aggregation {aggregation.name} counts each prompt's top-k, and {where} counted it at "
                           f"k={stat.k} of {lm.d_ff} (density {stat.k / lm.d_ff:.4g}); use that density, or pooled / "
                           "mean, which hold at any density")
    scores = aggregation.score(stat).float()
    if settings.method == "topk_refit_edges" and k < lm.d_ff and len(set(edge_budgets(lm.num_layers, lm.d_ff, k))) == 1:
        # per prompt this falls back to uniform widths (so evaluation grids run through); a class
        # bundle is made one at a time, and a user who asked for the edges is told
        raise GriffinError(f"topk_refit_edges cannot keep layers 0, 1 and the last whole at density {settings.density}: "
                           f"{lm.num_layers} layers × k={k} leave too few neurons for the others; use a larger "
                           "density or topk_refit")
    indices, weights = choose_experts(lm, settings.method, scores, settings.density, settings.seed,
                                      gram=stat.gram, refit_lambda=settings.refit_lambda)
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
    """Many prompts -> one class bundle (experts only: no KV, prompt ids or logits)."""
    info, stat, first = class_statistic(lm, prompts, settings, total=total, progress=progress, batch_size=batch_size)
    if source:
        info.extra["source"] = source
    return ClassResult(class_bundle(lm, info, stat, settings, source=source), stat, info, first)


# -- experts in place, and the classification mode -----------------------------------------


