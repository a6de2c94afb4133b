"""How to find classes in a log, chosen on the dev rows only: the clustering and its K, and how many
first layers the router needs. It reads the prompts' statistics that `griffin-export discover
--save-statistics` kept (one full prefill each, done once), so every choice here costs seconds.

    griffin-export discover bench/data/mixed_dev.jsonl --save-statistics STATS ...
    python -m bench.discovery_dev STATS -o reports/discovery_dev

Writes OUT/dev.md (and dev.json): for each clustering and K, the cosine silhouette and how well the
clusters match the prompts' kinds (adjusted Rand index; the kinds are never shown to the clustering);
for each router depth, by 5-fold cross-validation on the dev prompts (centroids from four fifths, the
held-out fifth routed), how often the router's class is the one the full statistic's nearest centroid
gives, and how well the routed classes match the kinds, with the router's cost as a fraction of the
model's layers.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from griffin_export.classes.discover import Clustering, cluster, coverage
from griffin_export.classes.router import similarities, unit_layers
from griffin_export.registry import DEFAULT_AGGREGATION
from griffin_export.settings import DiscoverSettings

DATA = Path(__file__).resolve().parent / "data"
DEPTHS = (1, 2, 3, 4, 6, 8)


def ari(kinds: list[str], labels: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(kinds, labels))


def centroids(stats: torch.Tensor, labels: np.ndarray, layers: int) -> torch.Tensor:
    first = unit_layers(stats[:, :layers])
    return torch.stack([unit_layers(first[torch.from_numpy(labels == c)].mean(0)) for c in range(labels.max() + 1)])


def nearest(c: torch.Tensor, stats: torch.Tensor) -> np.ndarray:
    return np.array([int(similarities(c, s[: c.shape[1]]).argmax()) for s in stats])


def words_router(dev_file: Path, dev: torch.Tensor, labels: np.ndarray, folds: np.ndarray) -> dict:
    """The router that reads no layer at all: the prompt's words (TF-IDF, unit norm), nearest class
    centroid by cosine, in the same folds; how often it picks the class the full statistic's nearest
    centroid gives."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [json.loads(line)["prompt"] for line in dev_file.read_text().splitlines()]
    kinds = [json.loads(line)["kind"] for line in dev_file.read_text().splitlines()]
    same, routed_all = [], np.zeros(len(texts), dtype=np.int64)
    for f in range(folds.max() + 1):
        train, test = folds != f, folds == f
        full = nearest(centroids(dev[train], labels[train], dev.shape[1]), dev[test])
        vec = TfidfVectorizer(sublinear_tf=True).fit([t for t, keep in zip(texts, train) if keep])
        x = torch.from_numpy(vec.transform(texts).toarray()).float()
        c = torch.stack([x[torch.from_numpy(train & (labels == k))].mean(0) for k in range(labels.max() + 1)])
        c = c / c.norm(dim=1, keepdim=True)
        routed = (x[torch.from_numpy(test)] @ c.T).argmax(1).numpy()
        same += (routed == full).tolist()
        routed_all[test] = routed
    return {"layers": "words (TF-IDF)", "cost": 0.0, "agrees_with_full_statistic": float(np.mean(same)),
            "ari_vs_kinds": ari(kinds, routed_all)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("statistics", type=Path, help="the dev log's statistics (discover --save-statistics)")
    p.add_argument("--dev", type=Path, default=DATA / "mixed_dev.jsonl")
    p.add_argument("--k-max", type=int, default=10)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("-o", "--output", type=Path, required=True)
    a = p.parse_args()
    from safetensors.torch import load_file
    from sklearn.metrics import silhouette_score

    dev = load_file(str(a.statistics))["scores"]
    dev_kinds = [json.loads(line)["kind"] for line in a.dev.read_text().splitlines()]
    if len(dev_kinds) != dev.shape[0]:
        raise SystemExit(f"{a.statistics} holds {dev.shape[0]} prompts; {a.dev} has {len(dev_kinds)}")
    x = unit_layers(dev).flatten(1)
    x = (x / x.norm(dim=1, keepdim=True)).numpy()
    rows = []
    k_neurons = dev.shape[2] // 2  # density 0.5
    for clustering in ("kmeans", "agglomerative"):
        for k in range(2, a.k_max + 1):
            c = cluster(dev, DiscoverSettings(k=k, clustering=clustering))
            rows.append({"clustering": clustering, "k": k,
                         "silhouette": float(silhouette_score(x, c.labels, metric="cosine")),
                         "coverage": coverage(dev, c.labels, k_neurons, DEFAULT_AGGREGATION),
                         "ari_vs_kinds": ari(dev_kinds, c.labels), "sizes": np.bincount(c.labels).tolist()})
    one_class = coverage(dev, np.zeros(len(dev_kinds), dtype=np.int64), k_neurons, DEFAULT_AGGREGATION)
    by_silhouette = cluster(dev, DiscoverSettings(k_max=a.k_max, k_criterion="silhouette"))
    chosen: Clustering = cluster(dev, DiscoverSettings(k_max=a.k_max), k_neurons=k_neurons)
    folds = np.arange(len(dev_kinds)) % a.folds
    depth_rows = []
    for depth in sorted({d for d in DEPTHS if d < dev.shape[1]} | {dev.shape[1]}):
        same, routed_all = [], np.zeros(len(dev_kinds), dtype=np.int64)
        for f in range(a.folds):
            train, test = folds != f, folds == f
            full = nearest(centroids(dev[train], chosen.labels[train], dev.shape[1]), dev[test])
            routed = nearest(centroids(dev[train], chosen.labels[train], depth), dev[test])
            same += (routed == full).tolist()
            routed_all[test] = routed
        depth_rows.append({"layers": depth, "cost": depth / dev.shape[1], "agrees_with_full_statistic": float(np.mean(same)),
                           "ari_vs_kinds": ari(dev_kinds, routed_all)})
    depth_rows.append(words_router(a.dev, dev, chosen.labels, folds))
    dev_name = os.path.relpath(a.dev)  # as typed from the repository, not this machine's path
    result = {"dev": dev_name, "prompts": len(dev_kinds), "clusterings": rows, "one_class_coverage": one_class,
              "chosen_k": chosen.k, "silhouette_k": by_silhouette.k, "router_depths": depth_rows}
    a.output.mkdir(parents=True, exist_ok=True)
    (a.output / "dev.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Discovery choices on {len(dev_kinds)} dev prompts ({a.dev.name})", "",
             f"`python -m bench.discovery_dev STATS -o {a.output}`, STATS from `griffin-export discover {dev_name} "
             "--save-statistics STATS` (the default model, one full prefill per prompt)", "",
             "Coverage: the mean fraction of a prompt's own top-k neurons (density 0.5) that its class's experts "
             f"(pooled) keep; one class for all: {one_class:.4f}.", "",
             "| clustering | K | cosine silhouette | coverage | ARI vs the kinds | sizes |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['clustering']} | {r['k']} | {r['silhouette']:.3f} | {r['coverage']:.4f} | {r['ari_vs_kinds']:.3f} | "
              f"{r['sizes']} |" for r in rows]
    lines += ["", f"K chosen (k-means): by the coverage criterion (the fewest classes past which one more keeps less than "
              f"0.3 % more): {chosen.k}; by the cosine silhouette: {by_silhouette.k}", "",
              f"Router depth, {a.folds}-fold cross-validation on the dev prompts (the classes: k-means, K={chosen.k}):", "",
              "| router layers | cost (of the layers) | same class as the full statistic | ARI of the routed classes vs the kinds |",
              "|---|---|---|---|"]
    lines += [f"| {r['layers']} | {100 * r['cost']:.1f} % | {100 * r['agrees_with_full_statistic']:.1f} % | "
              f"{r['ari_vs_kinds']:.3f} |" for r in depth_rows]
    (a.output / "dev.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
