"""The lean PyTorch decode step (gpt-fast style) for the Llama family of the adapter table.

    lean = LeanDecoder(lm.model, max_length=T + 64)   # the model with its experts installed
    lean.load_cache(cache, T)                          # the prompt's KV, copied once
    logits = lean.step(token)                          # one token in, logits [vocab] out

    batch = lean.start_batch(cache, mask, next_pos, room)   # a left-padded batch's KV [B, ...]
    logits = lean.step_batch(batch, tokens, keep)            # one token per row still decoding
    batch = lean.join_batches([batch, newcomers], room)      # rows that join a running batch

What it removes from a decode step against transformers' forward: the per-layer Python of
the HF modules (cache objects, mask building, kwargs plumbing) and the cache's re-allocation.
A layer is one packed QKV matmul, the rotary from a precomputed table, a write into a
preallocated KV buffer [1, kv_heads, max_length, head_dim], SDPA over its filled part, one
packed gate/up matmul. The KV buffers may be float16 under a float32 model (`kv_dtype`): the new key
and value are rounded to it as they are written, and each layer's filled part is read in float16 and
cast to float32 for SDPA (which takes one dtype): the float16 buffer is what memory gives up, one
layer's float32 copy (a megabyte or two) can stay in the CPU's caches. (SDPA in float16 over the buffer instead measured
slower on a 2-core Xeon: 0.93× the float32 buffers' tokens/s against 0.99× for the cast, one thread,
1,774-token prompt.) A batch has its own buffers [B, kv_heads, columns, head_dim] in the
left-padded layout of the batched prefill (every row writes the same column; a mask hides each
row's padding, a per-row position drives the rotary); rows that finish are dropped from them. The packed weights are made once and the HF modules' weights become
views into them, so nothing is held twice. On CUDA the step can be compiled with
torch.compile(mode="reduce-overhead") (CUDA graphs); on the CPU eager is kept unless compiling
measures faster (see README, Speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GriffinError
from ..model.arch import (FFBlock, FFSpec, attention_shape, attention_window, ff_blocks, lean_gap, rotary_table,
                          sliding_layers, spec_for)


def covers(model: nn.Module) -> bool:
    """Whether the lean step can run this model (arch.lean_gap)."""
    return lean_gap(model.config) is None


def _pack(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [in, out] weight (and bias) holding the linears side by side; each linear keeps a
    transposed view into it, so nothing is held twice. [in, out] because a one-token matmul
    x @ W reads it about twice as fast as F.linear's x @ W.T does on this CPU (MKL: the 113 MB
    lm_head of the default model in 4.3 ms against 7.5 ms)."""
    weight = torch.cat([lin.weight.detach() for lin in linears]).t().contiguous()
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.detach() for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[:, start:start + n].t(), requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return weight, bias


def _mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: in float32, the weight applied in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class FFPacks:
    """One set of FF weights for the lean step, per layer: [gate | up] packed [hidden, 2k], down [k, hidden],
    and k. The HF linears they came from hold views into them (nothing is held twice), so a set of
    class experts serves the lean step and transformers' forward (a prefill) alike."""

    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    widths: list[int]


def ff_packs(modules: list[dict[str, nn.Module]], spec: FFSpec) -> FFPacks:
    """The lean step's packs of these FF linears, {attribute: linear} per layer (arch.ff_modules or
    arch.sliced_linears); the linears are re-pointed at views into them."""
    gate_up, down, widths = [], [], []
    for mods in modules:
        gate, up = (mods[n] for n in spec.inputs)
        gate_up.append(_pack(gate, up)[0])
        down.append(_pack(mods[spec.output])[0])
        widths.append(mods[spec.output].weight.shape[1])
    return FFPacks(gate_up, down, widths)


class _Layer:
    def __init__(self, layer: nn.Module, block: FFBlock, spec: FFSpec):
        att = layer.self_attn
        self.wqkv, self.bqkv = _pack(att.q_proj, att.k_proj, att.v_proj)
        self.sizes = [att.q_proj.weight.shape[0], att.k_proj.weight.shape[0], att.v_proj.weight.shape[0]]
        self.wo, self.bo = _pack(att.o_proj)
        self.q_norm = att.q_norm.weight if spec.qk_norm else None
        self.k_norm = att.k_norm.weight if spec.qk_norm else None
        gate, up = (block.inputs[n] for n in spec.inputs)
        self.w_gate_up, _ = _pack(gate, up)
        self.width = block.output.weight.shape[1]
        self.w_down, _ = _pack(block.output)
        self.norm_in, self.norm_post = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.scaling = float(att.scaling)


class LeanDecoder:
    """Decode steps of a Llama-family model (experts installed or not) with a static KV buffer."""

    def __init__(self, model: nn.Module, max_length: int, *, compile: bool = False, static_length: int | None = None,
                 kv_dtype: torch.dtype | None = None):
        cfg = model.config
        if not covers(model):
            raise GriffinError(f"the lean PyTorch step covers the Llama family (SiLU); not {cfg.model_type}")
        inner = model.model
        self.eps = float(cfg.rms_norm_eps)
        self.heads, self.kv_heads, self.head_dim = attention_shape(cfg)
        self.window = attention_window(cfg)
        self.sliding = set(sliding_layers(model))
        spec = spec_for(cfg.model_type)
        self.layers = [_Layer(layer, block, spec) for layer, block in zip(inner.layers, ff_blocks(model, spec))]
        head = model.get_output_embeddings()
        self.active_ff = FFPacks([L.w_gate_up for L in self.layers], [L.w_down for L in self.layers],
                                 [L.width for L in self.layers])  # what a batch started now decodes with
        tied = head.weight is inner.embed_tokens.weight
        self.head, self.head_bias = _pack(head)
        if tied:  # the input embedding becomes the same view: held once, and the model's fingerprint unchanged
            inner.embed_tokens.weight = head.weight
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        p = self.embed
        self.dtype, self.device = p.dtype, p.device
        self.kv_dtype = kv_dtype or self.dtype
        self._model = model
        self._step = self._forward
        # a compiled step has one shape: its buffers get static_length positions (at most 4096) at once
        self._static = min(static_length or 4096, 4096) if compile else 0
        self.max_length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.reserve(max_length)
        self.length = 0
        if compile:  # one graph for every position: the static-shape step (mask, index_copy_)
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._step = torch.compile(self._forward_static, mode=mode, fullgraph=True, dynamic=False)

    def ff(self) -> FFPacks:
        """The FF weights the step decodes with now (one object for as long as they are in use)."""
        return self.active_ff

    def use_ff(self, packs: FFPacks) -> None:
        """Decode with these FF weights from the next step on (another class's experts, or the full
        model's): attention and the head stay as they are. A batch started from now on keeps them for
        its rows whatever is in use later (start_batch)."""
        for L, gate_up, down, width in zip(self.layers, packs.gate_up, packs.down, packs.widths):
            L.w_gate_up, L.w_down, L.width = gate_up, down, width
        self.active_ff = packs

    def reserve(self, max_length: int) -> None:
        """Buffers (and rotary tables) of at least max_length positions; a compiled step keeps its size."""
        if max_length <= self.max_length or max_length <= 0:
            return
        if self._static:
            if self.max_length:
                raise GriffinError(f"the compiled lean step was built for {self.max_length} positions; {max_length} asked")
            max_length = max(max_length, self._static)
        cos, sin = rotary_table(self._model, max_length)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        shape = (1, self.kv_heads, max_length, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]
        self._positions = torch.arange(max_length, device=self.device)
        self.max_length = max_length

    def load_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Copy a prompt's KV (per layer [1, kv_heads, n, head_dim], n <= length: a sliding
        layer may hold only its window, the last n positions) into the buffers."""
        if length > self.max_length:
            raise GriffinError(f"the cache holds {length} tokens; the lean decoder's buffer has {self.max_length}")
        for i, (k, v) in enumerate(kv):
            n = k.shape[2]
            self.k[i][:, :, length - n:length].copy_(k)
            self.v[i][:, :, length - n:length].copy_(v)
        self.length = length

    def start_batch(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, next_pos: torch.Tensor,
                    room: int, ff: FFPacks | None = None) -> "LeanBatch":
        """A batch's decode state from its left-padded prefill: per layer KV [B, kv_heads, n, head_dim]
        (n <= T: a sliding layer may hold only the last n columns), the attention mask [B, T] (0 on
        the padding), each row's next position [B], and `room` columns in all (T + the tokens to
        come). The compiled step is batch-1; a batch runs eager. Its rows decode with the FF weights `ff`
        (those in use now where None) whatever is in use later, so batches of different experts join."""
        B, T = mask.shape
        columns = max(room, T + 1)
        self.reserve(columns)  # the rotary table: a position never passes its column
        shape = (B, self.kv_heads, columns, self.head_dim)
        ks, vs = [], []
        for k, v in kv:
            n = k.shape[2]
            for src, out in ((k, ks), (v, vs)):
                # columns past T are written before any step reads them; zeroing them too
                # (400 MB at 16 x 512 tokens) took about a decode step (150 ms vs 20 ms here)
                buf = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
                buf[:, :, :T - n].zero_()  # a sliding layer's dropped columns: masked, but NaN * 0 is NaN
                buf[:, :, T - n:T].copy_(src)
                out.append(buf)
        valid = torch.zeros(B, columns, dtype=torch.bool, device=self.device)
        valid[:, :T] = mask.to(self.device).bool()
        return LeanBatch(ks, vs, valid, next_pos.to(self.device).clone(), T, [ff or self.active_ff] * B)

    @torch.inference_mode()
    def join_batches(self, parts: list["LeanBatch"], room: int) -> "LeanBatch":
        """The rows of several batches in one, in order: how requests join a running batch at a step
        boundary (continuous batching). Every row keeps its positions and its columns, aligned on the
        right (each with its own FF weights: rows of different classes' experts decode in one batch, every
        other weight read once for all of them): the new batch holds the longest row (its prompt after the padding and what it decoded),
        L columns, so columns no row attends to any more are dropped, then `room` more for the tokens to
        come. Left of a row's own columns: zeros, masked (a masked NaN would still poison the softmax)."""
        spans = [p.length - p.valid[:, :p.length].int().argmax(dim=1) for p in parts]  # each row's columns
        widest = [int(s.max()) for s in spans]
        L = max(widest)
        columns = L + max(room, 1)
        self.reserve(columns)  # the rotary table: a position never passes its column
        B = sum(p.valid.shape[0] for p in parts)
        shape = (B, self.kv_heads, columns, self.head_dim)
        ks = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        vs = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        valid = torch.zeros(B, columns, dtype=torch.bool, device=self.device)
        first = 0
        for p, m in zip(parts, widest):
            rows = slice(first, first + p.valid.shape[0])
            for out, src in ((ks, p.k), (vs, p.v)):
                for buf, t in zip(out, src):
                    buf[rows, :, :L - m].zero_()
                    buf[rows, :, L - m:L].copy_(t[:, :, p.length - m:p.length])
            valid[rows, L - m:L] = p.valid[:, p.length - m:p.length]
            first = rows.stop
        return LeanBatch(ks, vs, valid, torch.cat([p.next_pos for p in parts]), L, [f for p in parts for f in p.ff])

    @torch.inference_mode()
    def step_batch(self, state: "LeanBatch", tokens: list[int], keep: list[int]) -> torch.Tensor:
        """Feed one token to each row in `keep` (rows of the previous step; the others finished
        and leave the buffers); float32 logits [len(keep), vocab]."""
        if len(keep) < state.valid.shape[0]:
            rows = torch.tensor(keep, device=self.device)
            state.k = [t.index_select(0, rows) for t in state.k]
            state.v = [t.index_select(0, rows) for t in state.v]
            state.valid, state.next_pos = state.valid[rows], state.next_pos[rows]
            state.ff = [state.ff[j] for j in keep]
        n = state.length + 1
        if n > state.valid.shape[1]:
            raise GriffinError(f"the lean decoder's batch buffer of {state.valid.shape[1]} positions is full")
        state.valid[:, n - 1] = True
        causal = state.valid[:, None, None, :n]
        local = causal
        if self.window and n > self.window:  # column distance is position distance: no gaps after a row's padding
            local = causal.clone()
            local[..., :n - self.window] = False

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            state.k[i][:, :, n - 1] = k
            state.v[i][:, :, n - 1] = v
            return self._sdpa(q, state.k[i][:, :, :n], state.v[i][:, :, :n], scale,
                              local if i in self.sliding else causal)

        pos = state.next_pos
        ids = torch.tensor(tokens, device=self.device)
        groups: dict[int, tuple[FFPacks, list[int]]] = {}
        for j, packs in enumerate(state.ff):
            groups.setdefault(id(packs), (packs, []))[1].append(j)
        ff = [(p, None if len(groups) == 1 else torch.tensor(rows, device=self.device)) for p, rows in groups.values()]
        logits = self._layers(self.embed[ids], self.cos[pos][:, None], self.sin[pos][:, None], attend, ff)
        state.next_pos = pos + 1
        state.length = n
        return logits.float()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token; float32 logits [vocab] for the next."""
        pos = self.length
        if pos >= self.max_length:
            raise GriffinError(f"the lean decoder's KV buffer of {self.max_length} positions is full")
        ids = torch.tensor([token], device=self.device)
        logits = self._step(ids, torch.tensor(pos, device=self.device))
        self.length = pos + 1
        return logits[0].float()

    def _forward_static(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """_forward with shapes that do not depend on the position: attention over the whole
        buffer under a mask, the new key and value written with index_copy_ (what CUDA graphs
        and torch.compile without recompiles need)."""
        at = pos.view(1)
        cos, sin = self.cos.index_select(0, at)[0], self.sin.index_select(0, at)[0]
        causal = (self._positions <= pos).view(1, 1, 1, -1)
        local = causal & (self._positions > pos - self.window).view(1, 1, 1, -1) if self.window else causal

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            self.k[i].index_copy_(2, at, k[:, :, None].to(self.kv_dtype))
            self.v[i].index_copy_(2, at, v[:, :, None].to(self.kv_dtype))
            return self._sdpa(q, self.k[i], self.v[i], scale, local if i in self.sliding else causal)

        return self._layers(self.embed[ids], cos, sin, attend)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = int(pos) + 1

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            self.k[i][:, :, n - 1] = k
            self.v[i][:, :, n - 1] = v
            start = max(0, n - self.window) if self.window and i in self.sliding else 0
            return self._sdpa(q, self.k[i][:, :, start:n], self.v[i][:, :, start:n], scale, None)

        return self._layers(self.embed[ids], self.cos[pos], self.sin[pos], attend)

    def _sdpa(self, q, keys, values, scale: float, mask) -> torch.Tensor:
        if keys.dtype != q.dtype:  # a cache of another type: this layer's read cast to the query's
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=self.heads != self.kv_heads)

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend,
                ff: list[tuple[FFPacks, torch.Tensor | None]] | None = None) -> torch.Tensor:
        """x [B, hidden] through every layer and the head; `attend(layer, q, k, v, scale)` stores
        the new key and value (q [B, heads, head_dim], k and v [B, kv_heads, head_dim]) and returns
        the attention output [B, heads, 1, head_dim]. cos and sin broadcast over the heads. `ff`: the
        FF weights each group of rows decodes with, (packs, its rows, None for all); None: those in use."""
        hd, B = self.head_dim, x.shape[0]
        for i, L in enumerate(self.layers):
            h = _rms(x, L.norm_in, self.eps)
            q, k, v = _mm(h, L.wqkv, L.bqkv).split(L.sizes, dim=-1)
            q, k, v = q.view(B, self.heads, hd), k.view(B, self.kv_heads, hd), v.view(B, self.kv_heads, hd)
            if L.q_norm is not None:
                q, k = _rms(q, L.q_norm, self.eps), _rms(k, L.k_norm, self.eps)
            att = attend(i, _rotate(q, cos, sin), _rotate(k, cos, sin), v, L.scaling)
            x = x + _mm(att.reshape(B, -1), L.wo, L.bo)
            h = _rms(x, L.norm_post, self.eps)
            if ff is None:
                gate, up = _mm(h, L.w_gate_up).split(L.width, dim=-1)
                x = x + _mm(F.silu(gate) * up, L.w_down)
            elif len(ff) == 1:
                p = ff[0][0]
                gate, up = _mm(h, p.gate_up[i]).split(p.widths[i], dim=-1)
                x = x + _mm(F.silu(gate) * up, p.down[i])
            else:  # each group of rows through its own experts
                out = torch.empty_like(x)
                for p, rows in ff:
                    gate, up = _mm(h.index_select(0, rows), p.gate_up[i]).split(p.widths[i], dim=-1)
                    out.index_copy_(0, rows, _mm(F.silu(gate) * up, p.down[i]))
                x = x + out
        return _mm(_rms(x, self.norm, self.eps), self.head, self.head_bias)


@dataclass
class LeanBatch:
    """A batch's decode state: per layer KV buffers [B, kv_heads, columns, head_dim], which
    columns each row may attend to (its prompt after the padding, and what it decoded), each
    row's next position, and the columns filled."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor  # [B, columns] bool
    next_pos: torch.Tensor  # [B]
    length: int
    ff: list[FFPacks]  # [B]: the FF weights each row decodes with (rows of several classes' experts mix)
