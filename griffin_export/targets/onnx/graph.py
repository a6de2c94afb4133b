"""The exported ONNX graph's contract: file and I/O names, its metadata (GraphInfo), and reading a
graph back without its weights (read_graph) with the checks a runtime needs before binding a bundle.

The exporters (onnx_export.py, onnx_lean.py) write what this module names; the runtime
(runtime/onnx.py) and inspect read it through here, so neither side imports the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ... import __version__
from ...bundle.format import FORMAT_VERSION as BUNDLE_FORMAT_VERSION
from ...bundle.format import check_format, parse_metadata, str_metadata
from ...errors import GriffinError
from ...method.budget import widths_text
from ...model.arch import ff_param, spec_for
from ...settings import KV_DTYPES, QuantSettings
from .int4 import Packed, packing_from_text, param_shapes

GRAPH_FORMAT = "griffin-onnx"
GRAPH_FORMAT_VERSION = "1"  # the traced graph
LEAN_FORMAT_VERSION = "2"  # the lean graph (onnx_lean.py): an older reader refuses it instead of misbinding its KV
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
PAST = "past_key_values.{}.{}"  # layer, key|value
PRESENT = "present.{}.{}"
KV_SCALE = "kv_scale.{}.{}"  # layer, key|value: an int8 KV buffer's scales [1, kv_heads, 1, head_dim] (lean.py)


def kv_io_parts(name: str) -> tuple[str, int, str] | None:
    """A KV input/output name -> (its template PAST or PRESENT, layer, "key" | "value"); None for others."""
    for template in (PAST, PRESENT):
        head = template.split("{}")[0]
        layer, _, kind = name[len(head):].partition(".") if name.startswith(head) else ("", "", "")
        if layer.isdigit() and kind in ("key", "value"):
            return template, int(layer), kind
    return None
# symbolic dimension names, as HF Optimum names them
BATCH, SEQ, PAST_LEN, TOTAL_LEN = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"

@dataclass
class GraphInfo:
    """metadata_props of an exported graph. Every value is stored as a string."""

    kind: str  # "pruned" (a bundle's experts) or "full" (the model as loaded)
    base_model: str
    base_fingerprint: str
    architecture: str
    dtype: str
    num_layers: int
    d_ff: int
    hidden_size: int
    k: list[int]  # FF width per layer, as found in the weights
    density: float
    method: str
    kv_heads: int
    head_dim: int
    sliding_layers: list[int]  # layers whose attention is windowed (their bundle KV may be shorter)
    eos_token_ids: list[int]
    context_length: int  # 0 = unknown
    chat: bool = False
    tokenizer: str = ""
    bundle_format_version: str = BUNDLE_FORMAT_VERSION
    tool_version: str = __version__
    format: str = GRAPH_FORMAT
    format_version: str = GRAPH_FORMAT_VERSION
    layout: str = "traced"  # "traced" (this module) or "lean" (onnx_lean.py)
    max_length: int = 0  # lean: KV buffer positions (prompt + generated tokens); 0 = grows (traced)
    batch_size: int = 0  # lean: the batch its buffers are allocated for; 0 = any (traced)
    # the KV buffers' type (lean graphs: float32, float16 or int8, targets/onnx/lean.py); "" = the weights' dtype
    # (traced graphs, and lean graphs written before the KV type was a choice)
    kv_dtype: str = ""
    # block-wise 4-bit weights (onnx_quant.py); "" = float weights
    quantization: str = ""
    quant_block_size: int = 0
    quant_accuracy_level: int = 0
    quant_symmetric: bool = False
    quant_lm_head: bool = False
    quant_algorithm: str = "rtn"  # graphs written before hqq existed were rtn
    quant_packing: str = ""  # JSON: each quantized weight -> the parameters packed into it
    extra: dict[str, str] = field(default_factory=dict)  # the bundle's extra.* keys

    def to_metadata(self) -> dict[str, str]:
        return str_metadata(self)

    @property
    def kv(self) -> str:
        """The KV cache's type: kv_dtype, else the weights' dtype."""
        return self.kv_dtype or self.dtype

    def quant_settings(self) -> QuantSettings | None:
        if not self.quantization:
            return None
        return QuantSettings(self.quantization, self.quant_block_size, self.quant_accuracy_level,
                             self.quant_symmetric, self.quant_lm_head, self.quant_algorithm)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> "GraphInfo":
        check_format(meta, source, GRAPH_FORMAT, (GRAPH_FORMAT_VERSION, LEAN_FORMAT_VERSION), "graph")
        info = parse_metadata(cls, meta, source)
        if info.layout not in ("traced", "lean") or (info.layout == "lean") != (info.format_version == LEAN_FORMAT_VERSION):
            raise GriffinError(f"{source}: graph layout {info.layout!r} does not match format version {info.format_version}")
        if info.kv_dtype and (info.kv_dtype not in KV_DTYPES or info.layout != "lean"):
            raise GriffinError(f"{source}: metadata kv_dtype={info.kv_dtype!r} is not a KV type this version reads "
                               f"({', '.join(KV_DTYPES)}, lean graphs)")
        return info


# -- reading a graph without its weights ---------------------------------------------------------


@dataclass
class Graph:
    """An exported graph's metadata and initializer table, read without the weight data."""

    path: Path  # the .onnx file
    info: GraphInfo
    initializers: dict[str, tuple[int, list[int]]]  # name -> (onnx elem type, shape)
    widths: list[int]  # FF width per layer, from the initializer shapes
    external: set[str]  # initializers stored as external data (the only ones ORT can swap)
    vocab: int = 0  # the logits output's last dimension where the graph fixes it (lean graphs), else 0
    packing: dict[str, Packed] = field(default_factory=dict)  # quantized graphs: weight -> parameters in it
    # every parameter's shape as the graph holds it: a float initializer, or packed into a quantized weight
    param_shapes: dict[str, list[int]] = field(default_factory=dict)
    _scales: list | None = field(default=None, repr=False)

    def param_shape(self, name: str) -> list[int] | None:
        return self.param_shapes.get(name)

    def kv_scales(self) -> list[tuple]:
        """An int8 KV cache's scales: per layer (key, value) float32 arrays [1, kv_heads, 1, head_dim]."""
        if self.info.kv != "int8":
            return []
        if self._scales is None:
            self._scales = _read_kv_scales(self.path, self.info.num_layers)
        return self._scales

    @property
    def source(self) -> str:
        return str(self.path.parent if self.path.name == MODEL_FILE else self.path)


def graph_file(path: str | os.PathLike) -> Path:
    """A graph directory (holding model.onnx) or the .onnx file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise GriffinError(f"ONNX graph {path} does not exist")
    return path


def load_proto(path: Path):
    """The ModelProto without external data; a corrupt file is a GriffinError."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, EOFError) as e:
        raise GriffinError(f"{path} is not a valid ONNX file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not proto.graph.node:
        raise GriffinError(f"{path} is not a valid ONNX file: it holds no graph")
    return proto


def check_external_data(proto, path: Path) -> None:
    """Every external initializer's file exists and is long enough (a missing or truncated
    model.onnx.data is a one-line error, not an ORT stack trace)."""
    from onnx import TensorProto

    sizes: dict[str, int] = {}
    for t in proto.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in t.external_data}
        location = ext.get("location", "")
        if location not in sizes:
            f = path.parent / location
            if not location or not f.is_file():
                raise GriffinError(f"{path}: external data file {f.name or '?'} is missing (expected beside the graph)")
            sizes[location] = f.stat().st_size
        end = int(ext.get("offset", 0)) + int(ext.get("length", 0))
        if end > sizes[location]:
            raise GriffinError(f"{path}: external data file {location} is truncated ({sizes[location]} bytes, "
                               f"tensor {t.name} ends at byte {end})")


def read_graph(path: str | os.PathLike) -> Graph:
    path = graph_file(path)
    proto = load_proto(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    if not all(isinstance(x, str) for kv in meta.items() for x in kv):  # protobuf hands back bytes that are not UTF-8
        raise GriffinError(f"{path} is not a valid ONNX file: its metadata is not UTF-8 text")
    info = GraphInfo.from_metadata(meta, str(path))
    check_external_data(proto, path)
    inits = {t.name: (int(t.data_type), list(t.dims)) for t in proto.graph.initializer}
    from onnx import TensorProto

    external = {t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    packing = _read_packing(info, inits, external, path)
    shapes = {**{n: list(s) for n, s in param_shapes(packing).items()}, **{n: s for n, (_, s) in inits.items()}}
    spec = spec_for(info.architecture)
    widths = []
    for i in range(info.num_layers):
        name = ff_param(spec, i, spec.output)
        if name not in shapes:
            raise GriffinError(f"{path}: FF initializer {name} is missing; this graph cannot take a bundle's weights")
        widths.append(shapes[name][-1])
    if info.layout == "lean":
        _check_lean(proto, info, inits, path)
    logits = next((o for o in proto.graph.output if o.name == "logits"), None)
    dims = logits.type.tensor_type.shape.dim if logits is not None else []
    vocab = int(dims[-1].dim_value) if dims else 0
    return Graph(path, info, inits, widths, external, vocab, packing, shapes)


def step_read_bytes(path: str | os.PathLike) -> int:
    """Bytes of weights one decode step of a graph reads, at their own precision (4-bit blocks with
    their scales and zero points): every initializer a node reads whole. Left out: tables a step
    reads one row of, the embedding (a Gather's data, unless the tied head reads it too) and the
    rotary cos/sin caches of GroupQueryAttention."""
    proto = load_proto(graph_file(path))
    g = proto.graph
    whole: set[str] = set()
    for node in g.node:
        for j, name in enumerate(node.input):
            if (node.op_type == "Gather" and j == 0) or (node.op_type == "GroupQueryAttention" and j in (7, 8)):
                continue
            whole.add(name)
    return sum(_tensor_bytes(t) for t in g.initializer if t.name in whole)


def _read_kv_scales(path: Path, layers: int) -> list[tuple]:
    """The int8 KV scales from the graph (its external data read for these tensors alone)."""
    from onnx import numpy_helper

    proto = load_proto(path)
    wanted = {KV_SCALE.format(i, t) for i in range(layers) for t in ("key", "value")}
    arrays = {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in proto.graph.initializer
              if t.name in wanted}
    return [(arrays[KV_SCALE.format(i, "key")], arrays[KV_SCALE.format(i, "value")]) for i in range(layers)]


def _read_packing(info: GraphInfo, inits: dict, external: set[str], path: Path) -> dict[str, Packed]:
    """A quantized graph's packing, checked against its initializers (each quantized tensor
    there and external, so a bundle can be swapped in)."""
    if not info.quantization:
        return {}
    info.quant_settings()  # a scheme or block size this version does not know is refused here
    packing = packing_from_text(info.quant_packing, str(path))
    for p in packing.values():
        for name in (p.weight, p.scales, p.zero_points):
            if name is not None and (name not in inits or name not in external):
                raise GriffinError(f"{path}: quantized tensor {name} is missing from the graph's external data")
    return packing


def _check_lean(proto, info: GraphInfo, inits: dict[str, tuple[int, list[int]]], path: Path) -> None:
    """A lean graph's metadata agrees with the graph itself: its rotary table covers max_length,
    and every layer's past input is [batch, kv_heads, max, head_dim]."""
    rows = inits.get("cos_cache", (0, [0]))[1][0]
    if info.max_length < 2 or rows != info.max_length:
        raise GriffinError(f"{path}: metadata max_length={info.max_length}, but the graph's rotary table has {rows} rows")
    if info.batch_size < 1:
        raise GriffinError(f"{path}: metadata batch_size={info.batch_size} is not a batch")
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    names = {1: "float32", 10: "float16", 3: "int8"}  # onnx TensorProto element types
    types = {i.name: names.get(i.type.tensor_type.elem_type, _onnx_dtype(i.type.tensor_type.elem_type))
             for i in proto.graph.input}
    scale = [1, info.kv_heads, 1, info.head_dim]
    for layer in range(info.num_layers):
        shape = shapes.get(PAST.format(layer, "key"))
        if shape is None or len(shape) != 4 or shape[1] != info.kv_heads or shape[3] != info.head_dim:
            raise GriffinError(f"{path}: metadata says {info.num_layers} layers of {info.kv_heads} KV heads × "
                               f"head_dim {info.head_dim}; input {PAST.format(layer, 'key')} is {shape}")
        for kind in ("key", "value"):
            name = PAST.format(layer, kind)
            if types.get(name) != info.kv:
                raise GriffinError(f"{path}: metadata says a {info.kv} KV cache; input {name} is {types.get(name)}")
            if info.kv == "int8" and inits.get(KV_SCALE.format(layer, kind), (0, None))[1] != scale:
                raise GriffinError(f"{path}: an int8 KV cache needs scales {KV_SCALE.format(layer, kind)} of shape "
                                   f"{scale}; the graph has {inits.get(KV_SCALE.format(layer, kind), (0, 'none'))[1]}")


def check_graph_bundle(graph: Graph, bundle_info, bundle_source: str) -> None:
    """Refuse a bundle the graph cannot run, naming both sides in one line."""
    g, b, gs = graph.info, bundle_info, graph.source
    if g.architecture != b.architecture:
        raise GriffinError(f"graph {gs} is a {g.architecture} model; bundle {bundle_source} is from a {b.architecture} model")
    if g.num_layers != b.num_layers:
        raise GriffinError(f"graph {gs} has {g.num_layers} layers; bundle {bundle_source} has {b.num_layers}")
    if g.dtype != b.dtype:
        raise GriffinError(f"graph {gs} is {g.dtype}; bundle {bundle_source} holds {b.dtype} weights")
    if g.base_fingerprint != b.base_fingerprint:
        raise GriffinError(f"graph {gs} was exported from {g.base_model} (fingerprint {g.base_fingerprint[:16]}); "
                           f"bundle {bundle_source} belongs to {b.base_model} (fingerprint {b.base_fingerprint[:16]})")
    if graph.widths != list(b.k):
        first = next(i for i, (x, y) in enumerate(zip(graph.widths, b.k)) if x != y)
        raise GriffinError(f"graph {gs} has k={widths_text(graph.widths)}; bundle {bundle_source} has "
                           f"k={widths_text(list(b.k))} (first difference: layer {first}); export a graph for this bundle")


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
    from ...model.arch import ARCHITECTURES, ff_param

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
        from .int4 import packing_from_text, param_shapes

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
        from ...settings import QuantSettings
        from .int4 import describe

        how = describe(QuantSettings(q["scheme"], q["block_size"], q["accuracy_level"], q["symmetric"], q["lm_head"],
                                     q["algorithm"]))
        lines.append(f"  quantized    {q['scheme']} MatMulNBits: {q['quantized_weights']} weights ({q['quantized_params']} "
                     f"parameters), {how}")
    if m.get("kv_dtype"):
        scaled = ", a float32 scale per KV head and channel (kv_scale.{i}.key/value)" if m["kv_dtype"] == "int8" else ""
        lines.append(f"  KV cache     {m['kv_dtype']}{scaled}")
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


def owns(path: Path) -> bool:
    """An .onnx file, or a directory holding one (inspect asks the ONNX target first: a graph directory
    holds a tokenizer, and may hold a config.json too)."""
    return path.suffix == ".onnx" or (path.is_dir() and (path / MODEL_FILE).is_file())


def describe(path: str | os.PathLike) -> tuple[dict, str]:
    """(summary, text) of a graph from its protobuf alone (griffin-export inspect)."""
    s = describe_onnx(path)
    return s, format_onnx(s)
