"""The router: which class a new prompt belongs to, without a full-model prefill, and whether its class
experts are safe for it (the guard).

A prompt's GRIFFIN statistic over the first few layers (`layers`, a fraction of a prefill: the rest of
the model and its output head never run) is normalized per layer and compared, by cosine, with each
class's centroid of the same statistic over the class's own prompts. The nearest class wins. The guard
compares that similarity with the class's threshold: a low quantile of its own prompts' similarities,
so a prompt less like the class than nearly all of its members is sent elsewhere (the full model).

A router is a safetensors file of its own, beside its class bundles:

    centroids   float32 [K, layers, D_ff]   per class, per layer: the unit-norm mean of its prompts' unit-norm statistics
and str->str metadata (RouterInfo): the base model and its fingerprint, the class names, the bundle
files (relative to the router's folder) and a digest of each, the guard thresholds. It is checked on
read like a bundle, and refused with a model or bundles it was not made with. Nothing is unpickled.

    router = read_router("classes/router.safetensors")
    choice = route(lm, router, tokenize(lm, text))     # Route(index, name, similarity, margin, guarded)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..bundle.format import parse_metadata, read_file, read_metadata, str_metadata
from ..errors import GriffinError
from ..files.outputs import atomic_output, check_output_path
from ..method.statistic import FFStatistic, recording
from ..model.arch import ff_blocks
from ..model.load import LoadedModel

__all__ = ["Route", "Router", "RouterInfo", "bundle_digest", "check_router", "check_router_bundles", "first_layers",
           "is_router", "read_router", "route", "write_router"]

ROUTER_FORMAT = "griffin-router"
ROUTER_VERSION = "1"
CENTROIDS = "centroids"


@dataclass
class RouterInfo:
    base_model: str
    base_fingerprint: str
    architecture: str
    num_layers: int
    d_ff: int
    layers: int  # the first `layers` layers' statistic routes
    classes: list[str]  # class names, in the centroids' order
    bundles: list[str]  # each class's bundle file, relative to the router's folder
    bundle_digests: list[str]  # of each bundle file: the router only goes with the bundles it was made with
    thresholds: list[float]  # the guard: the lowest similarity a prompt of each class may have
    chat: bool = False
    kind: str = "statistic"  # registry.ROUTERS
    format: str = ROUTER_FORMAT
    format_version: str = ROUTER_VERSION
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Router:
    info: RouterInfo
    centroids: torch.Tensor  # [K, layers, D_ff] float32, unit norm per layer
    path: Path | None = None  # where it was read from: its bundles are beside it

    @property
    def k(self) -> int:
        return len(self.info.classes)

    def bundle_paths(self) -> list[Path]:
        base = self.path.parent if self.path is not None else Path(".")
        return [base / b for b in self.info.bundles]


@dataclass(frozen=True)
class Route:
    index: int  # the class chosen (position in the router's classes)
    name: str
    similarity: float  # cosine to its centroid, in [-1, 1]
    margin: float  # over the next nearest class (inf with one class)
    guarded: bool  # below the class's threshold: its experts are not trusted with this prompt


def unit_layers(stat: torch.Tensor) -> torch.Tensor:
    """[..., L, D_ff] statistics, each layer scaled to unit L2 norm (every layer gets one vote)."""
    return stat / stat.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def similarities(centroids: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """Cosine of a statistic [layers, D_ff] (any scale) with each centroid: [K]. Per-layer unit norms,
    so the cosine over the concatenation is the mean of the layers' cosines."""
    layers = centroids.shape[1]
    return (centroids * unit_layers(stat.float())[None]).sum(dim=(1, 2)) / layers


class _Stop(Exception):
    """Raised by a hook after the last routing layer: the rest of the forward never runs."""


@torch.inference_mode()
def first_layers(lm: LoadedModel, ids: torch.Tensor, layers: int) -> torch.Tensor:
    """The GRIFFIN statistic of the prompt ids [1, T] over the first `layers` layers: [layers, D_ff].
    The forward stops after layer `layers` - 1; causal layers see what they see in a full prefill,
    so this equals the first layers of the full prefill's statistic."""
    blocks = ff_blocks(lm.model, lm.spec)
    if not 1 <= layers <= len(blocks):
        raise GriffinError(f"a router over {layers} layers; the model has {len(blocks)}")
    stat = FFStatistic(layers, lm.d_ff)

    def stop(module, args, out):
        raise _Stop

    handle = blocks[layers - 1].output.register_forward_hook(stop)
    try:
        with recording(blocks[:layers], stat):
            lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        handle.remove()
    return stat.scores()


def route(lm: LoadedModel, router: Router, ids: torch.Tensor) -> Route:
    """The class of prompt ids [1, T], from a partial prefill of the router's first layers."""
    return route_statistic(router, first_layers(lm, ids, router.info.layers))


def route_statistic(router: Router, stat: torch.Tensor) -> Route:
    """The class of a prompt whose first-layers statistic [layers, D_ff] is `stat`."""
    sims = similarities(router.centroids, stat[: router.info.layers])
    best = int(sims.argmax())
    others = sims.clone()
    others[best] = -float("inf")
    margin = float(sims[best] - others.max()) if len(sims) > 1 else float("inf")
    sim = float(sims[best])
    return Route(best, router.info.classes[best], sim, margin, sim < router.info.thresholds[best])


def bundle_digest(path: str | os.PathLike) -> str:
    """A bundle file's identity for a router: blake2b of its bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- the file -----------------------------------------------------------------------------------


def write_router(router: Router, path: str | os.PathLike, *, force: bool = False) -> Path:
    from safetensors.torch import save_file

    path = check_output_path(path, force)
    with atomic_output(path) as tmp:
        save_file({CENTROIDS: router.centroids.float().contiguous()}, str(tmp), metadata=str_metadata(router.info))
    return path


def is_router(path: str | os.PathLike) -> bool:
    """Whether a file is a router (its header says so); anything unreadable is not."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        return read_metadata(p)[0].get("format") == ROUTER_FORMAT
    except GriffinError:
        return False


def read_router(path: str | os.PathLike) -> Router:
    """A router file, checked: format, shapes, finite unit-norm centroids, one name, bundle and
    threshold per class. Its bundles are checked when they are opened (check_router)."""
    path = Path(path)
    meta, tensors = read_file(path, ROUTER_FORMAT, (ROUTER_VERSION,), "router")
    info = parse_metadata(RouterInfo, meta, str(path))
    names, centroids = list(tensors), tensors.get(CENTROIDS)
    k = len(info.classes)
    if names != [CENTROIDS] or centroids is None:
        raise GriffinError(f"{path}: a router holds one tensor, {CENTROIDS!r}; found {names}")
    if not (k >= 1 and len(info.bundles) == len(info.bundle_digests) == len(info.thresholds) == k):
        raise GriffinError(f"{path}: {k} classes but {len(info.bundles)} bundles, {len(info.bundle_digests)} digests "
                           f"and {len(info.thresholds)} thresholds")
    if len(set(info.classes)) != k or not all(info.classes):
        raise GriffinError(f"{path}: class names must be unique and non-empty: {info.classes}")
    if not 1 <= info.layers <= info.num_layers or info.d_ff < 1:
        raise GriffinError(f"{path}: routes over {info.layers} of {info.num_layers} layers (d_ff {info.d_ff})")
    want = (k, info.layers, info.d_ff)
    if centroids.dtype != torch.float32 or tuple(centroids.shape) != want:
        raise GriffinError(f"{path}: centroids should be float32 {list(want)}, found {centroids.dtype} "
                           f"{list(centroids.shape)}")
    if not bool(torch.isfinite(centroids).all()) or not torch.allclose(centroids.norm(dim=-1), torch.ones(k, info.layers),
                                                                     atol=1e-3):
        raise GriffinError(f"{path}: centroids must be finite with unit norm per layer")
    if not all(-1.0 <= t <= 1.0 for t in info.thresholds):
        raise GriffinError(f"{path}: guard thresholds are cosines, in [-1, 1]: {info.thresholds}")
    for b in info.bundles:
        if Path(b).is_absolute() or ".." in Path(b).parts:
            raise GriffinError(f"{path}: bundle {b!r} must be a file name beside the router")
    return Router(info, centroids, path)


def check_router(router: Router, lm: LoadedModel) -> None:
    """The router goes with this base model and with the bundles beside it that it was made with."""
    where = str(router.path or "the router")
    if router.info.base_fingerprint != lm.fingerprint:
        raise GriffinError(f"{where} was made on {router.info.base_model} (fingerprint "
                           f"{router.info.base_fingerprint[:16]}), not on {lm.identity}")
    check_router_bundles(router)


def check_router_bundles(router: Router) -> None:
    """The bundles beside the router are there and are the ones it was made with (no model needed)."""
    where = str(router.path or "the router")
    for name, path, digest in zip(router.info.classes, router.bundle_paths(), router.info.bundle_digests):
        if not path.is_file():
            raise GriffinError(f"{where}: class {name!r}'s bundle {path} does not exist")
        if bundle_digest(path) != digest:
            raise GriffinError(f"{where} was not made with {path} (its digest differs): a router goes with the class "
                               "bundles it was made with")
