"""Prompt classes: one set of experts for every prompt of a kind ("news summaries").

Each prompt of the class gets one full-model prefill (`export.layer_scores`), which gives
its GRIFFIN scores s_p [L, D_ff]. A `ClassStatistic` keeps running float64 sums of a few
per-prompt terms, and every aggregation in `AGGREGATIONS` is a function of those sums, so
memory is O(L × D_ff) whatever the number of prompts, the prompts are read as a stream,
and the result does not depend on their order.

    lm = load_model()
    result = export_class(lm, iter_prompts(["xsum.jsonl"], field="article"), ClassSettings("news"))
    write_bundle(result.bundle, "news.safetensors")      # then: load_runtime(..., new_prompts=True)

Also here: the paper's classification mode (`classification_logits`), where the experts
come from all tokens but the last and only the last position runs through them.
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .arch import ff_blocks, per_layer, sliced
from .bundle import Bundle
from .errors import GriffinError
from .export import ExportSettings, bundle_from_indices, expert_weights, layer_scores, read_prompt, tokenize
from .jsonl import parse_object, text_field
from .models import LoadedModel
from .prefill import forward, new_cache
from .select import check_density, k_for, select_all
from .statistic import FFStatistic, recording

# Selection methods that make sense on a class score (magnitude and random ignore the prompts).
CLASS_METHODS = ("topk", "sample", "topk_sample")

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


def count_prompts(paths: Sequence[str | os.PathLike], field: str = "prompt", limit: int | None = None) -> int:
    """Read every input once without a model: counts prompts for the progress bar and
    raises on bad input (naming file and line) before any prefill is spent."""
    return sum(1 for _ in iter_prompts(paths, field, limit))


# -- aggregation -------------------------------------------------------------------------


@dataclass
class ClassStatistic:
    """Running sums over prompts of per-prompt terms [L, D_ff], float64.

    s_p are one prompt's scores (column L2 norms of its row-normalized activations).
    Float64 sums keep the result independent of prompt order (to ~1e-16).
    """

    num_layers: int
    d_ff: int
    k: int  # the class's per-layer k, for the top-k frequency
    prompts: int = 0
    tokens: int = 0
    normalized: torch.Tensor = field(init=False)  # Σ_p s_p / ‖s_p‖ per layer
    squared: torch.Tensor = field(init=False)  # Σ_p s_p²: sums of squares over all the class's tokens
    in_topk: torch.Tensor = field(init=False)  # Σ_p 1[j ∈ top-k(s_p)]

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.d_ff)
        self.normalized = torch.zeros(shape, dtype=torch.float64)
        self.squared = torch.zeros(shape, dtype=torch.float64)
        self.in_topk = torch.zeros(shape, dtype=torch.float64)

    def add(self, scores: torch.Tensor, tokens: int = 0) -> None:
        """One prompt's scores [L, D_ff]."""
        s = scores.detach().to(torch.float64).cpu()
        self.normalized += s / s.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        self.squared += s.square()
        top = torch.topk(s, self.k, dim=-1).indices  # [L, k]
        self.in_topk.scatter_add_(1, top, torch.ones_like(top, dtype=torch.float64))
        self.prompts += 1
        self.tokens += tokens


def _mean(st: ClassStatistic) -> torch.Tensor:
    # each token's activation row has unit norm, so ‖s_p‖² is the prompt's token count and
    # s_p/‖s_p‖ is the per-token RMS: long and short prompts vote alike
    return st.normalized / st.prompts


def _topk_freq(st: ClassStatistic) -> torch.Tensor:
    # the fraction of prompts whose top-k holds the neuron; ties (common with few prompts)
    # broken by `mean`, which is in [0, 1], so scaled by 1/2 it never crosses a count step
    return (st.in_topk + 0.5 * _mean(st)) / st.prompts


def _pooled(st: ClassStatistic) -> torch.Tensor:
    return st.squared.sqrt()


@dataclass(frozen=True)
class Aggregation:
    name: str
    help: str
    score: Callable[[ClassStatistic], torch.Tensor]  # -> class score [L, D_ff]


AGGREGATIONS: dict[str, Aggregation] = {a.name: a for a in (
    Aggregation("mean", "mean of the prompts' scores, each normalized to unit L2 norm per layer "
                        "(every prompt has one equal vote)", _mean),
    Aggregation("topk_freq", "fraction of prompts whose own top-k holds the neuron (ties broken by mean)",
                _topk_freq),
    Aggregation("pooled", "the GRIFFIN statistic over all the class's tokens as if one long prompt "
                          "(long prompts weigh more)", _pooled),
)}
# pooled kept the gold summaries' likelihood best in bench/class_aggregation.py (XSum, see README)
DEFAULT_AGGREGATION = "pooled"


def check_aggregation(name: str) -> Aggregation:
    try:
        return AGGREGATIONS[name]
    except KeyError:
        raise GriffinError(f"unknown aggregation {name!r}; known: {', '.join(AGGREGATIONS)}") from None


# -- the class export --------------------------------------------------------------------


@dataclass
class ClassSettings:
    name: str
    aggregation: str = DEFAULT_AGGREGATION
    density: float = 0.5
    method: str = "topk"
    seed: int = 0
    chunk_size: int = 512
    chat: bool = False

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise GriffinError("a class needs a name (--name)")
        check_aggregation(self.aggregation)
        check_density(self.density)
        if self.method not in CLASS_METHODS:
            raise GriffinError(f"method {self.method!r} does not use the prompts; a class takes one of "
                               f"{', '.join(CLASS_METHODS)}")

    def export_settings(self) -> ExportSettings:
        return ExportSettings(density=self.density, method=self.method, seed=self.seed,
                              chunk_size=self.chunk_size, keep_kv=False, chat=self.chat)


@dataclass
class ClassResult:
    bundle: Bundle
    statistic: ClassStatistic
    skipped: int  # prompts longer than the context
    first_skipped: str | None  # where the first one was


def _over_context(lm: LoadedModel, e: GriffinError) -> bool:
    # export.tokenize refuses prompts that do not fit with this message (export.check_context)
    return lm.context_length is not None and "the model's context is" in str(e)


def class_statistic(lm: LoadedModel, prompts: Iterable[Prompt], settings: ClassSettings, *,
                    total: int | None = None, progress: bool = False) -> tuple[ClassStatistic, int, str | None]:
    """One full prefill per prompt, folded into a ClassStatistic. Prompts that do not fit the
    context are skipped and counted, never truncated. Returns (statistic, skipped, first skipped)."""
    export = settings.export_settings()
    stat = ClassStatistic(lm.num_layers, lm.d_ff, k_for(settings.density, lm.d_ff))
    skipped, first_skipped = 0, None
    bar = tqdm(total=total, desc=f"class {settings.name}", unit="prompt", disable=not progress)
    try:
        for prompt in prompts:
            try:
                ids = tokenize(lm, prompt.text, chat=settings.chat)
            except GriffinError as e:
                if not _over_context(lm, e):
                    raise GriffinError(f"{prompt.where}: {e}") from e
                skipped += 1
                first_skipped = first_skipped or prompt.where
                bar.set_postfix(skipped=skipped)
            else:
                scores, _, _ = layer_scores(lm, ids, export)  # the cache is dropped right here
                stat.add(scores, tokens=ids.shape[1])
            bar.update(1)
    finally:
        bar.close()
    return stat, skipped, first_skipped


def class_indices(stat: ClassStatistic, settings: ClassSettings) -> list[torch.Tensor]:
    if stat.prompts == 0:
        raise GriffinError("no prompt to aggregate")
    scores = check_aggregation(settings.aggregation).score(stat).float()
    return select_all(scores, stat.k, settings.method, settings.seed)


def export_class(lm: LoadedModel, prompts: Iterable[Prompt], settings: ClassSettings, *,
                 total: int | None = None, progress: bool = False, source: str = "") -> ClassResult:
    """Many prompts -> one class bundle (experts only: no KV, prompt ids or logits)."""
    stat, skipped, first = class_statistic(lm, prompts, settings, total=total, progress=progress)
    if stat.prompts == 0:
        why = f"all {skipped} prompts are longer than the model's context" if skipped else "no prompts"
        raise GriffinError(f"class {settings.name!r}: {why}; nothing to export")
    indices = class_indices(stat, settings)
    extra = {"class": settings.name, "prompts": str(stat.prompts), "skipped": str(skipped),
             "aggregation": settings.aggregation}
    if source:
        extra["source"] = source
    # prompt_tokens of a class bundle: the tokens its statistic was computed from
    bundle = bundle_from_indices(lm, indices, settings.export_settings(), prompt_tokens=stat.tokens,
                                 kind="class", extra=extra)
    return ClassResult(bundle, stat, skipped, first)


# -- experts in place, and the classification mode -----------------------------------------


@contextmanager
def experts(lm: LoadedModel, indices: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run the model with only `indices` [k_i] per layer; the full FF linears come back after."""
    if getattr(lm.model, "_griffin_experts", False):
        raise GriffinError("this model already has a runtime's experts installed; use a fresh base model")
    blocks = ff_blocks(lm.model, lm.spec)
    with sliced(blocks, lm.spec, per_layer(blocks, expert_weights(lm, list(indices)))):
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
