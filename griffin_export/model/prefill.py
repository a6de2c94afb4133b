"""Full-model prefill over a prompt (chunked), and the KV cache <-> plain tensors."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import nn
from tqdm.auto import tqdm


@lru_cache(maxsize=None)
def cache_kwarg(forward_cls: type) -> str:
    # transformers 5.x renamed forward's `past_key_values` to `cache`.
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that appends into spare capacity instead of re-allocating the whole
        cache with torch.cat every token. On CPU that cat (a fresh ~1.5 MB buffer per layer
        per token for a 1k-token prompt) cost about as much as the FF matmuls."""

        SPARE = 256  # tokens of headroom per re-allocation
        capacity = 0  # tokens to allocate at once when the final length is known (new_cache)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = self.get_seq_length(), key_states.shape[-2]
            buf = getattr(self, "_kbuf", None)
            ours = buf is not None and n > 0 and self.keys.data_ptr() == buf.data_ptr()
            if not ours or n + t > buf.shape[-2]:
                # one buffer of the known length where there is one: growing a long prompt's cache
                # chunk by chunk left ~0.6 GB of freed buffers in the heap at 8,000 tokens
                size = n + t + self.SPARE if n + t > self.capacity else self.capacity
                self._kbuf = self._grown(self.keys, key_states, n, size)
                self._vbuf = self._grown(self.values, value_states, n, size)
            self._kbuf[..., n : n + t, :].copy_(key_states)
            self._vbuf[..., n : n + t, :].copy_(value_states)
            self.keys, self.values = self._kbuf[..., : n + t, :], self._vbuf[..., : n + t, :]
            return self.keys, self.values

        @staticmethod
        def _grown(old: torch.Tensor, new: torch.Tensor, n: int, capacity: int) -> torch.Tensor:
            buf = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
            if n:
                buf[..., :n, :].copy_(old[..., :n, :])
            return buf

    return GrowingLayer


_GROWING = None


def new_cache(model: nn.Module, capacity: int = 0):
    """A DynamicCache whose full-attention layers grow in place (sliding ones stay as they are);
    `capacity` tokens allocated at the first update where the final length is known."""
    global _GROWING
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    _GROWING = _GROWING or _growing_layer_class()
    cache = DynamicCache(config=model.config)
    cache.layers = [_GROWING() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for layer in cache.layers:
        if isinstance(layer, _GROWING):
            layer.capacity = capacity
    return cache


@torch.inference_mode()
def forward(model: nn.Module, ids: torch.Tensor, cache, *, last_only: bool = True) -> torch.Tensor:
    """ids [1, T] -> float32 logits [T, vocab] (or [1, vocab] with last_only); updates cache."""
    kw = {cache_kwarg(type(model)): cache, "use_cache": True}
    if last_only:
        kw["logits_to_keep"] = 1
    out = model(input_ids=ids, **kw)
    return out.logits[0].float()


def prefill(model: nn.Module, ids: torch.Tensor, *, chunk_size: int = 512, progress: bool = False,
            capacity: int = 0):
    """Run the prompt through the model in chunks. Returns (cache, last-position logits [vocab]).
    `capacity`: the tokens the cache will hold in the end, when known (prompt + tokens to decode)."""
    cache = new_cache(model, capacity)
    T = ids.shape[-1]
    starts = range(0, T, chunk_size)
    bar = tqdm(total=T, desc="prefill", unit="tok", disable=not progress, leave=False)
    logits = None
    for s in starts:
        logits = forward(model, ids[:, s : s + chunk_size], cache)
        bar.update(min(chunk_size, T - s))
    bar.close()
    return cache, logits[-1]


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value) [1, kv_heads, T, head_dim], as the cache holds them."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def take_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cache's KV as contiguous tensors (what a bundle stores), emptying the cache layer by
    layer so a long prompt's KV is never held twice (a view of a larger buffer is copied, and
    that buffer let go before the next layer's)."""
    out = []
    for layer in cache.layers:
        out.append((layer.keys.contiguous(), layer.values.contiguous()))
        layer.keys = layer.values = None
        layer._kbuf = layer._vbuf = None
    return out


def restore_cache(model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], prompt_len: int):
    """A live cache holding a bundle's KV, positioned after `prompt_len` tokens."""
    cache = new_cache(model)
    device = next(model.parameters()).device
    for i, (k, v) in enumerate(kv):
        cache.layers[i].update(k.to(device), v.to(device))
        if hasattr(cache.layers[i], "cumulative_length"):
            # sliding-window layers store only the window; their position is the prompt's
            cache.layers[i].cumulative_length = prompt_len
    return cache
