"""A class's statistic: running sums over its prompts, the aggregations read from them, and
the statistic file that lets shards of a class be merged exactly.

Every term is a float64 sum over prompts, so the statistic is independent of prompt order (to
~1e-16), memory does not grow with the number of prompts, and two statistics of the same model
and k add up to the statistic of their prompts together (`merge`): a class can be counted in
shards and the shards summed. With `gram=True` the sums include the raw activations' Gram
matrix Σ ZᵀZ over all the class's tokens ([L, D_ff, D_ff]), which the refit methods solve on.

    write_statistic(stat, "news.stat.safetensors")           # griffin-export class --save-statistic
    stat = merge([read_statistic(p) for p in shards])        # griffin-export class-merge part-*.safetensors

A partial statistic (`griffin-export class --shard I/N`) counts the I-th of N slices of the
prompts; `merge` takes a complete set of them (every shard once, all from one run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..bundle.format import parse_metadata, read_file, str_metadata
from ..errors import GriffinError
from ..files.outputs import atomic_output, check_output_path

STATISTIC_FORMAT = "griffin-class-statistic"
STATISTIC_VERSION = "2"  # 2: the class's settings, its inputs and the shard (1 is read too)
_TERMS = ("normalized", "squared", "in_topk")  # tensor names in the file, besides "gram"


@dataclass
class StatisticInfo:
    """What a statistic was counted on: it only merges with, and only exports for, the same model."""

    base_model: str
    base_fingerprint: str
    architecture: str
    num_layers: int
    d_ff: int
    k: int  # the k of the top-k frequency term
    prompts: int = 0
    tokens: int = 0
    skipped: int = 0  # prompts longer than the context, not counted
    chat: bool = False
    # what the statistic was counted for: class-merge builds with these unless told otherwise
    name: str = ""
    method: str = ""
    aggregation: str = ""
    # the whole input set (every shard reads all of it): prompt count and a digest of the texts
    inputs_prompts: int = 0
    inputs_digest: str = ""
    shard: str = ""  # "I/N" for a partial statistic of shard I of N, "" for a whole one
    format: str = STATISTIC_FORMAT
    format_version: str = STATISTIC_VERSION
    extra: dict[str, str] = field(default_factory=dict)  # e.g. source files


@dataclass
class ClassStatistic:
    """Running sums over prompts of per-prompt terms [L, D_ff] (and the Gram), float64.

    s_p are one prompt's scores (column L2 norms of its row-normalized activations).
    """

    num_layers: int
    d_ff: int
    k: int  # the class's per-layer k, for the top-k frequency
    gram: torch.Tensor | None = None  # Σ_p Z_pᵀZ_p [L, D_ff, D_ff], with_gram only
    with_gram: bool = False
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
        if self.with_gram and self.gram is None:
            self.gram = torch.zeros(self.num_layers, self.d_ff, self.d_ff, dtype=torch.float64)

    def add(self, scores: torch.Tensor, tokens: int = 0, gram: torch.Tensor | None = None) -> None:
        """One prompt's scores [L, D_ff] (and its Gram [L, D_ff, D_ff] when the class keeps one)."""
        if (gram is None) == (self.gram is not None):
            raise ValueError("a prompt's Gram is needed exactly when the class keeps one")
        self.add_scores(scores, tokens)
        if gram is not None:
            self.add_gram(gram)

    def add_scores(self, scores: torch.Tensor, tokens: int) -> None:
        s = scores.detach().to(torch.float64).cpu()
        self.normalized += s / s.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        self.squared += s.square()
        top = torch.topk(s, self.k, dim=-1).indices  # [L, k]
        self.in_topk.scatter_add_(1, top, torch.ones_like(top, dtype=torch.float64))
        self.prompts += 1
        self.tokens += tokens

    def add_gram(self, gram: torch.Tensor) -> None:
        """The Gram of one or more prompts (a batch's sum): float32, summed here in float64."""
        self.gram += gram.detach().cpu()

    def terms(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name) for name in _TERMS}
        if self.gram is not None:
            out["gram"] = self.gram
        return out


# -- aggregations: (ClassStatistic) -> class score [L, D_ff] (registry.AGGREGATIONS names them) ----


def mean_score(st: ClassStatistic) -> torch.Tensor:
    # each token's activation row has unit norm, so ‖s_p‖² is the prompt's token count and
    # s_p/‖s_p‖ is the per-token RMS: long and short prompts vote alike
    return st.normalized / st.prompts


def topk_freq_score(st: ClassStatistic) -> torch.Tensor:
    # the fraction of prompts whose top-k holds the neuron; ties (common with few prompts)
    # broken by `mean`, which is in [0, 1], so scaled by 1/2 it never crosses a count step
    return (st.in_topk + 0.5 * mean_score(st)) / st.prompts


def pooled_score(st: ClassStatistic) -> torch.Tensor:
    return st.squared.sqrt()


# -- shards ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """The I-th of N disjoint, contiguous slices of a class's prompts (1 <= I <= N)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 1 <= self.index <= self.count):
            raise GriffinError(f"shard {self.index}/{self.count}: I/N needs 1 <= I <= N")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        i, sep, n = text.partition("/")
        if not (sep and i.strip().isdigit() and n.strip().isdigit()):
            raise GriffinError(f"`shard` {text!r}: write it as I/N, e.g. 2/8 (shards are numbered from 1)")
        return cls(int(i), int(n))

    def rows(self, total: int) -> range:
        """Which of `total` prompts (0-based) this shard counts: sizes differ by at most one."""
        return range((self.index - 1) * total // self.count, self.index * total // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _check_shards(infos: list[StatisticInfo]) -> None:
    """Partial statistics merge only as one complete set: the same run (inputs, class settings,
    shard count) and every shard 1..N exactly once."""
    sharded = [i for i in infos if i.shard]
    where = [i.extra.get("file", f"statistic {n + 1}") for n, i in enumerate(infos)]
    if not sharded:
        by_inputs: dict[str, str] = {}
        for info, w in zip(infos, where):
            if info.inputs_digest and info.inputs_digest in by_inputs:
                raise GriffinError(f"{by_inputs[info.inputs_digest]} and {w} were counted on the same prompts: "
                                   "merging them would count every prompt twice")
            by_inputs.setdefault(info.inputs_digest, w)
        return
    if len(sharded) != len(infos):
        whole = where[next(n for n, i in enumerate(infos) if not i.shard)]
        raise GriffinError(f"{whole} is a whole statistic, the others are shards; merge shards of one run only")
    first = infos[0]
    for n, info in enumerate(infos[1:], start=1):
        for key, what in (("inputs_digest", "other prompts"), ("name", "another class name"),
                          ("method", "another `method`"), ("aggregation", "another `aggregation`")):
            if getattr(info, key) != getattr(first, key):
                raise GriffinError(f"{where[n]} was counted on {what} ({key} {getattr(info, key)!r}) than "
                                   f"{where[0]} ({getattr(first, key)!r}); shards of one run must agree")
    check_shard_set([Shard.parse(i.shard) for i in infos], where, "merge the shards of one run",
                    "the merge would leave out their prompts")


def check_shard_set(shards: list[Shard], where: list[str], one_split: str, left_out: str) -> None:
    """Shards that make one whole: one split (the same N), every shard 1..N exactly once; `where` names
    each, `one_split` and `left_out` end the messages for shards of two splits and missing shards."""
    counts = {s.count for s in shards}
    if len(counts) > 1:
        raise GriffinError(f"the shards split the prompts {' and '.join(f'{c} ways' for c in sorted(counts))}; "
                           f"{one_split}")
    seen: dict[int, str] = {}
    for s, w in zip(shards, where):
        if s.index in seen:
            raise GriffinError(f"shard {s} is given twice ({seen[s.index]} and {w})")
        seen[s.index] = w
    missing = [f"{i}/{shards[0].count}" for i in range(1, shards[0].count + 1) if i not in seen]
    if missing:
        raise GriffinError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                           f"{'are' if len(missing) > 1 else 'is'} missing: {left_out}")


# -- merging and files -------------------------------------------------------------------


def merge(parts: Iterable[tuple[StatisticInfo, ClassStatistic]]) -> tuple[StatisticInfo, ClassStatistic]:
    """Shards of one class -> the statistic of all their prompts (sums of sums: exact up to float64
    rounding, in any order). Shards must share model, k and whether they hold a Gram."""
    parts = list(parts)
    if not parts:
        raise GriffinError("no statistic to merge")
    _check_shards([i for i, _ in parts])
    info0, st0 = parts[0]
    info = StatisticInfo(**{**info0.__dict__, "prompts": 0, "tokens": 0, "skipped": 0, "shard": "",
                            "extra": dict(info0.extra)})
    total = ClassStatistic(st0.num_layers, st0.d_ff, st0.k, with_gram=st0.gram is not None)
    for i, (part_info, st) in enumerate(parts):
        where = part_info.extra.get("file", f"statistic {i + 1}")
        if part_info.base_fingerprint != info.base_fingerprint:
            raise GriffinError(f"{where} was counted on {part_info.base_model}, the first on {info.base_model}: "
                               "statistics of different models do not add up")
        if (st.num_layers, st.d_ff, st.k) != (total.num_layers, total.d_ff, total.k):
            raise GriffinError(f"{where} has {st.num_layers} layers × d_ff {st.d_ff} at k={st.k}; the first has "
                               f"{total.num_layers} × {total.d_ff} at k={total.k} (count every shard at one density)")
        if (st.gram is None) != (total.gram is None):
            raise GriffinError(f"{where} {'lacks' if st.gram is None else 'has'} the Gram matrices the first "
                               f"{'has' if st.gram is None else 'lacks'}; count every shard with the same kind of `method`")
        if part_info.chat != info.chat:
            raise GriffinError(f"{where} was counted {'with' if part_info.chat else 'without'} chat=True, the first not")
        for name, t in st.terms().items():
            getattr(total, name).add_(t)
        total.prompts += st.prompts
        total.tokens += st.tokens
        info.prompts += part_info.prompts
        info.tokens += part_info.tokens
        info.skipped += part_info.skipped
    return info, total


def write_statistic(info: StatisticInfo, stat: ClassStatistic, path: str | os.PathLike, *, force: bool = False) -> Path:
    from safetensors.torch import save_file

    path = check_output_path(path, force)
    with atomic_output(path) as tmp:
        save_file({n: t.contiguous() for n, t in stat.terms().items()}, str(tmp), metadata=str_metadata(info))
    return path


def read_statistic(path: str | os.PathLike) -> tuple[StatisticInfo, ClassStatistic]:
    """A statistic file, checked: format, shapes, dtypes, finite sums, counts."""
    path = Path(path)
    meta, tensors = read_file(path, STATISTIC_FORMAT, ("1", STATISTIC_VERSION), "class statistic")
    info = parse_metadata(StatisticInfo, meta, str(path))
    info.extra["file"] = str(path)
    L, D = info.num_layers, info.d_ff
    if info.shard:
        try:
            Shard.parse(info.shard)
        except GriffinError:
            raise GriffinError(f"{path}: metadata shard={info.shard!r} is not I/N") from None
    empty_shard = info.shard and info.prompts == 0  # a shard whose prompts were all over-context
    if not (L >= 1 and D >= 1 and 1 <= info.k <= D and (info.prompts >= 1 or empty_shard)
            and info.tokens >= info.prompts):
        raise GriffinError(f"{path}: metadata layers={L}, d_ff={D}, k={info.k}, prompts={info.prompts}, "
                           f"tokens={info.tokens} do not describe a counted class")
    want = {n: (L, D) for n in _TERMS}
    if "gram" in tensors:
        want["gram"] = (L, D, D)
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != torch.float64:
            got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
            raise GriffinError(f"{path}: tensor {name} should be float64 {list(shape)}, found {got}")
        if not bool(torch.isfinite(t).all()):
            raise GriffinError(f"{path}: tensor {name} holds non-finite values")
    if set(tensors) - set(want):
        raise GriffinError(f"{path}: unexpected tensors {sorted(set(tensors) - set(want))}")
    stat = ClassStatistic(L, D, info.k, gram=tensors.get("gram"), prompts=info.prompts, tokens=info.tokens)
    for name in _TERMS:
        setattr(stat, name, tensors[name])
    return info, stat
