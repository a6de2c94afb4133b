"""The decoder as an ONNX graph with explicit KV cache inputs/outputs (HF Optimum names).

    inputs   input_ids [batch, sequence] int64, attention_mask [batch, past + sequence] int64,
             position_ids [batch, sequence] int64,
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    outputs  logits [batch, sequence, vocab], present.{i}.key / .value [batch, kv_heads, past + sequence, head_dim]

One graph serves prefill (many tokens, past length 0) and decode (one token). The FF
weights are initializers named after the base model's parameters, exactly as the bundle
names its tensors (model.layers.3.mlp.gate_proj.weight [k, hidden]), so ONNX Runtime can
replace them at session creation with another bundle of the same model and k.

Exporter: torch.onnx.export(dynamo=True), i.e. torch.export + onnxscript. The TorchScript
exporter traces with concrete sizes, and transformers 5.x computes mask and cache lengths
as Python ints, so its graph would bake in the example's past length; torch.export keeps
them symbolic, and transformers keeps its models torch.export-clean for every architecture
in arch.py (Gemma2's sliding window and OPT's biases and learned positions included).
The onnxscript optimizer is off: it folds Transpose(weight) into anonymous initializers,
which would break swapping FF weights by name (ONNX Runtime folds them at session creation
instead, after the swap). Tracing forces transformers' GQA path of SDPA
(TRANSFORMERS_SDPA_FORCE_GQA), so grouped KV heads go to the Attention node as they are
instead of being repeated (a copy of the whole cache per step) by an Expand in the graph.

Every layer's KV is kept at full length, sliding-window layers included (their window is a
mask, not a truncated cache), so all layers share one past length; the loader left-pads a
bundle's windowed KV with zeros that the mask never reads.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ... import __version__
from ...bundle.experts import check_bundle, check_fresh, installed
from ...bundle.format import Bundle
from ...errors import GriffinError
from ...files.outputs import atomic_dir, check_output_dir
from ...model.arch import attention_shape, ff_blocks, ff_param, sliding_layers, spec_for
from ...model.decoding import eos_ids
from ...model.load import LoadedModel, dtype_name
from ...model.prefill import cache_kwarg
from ...registry import one_of
from ...settings import KV_DTYPE, LAYOUTS, QuantSettings, check_kv_dtype
from .graph import (BATCH, DATA_FILE, INPUT_NAMES, LEAN_FORMAT_VERSION, MODEL_FILE, PAST, PAST_LEN, PRESENT, SEQ,
                    TOTAL_LEN, GraphInfo, read_graph)
from .int4 import packing_to_text, quantize_proto

# 23: SDPA becomes one ONNX Attention node (GQA-aware) instead of ~15 decomposed ops; with
# the GQA path below, ORT CPU decode ran ~1.5x faster than opset 20 on the default model
# (999-token prompt). ONNX Runtime >= 1.23 has the Attention-23 kernel.
OPSET = 23

# example sizes for tracing: > 1 so torch.export does not specialize any axis to 0 or 1
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 5


# -- the module torch.export traces ------------------------------------------------------------


class _Decoder(nn.Module):
    """(input_ids, attention_mask, position_ids, past) -> (logits, present): the HF model with its
    cache made explicit. The cache is rebuilt from the past tensors every call, so the graph
    holds no state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.causal = model  # initializer names get a "causal." prefix, stripped after export
        self._cache_kw = cache_kwarg(type(model))

    def forward(self, input_ids, attention_mask, position_ids, past: list[tuple[torch.Tensor, torch.Tensor]]):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.causal.config)
        # full-length layers everywhere: the config still gives sliding layers their window mask
        cache.layers = [DynamicLayer() for _ in cache.layers]
        for layer, (k, v) in zip(cache.layers, past):
            layer.update(k, v)
        out = self.causal(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{self._cache_kw: cache})
        return out.logits, [(layer.keys, layer.values) for layer in cache.layers]


# -- export ------------------------------------------------------------------------------------


def ff_widths(lm: LoadedModel) -> list[int]:
    """Each layer's FF width as the weights have it (not the config's intermediate_size)."""
    return [int(b.output.weight.shape[1]) for b in ff_blocks(lm.model, lm.spec)]


def ff_weight_names(lm: LoadedModel) -> list[str]:
    names = []
    for i, b in enumerate(ff_blocks(lm.model, lm.spec)):
        for name, lin in (*b.inputs.items(), (lm.spec.output, b.output)):
            names.append(ff_param(lm.spec, i, name))
            if lin.bias is not None:
                names.append(ff_param(lm.spec, i, name, "bias"))
    return names


def graph_info(lm: LoadedModel, bundle: Bundle | None, max_length: int = 0, kv_dtype: str = KV_DTYPE) -> GraphInfo:
    _, kv_heads, head_dim = attention_shape(lm.config)
    widths = ff_widths(lm)
    lean = dict(layout="lean", max_length=max_length, batch_size=1, format_version=LEAN_FORMAT_VERSION,
                kv_dtype=kv_dtype) if max_length else {}
    common = dict(base_model=lm.identity, base_fingerprint=lm.fingerprint, architecture=lm.architecture,
                  dtype=dtype_name(lm.dtype), num_layers=lm.num_layers, d_ff=lm.d_ff, hidden_size=lm.hidden_size,
                  k=widths, kv_heads=kv_heads, head_dim=head_dim, sliding_layers=sliding_layers(lm.model),
                  eos_token_ids=sorted(eos_ids(lm.config, lm.tokenizer)), context_length=lm.context_length or 0,
                  tokenizer=lm.tokenizer_identity(), **lean)
    if bundle is None:
        return GraphInfo(kind="full", density=1.0, method="full", **common)
    b = bundle.info
    return GraphInfo(kind="pruned", density=b.density, method=b.method, chat=b.chat,
                     bundle_format_version=b.format_version, extra=dict(b.extra), **common)


def choose_layout(lm: LoadedModel, graph: str) -> str:
    """The graph layout to export: "lean" or "traced" (graph: auto, lean or traced)."""
    one_of(graph, LAYOUTS, "graph layout")
    from .lean import check_lean_model

    if graph == "auto":
        try:
            check_lean_model(lm)
        except GriffinError:
            return "traced"
        return "lean"
    if graph == "lean":
        check_lean_model(lm)
    return graph


def export_onnx(lm: LoadedModel, output: str | os.PathLike, bundle: Bundle | None = None, *,
                force: bool = False, progress: bool = False, source: str = "bundle", graph: str = "auto",
                max_length: int | None = None, quantize: QuantSettings | None = None,
                kv_dtype: str | None = None) -> Path:
    """Write OUTPUT/model.onnx (+ model.onnx.data and the tokenizer): the decoder with the
    bundle's experts, or the model as loaded when `bundle` is None. `graph`: the lean decoder
    (onnx_lean.py; with a KV buffer of `max_length` positions and of type `kv_dtype`, None:
    settings.KV_DTYPE for a float32 model, a float16 model's own dtype) where the architecture has one
    (auto), or the traced one (its cache keeps the weights' dtype). `quantize`: block-wise 4-bit MatMuls (onnx_quant.py). Returns OUTPUT."""
    from tqdm.auto import tqdm

    out = check_output_dir(output, force, MODEL_FILE)
    if kv_dtype is not None:
        check_kv_dtype(kv_dtype)
    layout = choose_layout(lm, graph)
    if layout == "lean":
        from .lean import max_length_for

        max_length = max_length_for(lm, max_length)
        kv_dtype = kv_dtype or (KV_DTYPE if lm.dtype == torch.float32 else dtype_name(lm.dtype))
    elif max_length is not None:
        raise GriffinError("`max_length` sizes the lean graph's KV buffer; the traced graph's cache grows")
    elif kv_dtype is not None and kv_dtype != dtype_name(lm.dtype):
        raise GriffinError(f"kv_dtype={kv_dtype!r} is the lean graph's choice; the traced graph's cache keeps the "
                           f"weights' dtype ({dtype_name(lm.dtype)})")
    if bundle is not None:
        check_bundle(lm, bundle.info, source)
        check_fresh(lm)
    if quantize is not None and lm.dtype != torch.float32:
        raise GriffinError(f"quantize={quantize.scheme} takes a float32 model; this one is {dtype_name(lm.dtype)}")
    _ = lm.fingerprint  # hashed before any swap
    bar = tqdm(total=5 if quantize else 4, desc="onnx export", unit="stage", disable=not progress, leave=False)

    def stage(name: str) -> None:
        bar.set_postfix_str(name)
        bar.refresh()

    scales = None
    if layout == "lean" and kv_dtype == "int8":  # on the model as loaded: every graph of it gets the same
        from .lean import kv_scales

        stage("int8 KV scales")
        scales = kv_scales(lm)
    with atomic_dir(out) as tmp, (installed(lm, bundle.weights) if bundle else contextlib.nullcontext()):
        info = graph_info(lm, bundle, max_length if layout == "lean" else 0, kv_dtype or KV_DTYPE)
        if bundle is not None and info.k != bundle.info.k:  # the swap went wrong: a bug, not bad input
            raise RuntimeError(f"installed widths {info.k} differ from the bundle's k {bundle.info.k}")
        if layout == "lean":
            stage("build (lean graph)")
            _export_lean(lm, info, tmp, scales)
            bar.update(2)
        else:
            stage("trace (torch.export)")
            program = _trace(lm, info)
            bar.update()
            stage("save")
            _finish(program.model, lm, info)
            _save(program.model, tmp, ff_weight_names(lm))
            bar.update()
        if quantize is not None:
            stage(f"quantize ({quantize.scheme})")
            _quantize(tmp, info, quantize, ff_weight_names(lm))
            bar.update()
        stage("onnx.checker")
        check_graph(tmp / MODEL_FILE)
        bar.update()
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        bar.update()
    bar.close()
    return out


def _export_lean(lm: LoadedModel, info: GraphInfo, directory: Path, scales) -> None:
    """The lean graph, its external weights and onnxruntime-genai's genai_config.json."""
    import onnx

    from .lean import build_lean, genai_config, write_genai_config

    proto, facts = build_lean(lm, info.max_length, set(ff_weight_names(lm)), info.sliding_layers, info.kv, scales)
    if (facts["kv_heads"], facts["head_dim"]) != (info.kv_heads, info.head_dim):  # a bug, not bad input
        raise RuntimeError(f"lean graph KV layout {facts} differs from the model's cache ({info.kv_heads}, {info.head_dim})")
    onnx.helper.set_model_props(proto, info.to_metadata())
    proto.producer_version = __version__
    # every FF tensor external (ONNX Runtime swaps only those, runtime/onnx.py); the small
    # shape constants stay inline, where the checker's shape inference can read them
    ff = set(ff_weight_names(lm))
    smallest = min(t.numel() * t.element_size() for n, t in lm.model.named_parameters() if n in ff)
    try:
        onnx.save_model(proto, str(directory / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=min(256, smallest))
    except OSError as e:
        raise GriffinError(f"cannot write {directory / MODEL_FILE}: {e.strerror or e}") from e
    write_genai_config(directory, genai_config(lm, facts, info.max_length, MODEL_FILE))


def _quantize(directory: Path, info: GraphInfo, settings: QuantSettings, ff_names: list[str]) -> None:
    """Quantize the graph just written in `directory` and record how in its metadata."""
    import dataclasses

    import onnx

    path = directory / MODEL_FILE
    proto = onnx.load(str(path), load_external_data=True)
    packing = quantize_proto(proto, settings)
    onnx.helper.set_model_props(proto, dataclasses.replace(info, **_quant_fields(settings, packing)).to_metadata())
    # what a runtime swaps (quantized FF weights and FF biases) goes external however small
    swap = {n for p in packing.values() for n in (p.weight, p.scales, p.zero_points) if n} | set(ff_names)
    smallest = min(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer if t.name in swap)
    (directory / DATA_FILE).unlink()  # loaded above; written anew
    try:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=min(256, smallest))
    except OSError as e:
        raise GriffinError(f"cannot write {path}: {e.strerror or e}") from e


def _quant_fields(settings: QuantSettings, packing) -> dict:
    return dict(quantization=settings.scheme, quant_block_size=settings.block_size,
                quant_accuracy_level=settings.accuracy_level, quant_symmetric=settings.symmetric,
                quant_lm_head=settings.lm_head, quant_algorithm=settings.algorithm,
                quant_packing=packing_to_text(packing))


def _example_inputs(lm: LoadedModel, info: GraphInfo):
    B, S, P = _EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST
    dev = lm.device
    ids = torch.full((B, S), 1, dtype=torch.long, device=dev)
    mask = torch.ones(B, P + S, dtype=torch.long, device=dev)
    pos = torch.arange(P, P + S, device=dev).expand(B, S).contiguous()
    kv = lambda: torch.zeros(B, info.kv_heads, P, info.head_dim, dtype=lm.dtype, device=dev)  # noqa: E731
    past = [(kv(), kv()) for _ in range(info.num_layers)]
    return (ids, mask, pos, past)


def _trace(lm: LoadedModel, info: GraphInfo):
    from torch.export import Dim

    batch, seq, past, total = Dim(BATCH), Dim(SEQ), Dim(PAST_LEN), Dim(TOTAL_LEN)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq},
               "past": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(info.num_layers)]}
    L = info.num_layers
    names_in = [*INPUT_NAMES, *(PAST.format(i, t) for i in range(L) for t in ("key", "value"))]
    names_out = ["logits", *(PRESENT.format(i, t) for i in range(L) for t in ("key", "value"))]
    decoder = _Decoder(lm.model).eval()
    chatter = io.StringIO()  # torch.onnx prints its stages; keep them out of the user's terminal
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.no_grad(), _env(GQA_ENV, "1"):
            warnings.simplefilter("ignore")
            return torch.onnx.export(decoder, _example_inputs(lm, info), None, dynamo=True, optimize=False,
                                     dynamic_shapes=dynamic, input_names=names_in, output_names=names_out,
                                     opset_version=OPSET, verbose=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GriffinError(f"ONNX export of the {info.architecture} model failed: {first}") from e


GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' sdpa_attention at call time


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _finish(model, lm: LoadedModel, info: GraphInfo) -> None:
    """Name initializers after the base model's parameters, check the FF ones are all there with
    the expected widths, and attach the metadata."""
    prefix = "causal."
    for name, value in list(model.graph.initializers.items()):
        if name.startswith(prefix):
            value.name = name[len(prefix):]
    inits = model.graph.initializers
    spec = spec_for(lm.architecture)
    missing = [n for n in ff_weight_names(lm) if n not in inits]
    if missing:  # the exporter folded or renamed an FF weight: swapping bundles would silently fail
        raise RuntimeError(f"FF weights are not named initializers in the exported graph: {missing[:3]}")
    for i, k in enumerate(info.k):
        shape = tuple(inits[ff_param(spec, i, spec.output)].shape)
        if shape[-1] != k:
            raise RuntimeError(f"{ff_param(spec, i, spec.output)} has shape {shape}, expected width {k}")
    # the exporter annotates every node with its Python stack trace (local paths, most of the
    # .onnx bytes); a deployable graph does not need them
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        for v in node.outputs:
            v.metadata_props.clear()
    for v in (*model.graph.inputs, *model.graph.initializers.values()):
        v.metadata_props.clear()
    model.producer_name = "griffin-export"
    model.producer_version = __version__
    model.metadata_props.update(info.to_metadata())


def _save(model, directory: Path, ff_names: list[str]) -> None:
    import onnx_ir as ir

    # ONNX Runtime only swaps initializers stored as external data (see runtime/onnx.py), so
    # every FF tensor goes external, however small; other tensors under 256 bytes stay inline.
    smallest = min(model.graph.initializers[n].const_value.nbytes for n in ff_names)
    try:
        ir.save(model, directory / MODEL_FILE, external_data=DATA_FILE, size_threshold_bytes=min(256, smallest - 1))
    except OSError as e:
        raise GriffinError(f"cannot write {directory / MODEL_FILE}: {e.strerror or e}") from e


def check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:  # our own graph failing the checker is a bug
        raise RuntimeError(f"exported graph fails onnx.checker: {str(e).splitlines()[0]}") from e


def write_graph(bundle: str | os.PathLike, output: str | os.PathLike, **options) -> Path:
    """The registry's writer (bundle, output, **options) -> path: export_graph for one bundle."""
    return export_graph(output, bundle, **options)[0]


def export_graph(output: str | os.PathLike, bundle: str | os.PathLike | None = None, *, model: str | None = None,
                 gguf_file: str | None = None, dtype: str | None = None, device: str = "cpu", force: bool = False,
                 progress: bool = False, graph: str = "auto", max_length: int | None = None,
                 quantize: QuantSettings | None = None, kv_dtype: str | None = None) -> tuple[Path, GraphInfo]:
    """What `griffin-export onnx` does: load the base model (the bundle's recorded one unless
    `model` is given) and export the bundle's graph, or the full model's when `bundle` is None."""
    from ...bundle.format import read_bundle
    from ...model.load import load_model

    check_output_dir(output, force, MODEL_FILE)  # fail before loading anything
    if kv_dtype is not None:
        check_kv_dtype(kv_dtype)
    b = read_bundle(bundle, load_kv=False) if bundle is not None else None
    if b is not None and dtype is not None and dtype != b.info.dtype:
        raise GriffinError(f"dtype={dtype}: bundle {bundle} holds {b.info.dtype} weights; its graph has the same dtype")
    weights = b.info.dtype if b is not None else (dtype or "float32")
    if graph == "traced" and kv_dtype not in (None, weights):  # export_onnx says so too, after the load
        raise GriffinError(f"kv_dtype={kv_dtype!r} is the lean graph's choice; the traced graph's cache keeps the "
                           f"weights' dtype ({weights})")
    lm = load_model(model or (b.info.base_model if b else None), gguf_file=gguf_file,
                    dtype=b.info.dtype if b else (dtype or "float32"), device=device, quiet=not progress)
    path = export_onnx(lm, output, b, force=force, progress=progress, source=str(bundle or "bundle"), graph=graph,
                       max_length=max_length, quantize=quantize, kv_dtype=kv_dtype)
    return path, read_graph(path).info

