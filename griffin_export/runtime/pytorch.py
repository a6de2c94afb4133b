"""PyTorch runtime: the base model with its FF layers swapped for a bundle's experts.

    rt = load_runtime("expert.safetensors")          # base model found from the bundle
    print(rt.generate(DecodeOptions(max_new_tokens=64)).text)
"""

from __future__ import annotations

import copy
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ..bundle.experts import check_bundle, check_fresh, install
from ..bundle.format import Bundle, kv_layout_of, read_bundle
from ..errors import GriffinError
from ..model.arch import attention_shape, ff_blocks, ff_modules, swapped
from ..model.decoding import eos_ids
from ..model.load import LoadedModel, check_device, load_model, peek_architecture, use_threads
from ..model.prefill import cache_kwarg, cache_tensors, forward, new_cache, prefill, restore_cache
from ..model.tokens import check_context, check_generation_fits, tokenize
from ..settings import CHUNK_SIZE, TORCH_KV_DTYPE, TORCH_KV_DTYPES, RuntimeOptions, check_kv_dtype
from .base import Runtime, left_padded
from .lean import FFPacks, LeanBatch, LeanDecoder, covers
from .timing import BenchContext, BenchRow, greedy_seconds

__all__ = ["TorchRuntime", "load_runtime"]


def _check_bundle_tensors(lm: LoadedModel, bundle: Bundle, source: str) -> None:
    """The bundle's KV layout and vocabulary are the model's (its header alone cannot say)."""
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    if bundle.last_logits is not None and bundle.last_logits.numel() != vocab:
        raise GriffinError(f"{source}: last logits cover {bundle.last_logits.numel()} tokens; the model's vocabulary "
                           f"has {vocab}")
    ids = [t for t in (bundle.prompt_ids, bundle.warmup_ids) if t is not None and t.numel()]
    if any(int(t.max()) >= vocab for t in ids):
        raise GriffinError(f"{source}: prompt or warm-up token ids are outside the model's vocabulary 0..{vocab - 1}")
    have = kv_layout_of(bundle)
    if have is not None and have != (want := attention_shape(lm.config)[1:]):
        raise GriffinError(f"{source}: its KV cache has {have[0]} heads × head_dim {have[1]}; the model's has "
                           f"{want[0]} × {want[1]}")


class TorchDecoding(Runtime):
    """Decoding on a PyTorch model with whatever FF linears are in it: one sequence or a batch,
    through the lean step (runtime/lean.py) where it covers the architecture, else transformers'
    forward. TorchRuntime puts one bundle's experts in; runtime/routed.py swaps classes' in and out."""

    def _init_decoding(self, lm: LoadedModel, lean: bool | None, compile: bool, kv_dtype: str | None = None) -> None:
        self.lm = lm
        self.blocks = ff_blocks(lm.model, lm.spec)
        self.eos = eos_ids(lm.config, lm.tokenizer)
        # decode steps through the lean step (runtime/lean.py) where it covers the architecture,
        # unless lean=False; lean=True where it does not is an error; compile: torch.compile it
        if lean is None:
            lean = covers(lm.model)
        elif lean and not covers(lm.model):
            raise GriffinError(f"the lean PyTorch step covers the Llama family; this is a {lm.architecture} model")
        if compile and not lean:
            raise GriffinError("compile needs the lean PyTorch step (the Llama family)")
        if kv_dtype is not None and not lean:
            raise GriffinError(f"`kv_dtype` is the lean PyTorch step's (the Llama family); this {lm.architecture} model "
                               "decodes through transformers' forward, whose cache keeps the weights' dtype")
        self._lean_settings = dict(compile=compile, static_length=lm.context_length,
                                   kv_dtype=lean_kv_dtype(lm.dtype, kv_dtype)) if lean else None
        self.lean: LeanDecoder | None = None  # built at the first generate: it re-points the model's weights

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def prepare(self) -> None:
        """Build the lean step now (else the first generate does: it packs the weights once)."""
        if self._lean_settings is not None and self.lean is None:
            self.lean = LeanDecoder(self.lm.model, 0, **self._lean_settings)

    def _batch_prefill_ff(self) -> AbstractContextManager[None]:
        """The FF linears a batch's prompts are prefilled with (a `with` block): the ones in the model."""
        return nullcontext()

    def check_room(self, prompt_tokens: int, max_new_tokens: int) -> None:
        check_generation_fits(prompt_tokens, max_new_tokens, self.lm.context_length)

    def stepper(self, cache, cached: int, room: int):
        if self._lean_settings is None:
            return super().stepper(cache, cached, room)
        # built here, not in __init__: its packed weights leave the HF modules holding transposed
        # views, which forward() takes but save_pretrained() does not (checkpoint.py installs
        # experts through a TorchRuntime and saves)
        self.prepare()
        self.lean.reserve(room)  # a warm-up may pass max_new_tokens
        self.lean.load_cache(cache_tensors(cache), cached)
        return self.lean.step

    def start_batch(self, batch: list[torch.Tensor], max_new_tokens: int):
        """Prefill prompts ids [1, T_b] together: left-padded to the longest, masked, positions
        counted from each prompt's first token (with _batch_prefill_ff's linears). Decoding then runs
        through the lean step where it covers the model (its batch buffers hold T + max_new_tokens
        columns), else through transformers' forward."""
        ids, mask, positions = (t.to(self.lm.device) for t in left_padded(batch))
        T = ids.shape[1]
        state = _Batch(new_cache(self.lm.model), mask, positions[:, -1] + 1, T + max_new_tokens,
                       ff=self.lean.active_ff if self.lean is not None else None)
        with self._batch_prefill_ff():
            for s in range(0, T, CHUNK_SIZE):
                logits = self._forward(ids[:, s:s + CHUNK_SIZE], mask[:, :s + CHUNK_SIZE],
                                       positions[:, s:s + CHUNK_SIZE], state.cache)
        return state, logits

    def _lean_batch(self, state: "_Batch") -> LeanBatch:
        if state.lean is None:  # the prefill's cache copied once into the lean step's batch buffers
            self.prepare()
            state.lean = self.lean.start_batch(cache_tensors(state.cache), state.mask, state.next_pos, state.room,
                                               state.ff)
            state.cache = None
        return state.lean

    @property
    def joins_batches(self) -> bool:
        return self._lean_settings is not None

    def join_batch(self, state: "_Batch", new: "_Batch", room: int) -> "_Batch":
        """The rows of `new` (a start_batch) after those of a running batch, each keeping its cache:
        the lean step's batches join (LeanDecoder.join_batches); `room` tokens more for every row."""
        if not self.joins_batches:
            super().join_batch(state, new, room)
        parts = [self._lean_batch(state), self._lean_batch(new)]  # (the first builds the lean step)
        state.lean = self.lean.join_batches(parts, room)
        return state

    def step_batch(self, state: "_Batch", tokens: list[int], keep: list[int]) -> torch.Tensor:
        if self._lean_settings is not None:
            batch = self._lean_batch(state)  # (the first builds the lean step)
            return self.lean.step_batch(batch, tokens, keep)
        dev = self.lm.device
        if len(keep) < state.mask.shape[0]:  # finished sequences leave the batch
            rows = torch.tensor(keep, device=dev)
            state.cache.batch_select_indices(rows)
            state.mask, state.next_pos = state.mask[rows], state.next_pos[rows]
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(keep), 1)], dim=1)
        logits = self._forward(torch.tensor(tokens, device=dev)[:, None], state.mask, state.next_pos[:, None],
                               state.cache)
        state.next_pos = state.next_pos + 1
        return logits

    @torch.inference_mode()
    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        kw = {cache_kwarg(type(self.lm.model)): cache}
        out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **kw)
        return out.logits[:, -1].float()  # [B, vocab]

    def step(self, cache, token: int) -> torch.Tensor:
        """Feed one token through transformers' forward; logits [vocab] for the next."""
        return forward(self.lm.model, torch.tensor([[token]], device=self.lm.device), cache)[-1]


class TorchRuntime(TorchDecoding):
    """Decodes with a bundle's experts; prefill of a new prompt runs the full model
    (the GRIFFIN regime) when the full FF weights were kept. With pruned_prefill every
    prompt (a new one, or the bundle's own instead of its KV) is prefilled through the
    experts too: what a standalone pruned checkpoint computes."""

    def __init__(self, lm: LoadedModel, bundle: Bundle, *, keep_full: bool = False, source: str = "bundle",
                 pruned_prefill: bool = False, lean: bool | None = None, compile: bool = False,
                 kv_dtype: str | None = None):
        check_fresh(lm)
        check_bundle(lm, bundle.info, source)
        _check_bundle_tensors(lm, bundle, source)
        self.bundle, self.pruned_prefill = bundle, pruned_prefill
        self._full = ff_modules(ff_blocks(lm.model, lm.spec), lm.spec) if keep_full else None
        install(lm, bundle.weights)
        self._init_decoding(lm, lean, compile, kv_dtype)

    # -- FF width ---------------------------------------------------------------------

    def _full_ff(self) -> AbstractContextManager[None]:
        """The full FF linears in the layers for a `with` block (a new prompt's prefill)."""
        if self._full is None:
            raise GriffinError("a new prompt needs the full model for prefill; load the runtime with keep_full=True")
        return swapped(self.blocks, self._full)

    def full_prefill(self, ids: torch.Tensor):
        """Prefill ids [1, T] with the full FF layers; returns (cache, last logits)."""
        check_context(self.lm.context_length, ids.shape[1])
        with self._full_ff():
            return prefill(self.lm.model, ids)

    # -- decoding ---------------------------------------------------------------------

    def start(self, ids: torch.Tensor | None = None):
        """(cache, first logits): a new prompt's prefill, else the bundle's own prompt and
        warm-up tokens (from its KV unless pruned_prefill)."""
        b = self.bundle
        if ids is None:
            if b.kv is not None and b.last_logits is not None and not self.pruned_prefill:
                return restore_cache(self.lm.model, b.kv, b.cached_tokens), b.last_logits
            if b.prompt_ids is None:
                raise GriffinError("this bundle has no prompt (a class bundle): give a prompt to generate from")
            ids = b.own_ids()[None].to(self.lm.device)
        if self.pruned_prefill:
            check_context(self.lm.context_length, ids.shape[1])
            return prefill(self.lm.model, ids)
        return self.full_prefill(ids)

    def tokenize(self, text: str) -> torch.Tensor:
        return tokenize(self.lm, text, chat=self.bundle.info.chat)

    def _batch_prefill_ff(self) -> AbstractContextManager[None]:
        return nullcontext() if self.pruned_prefill else self._full_ff()


def lean_kv_dtype(dtype: torch.dtype, kv_dtype: str | None) -> torch.dtype:
    """The lean step's KV buffers' dtype: kv_dtype's, else settings.TORCH_KV_DTYPE under a float32
    model (a half-precision model's cache keeps its dtype)."""
    if kv_dtype is not None:
        return getattr(torch, check_kv_dtype(kv_dtype, TORCH_KV_DTYPES, "the lean PyTorch step"))
    return getattr(torch, TORCH_KV_DTYPE) if dtype == torch.float32 else dtype


@dataclass
class _Batch:
    cache: object  # transformers' cache: the prefill's, then transformers' decode steps'
    mask: torch.Tensor  # [B, tokens so far]: 0 at the left padding
    next_pos: torch.Tensor  # [B]: the position of each sequence's next token
    room: int  # columns a lean batch buffer needs: the padded prompt + max_new_tokens
    lean: LeanBatch | None = None  # decoding through the lean step: its buffers (the cache is dropped)
    ff: FFPacks | None = None  # the lean step's FF weights in use at the prefill: the rows decode with them


def load_runtime(bundle: str | os.PathLike | Bundle, model: LoadedModel | str | None = None, *,
                 gguf_file: str | None = None, device: str = "cpu", new_prompts: bool = False,
                 quiet: bool = True, pruned_prefill: bool = False, lean: bool | None = None,
                 compile: bool = False, source: str | None = None, kv_dtype: str | None = None) -> TorchRuntime:
    """Base model + bundle -> TorchRuntime. `model` defaults to the bundle's recorded base model.

    With new_prompts (or a bundle without KV) the full FF weights stay in memory for the
    prefill of new prompts; otherwise they are dropped once the experts are installed and
    the bundle's KV cache is not even read when it will not be used. With pruned_prefill
    prompts are prefilled through the experts: the full FF weights and the KV are never kept.
    """
    source = source or ("bundle" if isinstance(bundle, Bundle) else str(bundle))
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle, load_kv=not (new_prompts or pruned_prefill))
    if not isinstance(model, LoadedModel):
        model = load_model(model or bundle.info.base_model, gguf_file=gguf_file, dtype=bundle.info.dtype,
                           device=device, quiet=quiet)
    keep_full = (new_prompts or bundle.kv is None) and not pruned_prefill
    return TorchRuntime(model, bundle, keep_full=keep_full, source=source, pruned_prefill=pruned_prefill, lean=lean,
                        compile=compile, kv_dtype=kv_dtype)


def load(bundle: Bundle, options: RuntimeOptions, *, new_prompts: bool = False, max_new_tokens: int | None = None,
         source: str = "bundle", quiet: bool = True) -> TorchRuntime:
    """The registry's loader (runtime/opening.open_runtime): what can be refused without the weights
    is refused first, the device and, for the bundle's own prompt, its room in the model's context."""
    check_device(options.device)
    use_threads(options.threads)
    base = options.model or bundle.info.base_model
    if not new_prompts and max_new_tokens is not None:  # the context is in the config: no weights needed
        ctx = peek_architecture(base, options.gguf_file).context_length
        check_generation_fits(bundle.info.prompt_tokens, max_new_tokens, ctx)
    if not quiet:
        print(f"loading base model {base} ...", file=sys.stderr)
    rt = load_runtime(bundle, options.model, gguf_file=options.gguf_file, device=options.device,
                      new_prompts=new_prompts, pruned_prefill=options.pruned_prefill, lean=options.lean,
                      compile=options.compile, source=source, quiet=quiet, kv_dtype=options.kv_dtype)
    rt.prepare()  # the lean step's one-time packing, before any timed decode
    return rt


# -- the speed benchmark's rows (runtime/timing.py) ----------------------------------------------


BENCH_KV_DTYPES = {"torch-lean": TORCH_KV_DTYPES}  # runtime/timing.py


def bench_rows(ctx: BenchContext, variant: str, bundle: Bundle | None, kv_dtype: str | None = None
               ) -> dict[str, BenchRow]:
    """torch: transformers' forward per step; torch-lean: the lean step (compiled on a GPU, where it
    uses CUDA graphs; eager on a CPU, where compiling measured no faster), its KV buffers of kv_dtype.
    Each on its own copy of the full model, with the bundle's experts installed where there is one."""
    lm = ctx.lm
    model = LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.identity, lm.spec, lm.fingerprint)
    if bundle is not None:
        model = TorchRuntime(model, bundle, lean=False).lm
    net, device = model.model, model.device
    if variant == "torch-lean":
        lean = LeanDecoder(net, ctx.room, compile=device.type == "cuda", static_length=ctx.room,
                           kv_dtype=lean_kv_dtype(lm.dtype, kv_dtype))

        def seconds(n: int) -> float:
            lean.load_cache(ctx.kv, ctx.prompt_len)
            return greedy_seconds(lean.step, ctx.first, n, lean.device)

        return {"": BenchRow(seconds, kv=str(lean.kv_dtype).replace("torch.", ""))}
    else:
        def seconds(n: int) -> float:  # from a fresh copy of the prompt's KV
            cache = restore_cache(net, [(k.clone(), v.clone()) for k, v in ctx.kv], ctx.prompt_len)
            return greedy_seconds(lambda t: forward(net, torch.tensor([[t]], device=device), cache)[-1],
                                  ctx.first, n, device)
    return {"": BenchRow(seconds)}
