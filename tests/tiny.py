"""Tiny randomly initialized models of every supported architecture (no downloads)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM
from transformers import GemmaConfig, Gemma2Config, LlamaConfig, MistralConfig, OPTConfig, Phi3Config, Qwen2Config
from transformers import Gemma3TextConfig, Qwen3Config

from griffin_export import from_model
from griffin_export.model.arch import ff_blocks

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=8),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, sliding_window=16),
    # a sliding layer then a global one, as Gemma 3 interleaves them (window 16 < the 24-token prompts)
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=16,
                                            layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: Phi3Config(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32),
}
ARCHS = sorted(CONFIGS)

# The lean ONNX graph's GroupQueryAttention wants head_dim a multiple of 16 on the CPU (its
# rotary kernel), so its tests use these: the Llama family, head_dim 16, and Mistral with a
# sliding window shorter than the test prompts.
LEAN = dict(COMMON, hidden_size=64, num_hidden_layers=4)  # 4 layers: topk_refit_edges gives uneven k
LEAN_CONFIGS = {
    "llama": lambda: LlamaConfig(**LEAN),
    "mistral": lambda: MistralConfig(**LEAN, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**LEAN),
    "qwen3": lambda: Qwen3Config(**LEAN, head_dim=16),
}
LEAN_ARCHS = sorted(LEAN_CONFIGS)


def tiny_model(arch: str, seed: int = 0, *, lean: bool = False):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config((LEAN_CONFIGS if lean else CONFIGS)[arch](), dtype=torch.float32)
    # Random init leaves OPT/Gemma activations tiny; scale up so selections are not ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return from_model(model.eval(), identity=f"tiny-{arch}")


def prompt_ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


@contextmanager
def masked(model, indices):
    """The full model with every FF neuron outside `indices` (per layer) zeroed: the
    mathematical definition of running with only those neurons."""
    blocks = ff_blocks(model, from_model(model).spec)
    handles = []
    for block, idx in zip(blocks, indices):
        mask = torch.zeros(block.output.weight.shape[1])
        mask[idx] = 1.0
        handles.append(block.output.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
