"""Counting a class's prompts into its statistic, here in this process: one full-model prefill per
prompt (or per right-padded batch), folded into running sums (aggregate.ClassStatistic). A long
count can be checkpointed and resumed: the partial statistic is written every few minutes, and a
resumed count skips the prompts it holds. A Ray worker (ray_engine.py) runs the same counter."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import GriffinError
from ..files.inputs import Prompt
from ..method.export import batch_statistic, prompt_statistic
from ..method.selection import k_for
from ..model.load import LoadedModel
from ..model.tokens import OVER_CONTEXT, tokenize
from ..settings import ClassSettings
from .aggregate import ClassStatistic, Shard, StatisticInfo, read_statistic, write_statistic


def shard_of(prompts: Iterable[Prompt], shard: Shard, total: int) -> Iterator[Prompt]:
    """The prompts of one shard (a contiguous slice of the `total` prompts)."""
    rows = shard.rows(total)
    return itertools.islice(prompts, rows.start, rows.stop)


@dataclass(frozen=True)
class Checkpoint:
    """Where a count keeps its progress: the partial statistic, rewritten (atomically) at most every
    `every_s` seconds and removed when the count completes."""

    path: Path
    every_s: float = 120.0


def _over_context(lm: LoadedModel, e: GriffinError) -> bool:
    # tokenize refuses prompts that do not fit with this message (prompts.check_context)
    return lm.context_length is not None and OVER_CONTEXT in str(e)


class ClassCounter:
    """Folds prompts into a class's statistic: one full prefill per prompt (or per batch of
    `batch_size`, right-padded), the Gram of the raw activations too for refit methods.
    Prompts that do not fit the context are skipped and counted, never truncated. A Ray
    worker holds one of these; `class_statistic` runs one here."""

    def __init__(self, lm: LoadedModel, settings: ClassSettings, *, batch_size: int = 1,
                 checkpoint: Checkpoint | None = None):
        if batch_size < 1:
            raise GriffinError(f"batch size must be >= 1, got {batch_size}")
        self.lm, self.settings, self.batch_size, self.checkpoint = lm, settings, batch_size, checkpoint
        self.stat = ClassStatistic(lm.num_layers, lm.d_ff, k_for(settings.density, lm.d_ff), with_gram=settings.refit)
        self.info = StatisticInfo(base_model=lm.identity, base_fingerprint=lm.fingerprint,
                                  architecture=lm.architecture, num_layers=lm.num_layers, d_ff=lm.d_ff,
                                  k=self.stat.k, chat=settings.chat, name=settings.name, method=settings.method,
                                  aggregation=settings.aggregation)
        self.first_skipped: str | None = None
        self._saved = time.monotonic()

    @property
    def read(self) -> int:
        """Prompts read so far, counted or skipped: where a resumed count starts."""
        return self.stat.prompts + self.info.skipped

    def resume(self, path: Path) -> int:
        """Continue from a checkpoint of the same count; returns the prompts it holds (to skip)."""
        info, stat = read_statistic(path)
        mine = self.info
        for key, what in (("base_fingerprint", "another model"), ("inputs_digest", "other prompts"),
                          ("shard", "another shard"), ("name", "another class name"), ("method", "another method"),
                          ("aggregation", "another aggregation"), ("chat", "another chat setting"), ("k", "another density")):
            if getattr(info, key) != getattr(mine, key):
                raise GriffinError(f"{path} holds a count of {what} ({key} {getattr(info, key)!r}, here "
                                   f"{getattr(mine, key)!r}); start over without resume=True")
        if (stat.gram is None) != (self.stat.gram is None):
            raise GriffinError(f"{path} was counted for a method {'without' if stat.gram is None else 'with'} a refit; "
                               "start over without resume=True")
        self.stat, self.info = stat, info
        self.info.extra.pop("file", None)
        return self.read

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
            if not batch:  # every prompt read so far is in the sums: a consistent point to save
                self._maybe_save()
            if on_prompt is not None:
                on_prompt()
        if batch:
            self._count(batch)

    def _maybe_save(self) -> None:
        if self.checkpoint is None or time.monotonic() - self._saved < self.checkpoint.every_s:
            return
        info, stat, _ = self.result()
        write_statistic(info, stat, self.checkpoint.path, force=True)
        self._saved = time.monotonic()

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
                    total: int | None = None, progress: bool = False, batch_size: int = 1,
                    info: StatisticInfo | None = None, checkpoint: Checkpoint | None = None, resume: bool = False
                    ) -> tuple[StatisticInfo, ClassStatistic, str | None]:
    """The prompts folded into a ClassStatistic here, in this process (ClassCounter).
    Returns (info, statistic, where the first skipped prompt was). `info`: what the count is of
    (inputs digest, shard), recorded in it and in its checkpoints; with `resume`, the checkpoint's
    prompts are not counted again (a checkpoint that is not there: the count starts over)."""
    counter = ClassCounter(lm, settings, batch_size=batch_size, checkpoint=checkpoint)
    if info is not None:
        for key in ("inputs_prompts", "inputs_digest", "shard", "extra"):
            setattr(counter.info, key, getattr(info, key))
    skip = counter.resume(checkpoint.path) if resume and checkpoint is not None and checkpoint.path.is_file() else 0
    prompts = itertools.islice(prompts, skip, None)
    bar = tqdm(total=total, initial=skip, desc=f"class {settings.name}", unit="prompt", disable=not progress)

    def on_prompt() -> None:
        if counter.info.skipped:
            bar.set_postfix(skipped=counter.info.skipped, refresh=False)
        bar.update(1)

    try:
        counter.feed(prompts, on_prompt=on_prompt)
    finally:
        bar.close()
    if checkpoint is not None:
        checkpoint.path.unlink(missing_ok=True)  # complete: nothing to resume
    return counter.result()


