"""Block-wise 4-bit weights for an exported graph, with ONNX Runtime's own quantizer.

    griffin-export onnx expert.safetensors --quantize int4 -o expert_int4/

Every MatMul over a weight becomes com.microsoft MatMulNBits (4-bit blocks of `block_size`
along the input dimension, a float scale per block, a zero point unless symmetric), written
by onnxruntime.quantization's MatMulNBitsQuantizer. The embedding's Gather, norms, biases
and the rotary tables stay float; the lm_head is quantized unless `lm_head=False`.

Two of ONNX Runtime's algorithms: rtn (round to nearest, an integer zero point per block: the
kernels' fast CPU path) and hqq (a float zero point per block, fitted). A model that was itself
4-bit with a float minimum per block (the default model is Q4_1) loses accuracy again under rtn,
whose integer zero point shifts each block by up to half a step; hqq reproduces such blocks
almost exactly, but ONNX Runtime's CPU kernel takes float zero points on a slow path (README).

The exported graphs keep their weights as initializers named after the model's parameters
([out, in]) behind Transpose/Concat nodes that ONNX Runtime folds at session creation
(that is what lets a bundle be swapped in by name). The quantizer only takes a constant
[in, out] operand, so those nodes are folded here first, into one constant per MatMul
(Gemm with transB, the traced OPT's FF, becomes MatMul + Add). `packing` records which
parameters each quantized weight holds and in what order, and the runtime quantizes a
swapped bundle's FF weights the same way at load (`quantize_for_swap`: the same quantizer
over a one-MatMul graph per weight), so a bundle swapped into the graph gets exactly the
weights an export of its own graph would have.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass

import numpy as np

from ...errors import GriffinError
from ...settings import QuantSettings

BITS = 4


@dataclass(frozen=True)
class Packed:
    """One MatMulNBits weight: its initializers and the parameters ([out, in] each) stacked
    along out, then transposed, to make its [in, out] operand."""

    weight: str
    scales: str
    zero_points: str | None
    params: tuple[tuple[str, tuple[int, int]], ...]


def describe(settings: QuantSettings) -> str:
    sym = "symmetric" if settings.symmetric else "asymmetric"
    head = f"lm_head {settings.scheme}" if settings.lm_head else "lm_head float"
    return (f"{settings.algorithm}, block {settings.block_size}, {sym}, accuracy_level {settings.accuracy_level}, "
            f"{head}; embedding, norms and biases float")


def _nbits():
    """onnxruntime's quantizer module. Importing it calls logging.basicConfig(level=INFO), after
    which it and onnx_ir log every node to stderr; the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return matmul_nbits_quantizer


def _quantizer(settings: QuantSettings):
    m = _nbits()
    if settings.algorithm == "hqq":
        return m.HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=BITS)
    return m.DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                          accuracy_level=settings.accuracy_level or None, bits=BITS)


def _run_quantizer(proto, settings: QuantSettings, exclude: list[str]):
    """ONNX Runtime's MatMulNBitsQuantizer over `proto`; the quantized model proto."""
    from onnx import helper

    q = _nbits().MatMulNBitsQuantizer(proto, bits=BITS, block_size=settings.block_size, is_symmetric=settings.symmetric,
                                      accuracy_level=settings.accuracy_level or None, nodes_to_exclude=exclude,
                                      algo_config=_quantizer(settings))
    with warnings.catch_warnings():  # hqq hands torch a read-only numpy view and torch warns about it
        warnings.simplefilter("ignore", UserWarning)
        q.process()
    out = q.model.model
    for node in out.graph.node:  # the HQQ path writes no accuracy_level: the same compute type for both
        if node.op_type == "MatMulNBits" and settings.accuracy_level and \
                not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level", settings.accuracy_level))
    return out


def _lm_head(g, producer: dict) -> object | None:
    """The MatMul (or Gemm) that writes the logits output, through at most a few casts/reshapes."""
    node = producer.get("logits")
    for _ in range(4):
        if node is None or node.op_type in ("MatMul", "Gemm"):
            return node
        node = producer.get(node.input[0]) if node.input else None
    return None


def _fold(proto, lm_head: bool) -> dict[str, list[str]]:
    """Replace each MatMul over Transpose([Concat of] initializers) by a MatMul over one folded
    [in, out] constant, and Gemm(A, W, C, transB=1) by MatMul + Add. Returns the folded
    constant's name -> the parameters it stacks. With lm_head False the logits' MatMul is
    left alone (float)."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    head = None if lm_head else _lm_head(g, producer)
    head_out = list(head.output) if head is not None else None

    def const(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def sources(b: str) -> list[str] | None:
        t = producer.get(b)
        if t is None or t.op_type != "Transpose" or [a.ints for a in t.attribute if a.name == "perm"] != [[1, 0]]:
            return None
        src = t.input[0]
        if src in inits:
            return [src]
        c = producer.get(src)
        if c is None or c.op_type != "Concat" or [a.i for a in c.attribute if a.name == "axis"] != [0]:
            return None
        return list(c.input) if all(i in inits for i in c.input) else None

    folded: dict[str, list[str]] = {}
    new_inits = []
    nodes = []
    for node in g.node:
        params = None
        if node.op_type == "MatMul":
            params = sources(node.input[1])
        elif node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0 \
                    and attrs.get("beta", 1.0) == 1.0 and len(const(node.input[1]).shape) == 2:
                params = [node.input[1]]
        if not params or list(node.output) == head_out:
            nodes.append(node)
            continue
        name = "+".join(params) + ".T"
        if name not in folded:
            arrays = [const(p) for p in params]
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(np.concatenate(arrays, 0).T), name))
            folded[name] = params
        node_name = node.name or f"/quant/{name}"
        if node.op_type == "Gemm":
            mid = node.output[0] + "/matmul"
            nodes.append(helper.make_node("MatMul", [node.input[0], name], [mid], name=node_name))
            if len(node.input) > 2 and node.input[2]:
                nodes.append(helper.make_node("Add", [mid, node.input[2]], [node.output[0]], name=node_name + "/bias"))
            else:
                nodes[-1].output[0] = node.output[0]
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node_name))
    g.initializer.extend(new_inits)
    del g.node[:]
    g.node.extend(_live(nodes, {o.name for o in g.output}))
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return folded


def _live(nodes: list, outputs: set[str]) -> list:
    """The nodes whose outputs something still reads (the folded Transpose/Concat are not)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]


def quantize_proto(proto, settings: QuantSettings) -> dict[str, Packed]:
    """Quantize `proto` (weights loaded) in place; returns the packing, by quantized weight name."""
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in proto.graph.initializer}  # before folding
    folded = _fold(proto, settings.lm_head)
    if not folded:
        raise RuntimeError("no MatMul over a weight found to quantize")  # our own graph: a bug
    exclude = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] not in folded]
    proto.CopyFrom(_run_quantizer(proto, settings, exclude))
    packing: dict[str, Packed] = {}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        weight, scales = node.input[1], node.input[2]
        zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
        source = weight.removesuffix(f"_Q{BITS}")
        if source not in folded:
            raise RuntimeError(f"quantized weight {weight} is not one of the folded ones")
        packing[weight] = Packed(weight, scales, zp, tuple((p, shapes[p]) for p in folded[source]))
    missing = set(folded) - {w.removesuffix(f"_Q{BITS}") for w in packing}
    if missing:
        raise RuntimeError(f"the quantizer left weights float: {sorted(missing)[:3]}")
    return packing


# -- the packing in the graph's metadata ------------------------------------------------------------


def packing_to_text(packing: dict[str, Packed]) -> str:
    return json.dumps({w: {"scales": p.scales, "zero_points": p.zero_points,
                           "params": [[n, *s] for n, s in p.params]} for w, p in packing.items()},
                      separators=(",", ":"))


def packing_from_text(text: str, source: str) -> dict[str, Packed]:
    try:
        raw = json.loads(text)
        return {w: Packed(w, v["scales"], v["zero_points"], tuple((n, (int(r), int(c))) for n, r, c in v["params"]))
                for w, v in raw.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise GriffinError(f"{source}: metadata quant_packing is not a valid packing ({type(e).__name__})") from None


def param_shapes(packing: dict[str, Packed]) -> dict[str, tuple[int, int]]:
    """Every parameter packed into a quantized weight -> its [out, in] shape."""
    return {n: s for p in packing.values() for n, s in p.params}


# -- a swapped bundle ------------------------------------------------------------------------------


def quantize_for_swap(packing: dict[str, Packed], weights: dict[str, np.ndarray],
                      settings: QuantSettings) -> dict[str, np.ndarray]:
    """The quantized initializers (weight, scales, zero points) of every packed weight whose
    parameters `weights` holds, quantized as the exporter quantized its own: the same quantizer
    run over a graph of one MatMul on that weight."""
    out: dict[str, np.ndarray] = {}
    for p in packing.values():
        have = [n in weights for n, _ in p.params]
        if not any(have):
            continue
        if not all(have):
            missing = [n for n, _ in p.params if n not in weights]
            raise GriffinError(f"the quantized graph packs {', '.join(n for n, _ in p.params)} into one weight; "
                               f"the bundle lacks {', '.join(missing)}")
        w = np.ascontiguousarray(np.concatenate([weights[n].astype(np.float32, copy=False) for n, _ in p.params], 0).T)
        packed, scales, zp = _quantize_one(w, settings)
        out[p.weight] = packed
        out[p.scales] = scales
        if p.zero_points is not None:
            out[p.zero_points] = zp
    return out


def _quantize_one(w: np.ndarray, settings: QuantSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(packed weight, scales, zero points) of one [in, out] weight, by the quantizer itself."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="one")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, "w")])
    out = _run_quantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), settings, [])
    node = next(x for x in out.graph.node if x.op_type == "MatMulNBits")
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
    return values[node.input[1]], values[node.input[2]], values[zp] if zp else None
