"""The export pipeline: prompt -> full-model prefill with the statistic -> selection -> Bundle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import __version__
from ..bundle.format import WARMUP_FORMAT_VERSION, Bundle, BundleInfo, write_bundle
from ..files.inputs import read_prompt
from ..files.outputs import check_output_path
from ..model.arch import ff_blocks, ff_param, slice_block
from ..model.decoding import decode, eos_ids
from ..model.load import LoadedModel, ModelFacts, ModelSource, dtype_name
from ..model.offload import param_values
from ..model.prefill import forward, new_cache, prefill, take_kv
from ..model.tokens import check_context, tokenize
from ..registry import method
from ..settings import REFIT_LAMBDA, DecodeOptions, ExportSettings
from .budget import BudgetInputs
from .refit import refit_down
from .selection import k_for, select_all
from .statistic import BatchStatistic, FFStatistic, recording

__all__ = ["export_file", "export_ids", "export_prompt", "precheck"]


def prompt_statistic(lm: LoadedModel, ids: torch.Tensor, *, chunk_size: int = 512, gram: bool = False,
                     progress: bool = False, then: int = 0) -> tuple[FFStatistic, object, torch.Tensor]:
    """Prefill the prompt once, full model, recording the FF statistic (and the Gram
    matrices for refit methods). Returns (statistic, cache, last logits [vocab]); the cache
    has room for `then` more tokens (the warm-up) without growing."""
    blocks = ff_blocks(lm.model, lm.spec)
    stat = FFStatistic(len(blocks), lm.d_ff, gram=gram)
    with recording(blocks, stat):
        cache, last_logits = prefill(lm.model, ids, chunk_size=chunk_size, progress=progress,
                                     capacity=ids.shape[1] + then)
    return stat, cache, last_logits


def batch_statistic(lm: LoadedModel, batch: list[torch.Tensor], *, chunk_size: int = 512,
                    gram: bool = False) -> BatchStatistic:
    """One full-model prefill of several prompts (ids [1, T_b] each), right-padded into one
    batch: each prompt's statistic as its own prefill gives it (statistic.BatchStatistic)."""
    lengths = [int(ids.shape[1]) for ids in batch]
    ids = torch.zeros(len(batch), max(lengths), dtype=torch.long, device=lm.device)  # pad id 0: never attended
    for b, one in enumerate(batch):
        ids[b, : lengths[b]] = one[0]
    blocks = ff_blocks(lm.model, lm.spec)
    stat = BatchStatistic(len(blocks), lm.d_ff, lengths, gram=gram)
    cache = new_cache(lm.model)
    with recording(blocks, stat):
        for start in range(0, ids.shape[1], chunk_size):
            stat.start = start
            forward(lm.model, ids[:, start : start + chunk_size], cache)
    return stat


def warm_up(lm: LoadedModel, stat: FFStatistic, cache, logits: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Decode up to n greedy tokens with the model as it is (full width) from `cache`, adding their
    FF activations to `stat`. Stops before an end-of-sequence token. Returns (tokens, logits after them)."""
    def step(tok: int) -> torch.Tensor:
        nonlocal logits  # the logits after the last token fed: what the bundle stores
        logits = forward(lm.model, torch.tensor([[tok]], device=lm.device), cache)[-1]
        return logits

    with recording(ff_blocks(lm.model, lm.spec), stat):
        gen = decode(step, logits, DecodeOptions(max_new_tokens=n), eos=eos_ids(lm.config, lm.tokenizer))
        if gen.stop_reason == "length" and gen.token_ids:
            step(gen.token_ids[-1])  # decode skips its n-th token's forward; the KV and logits come after it
    return gen.token_ids, logits


def layer_scores(lm: LoadedModel, ids: torch.Tensor, settings: ExportSettings, *, progress: bool = False):
    """Prefill the prompt once, full model. Returns (scores [L, D_ff], cache, last logits [vocab])."""
    stat, cache, last_logits = prompt_statistic(lm, ids, chunk_size=settings.chunk_size, progress=progress)
    return method_scores(lm, settings.method, stat.scores()), cache, last_logits


def method_scores(lm: LoadedModel, method_name: str, prompt_scores: torch.Tensor) -> torch.Tensor:
    """[L, D_ff] scores a method ranks by: the prompt statistic, or the method's own static score."""
    static = method(method_name).scores
    return prompt_scores if static is None else static(lm)


def choose_experts(lm: LoadedModel, method_name: str, scores: torch.Tensor, density: float, seed: int, *,
                   gram: torch.Tensor | None = None, refit_lambda: float = REFIT_LAMBDA, strict: bool = False,
                   ids: torch.Tensor | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Selection and sliced weights of one method: (per-layer indices, FF tensors by name).
    `scores` [L, D_ff] are what the method ranks by (method_scores); refit methods need `gram`.
    `strict`: refuse a per-layer budget the method cannot meet instead of falling back to uniform;
    `ids`: the prompt, for a budget rule that reads it."""
    m = method(method_name)
    if m.refit and gram is None:
        raise ValueError(f"{m.name} needs the prefill's Gram matrices")
    k = m.budget(BudgetInputs(lm, density, k_for(density, lm.d_ff), scores, gram, refit_lambda, ids, strict))
    indices = select_all(scores, k, m.name, seed)
    return indices, expert_weights(lm, indices, gram=gram if m.refit else None, refit_lambda=refit_lambda)


def expert_weights(lm: LoadedModel, indices: list[torch.Tensor], *, gram: torch.Tensor | None = None,
                   refit_lambda: float = REFIT_LAMBDA) -> dict[str, torch.Tensor]:
    """The kept neurons' FF tensors of every layer, keyed by parameter name. With `gram`
    ([L, D_ff, D_ff]) the down-projection columns are refit on the prompt (refit.py)."""
    spec = lm.spec
    weights: dict[str, torch.Tensor] = {}
    for i, (block, idx) in enumerate(zip(ff_blocks(lm.model, spec), indices)):
        w_down = param_values(block.output)
        idx = idx.to(w_down.device)
        layer = slice_block(block, idx, spec, lm.d_ff)
        if gram is not None:
            name = ff_param(spec, i, spec.output)
            layer[name] = refit_down(w_down, gram[i], idx.cpu(), refit_lambda).to(w_down)
        weights.update(layer)
    return weights


def bundle_from_indices(lm: LoadedModel, indices: list[torch.Tensor], settings: ExportSettings, *,
                        prompt_tokens: int, kind: str = "prompt", extra: dict[str, str] | None = None,
                        weights: dict[str, torch.Tensor] | None = None) -> Bundle:
    blocks = ff_blocks(lm.model, lm.spec)
    if weights is None:
        weights = expert_weights(lm, indices)
    info = BundleInfo(
        base_model=lm.identity,
        base_fingerprint=lm.fingerprint,
        architecture=lm.architecture,
        dtype=dtype_name(lm.dtype),
        num_layers=len(blocks),
        d_ff=lm.d_ff,
        hidden_size=lm.hidden_size,
        k=[int(i.numel()) for i in indices],
        density=settings.density,
        method=settings.method,
        seed=settings.seed,
        prompt_tokens=prompt_tokens,
        tokenizer=lm.tokenizer_identity(),
        has_kv=False,
        kind=kind,
        chat=settings.chat,
        tool_version=__version__,
        extra=extra or {},
    )
    return Bundle(info, [i.cpu() for i in indices], weights)


def export_ids(lm: LoadedModel, ids: torch.Tensor, settings: ExportSettings, *, progress: bool = False) -> Bundle:
    """The whole GRIFFIN export for token ids [1, T]."""
    check_context(lm.context_length, ids.shape[1], warmup=settings.warmup)
    refit = method(settings.method).refit
    stat, cache, last_logits = prompt_statistic(lm, ids, chunk_size=settings.chunk_size, gram=refit, progress=progress,
                                                then=settings.warmup)
    warm, last_logits = warm_up(lm, stat, cache, last_logits, settings.warmup)
    indices, weights = choose_experts(lm, settings.method, method_scores(lm, settings.method, stat.scores()),
                                      settings.density, settings.seed, gram=stat.gram,
                                      refit_lambda=settings.refit_lambda, ids=ids)
    extra = {"refit_lambda": str(settings.refit_lambda)} if refit else None
    bundle = bundle_from_indices(lm, indices, settings, prompt_tokens=ids.shape[1], weights=weights, extra=extra)
    bundle.prompt_ids = ids[0].cpu()
    if warm:  # none when the full model's first token ends its output
        bundle.warmup_ids = torch.tensor(warm, dtype=torch.long)
        bundle.info.warmup_tokens = len(warm)
        bundle.info.format_version = WARMUP_FORMAT_VERSION
    bundle.last_logits = last_logits.float().cpu()
    if settings.keep_kv:
        bundle.kv = take_kv(cache)
        bundle.info.has_kv = True
    return bundle


def export_prompt(lm: LoadedModel, text: str, settings: ExportSettings | None = None, *, progress: bool = False) -> Bundle:
    """A prompt's experts: one full-model prefill that scores every FF neuron, the selection, and the
    bundle (with the prompt's KV cache and the full model's first warm-up tokens, by default). The
    defaults are the command's: `griffin-export PROMPT -o B` writes the same bundle.

        bundle = export_prompt(load_model(), "Summarize: ...", ExportSettings(density=0.5, method="topk"))
    """
    settings = settings or ExportSettings()
    return export_ids(lm, tokenize(lm, text, chat=settings.chat), settings, progress=progress)


def precheck(source: ModelSource, densities: Sequence[float] = ()) -> ModelFacts:
    """What can be refused before any weights load: the device, the architecture (config.json or the
    GGUF header), and densities that keep no neuron of the model's FF width."""
    facts = source.peek()
    if facts.d_ff:
        for d in densities:
            k_for(d, facts.d_ff)
    return facts


def export_file(prompt: str | os.PathLike, output: str | os.PathLike, settings: ExportSettings | None = None,
                source: ModelSource | None = None, *, force: bool = False, progress: bool = False,
                report: Callable[[str], None] | None = None) -> tuple[Path, Bundle]:
    """A prompt file (or "-" for stdin) exported to a bundle file, everything that can be refused
    refused before the model loads: the output, the prompt, the device, the architecture, the density."""
    settings, source = settings or ExportSettings(), source or ModelSource()
    check_output_path(output, force)
    text = read_prompt(prompt)
    precheck(source, [settings.density])
    if report is not None:
        report(f"loading model {source.model or 'default (SmolLM2-135M-Instruct)'} ...")
    bundle = export_prompt(source.load(quiet=not progress), text, settings, progress=progress)
    return write_bundle(bundle, output, force=force), bundle
