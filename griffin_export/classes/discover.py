"""Prompt classes found in an unlabeled log: the prompts clustered by what their experts share, a
class bundle per cluster, and the router that sends a new prompt to its class.

Each prompt of the log gets one full-model prefill (streamed, as `class` counts), which gives its
GRIFFIN statistic s_p [L, D_ff]. Its representation for clustering is s_p with every layer scaled to
unit norm (classes/router.unit_layers): two prompts are alike as far as their layers' statistics point
the same way, every layer with one vote; cosine similarity over it is the mean of the layers' cosines.
The prompts are clustered by cosine (k-means on the unit vectors, or average-linkage agglomeration; K
given, or chosen by coverage or the silhouette: settings.DiscoverSettings.k_criterion). A cluster's class statistic is the sum of its prompts'
(aggregate.ClassStatistic, exactly what `class` counts over them), so its class bundle needs no second
prefill, except for a refit method, whose Gram is counted on the cluster's prompts in a second pass.
The router's centroids are the clusters' means of the first `router_layers` layers.

    found = discover(["traffic.jsonl"], ClassSettings("traffic"), DiscoverSettings(k=None))
    write_discovery(found, "classes/")      # classes/{name}.safetensors, router.safetensors, report.md/.json
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import registry
from ..bundle.format import Bundle, read_file, write_bundle
from ..errors import GriffinError
from ..files.inputs import Prompt, iter_prompts, survey_prompts
from ..files.outputs import atomic_dir, atomic_output, check_output_dir, check_output_path
from ..method.export import prompt_statistic
from ..method.selection import k_for
from ..model.load import LoadedModel, ModelSource
from ..model.tokens import OVER_CONTEXT, tokenize
from ..registry import DEFAULT_AGGREGATION
from ..settings import ClassSettings, CountSettings, DiscoverSettings, plural
from .aggregate import ClassStatistic, Shard, StatisticInfo, check_shard_set
from .build import class_bundle
from .counting import class_statistic, shard_of
from .ray_engine import ModelWorker, check_fingerprints, ray_cluster, worker_errors, worker_threads
from .router import Router, RouterInfo, bundle_digest, similarities, unit_layers, write_router

__all__ = ["Discovery", "discover", "discover_shard", "write_discovery"]

REPRESENTATIVES = 3  # prompts shown per class in the report: the nearest to its centroid
ROUTER_FILE = "router.safetensors"
REPORT_FILES = ("report.md", "report.json")


@dataclass
class LogStatistics:
    """What discovery keeps of every prompt of the log it could read: s_p, its length, where it is."""

    scores: torch.Tensor  # [N, L, D_ff] float32, s_p (column norms of the row-normalized activations)
    tokens: list[int]
    prompts: list[Prompt]
    positions: list[int]  # each kept prompt's place among the inputs' prompts (0-based)
    skipped: list[str] = field(default_factory=list)  # where the prompts longer than the context are
    shard: str = ""  # "I/N": the statistics of the I-th of N slices of the prompts only (discover --shard)


LOG_FORMAT = "griffin-log-statistics"
LOG_VERSION = "1"


def write_log_statistics(log: LogStatistics, lm: LoadedModel, inputs_digest: str, path: str | os.PathLike, *,
                         force: bool = False) -> Path:
    """Every prompt's statistic, to cluster again (another k, another clustering) without a prefill."""
    from safetensors.torch import save_file

    path = check_output_path(path, force)
    meta = {"format": LOG_FORMAT, "format_version": LOG_VERSION, "base_model": lm.identity,
            "base_fingerprint": lm.fingerprint, "inputs_digest": inputs_digest,
            "skipped": json.dumps(log.skipped), "shard": log.shard}
    with atomic_output(path) as tmp:
        save_file({"scores": log.scores.contiguous(), "tokens": torch.tensor(log.tokens, dtype=torch.int64),
                   "positions": torch.tensor(log.positions, dtype=torch.int64)}, str(tmp), metadata=meta)
    return path


def read_log_statistics(path: str | os.PathLike, lm: LoadedModel, prompts: list[Prompt], inputs_digest: str
                        ) -> LogStatistics:
    """Statistics saved by write_log_statistics, checked against this model and these inputs."""
    path = Path(path)
    meta, tensors = read_file(path, LOG_FORMAT, (LOG_VERSION,), "log statistics file")
    try:
        scores, tokens, positions = (tensors[n] for n in ("scores", "tokens", "positions"))
        tokens, positions, skipped = tokens.tolist(), positions.tolist(), json.loads(meta["skipped"])
    except (KeyError, ValueError):
        raise GriffinError(f"{path} is not a readable log statistics file: a tensor or key is missing") from None
    if meta.get("base_fingerprint") != lm.fingerprint:
        raise GriffinError(f"{path} was computed on {meta.get('base_model')}, not on {lm.identity}")
    if meta.get("inputs_digest") != inputs_digest:
        raise GriffinError(f"{path} was computed on other prompts than these inputs")
    if (scores.dtype != torch.float32 or scores.shape[1:] != (lm.num_layers, lm.d_ff)
            or not scores.shape[0] == len(tokens) == len(positions) or not all(0 <= i < len(prompts) for i in positions)):
        raise GriffinError(f"{path}: its statistics do not match the model's layers and FF width or the prompts")
    return LogStatistics(scores, tokens, [prompts[i] for i in positions], positions, skipped, meta.get("shard", ""))


def read_log_parts(paths: Sequence[str | os.PathLike], lm: LoadedModel, prompts: list[Prompt], inputs_digest: str
                   ) -> LogStatistics:
    """One whole statistics file, or every shard of one split (`discover --shard I/N`, each 1..N once),
    joined in the prompts' order."""
    parts = [read_log_statistics(p, lm, prompts, inputs_digest) for p in paths]
    if len(parts) == 1 and not parts[0].shard:
        return parts[0]
    whole = [str(p) for p, part in zip(paths, parts) if not part.shard]
    if whole:
        raise GriffinError(f"{whole[0]} holds every prompt's statistics, the others one shard's; give one or the other")
    shards = [Shard.parse(part.shard) for part in parts]
    check_shard_set(shards, [str(p) for p in paths], "give the shards of one split", "their prompts would be left out")
    return join_logs([parts[n] for n in sorted(range(len(parts)), key=lambda n: shards[n].index)])


def join_logs(parts: list[LogStatistics]) -> LogStatistics:
    """Slices' statistics, in the order given (the prompts' order), as one log's."""
    return LogStatistics(torch.cat([part.scores for part in parts]), [t for part in parts for t in part.tokens],
                         [p for part in parts for p in part.prompts], [i for part in parts for i in part.positions],
                         [w for part in parts for w in part.skipped])


class _LogWorker(ModelWorker):
    """A Ray actor for discovery: the model and the statistics of the slice of prompts it is sent."""

    def __init__(self, source: ModelSource, settings: ClassSettings, threads: int, device: str):
        super().__init__(source, threads, device)
        self.settings = settings

    def collect(self, prompts: list[tuple[str, str]], first: int) -> LogStatistics:
        return collect(self.lm, (Prompt(text, where) for text, where in prompts), self.settings, first=first)


def ray_collect(source: ModelSource, prompts: list[Prompt], settings: ClassSettings, rs: CountSettings,
                fingerprint: str) -> LogStatistics:
    """Every prompt's statistic computed by `rs.workers` Ray actors, a contiguous slice each, joined here:
    what `collect` gives in one process. `fingerprint`: the driver's model, which every worker must match."""
    n = min(rs.workers, len(prompts))
    with ray_cluster(rs) as ray:
        actor = ray.remote(_LogWorker).options(num_cpus=1, num_gpus=rs.gpus_per_worker, max_restarts=0)
        device = "cuda" if rs.gpus_per_worker else "cpu"
        workers = [actor.remote(source, settings, worker_threads(rs), device) for _ in range(n)]
        try:
            with worker_errors("computing the prompts' statistics"):
                check_fingerprints(ray, workers, fingerprint)
                rows = [Shard(i + 1, n).rows(len(prompts)) for i in range(n)]
                parts = ray.get([w.collect.remote([(p.text, p.where) for p in prompts[r.start:r.stop]], r.start)
                                 for w, r in zip(workers, rows)])
        finally:
            for w in workers:
                ray.kill(w)
    return join_logs(parts)


def collect(lm: LoadedModel, prompts: Iterable[Prompt], settings: ClassSettings, *, total: int | None = None,
            progress: bool = False, first: int = 0) -> LogStatistics:
    """One full prefill per prompt, keeping each prompt's statistic; over-context prompts are skipped
    and named (never truncated). `first`: the first prompt's place among the inputs' (a shard's)."""
    scores, tokens, kept, positions, skipped = [], [], [], [], []
    for n, prompt in enumerate(tqdm(prompts, total=total, desc="statistics", unit="prompt", disable=not progress),
                               start=first):
        try:
            ids = tokenize(lm, prompt.text, chat=settings.chat)
        except GriffinError as e:
            if lm.context_length is None or OVER_CONTEXT not in str(e):
                raise GriffinError(f"{prompt.where}: {e}") from e
            skipped.append(prompt.where)
            continue
        stat, _, _ = prompt_statistic(lm, ids, chunk_size=settings.chunk_size)
        scores.append(stat.scores())
        tokens.append(int(ids.shape[1]))
        kept.append(prompt)
        positions.append(n)
    if not kept:
        raise GriffinError(f"no prompt to cluster: all {len(skipped)} are longer than the model's context")
    return LogStatistics(torch.stack(scores), tokens, kept, positions, skipped)


# -- clustering ---------------------------------------------------------------------------------


@dataclass
class Clustering:
    labels: np.ndarray  # [N] class of each prompt, 0..k-1, classes numbered by size (largest first)
    k: int
    scores: dict[int, float]  # K -> the criterion (coverage or silhouette), for every K tried (empty when k was given)


def require_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise GriffinError('clustering needs scikit-learn: pip install -e ".[classes]"') from None


def _labels(x: np.ndarray, k: int, clustering: str, seed: int) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering, KMeans

    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    if clustering == "kmeans":  # on unit vectors, k-means is (almost) spherical: by cosine
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(x)


def coverage(scores: torch.Tensor, labels: np.ndarray, k: int, aggregation: str) -> float:
    """What a clustering keeps of each prompt's own experts: the mean over prompts and layers of the
    fraction of the prompt's own top-k neurons that its class's experts (the top-k of the class score,
    `aggregation` of its prompts' statistics) keep too."""
    score = registry.aggregation(aggregation).score
    own = torch.topk(scores, k, dim=-1).indices  # [N, L, k]
    kept = []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        stat = ClassStatistic(scores.shape[1], scores.shape[2], k)
        for i in members:
            stat.add_scores(scores[i], 0)
        mask = torch.zeros(scores.shape[1:], dtype=torch.bool)
        mask.scatter_(1, torch.topk(score(stat).float(), k, dim=-1).indices, True)
        kept += [float(mask.gather(1, own[i]).float().mean()) for i in members]
    return float(np.mean(kept))


def cluster(vectors: torch.Tensor, settings: DiscoverSettings, *, k_neurons: int | None = None,
            aggregation: str = DEFAULT_AGGREGATION) -> Clustering:
    """The prompts' classes from their statistics [N, L, D_ff] (compared by cosine, every layer scaled to
    unit norm). K as given, else chosen by settings.k_criterion among 1..k_max (coverage: of the top
    `k_neurons` of each prompt, by the classes' `aggregation`) or 2..k_max (silhouette)."""
    require_sklearn()
    from sklearn.metrics import silhouette_score

    n = vectors.shape[0]
    x = unit_layers(vectors).flatten(1)
    x = (x / x.norm(dim=1, keepdim=True)).numpy().astype(np.float32)
    if settings.k is not None:
        if settings.k > n:
            raise GriffinError(f"`k` is {settings.k} classes; the log has {plural(n, 'prompt')} to cluster")
        k, tried = settings.k, {}
    elif settings.k_criterion == "silhouette":
        top = min(settings.k_max, n - 1)
        if top < 2:
            raise GriffinError(f"choosing k needs at least 3 prompts; the log has {n} (give `k`)")
        tried = {k: float(silhouette_score(x, _labels(x, k, settings.clustering, settings.seed), metric="cosine"))
                 for k in range(2, top + 1)}
        k = max(tried, key=tried.get)
    else:  # coverage: add classes while one more keeps at least min_gain more of the prompts' own experts
        kn = k_neurons or vectors.shape[2] // 2
        tried = {1: coverage(vectors, np.zeros(n, dtype=np.int64), kn, aggregation)}
        k = 1
        for nxt in range(2, min(settings.k_max, n) + 1):
            tried[nxt] = coverage(vectors, _labels(x, nxt, settings.clustering, settings.seed), kn, aggregation)
            if tried[nxt] - tried[nxt - 1] < settings.min_gain:
                break
            k = nxt
    labels = _labels(x, k, settings.clustering, settings.seed)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")  # number classes by size
    labels = np.argsort(order)[labels]
    sizes = np.bincount(labels, minlength=k)
    if (sizes == 0).any():
        raise GriffinError(f"the clustering left {int((sizes == 0).sum())} of {k} classes empty; choose a smaller `k`")
    return Clustering(labels, k, tried)


# -- classes and the router ----------------------------------------------------------------------


@dataclass
class Discovery:
    """Everything discover found: the classes' bundles and statistics, the router, and what the report says."""

    names: list[str]
    bundles: list[Bundle]
    infos: list[StatisticInfo]
    statistics: list[ClassStatistic]
    router: Router
    report: dict


def class_of(lm: LoadedModel, log: LogStatistics, members: np.ndarray, settings: ClassSettings) -> ClassStatistic:
    """The class statistic of these prompts, from their kept statistics: the sums `class` would count."""
    stat = ClassStatistic(lm.num_layers, lm.d_ff, k_for(settings.density, lm.d_ff))
    for i in members:
        stat.add_scores(log.scores[i], log.tokens[i])
    return stat


def discover(inputs: Sequence[str | os.PathLike], settings: ClassSettings, found: DiscoverSettings | None = None,
             source: ModelSource | None = None, *, field: str = "prompt", limit: int | None = None,
             progress: bool = False, report: Callable[[str], None] | None = None,
             statistics: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
             save_statistics: str | os.PathLike | None = None, engine: CountSettings | None = None) -> Discovery:
    """Classes found in the prompts of `inputs` (read as `class` reads them): one prefill each, the
    clustering, a class bundle per cluster (named settings.name-1, -2, ... by size), the router and a
    report (sizes, representative prompts, the neurons each class shares with the others).
    `save_statistics` keeps every prompt's statistic in a file; `statistics` reads them from one
    instead of prefilling (another k or clustering of the same log costs seconds), or from every
    shard's file of one split (discover_shard). `engine` (engine="ray") computes the statistics on Ray
    workers, a slice of the prompts each."""
    found, source = found or DiscoverSettings(), source or ModelSource()
    say = report or (lambda line: None)
    require_sklearn()
    survey = survey_prompts(inputs, field, limit)
    if found.k is not None and found.k > survey.prompts:
        raise GriffinError(f"`k` is {found.k} classes; the log has {plural(survey.prompts, 'prompt')}")
    facts = source.peek()
    if facts.d_ff:
        k_for(settings.density, facts.d_ff)
    if facts.num_layers and found.router_layers > facts.num_layers:
        raise GriffinError(f"`router_layers` is {found.router_layers}; the model has {facts.num_layers} layers")
    say(f"{plural(survey.prompts, 'prompt')}; loading model {source.model or 'default (SmolLM2-135M-Instruct)'} ...")
    lm = source.load(quiet=not progress)
    if found.router_layers > lm.num_layers:
        raise GriffinError(f"`router_layers` is {found.router_layers}; the model has {lm.num_layers} layers")
    if statistics is not None:
        paths = [statistics] if isinstance(statistics, (str, os.PathLike)) else list(statistics)
        log = read_log_parts(paths, lm, list(iter_prompts(inputs, field, limit)), survey.digest)
    elif engine is not None and engine.engine == "ray":
        say(f"statistics on Ray, {plural(engine.workers, 'worker')} ...")
        log = ray_collect(source, list(iter_prompts(inputs, field, limit)), settings, engine, lm.fingerprint)
    else:
        log = collect(lm, iter_prompts(inputs, field, limit), settings, total=survey.prompts, progress=progress)
    if save_statistics is not None:
        write_log_statistics(log, lm, survey.digest, save_statistics, force=True)
    found_k = cluster(log.scores, found, k_neurons=k_for(settings.density, lm.d_ff), aggregation=settings.aggregation)
    say(f"{plural(found_k.k, 'class', 'classes')} among {plural(len(log.prompts), 'prompt')}")
    names = [f"{settings.name}-{i + 1}" for i in range(found_k.k)]
    infos, stats, bundles = [], [], []
    for c, name in enumerate(names):
        members = np.flatnonzero(found_k.labels == c)
        one = ClassSettings(**{**settings.__dict__, "name": name})
        if one.refit:  # the Gram of the class's activations: its prompts once more, now counted with it
            info, stat, _ = class_statistic(lm, (log.prompts[i] for i in members), one, total=len(members),
                                            progress=progress)
        else:
            stat = class_of(lm, log, members, one)
            info = StatisticInfo(base_model=lm.identity, base_fingerprint=lm.fingerprint,
                                 architecture=lm.architecture, num_layers=lm.num_layers, d_ff=lm.d_ff, k=stat.k,
                                 prompts=stat.prompts, tokens=stat.tokens, chat=settings.chat, name=name,
                                 method=settings.method, aggregation=settings.aggregation)
        info.inputs_prompts, info.inputs_digest = survey.prompts, survey.digest
        info.extra["source"] = ", ".join(Path(i).name for i in inputs)
        infos.append(info)
        stats.append(stat)
        bundles.append(class_bundle(lm, info, stat, one, source=info.extra["source"]))
    router = make_router(lm, log, found_k, names, found, settings.chat)
    return Discovery(names, bundles, infos, stats, router, summarize(lm, log, found_k, names, bundles, router, found))


def discover_shard(inputs: Sequence[str | os.PathLike], settings: ClassSettings, shard: str,
                   save_statistics: str | os.PathLike, source: ModelSource | None = None, *, field: str = "prompt",
                   limit: int | None = None, progress: bool = False, force: bool = False) -> LogStatistics:
    """The statistics of one slice of the log's prompts (`shard` "I/N"), written to `save_statistics`:
    N machines each count one slice, and `discover(..., statistics=[every shard's file])` clusters them
    all, as one run over the whole log would."""
    part = Shard.parse(shard)
    survey = survey_prompts(inputs, field, limit)
    if part.count > survey.prompts:
        raise GriffinError(f"`shard` {part}: the log has {plural(survey.prompts, 'prompt')}; split it at most "
                           f"{survey.prompts} ways")
    check_output_path(save_statistics, force)
    lm = (source or ModelSource()).load(quiet=not progress)
    rows = part.rows(survey.prompts)
    log = collect(lm, shard_of(iter_prompts(inputs, field, limit), part, survey.prompts), settings, total=len(rows),
                  progress=progress, first=rows.start)
    log.shard = str(part)
    write_log_statistics(log, lm, survey.digest, save_statistics, force=force)
    return log


def make_router(lm: LoadedModel, log: LogStatistics, found_k: Clustering, names: list[str], found: DiscoverSettings,
                chat: bool) -> Router:
    """Centroids of the classes' first-layers statistics, and each class's guard threshold: the
    `guard_quantile` of its own prompts' similarities to it."""
    first = unit_layers(log.scores[:, : found.router_layers])
    centroids = torch.stack([unit_layers(first[torch.from_numpy(found_k.labels == c)].mean(0))
                             for c in range(found_k.k)])
    thresholds = []
    for c in range(found_k.k):
        own = torch.stack([similarities(centroids, s)[c] for s in first[torch.from_numpy(found_k.labels == c)]])
        thresholds.append(float(torch.quantile(own, found.guard_quantile)) if found.guard_quantile else -1.0)
    info = RouterInfo(base_model=lm.identity, base_fingerprint=lm.fingerprint, architecture=lm.architecture,
                      num_layers=lm.num_layers, d_ff=lm.d_ff, layers=found.router_layers, classes=names,
                      bundles=[f"{n}.safetensors" for n in names], bundle_digests=[""] * len(names),
                      thresholds=thresholds, chat=chat,
                      extra={"clustering": found.clustering, "guard_quantile": str(found.guard_quantile)})
    return Router(info, centroids.float().contiguous())


def summarize(lm: LoadedModel, log: LogStatistics, found_k: Clustering, names: list[str], bundles: list[Bundle],
              router: Router, found: DiscoverSettings) -> dict:
    """The report: per class its size, the prompts nearest its centroid, how much of its experts it
    shares with each other class (the fraction of kept neurons in common, over all layers)."""
    full = unit_layers(log.scores).flatten(1)
    full = full / full.norm(dim=1, keepdim=True)
    kept = [set((layer, int(j)) for layer, idx in enumerate(b.indices) for j in idx) for b in bundles]
    classes = []
    for c, name in enumerate(names):
        members = np.flatnonzero(found_k.labels == c)
        centre = full[members].mean(0)
        near = members[np.argsort(-(full[members] @ centre).numpy(), kind="stable")[:REPRESENTATIVES]]
        classes.append({
            "name": name, "prompts": int(len(members)), "tokens": int(sum(log.tokens[i] for i in members)),
            "guard_threshold": router.info.thresholds[c],
            "representatives": [{"where": log.prompts[i].where, "text": log.prompts[i].text[:240]} for i in near],
            "shared": {other: len(kept[c] & kept[o]) / max(len(kept[c]), 1)
                       for o, other in enumerate(names) if o != c},
        })
    return {"prompts": len(log.prompts), "skipped": log.skipped, "k": found_k.k, "clustering": found.clustering,
            "k_criterion": found.k_criterion if found.k is None else "given", "k_scores": found_k.scores,
            "router_layers": found.router_layers,
            "router_cost": found.router_layers / lm.num_layers, "guard_quantile": found.guard_quantile,
            "labels": [{"where": p.where, "class": names[int(c)]} for p, c in zip(log.prompts, found_k.labels)],
            "classes": classes}


# -- writing -----------------------------------------------------------------------------------


def check_discovery_dir(out: str | os.PathLike, force: bool) -> Path:
    return check_output_dir(out, force, ROUTER_FILE)


def write_discovery(found: Discovery, out: str | os.PathLike, *, force: bool = False) -> Path:
    """The classes' bundles, the router (tied to them by digest) and the report, in one folder that
    appears whole or not at all."""
    out = check_discovery_dir(out, force)
    with atomic_dir(out) as tmp:
        for name, bundle in zip(found.names, found.bundles):
            write_bundle(bundle, tmp / f"{name}.safetensors")
        found.router.info.bundle_digests = [bundle_digest(tmp / b) for b in found.router.info.bundles]
        write_router(found.router, tmp / ROUTER_FILE)
        (tmp / "report.json").write_text(json.dumps(found.report, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(report_text(found.report) + "\n", encoding="utf-8")
    found.router.path = out / ROUTER_FILE
    return out


def report_text(r: dict) -> str:
    lines = [f"# Classes found in {plural(r['prompts'], 'prompt')}", "",
             f"{plural(r['k'], 'class', 'classes')} by {r['clustering']}"
             + (f", K chosen by the {r['k_criterion']}: " + ", ".join(f"K={k}: {s:.3f}" for k, s in r["k_scores"].items())
                if r["k_scores"] else ", K given")
             + f". Router: the first {r['router_layers']} layers' statistic ({100 * r['router_cost']:.1f} % of the "
             f"model's layers); guard at the {r['guard_quantile']:g} quantile of each class's own similarities.",
             ""]
    if r["skipped"]:
        lines += [f"Skipped {plural(len(r['skipped']), 'prompt')} longer than the model's context (first: "
                  f"{r['skipped'][0]}).", ""]
    lines += ["| class | prompts | tokens | guard threshold | shares most with |", "|---|---|---|---|---|"]
    for c in r["classes"]:
        other = max(c["shared"].items(), key=lambda kv: kv[1], default=None)
        lines.append(f"| {c['name']} | {c['prompts']} | {c['tokens']} | {c['guard_threshold']:.3f} | "
                     + (f"{other[0]} ({100 * other[1]:.0f} % of its experts)" if other else "—") + " |")
    for c in r["classes"]:
        lines += ["", f"## {c['name']}", ""]
        lines += [f"- `{p['where']}`: {p['text'][:160]!r}" for p in c["representatives"]]
    return "\n".join(lines)
