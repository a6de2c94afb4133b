"""The lean decoder graph: fused ONNX Runtime ops and one KV buffer per layer shared by past and present.

    inputs   input_ids [batch, sequence] int64, attention_mask [batch, total] int64,
             past_key_values.{i}.key / .value [batch, kv_heads, max_length, head_dim]
    outputs  logits [batch, sequence, vocab], present.{i}.key / .value (the same buffers)

What the traced graph (onnx_export.py) spends per decode step and this one does not: ~60 nodes
per layer (rotary, mask building, reshapes, casts), and a copy of the whole past into a new
present tensor in every Attention node. Here a layer is ten nodes, in the ops ONNX Runtime has
CPU and CUDA kernels for and that onnxruntime-genai's model builder writes for these models:
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (the residual add fused into the
norm), one packed QKV MatMul, GroupQueryAttention with the rotary embedding inside (cos/sin
caches as initializers), one packed gate/up MatMul. The runtime binds the same preallocated
buffer [1, kv_heads, max_length, head_dim] to a layer's past input and present output, so
GroupQueryAttention writes the new token's key and value in place (past_present_share_buffer);
positions come from the attention mask (seqlens_k = its sum - 1), as in onnxruntime-genai.

Why not onnxruntime-genai's builder itself: it loads the model with from_pretrained (a pruned
model with per-layer widths has no config for that) and names and pre-transposes the weights its
own way; swapping a bundle's FF weights by name needs them stored under the base model's
parameter names in the bundle's layout. So every weight here is an initializer named after the
base model's parameter, as the model holds it ([out, in]); the packing (Concat) and transposes
are nodes over initializers that ONNX Runtime folds into constants at session creation, after
add_external_initializers has swapped a bundle in. The graph's inputs, outputs and ops are the
builder's, and the directory carries a genai_config.json, so onnxruntime-genai loads it too.

Covers the Llama family of the adapter table (arch.FFSpec.lean): Llama, Mistral, Qwen2 (QKV
biases), Qwen3 (per-head q/k RMSNorm before the rotary). Other architectures keep the traced graph.

The KV buffers may be of another type than the weights (`kv_dtype`, GroupQueryAttention's T_CACHE):
float16 (the new key and value rounded to it as they are written, attention over the half buffer
with a float32 query), or int8 with a float32 scale per KV head and channel (k_quant_type and
v_quant_type PER_CHANNEL, kv_cache_bit_width 8: a value is stored as round(x / scale), clipped to
±127). The scales are initializers `kv_scale.{i}.key` / `.value` [1, kv_heads, 1, head_dim], chosen
at export (kv_scales below); a runtime quantizes a float cache it is handed with the same ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...errors import GriffinError
from ...model.arch import attention_shape, attention_window, ff_blocks, lean_gap, rotary_table
from .graph import KV_SCALE

# the graph's symbolic dimensions (onnxruntime-genai's names)
BATCH, SEQ, TOTAL, MAX_LEN = "batch_size", "sequence_length", "total_sequence_length", "max_sequence_length"
MS_DOMAIN = "com.microsoft"
DEFAULT_MAX_LENGTH = 4096  # KV buffer positions when --max-length is not given (capped by the context)
INT8_MAX = 127
# an int8 KV channel's scale: the largest |value| it takes on the calibration text, times this, over 127:
# room for prompts that go further than the text does (clipping costs more than coarser steps). Chosen on
# XSum dev rows 43, 136, 71 (1,804, 1,661, 1,562 tokens), the default model, mean KL divergence from the
# float32 KV's next-token distribution over 32 teacher-forced steps: margin 1: 0.28 / 0.21 / 0.12;
# 1.5: 0.16 / 0.075 / 0.044; 3: 0.022 / 0.007 / 0.003; 4: 0.010 / 0.011 / 0.004; 6: 0.018 / 0.027 / 0.011
INT8_MARGIN = 4.0


def check_lean_model(lm) -> None:
    """Refuse a model the lean graph does not cover, naming what is missing."""
    gap = lean_gap(lm.config)
    if gap:
        raise GriffinError(f"{gap}; export the traced graph (graph='traced')")
    head_dim = attention_shape(lm.config)[2]
    if head_dim % 16:  # ONNX Runtime's CPU GroupQueryAttention (its rotary kernel) refuses others
        raise GriffinError(f"the lean ONNX graph needs head_dim a multiple of 16; this model's is {head_dim} "
                           "(graph='traced')")


def max_length_for(lm, requested: int | None) -> int:
    """KV buffer length: the request, or min(context, DEFAULT_MAX_LENGTH); never past the context."""
    ctx = lm.context_length or DEFAULT_MAX_LENGTH
    if requested is None:
        return min(ctx, DEFAULT_MAX_LENGTH)
    if requested < 2:
        raise GriffinError(f"`max_length` must be at least 2, got {requested}")
    if requested > ctx:
        raise GriffinError(f"max_length={requested} is past the model's context of {ctx} tokens")
    return requested


def kv_scales(lm, margin: float = INT8_MARGIN) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (key, value) scales [kv_heads, head_dim] of an int8 KV cache for `lm` (the model as
    loaded, no experts installed): each channel's largest |value| on calibration.CALIBRATION_TEXT
    (on seeded random tokens for a model without a tokenizer), times `margin`, over 127. The text
    goes through in chunks no longer than a sliding window, so a windowed layer's cache (which keeps
    only its window) shows every position once."""
    from ...model.prefill import cache_tensors, forward, new_cache
    from .calibration import CALIBRATION_TEXT

    if lm.tokenizer is not None:
        ids = lm.tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids
    else:
        vocab = int(lm.model.get_input_embeddings().weight.shape[0])
        ids = torch.randint(0, vocab, (1, 512), generator=torch.Generator().manual_seed(0))
    if lm.context_length:
        ids = ids[:, :lm.context_length - 1]
    ids = ids.to(lm.device)
    chunk = min(attention_window(lm.config) or 512, 512)
    cache = new_cache(lm.model)
    top: list[list[torch.Tensor]] | None = None
    for start in range(0, ids.shape[1], chunk):
        n = min(chunk, ids.shape[1] - start)
        forward(lm.model, ids[:, start:start + n], cache)
        # the chunk's positions are the last n of every layer's cache
        now = [[t[:, :, -n:].detach().float().abs().amax(dim=(0, 2)) for t in pair] for pair in cache_tensors(cache)]
        top = now if top is None else [[torch.maximum(a, b) for a, b in zip(x, y)] for x, y in zip(top, now)]
    scale = np.float32(margin / INT8_MAX)
    return [tuple(np.maximum(t.cpu().numpy(), 1e-6).astype(np.float32) * scale for t in pair) for pair in top]


def quantize_kv(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A float KV tensor [B, kv_heads, n, head_dim] as the int8 GroupQueryAttention stores it with
    scale [1, kv_heads, 1, head_dim]: round(x / scale), clipped to ±127."""
    return np.clip(np.rint(x.astype(np.float32) / scale), -INT8_MAX, INT8_MAX).astype(np.int8)


class _Graph:
    """Nodes, initializers and value names of the graph being built."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self._n = 0

    def init(self, name: str, t: torch.Tensor | np.ndarray) -> str:
        arr = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else t
        if name in self.inits:
            raise RuntimeError(f"initializer {name} added twice")
        self.inits[name] = arr
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, *, domain: str = "", name: str | None = None,
           outs: list[str] | None = None, **attrs) -> list[str]:
        from onnx import helper

        self._n += 1
        base = name or f"/{op_type}_{self._n}"
        outs = outs or [f"{base}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, **kw)[0]

    def weight_t(self, *names: str) -> str:
        """The [in, out] operand of a MatMul over initializers [out, in] (packed when several)."""
        src = names[0] if len(names) == 1 else self.one("Concat", list(names), axis=0)
        return self.one("Transpose", [src], perm=[1, 0])


def kv_elem(kv_dtype: str, weights: int) -> int:
    """The onnx element type of the KV buffers: kv_dtype's ("float32", "float16", "int8")."""
    from onnx import TensorProto

    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}.get(kv_dtype, weights)


def build_lean(lm, max_length: int, ff_names: set[str], sliding: list[int], kv_dtype: str = "float32",
               kv_scales: list[tuple[np.ndarray, np.ndarray]] | None = None):
    """The lean decoder of `lm` (its experts installed, if any) as an onnx ModelProto; every
    initializer named after the model's parameter. KV buffers of `kv_dtype`; int8 takes each
    layer's (key, value) scales [kv_heads, head_dim]. Returns (proto, layout facts)."""
    from onnx import TensorProto, helper

    check_lean_model(lm)
    model, cfg = lm.model, lm.config
    inner = model.model
    dtype = lm.dtype
    if dtype not in (torch.float32, torch.float16):
        raise GriffinError(f"the ONNX graph takes float32 or float16 weights, not {dtype}")
    elem = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
    kv_type = kv_elem(kv_dtype, elem)
    if (kv_dtype == "int8") != (kv_scales is not None):
        raise RuntimeError("int8 KV buffers need their scales, and only they")  # the exporter's bug
    heads, kv_heads, head_dim = attention_shape(cfg)
    eps = float(cfg.rms_norm_eps)
    window = attention_window(cfg)
    g = _Graph()
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}

    def param(t: torch.Tensor) -> str:
        name = names[id(t)]
        if name not in g.inits:
            g.init(name, t)
        return name

    # attention mask -> GroupQueryAttention's seqlens_k (tokens before the last, per row) and total length
    one = g.init("/constants/one", np.array([1], np.int64))
    seqlens = g.one("Cast", [g.one("Sub", [g.one("ReduceSum", ["attention_mask", one], keepdims=0), one])],
                    to=TensorProto.INT32, name="/attn_mask/seqlens_k")
    total = g.one("Cast", [g.one("Gather", [g.one("Shape", ["attention_mask"]), g.init("/constants/axis1",
                                                                                     np.array(1, np.int64))], axis=0)],
                  to=TensorProto.INT32, name="/attn_mask/total_seq_len")
    cos, sin = rotary_table(model, max_length)  # GroupQueryAttention takes the first half of each row
    cos_name, sin_name = g.init("cos_cache", cos[:, :head_dim // 2].to(dtype)), g.init("sin_cache", sin[:, :head_dim // 2].to(dtype))

    emb = inner.embed_tokens.weight
    resid = g.one("Gather", [param(emb), "input_ids"], axis=0, name="/embed_tokens/Gather")
    layers = inner.layers
    blocks = ff_blocks(model, lm.spec)
    x = g.one("RMSNormalization", [resid, param(layers[0].input_layernorm.weight)], axis=-1,
              epsilon=eps, stash_type=1, name="/layers.0/input_layernorm")
    for i, (layer, block) in enumerate(zip(layers, blocks)):
        att = layer.self_attn
        p = f"/layers.{i}"
        q, k, v = att.q_proj, att.k_proj, att.v_proj
        qkv = g.one("MatMul", [x, g.weight_t(param(q.weight), param(k.weight), param(v.weight))], name=f"{p}/attn/qkv_proj")
        if q.bias is not None:
            qkv = g.one("Add", [qkv, g.one("Concat", [param(q.bias), param(k.bias), param(v.bias)], axis=0)])
        gqa_in = [qkv, "", ""]
        if lm.spec.qk_norm:  # Qwen3: RMSNorm over each head of q and k, before the rotary
            qs, ks, vs = g.op("Split", [qkv, g.init(f"{p}/qkv_sizes", np.array(
                [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], np.int64))], 3, axis=-1)
            gqa_in = [_head_norm(g, qs, param(att.q_norm.weight), head_dim, eps, f"{p}/attn/q_norm"),
                      _head_norm(g, ks, param(att.k_norm.weight), head_dim, eps, f"{p}/attn/k_norm"), vs]
        # ORT's local_window_size counts as transformers' sliding_window does (tested on Mistral)
        left = window if window and i in sliding else -1
        quant: dict = {}
        scales: list[str] = []
        if kv_scales is not None:  # position_ids, attention_bias and head_sink skipped, then the scales
            scales = ["", "", "", *(g.init(KV_SCALE.format(i, t), np.ascontiguousarray(
                s.reshape(1, kv_heads, 1, head_dim), np.float32)) for t, s in zip(("key", "value"), kv_scales[i]))]
            quant = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        attn = g.op("GroupQueryAttention", [*gqa_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                            seqlens, total, cos_name, sin_name, *scales],
                    outs=[f"{p}/attn/output_0", f"present.{i}.key", f"present.{i}.value"],
                    domain=MS_DOMAIN, name=f"{p}/attn/GroupQueryAttention", num_heads=heads,
                    kv_num_heads=kv_heads, scale=float(att.scaling), do_rotary=1, rotary_interleaved=0,
                    local_window_size=left, **quant)[0]
        o = g.one("MatMul", [attn, g.weight_t(param(att.o_proj.weight))], name=f"{p}/attn/o_proj")
        if att.o_proj.bias is not None:
            o = g.one("Add", [o, param(att.o_proj.bias)])
        x, _, _, resid = g.op("SkipSimplifiedLayerNormalization", [o, resid, param(layer.post_attention_layernorm.weight)],
                              4, domain=MS_DOMAIN, epsilon=eps, name=f"{p}/post_attention_layernorm")
        x = _mlp(g, x, block, lm.spec, param, f"{p}/mlp")
        last = i + 1 == len(layers)
        norm = inner.norm.weight if last else layers[i + 1].input_layernorm.weight
        x, _, _, resid = g.op("SkipSimplifiedLayerNormalization", [x, resid, param(norm)], 4, domain=MS_DOMAIN,
                              epsilon=eps, name="/norm" if last else f"/layers.{i + 1}/input_layernorm")
    head = model.get_output_embeddings()
    if head.bias is not None:
        g.one("Add", [g.one("MatMul", [x, g.weight_t(param(head.weight))], name="/lm_head"), param(head.bias)],
              outs=["logits"])
    else:
        g.one("MatMul", [x, g.weight_t(param(head.weight))], name="/lm_head", outs=["logits"])

    missing = sorted(ff_names - set(g.inits))
    if missing:
        raise RuntimeError(f"FF weights missing from the lean graph: {missing[:3]}")
    kv_shape = [BATCH, kv_heads, MAX_LEN, head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH, SEQ]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [BATCH, TOTAL])]
    outputs = [helper.make_tensor_value_info("logits", elem, [BATCH, SEQ, int(head.weight.shape[0])])]
    for i in range(len(layers)):
        for t in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{t}", kv_type, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{t}", kv_type, kv_shape))
    from onnx import numpy_helper

    initializers = [numpy_helper.from_array(arr, name) for name, arr in g.inits.items()]
    graph = helper.make_graph(g.nodes, "griffin-lean-decoder", inputs, outputs, initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS_DOMAIN, 1)],
                              ir_version=10, producer_name="griffin-export")
    facts = {"kv_heads": kv_heads, "head_dim": head_dim, "heads": heads, "window": window}
    return proto, facts


def _head_norm(g: _Graph, x: str, weight: str, head_dim: int, eps: float, name: str) -> str:
    """RMSNorm over each head_dim slice of x [B, S, heads * head_dim]."""
    shape = g.one("Shape", [x])
    per_head = g.one("Reshape", [x, g.init(f"{name}/shape", np.array([0, 0, -1, head_dim], np.int64))])
    normed = g.one("RMSNormalization", [per_head, weight], axis=-1, epsilon=eps, stash_type=1, name=name)
    return g.one("Reshape", [normed, shape])


def _mlp(g: _Graph, x: str, block, spec, param, name: str) -> str:
    """down(silu(gate(x)) * up(x)) with gate and up as one MatMul over the (sliced) weights."""
    gate, up = (block.inputs[n] for n in spec.inputs)
    width = int(block.output.weight.shape[1])
    gu = g.one("MatMul", [x, g.weight_t(param(gate.weight), param(up.weight))], name=f"{name}/gate_up_proj")
    gs, us = g.op("Split", [gu, g.init(f"{name}/split", np.array([width, width], np.int64))], 2, axis=-1)
    act = g.one("Mul", [gs, g.one("Sigmoid", [gs])], name=f"{name}/act")
    down = g.one("MatMul", [g.one("Mul", [act, us]), g.weight_t(param(block.output.weight))], name=f"{name}/down_proj")
    return down


# -- onnxruntime-genai ---------------------------------------------------------------------------


def genai_config(lm, facts: dict, max_length: int, model_file: str) -> dict:
    """genai_config.json for onnxruntime-genai's runtime (og.Model(DIR)), in the shape its
    builder writes for a decoder with shared past/present buffers."""
    from ...model.decoding import eos_ids

    cfg = lm.config
    eos = sorted(eos_ids(cfg, lm.tokenizer))
    bos = getattr(cfg, "bos_token_id", None)
    pad = getattr(cfg, "pad_token_id", None)
    return {
        "model": {
            "bos_token_id": bos if bos is not None else (eos[0] if eos else 0),
            "context_length": max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": facts["head_dim"],
                "hidden_size": lm.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": facts["heads"],
                "num_hidden_layers": lm.num_layers,
                "num_key_value_heads": facts["kv_heads"],
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
            "type": lm.architecture,
            "vocab_size": int(lm.model.get_output_embeddings().weight.shape[0]),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": max_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(directory: Path, config: dict) -> None:
    (directory / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
