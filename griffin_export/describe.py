"""Summaries read from headers only: bundles (safetensors header) and ONNX graphs (the protobuf,
never the external weight data)."""

from __future__ import annotations

import os
from collections import Counter

from .bundle.format import BundleInfo, read_metadata, tensor_role
from .method.budget import widths_text

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
        f"  counted      {m['prompts']} prompts, {m['tokens']} tokens, {m.get('skipped', '0')} skipped"
        + (", with the Gram (refit methods)" if s["gram"] else ", no Gram"),
        *(f"  {key[6:]:<12} {value}" for key, value in m.items() if key.startswith("extra.")),
    ])


# -- ONNX graphs (protobuf only: external weight data is never read) ----------------------------


def _onnx_shape(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _onnx_dtype(elem_type: int) -> str:
    from onnx import helper

    return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()


def _tensor_bytes(t) -> int:
    from onnx import helper

    ext = {e.key: e.value for e in t.external_data}
    if "length" in ext:
        return int(ext["length"])
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _ff_widths(inits: dict, architecture: str | None) -> tuple[str | None, list[int]]:
    """Per-layer FF width read off the output projection's initializer [hidden, k]; the
    architecture from the metadata, else the first table row whose names the graph uses."""
    from .model.arch import ARCHITECTURES, ff_param

    specs = [(architecture, ARCHITECTURES[architecture])] if architecture in ARCHITECTURES else list(ARCHITECTURES.items())
    for name, spec in specs:
        widths, i = [], 0
        while (w := inits.get(ff_param(spec, i, spec.output))) is not None:
            widths.append(int(w[-1]))
            i += 1
        if widths:
            return name, widths
    return None, []


def describe_onnx(path: str | os.PathLike) -> dict:
    from collections import Counter

    from onnx import TensorProto

    from .targets.onnx.graph import graph_file, load_proto

    f = graph_file(path)
    proto = load_proto(f)
    g = proto.graph
    meta = {p.key: p.value for p in proto.metadata_props}
    inline = {"count": 0, "bytes": 0}
    external = {"count": 0, "bytes": 0, "files": {}}
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            external["count"] += 1
            external["bytes"] += _tensor_bytes(t)
            loc = next((e.value for e in t.external_data if e.key == "location"), "?")
            file = f.parent / loc
            external["files"][loc] = file.stat().st_size if file.is_file() else None  # None: missing
        else:
            inline["count"] += 1
            inline["bytes"] += _tensor_bytes(t)
    shapes = {t.name: list(t.dims) for t in g.initializer}
    quantization = None
    if meta.get("quantization"):
        from .targets.onnx.int4 import packing_from_text, param_shapes

        packing = packing_from_text(meta.get("quant_packing", "{}"), str(f))
        shapes.update({n: list(sh) for n, sh in param_shapes(packing).items()})
        quantization = {"scheme": meta["quantization"], "block_size": int(meta.get("quant_block_size", 0)),
                        "accuracy_level": int(meta.get("quant_accuracy_level", 0)),
                        "symmetric": meta.get("quant_symmetric") == "true", "lm_head": meta.get("quant_lm_head") == "true",
                        "algorithm": meta.get("quant_algorithm", "rtn"),
                        "quantized_weights": len(packing),
                        "quantized_params": sum(len(p.params) for p in packing.values())}
    arch, widths = _ff_widths(shapes, meta.get("architecture"))
    return {
        "file": str(f),
        "file_bytes": f.stat().st_size,
        "ir_version": proto.ir_version,
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [{"name": v.name, "dtype": _onnx_dtype(v.type.tensor_type.elem_type), "shape": _onnx_shape(v)}
                   for v in g.input],
        "outputs": [{"name": v.name, "dtype": _onnx_dtype(v.type.tensor_type.elem_type), "shape": _onnx_shape(v)}
                    for v in g.output],
        "nodes": len(g.node),
        "operators": dict(Counter(n.op_type for n in g.node).most_common()),
        "architecture": arch,
        "ff_width_per_layer": widths,
        "quantization": quantization,
        "initializers": {"inline": inline, "external": external},
        "metadata": meta,
    }


def _io_lines(values: list[dict]) -> list[str]:
    """Inputs/outputs, with the per-layer KV entries folded into one line each."""
    from .targets.onnx.graph import kv_io_parts

    lines, folded = [], {}
    for v in values:
        parts = kv_io_parts(v["name"])
        if parts:
            key = parts[0].format("{i}", parts[2])
            if key in folded:
                folded[key][0] += 1
                continue
            folded[key] = [1, v]
            lines.append(key)
        else:
            lines.append(v)
    out = []
    for item in lines:
        v, n = (folded[item][1], folded[item][0]) if isinstance(item, str) else (item, 0)
        name = item if isinstance(item, str) else v["name"]
        shape = ", ".join(map(str, v["shape"]))
        out.append(f"    {name:<28} {v['dtype']:<8} [{shape}]" + (f"  × {n} layers" if n else ""))
    return out


def format_onnx(s: dict) -> str:
    m = s["metadata"]
    widths = s["ff_width_per_layer"]
    if not widths:
        ff = "no FF weights found by name"
    elif len(set(widths)) == 1:
        ff = f"{widths[0]} in every layer × {len(widths)} layers"
    else:
        ff = f"{','.join(map(str, widths))} ({len(widths)} layers)"
    opset = ", ".join(f"{d} {v}" for d, v in s["opset"].items())
    ini, ext = s["initializers"]["inline"], s["initializers"]["external"]
    lines = [f"{s['file']}: ONNX graph (IR {s['ir_version']}, opset {opset}), {s['file_bytes']:,} bytes, "
             f"producer {s['producer'] or '?'}"]
    if m.get("format") == "griffin-onnx":
        d_ff = m.get("d_ff", "?")
        lines += [
            f"  kind         {m.get('kind')} graph ({m.get('method')}, density {m.get('density')})",
            f"  base model   {m.get('base_model')}",
            f"  fingerprint  {m.get('base_fingerprint')}",
            f"  architecture {m.get('architecture')}, {m.get('dtype')}, {m.get('num_layers')} layers, d_ff {d_ff}, "
            f"hidden {m.get('hidden_size')}",
            "  layout       " + (f"lean (shared KV buffer of {m.get('max_length')} positions, batch {m.get('batch_size')})"
                                 if m.get("layout") == "lean" else "traced (the cache grows every step)"),
        ]
    lines.append(f"  FF width     {ff}" + (f" ({s['architecture']} names)" if s["architecture"] else ""))
    q = s.get("quantization")
    if q:
        from .settings import QuantSettings
        from .targets.onnx.int4 import describe

        how = describe(QuantSettings(q["scheme"], q["block_size"], q["accuracy_level"], q["symmetric"], q["lm_head"],
                                     q["algorithm"]))
        lines.append(f"  quantized    {q['scheme']} MatMulNBits: {q['quantized_weights']} weights ({q['quantized_params']} "
                     f"parameters), {how}")
    lines.append("  inputs:")
    lines += _io_lines(s["inputs"])
    lines.append("  outputs:")
    lines += _io_lines(s["outputs"])
    lines.append(f"  initializers {ini['count']} inline ({ini['bytes']:,} bytes), {ext['count']} external "
                 f"({ext['bytes']:,} bytes)")
    for loc, size in ext["files"].items():
        lines.append(f"    {loc}: " + ("MISSING" if size is None else f"{size:,} bytes"))
    ops = ", ".join(f"{op} {n}" for op, n in s["operators"].items())
    lines.append(f"  operators    {s['nodes']} nodes: {ops}")
    shown = {k: v for k, v in m.items() if not k.startswith("pkg.") and k != "quant_packing"}  # packing: above
    if shown:
        lines.append("  metadata:")
        lines += [f"    {k:<22} {v}" for k, v in sorted(shown.items())]
    return "\n".join(lines)


def inspect_path(path: str | os.PathLike) -> tuple[dict, str]:
    """(summary, text) for a bundle (.safetensors), an .onnx file or a graph directory."""
    p = str(path)
    if p.endswith(".onnx") or os.path.isdir(p):
        s = describe_onnx(path)
        return s, format_onnx(s)
    meta, entries = read_metadata(path)
    if meta.get("format") == "griffin-class-statistic":
        s = describe_statistic(path, meta, entries)
        return s, format_statistic(s)
    s = describe_bundle(path)
    return s, format_bundle(s)
