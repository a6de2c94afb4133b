"""griffin-export inspect: summaries read from headers only. Bundles and class statistics (the
safetensors header) here; every export target's own output (an ONNX graph, a GGUF file, a Hugging
Face checkpoint directory) by the target's `describe` (registry.TARGETS)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from .bundle.format import BundleInfo, read_metadata, tensor_role
from .errors import GriffinError
from .bundle.format import str_metadata
from .classes.router import ROUTER_FORMAT, bundle_digest, read_router
from .registry import TARGETS
from .settings import plural
from .method.budget import widths_text

if TYPE_CHECKING:
    pass

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


_GROUPS = {"kv": "kv cache", "indices": "neuron indices", "prompt": "prompt ids / last logits", "weights": "FF weights"}


def _group(name: str) -> str:
    return _GROUPS[tensor_role(name)]


def describe_bundle(path: str | os.PathLike) -> dict:
    meta, entries = read_metadata(path)
    info = BundleInfo.from_metadata(meta, str(path))  # validates format and version
    groups: Counter = Counter()
    counts: Counter = Counter()
    for name, (dtype, shape) in entries.items():
        n = 1
        for s in shape:
            n *= s
        groups[_group(name)] += n * _DTYPE_BYTES.get(dtype, 0)
        counts[_group(name)] += 1
    k = info.k
    return {
        "file": str(path),
        "file_bytes": os.path.getsize(path),
        "metadata": meta,
        "layers": info.num_layers,
        "k_per_layer": k,
        "kept_fraction": sum(k) / (info.d_ff * info.num_layers),
        "tensors": {g: {"count": counts[g], "bytes": groups[g]} for g in sorted(groups)},
    }


def format_bundle(s: dict) -> str:
    m = s["metadata"]
    k = s["k_per_layer"]
    k_text = widths_text(k)
    lines = [
        f"{s['file']}: {m['format']} v{m['format_version']} ({m.get('kind', 'prompt')} bundle), {s['file_bytes']:,} bytes",
        f"  base model   {m['base_model']}",
        f"  fingerprint  {m['base_fingerprint']}",
        f"  architecture {m['architecture']}, {m['dtype']}, {s['layers']} layers, d_ff {m['d_ff']}, hidden {m['hidden_size']}",
        f"  selection    {m['method']}, density {m['density']}, seed {m['seed']}: k = {k_text} "
        f"({100 * s['kept_fraction']:.1f}% of FF neurons)",
        f"  prompt       {m['prompt_tokens']} tokens"
        + (f" + {m['warmup_tokens']} warm-up tokens (full model, the output's start)"
           if m.get("warmup_tokens", "0") != "0" else "")
        + f", chat template: {m.get('chat', 'false')}, KV cache: {m['has_kv']}",
        f"  tokenizer    {m['tokenizer']}",
        f"  tool         griffin-export {m.get('tool_version', '?')}",
        "  tensors:",
    ]
    for group, t in s["tensors"].items():
        lines.append(f"    {group:<26} {t['count']:>5} tensors {t['bytes']:>14,} bytes")
    extra = {k: v for k, v in m.items() if k.startswith("extra.")}
    for key, value in extra.items():
        lines.append(f"  {key[6:]:<12} {value}")
    return "\n".join(lines)


def describe_statistic(path: str | os.PathLike, meta: dict[str, str], entries: dict) -> dict:
    """A class statistic (class --save-statistic) or a shard's partial one (class --shard), from its header."""
    from .bundle.format import check_format, parse_metadata
    from .classes.aggregate import STATISTIC_FORMAT, STATISTIC_VERSION, StatisticInfo

    check_format(meta, str(path), STATISTIC_FORMAT, ("1", STATISTIC_VERSION), "class statistic")
    info = parse_metadata(StatisticInfo, meta, str(path))
    return {"file": str(path), "file_bytes": os.path.getsize(path), "metadata": meta, "gram": "gram" in entries,
            "kind": "partial statistic" if info.shard else "class statistic"}


def format_statistic(s: dict) -> str:
    m = s["metadata"]
    shard = f", shard {m['shard']} of the {m.get('inputs_prompts', '?')} prompts" if m.get("shard") else ""
    return "\n".join([
        f"{s['file']}: {m['format']} v{m['format_version']} ({s['kind']}{shard}), {s['file_bytes']:,} bytes",
        f"  base model   {m['base_model']}",
        f"  fingerprint  {m['base_fingerprint']}",
        f"  architecture {m['architecture']}, {m['num_layers']} layers, d_ff {m['d_ff']}",
        f"  class        {m.get('name') or '?'}: method {m.get('method') or '?'}, aggregation "
        f"{m.get('aggregation') or '?'}, top-k counted at k={m['k']}, chat template: {m.get('chat', 'false')}",
        f"  counted      {plural(int(m['prompts']), 'prompt')}, {m['tokens']} tokens, {m.get('skipped', '0')} skipped"
        + (", with the Gram (refit methods)" if s["gram"] else ", no Gram"),
        *(f"  {key[6:]:<12} {value}" for key, value in m.items() if key.startswith("extra.")),
    ])


def describe_router(path: str | os.PathLike) -> dict:
    """A router, read and checked (its centroids are small), with each class's bundle beside it."""
    router = read_router(path)
    info = router.info
    bundles = []
    for name, p, digest in zip(info.classes, router.bundle_paths(), info.bundle_digests):
        state = "missing" if not p.is_file() else ("ok" if bundle_digest(p) == digest else "changed since")
        bundles.append({"class": name, "file": p.name, "state": state})
    return {"file": str(path), "file_bytes": os.path.getsize(path), "metadata": str_metadata(info),
            "classes": bundles, "thresholds": info.thresholds, "layers": info.layers, "num_layers": info.num_layers}


def format_router(s: dict) -> str:
    m = s["metadata"]
    lines = [f"{s['file']}: {m['format']} v{m['format_version']} ({m['kind']} router), {s['file_bytes']:,} bytes",
             f"  base model   {m['base_model']}",
             f"  fingerprint  {m['base_fingerprint']}",
             f"  routes by    the first {s['layers']} of {s['num_layers']} layers' FF statistic, cosine to each class "
             "centroid; the guard falls back below a class's threshold",
             f"  classes      {len(s['classes'])}:"]
    for c, t in zip(s["classes"], s["thresholds"]):
        lines.append(f"    {c['class']:<20} {c['file']:<32} threshold {t:.3f}  bundle {c['state']}")
    return "\n".join(lines)


def inspect_path(path: str | os.PathLike) -> tuple[dict, str]:
    """(summary, text) for a bundle or class statistic (.safetensors), or any target's output."""
    p = Path(path)
    for target in TARGETS.values():  # in the registry's order: the first that owns the path describes it
        if target.owns(p):
            return target.describe(p)
    if p.is_dir():
        raise GriffinError(f"{p} is a directory that is no export target's output ({', '.join(TARGETS)}); inspect "
                           "reads bundles and class statistics (.safetensors), GGUF files, ONNX graphs and checkpoint "
                           "directories")
    meta, entries = read_metadata(path)
    if meta.get("format") == ROUTER_FORMAT:
        s = describe_router(path)
        return s, format_router(s)
    if meta.get("format") == "griffin-class-statistic":
        s = describe_statistic(path, meta, entries)
        return s, format_statistic(s)
    s = describe_bundle(path)
    return s, format_bundle(s)
