"""The export pipeline: prompt -> full-model prefill with the statistic -> selection -> Bundle."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .arch import ff_blocks, magnitude_scores, slice_block
from .bundle import Bundle, BundleInfo
from .errors import GriffinError
from .models import LoadedModel, dtype_name
from .prefill import cache_tensors, prefill
from .select import check_density, check_method, k_for, select_all
from .statistic import FFStatistic, recording


@dataclass
class ExportSettings:
    density: float = 0.5
    method: str = "topk"
    seed: int = 0
    chunk_size: int = 512  # prefill chunk; the statistic is the same for any chunking
    keep_kv: bool = True
    chat: bool = False

    def __post_init__(self) -> None:
        check_method(self.method)
        check_density(self.density)
        if self.chunk_size < 1:
            raise GriffinError(f"chunk size must be >= 1, got {self.chunk_size}")


def read_prompt(source: str | os.PathLike) -> str:
    """UTF-8 prompt text from a file, or stdin for '-'."""
    import sys

    if str(source) == "-":
        data = sys.stdin.buffer.read()
        name = "stdin"
    else:
        path = Path(source)
        if not path.is_file():
            raise GriffinError(f"prompt file {source} does not exist")
        data = path.read_bytes()
        name = str(source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GriffinError(f"prompt {name} is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise GriffinError(f"prompt {name} is empty")
    return text


def tokenize(lm: LoadedModel, text: str, *, chat: bool = False) -> torch.Tensor:
    """Prompt text -> ids [1, T], refusing prompts longer than the model's context."""
    tok = lm.tokenizer
    if tok is None:
        raise GriffinError("the model has no tokenizer")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise GriffinError(f"--chat: the model {lm.identity} has no chat template")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
    else:
        ids = tok(text)["input_ids"]
    if not ids:
        raise GriffinError("the prompt encodes to 0 tokens")
    ids = torch.tensor([ids], dtype=torch.long, device=lm.device)
    check_context(lm, ids.shape[1])
    return ids


def check_context(lm: LoadedModel, n_tokens: int, reserve: int = 1) -> None:
    ctx = lm.context_length
    if ctx is not None and n_tokens + reserve > ctx:
        raise GriffinError(f"prompt has {n_tokens} tokens; the model's context is {ctx} (leave room to generate)")


def layer_scores(lm: LoadedModel, ids: torch.Tensor, settings: ExportSettings, *, progress: bool = False):
    """Prefill the prompt once, full model. Returns (scores [L, D_ff], cache, last logits [vocab])."""
    blocks = ff_blocks(lm.model, lm.spec)
    stat = FFStatistic(len(blocks), lm.d_ff)
    with recording(blocks, stat):
        cache, last_logits = prefill(lm.model, ids, chunk_size=settings.chunk_size, progress=progress)
    if settings.method == "magnitude":
        scores = torch.stack([magnitude_scores(b, lm.spec, lm.d_ff) for b in blocks])
    else:
        scores = stat.scores()
    return scores, cache, last_logits


def bundle_from_indices(lm: LoadedModel, indices: list[torch.Tensor], settings: ExportSettings, *,
                        prompt_tokens: int, kind: str = "prompt", extra: dict[str, str] | None = None) -> Bundle:
    blocks = ff_blocks(lm.model, lm.spec)
    weights: dict[str, torch.Tensor] = {}
    for block, idx in zip(blocks, indices):
        weights.update(slice_block(block, idx.to(block.output.weight.device), lm.spec, lm.d_ff))
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
    check_context(lm, ids.shape[1])
    scores, cache, last_logits = layer_scores(lm, ids, settings, progress=progress)
    k = k_for(settings.density, lm.d_ff)
    indices = select_all(scores, k, settings.method, settings.seed)
    bundle = bundle_from_indices(lm, indices, settings, prompt_tokens=ids.shape[1])
    bundle.prompt_ids = ids[0].cpu()
    bundle.last_logits = last_logits.float().cpu()
    if settings.keep_kv:
        bundle.kv = cache_tensors(cache)
        bundle.info.has_kv = True
    return bundle


def export_prompt(lm: LoadedModel, text: str, settings: ExportSettings | None = None, *, progress: bool = False) -> Bundle:
    settings = settings or ExportSettings()
    return export_ids(lm, tokenize(lm, text, chat=settings.chat), settings, progress=progress)
