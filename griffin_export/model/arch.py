"""The one architecture table: where each model type keeps its feed-forward weights.

GRIFFIN only needs two facts about an FF block:
  * the "input" projections, whose output rows are the neurons (gate/up, fc1), and
  * the "output" projection, whose input columns are the neurons (down, fc2).
The neuron activations Z are exactly the output projection's input, for gated MLPs
(act(gate) * up) and for OPT-style ones (act(fc1 + b)) alike, so the statistic is a
pre-hook on the output projection and pruning is swapping those nn.Linear modules for
smaller ones. No architecture gets its own MLP class.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import nn

from ..errors import GriffinError
from .offload import param_values


@dataclass(frozen=True)
class FFSpec:
    layers: str  # attribute path from the *ForCausalLM to the decoder layer list
    block: str  # path from a decoder layer to the module that owns the FF linears ("" = the layer)
    inputs: tuple[str, ...]  # neuron-row projections, in the order the model applies them
    output: str  # neuron-column projection
    fused: int = 1  # row blocks per input: Phi-3's gate_up_proj stacks [gate; up] -> 2
    d_ff_attr: str = "intermediate_size"
    context_attr: str = "max_position_embeddings"  # the config key of the context length
    lean: bool = False  # the lean ONNX decoder (onnx_lean.py) covers it; others export the traced graph
    llama_cpp: bool = True  # llama.cpp runs it (checkpoint --gguf); it has no OPT
    qk_norm: bool = False  # attention RMS-normalizes each head of q and k before the rotary (self_attn.q_norm, k_norm)


_GATED = FFSpec("model.layers", "mlp", ("gate_proj", "up_proj"), "down_proj")
_LLAMA_FAMILY = FFSpec("model.layers", "mlp", ("gate_proj", "up_proj"), "down_proj", lean=True)

ARCHITECTURES: dict[str, FFSpec] = {
    "llama": _LLAMA_FAMILY,
    "mistral": _LLAMA_FAMILY,
    "qwen2": _LLAMA_FAMILY,
    "qwen3": replace(_LLAMA_FAMILY, qk_norm=True),
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": replace(_GATED, qk_norm=True),  # Gemma 3: sliding and global layers alternate; the same FF layout
    "phi3": FFSpec("model.layers", "mlp", ("gate_up_proj",), "down_proj", fused=2),
    "opt": FFSpec("model.decoder.layers", "", ("fc1",), "fc2", d_ff_attr="ffn_dim", llama_cpp=False),
}


# GGUF's general.architecture -> transformers' model_type, where they differ
GGUF_ARCHITECTURES = {"gemma3": "gemma3_text"}


def spec_for(model_type: str) -> FFSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise GriffinError(
            f"unsupported architecture {model_type!r}; supported: {known}"
        ) from None


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root


@dataclass
class FFBlock:
    """One layer's FF linears, addressed by the base model's own parameter names."""

    prefix: str  # e.g. "model.layers.3.mlp."
    owner: nn.Module
    inputs: dict[str, nn.Linear]
    output: nn.Linear


def block_prefix(spec: FFSpec, layer: int) -> str:
    block = f".{spec.block}" if spec.block else ""
    return f"{spec.layers}.{layer}{block}."


def ff_param(spec: FFSpec, layer: int, proj: str, kind: str = "weight") -> str:
    """The base model's name of one FF parameter, e.g. model.layers.3.mlp.down_proj.weight: the one
    spelling bundles, graphs and checkpoints share (proj is one of spec.inputs or spec.output)."""
    return f"{block_prefix(spec, layer)}{proj}.{kind}"


def ff_blocks(model: nn.Module, spec: FFSpec) -> list[FFBlock]:
    blocks = []
    for i, layer in enumerate(_get(model, spec.layers)):
        owner = _get(layer, spec.block)
        blocks.append(
            FFBlock(
                prefix=block_prefix(spec, i),
                owner=owner,
                inputs={name: getattr(owner, name) for name in spec.inputs},
                output=getattr(owner, spec.output),
            )
        )
    return blocks


def d_ff(config, spec: FFSpec) -> int:
    return int(getattr(config, spec.d_ff_attr))


def input_rows(indices: torch.Tensor, d: int, fused: int) -> torch.Tensor:
    """Rows of an input projection that belong to `indices` (all fused blocks)."""
    return torch.cat([indices + b * d for b in range(fused)])


def slice_block(block: FFBlock, indices: torch.Tensor, spec: FFSpec, d: int) -> dict[str, torch.Tensor]:
    """The kept neurons' weights, keyed by full parameter name."""
    out: dict[str, torch.Tensor] = {}
    rows = input_rows(indices, d, spec.fused)
    for name, lin in block.inputs.items():
        out[f"{block.prefix}{name}.weight"] = param_values(lin).detach()[rows].contiguous()
        if lin.bias is not None:
            out[f"{block.prefix}{name}.bias"] = param_values(lin, "bias").detach()[rows].contiguous()
    lin = block.output
    out[f"{block.prefix}{spec.output}.weight"] = param_values(lin).detach()[:, indices].contiguous()
    if lin.bias is not None:  # the output bias is not per neuron: kept whole
        out[f"{block.prefix}{spec.output}.bias"] = param_values(lin, "bias").detach().contiguous()
    return out


def expected_shapes(spec: FFSpec, layer: int, k: int, hidden: int, biases: dict[str, bool]) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's sliced tensors; `biases` says which projections have one."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in spec.inputs:
        shapes[ff_param(spec, layer, name)] = (spec.fused * k, hidden)
        if biases[name]:
            shapes[ff_param(spec, layer, name, "bias")] = (spec.fused * k,)
    shapes[ff_param(spec, layer, spec.output)] = (hidden, k)
    if biases[spec.output]:
        shapes[ff_param(spec, layer, spec.output, "bias")] = (hidden,)
    return shapes


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def sliced_linears(block: FFBlock, spec: FFSpec, tensors: dict[str, torch.Tensor]) -> dict[str, nn.Linear]:
    """The block's FF linears holding only the kept neurons, {attribute: module}, from a bundle's
    tensors of this layer (not installed)."""
    return {name: _linear(tensors[f"{block.prefix}{name}.weight"], tensors.get(f"{block.prefix}{name}.bias"))
            for name in (*spec.inputs, spec.output)}


def install_slice(block: FFBlock, spec: FFSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Swap the block's FF linears for ones holding only the kept neurons.

    The full-width modules are dropped, so their weights are freed rather than kept
    beside the sliced copies.
    """
    put_ff([block], [sliced_linears(block, spec, tensors)])


def per_layer(blocks: list[FFBlock], weights: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split a flat {parameter name: tensor} dict (a bundle's weights) by layer."""
    return [{k: v for k, v in weights.items() if k.startswith(b.prefix)} for b in blocks]


def ff_modules(blocks: list[FFBlock], spec: FFSpec) -> list[dict[str, nn.Module]]:
    """Each layer's FF linears as {attribute: module}: what `swapped` puts back."""
    names = (*spec.inputs, spec.output)
    return [{n: getattr(b.owner, n) for n in names} for b in blocks]


@contextmanager
def swapped(blocks: list[FFBlock], modules: list[dict[str, nn.Module]]) -> Iterator[None]:
    """These FF linears in the layers for the block's duration; the ones there before come back after."""
    saved = [{n: getattr(b.owner, n) for n in mods} for b, mods in zip(blocks, modules)]
    try:
        put_ff(blocks, modules)
        yield
    finally:
        put_ff(blocks, saved)


def put_ff(blocks: list[FFBlock], modules: list[dict[str, nn.Module]]) -> None:
    """These FF linears in the layers, for good (what `swapped` does for a `with` block)."""
    for block, mods in zip(blocks, modules):
        for name, mod in mods.items():
            setattr(block.owner, name, mod)


@contextmanager
def sliced(blocks: list[FFBlock], spec: FFSpec, tensors: list[dict[str, torch.Tensor]]) -> Iterator[None]:
    """Each layer's sliced linears installed for the block's duration; the originals come back after."""
    with swapped(blocks, ff_modules(blocks, spec)):
        for block, t in zip(blocks, tensors):
            install_slice(block, spec, t)
        yield


def magnitude_scores(block: FFBlock, spec: FFSpec, d: int) -> torch.Tensor:
    """Prompt-independent score: product of the neuron's input-row norms (‖W_gate‖·‖W_up‖)."""
    score = torch.ones(d)
    for lin in block.inputs.values():
        norms = param_values(lin).detach().float().norm(dim=1).view(spec.fused, d)
        score = score * norms.prod(dim=0)
    return score


def rotary_table(model: nn.Module, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, sin [max_length, head_dim] from the model's own rotary module (Llama family),
    so every rope variant transformers implements (scaling types, attention factor) comes out
    exactly as it computes it."""
    rotary = model.model.rotary_emb
    device = next(model.parameters()).device
    pos = torch.arange(max_length, device=device)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32, device=device), pos)
    return cos[0].float(), sin[0].float()


def sliding_layers(model: nn.Module) -> list[int]:
    """Layers whose attention is windowed (config.sliding_window tokens), as transformers' cache sees them."""
    from transformers import DynamicCache

    return [i for i, s in enumerate(DynamicCache(config=model.config).is_sliding) if s]


def attention_window(config) -> int:
    """The sliding layers' window in tokens (config.sliding_window), 0 for none."""
    return int(getattr(config, "sliding_window", None) or 0)


def attention_shape(config) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) from the config, for every architecture of the table (the KV
    cache is [batch, kv_heads, positions, head_dim]; tests/test_exactness.py checks it against a
    real cache for each)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return heads, kv_heads, int(getattr(config, "head_dim", None) or config.hidden_size // heads)


def lean_gap(config) -> str | None:
    """Why the lean decode paths (onnx_lean.py, runtime/lean.py) cannot run a model of this config,
    or None when they can: they cover the table's Llama family with SiLU and whole-head rotary."""
    try:
        covered = spec_for(config.model_type).lean
    except GriffinError:
        covered = False
    if not covered:
        return f"the lean decode path does not cover {config.model_type} models yet"
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"the lean decode paths compute SiLU; this {config.model_type} model uses {act!r}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if float(rope.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "the lean decode paths apply the rotary embedding to whole heads"
    return None
