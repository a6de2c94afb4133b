"""Summaries of bundles read from the safetensors header only (no tensor data)."""

from __future__ import annotations

import os
from collections import Counter

from .bundle import BundleInfo, read_metadata

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _group(name: str) -> str:
    if name.startswith("griffin.kv."):
        return "kv cache"
    if name.startswith("griffin.indices."):
        return "neuron indices"
    if name.startswith("griffin."):
        return "prompt ids / last logits"
    return "FF weights"


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
    k_text = f"{k[0]} in every layer" if len(set(k)) == 1 else f"{min(k)}..{max(k)} (total {sum(k)})"
    lines = [
        f"{s['file']}: {m['format']} v{m['format_version']} ({m.get('kind', 'prompt')} bundle), {s['file_bytes']:,} bytes",
        f"  base model   {m['base_model']}",
        f"  fingerprint  {m['base_fingerprint']}",
        f"  architecture {m['architecture']}, {m['dtype']}, {s['layers']} layers, d_ff {m['d_ff']}, hidden {m['hidden_size']}",
        f"  selection    {m['method']}, density {m['density']}, seed {m['seed']}: k = {k_text} "
        f"({100 * s['kept_fraction']:.1f}% of FF neurons)",
        f"  prompt       {m['prompt_tokens']} tokens, chat template: {m.get('chat', 'false')}, KV cache: {m['has_kv']}",
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
