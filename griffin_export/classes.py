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

Also here: the paper's classification mode (`classification_logits`), where the experts
come from all tokens but the last and only the last position runs through them.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .arch import ff_blocks
from .bundle import Bundle
from .choices import CLASS_METHODS
from .errors import GriffinError
from .settings import ClassSettings
from .experts import installed
from .aggregate import (AGGREGATIONS, DEFAULT_AGGREGATION, Aggregation, ClassStatistic, Shard,  # noqa: F401
                        StatisticInfo, check_aggregation)
from .export import (batch_statistic, bundle_from_indices, choose_experts, expert_weights,
                     prompt_statistic)
from .jsonl import parse_object, text_field
from .models import LoadedModel
from .prefill import forward, new_cache
from .prompts import OVER_CONTEXT, read_prompt, tokenize
from .budget import edge_budgets
from .select import k_for, select_all
from .statistic import FFStatistic, recording


# -- prompt sources ----------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    text: str
    where: str  # "file.jsonl:12" or "dir/a.txt": named in errors and warnings


def iter_prompts(paths: Sequence[str | os.PathLike], field: str = "prompt", limit: int | None = None
                 ) -> Iterator[Prompt]:
    """Prompts, one at a time, from JSONL files (`field` of each line), folders of .txt files
    (one prompt per file, sorted by name) and single text files, in the order given; the
    first `limit` only (over-context ones included: they are read, then skipped)."""
    if limit is not None and limit < 1:
        raise GriffinError(f"limit must be >= 1, got {limit}")
    return itertools.islice(_all_prompts(paths, field), limit)


def _all_prompts(paths: Sequence[str | os.PathLike], field: str) -> Iterator[Prompt]:
    if not paths:
        raise GriffinError("no input: give a JSONL file, a folder of .txt files, or text files")
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from _folder(path)
        elif not path.exists():
            raise GriffinError(f"input {raw} does not exist")
        elif path.suffix.lower() == ".jsonl":
            yield from _jsonl(path, field)
        else:
            yield Prompt(read_prompt(path), str(path))


def _folder(path: Path) -> Iterator[Prompt]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
    if not files:
        raise GriffinError(f"folder {path} has no .txt files")
    for f in files:
        yield Prompt(read_prompt(f), str(f))


def _jsonl(path: Path, field: str) -> Iterator[Prompt]:
    found = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GriffinError(f"{where}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not prompts
            text = text_field(parse_object(line, where), field, where, "; choose one with --field")
            found = True
            yield Prompt(text, where)
    if not found:
        raise GriffinError(f"{path} has no prompts (the file is empty)")


@dataclass(frozen=True)
class InputSet:
    prompts: int
    digest: str  # of every prompt's text in order: shards of one run must have read the same inputs


def survey_prompts(paths: Sequence[str | os.PathLike], field: str = "prompt", limit: int | None = None) -> InputSet:
    """Read every input once without a model: counts prompts for the progress bar and the shards,
    and raises on bad input (naming file and line) before any prefill is spent."""
    h = hashlib.blake2b(digest_size=12)
    n = 0
    for prompt in iter_prompts(paths, field, limit):
        data = prompt.text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
        n += 1
    return InputSet(n, h.hexdigest())


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


@contextmanager
def experts(lm: LoadedModel, indices: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run the model with only `indices` [k_i] per layer; the full FF linears come back after."""
    with installed(lm, expert_weights(lm, list(indices))):
        yield


def classification_logits(lm: LoadedModel, ids: torch.Tensor, *, density: float = 0.5, method: str = "topk",
                          seed: int = 0) -> torch.Tensor:
    """The paper's classification mode, for multiple-choice log-likelihood: one pass where the
    experts come from every token but the last and only the last position runs through them.

    ids [1, T], T >= 2 -> float32 logits [T, vocab]: rows 0..T-2 from the full model, row T-1
    (the one that scores the last choice token, or the answer) from the experts. The
    statistic of tokens 0..T-2 does not depend on the last token (causal attention), so this
    equals the paper's single forward with the last position masked.
    """
    if ids.shape[-1] < 2:
        raise GriffinError("classification mode needs at least 2 tokens (experts come from all but the last)")
    if method not in CLASS_METHODS:
        raise GriffinError(f"method {method!r} is not a prompt statistic; use one of {', '.join(CLASS_METHODS)}")
    blocks = ff_blocks(lm.model, lm.spec)
    stat = FFStatistic(len(blocks), lm.d_ff)
    cache = new_cache(lm.model)
    with recording(blocks, stat):
        prefix = forward(lm.model, ids[:, :-1], cache, last_only=False)  # [T-1, vocab]
    indices = select_all(stat.scores(), k_for(density, lm.d_ff), method, seed)
    with experts(lm, indices):
        last = forward(lm.model, ids[:, -1:], cache)  # [1, vocab]
    return torch.cat([prefix, last])


def choice_loglik(lm: LoadedModel, context: torch.Tensor, choice: torch.Tensor, **selection) -> float:
    """Σ log p(choice | context) in classification mode: context [1, C] + choice [1, N] ids.

    As in lm-eval, the model reads context + choice[:-1]; the experts come from all of that
    but its last token, whose position (the one predicting the last choice token) is pruned.
    """
    ids = torch.cat([context, choice], dim=1)[:, :-1]
    logits = classification_logits(lm, ids, **selection)[-choice.shape[1]:]  # [N, vocab]
    return float(torch.log_softmax(logits, dim=-1).gather(1, choice[0, :, None]).sum())
