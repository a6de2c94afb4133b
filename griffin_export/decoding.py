"""The one decoding loop, shared by the PyTorch and ONNX runtimes.

A runtime only supplies `step(token_id) -> logits [vocab]`; sampling, stop strings and
limits live here, so equal weights give equal tokens in both runtimes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import GriffinError


@dataclass
class DecodeOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise GriffinError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise GriffinError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise GriffinError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(s == "" for s in self.stop):
            raise GriffinError("an empty stop string would stop before the first token; give a non-empty --stop")


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"  # length | eos | stop
    decode_s: float = 0.0  # the decoding loop's time: no prefill, no model preparation


def next_token(logits: torch.Tensor, opts: DecodeOptions, gen: torch.Generator) -> int:
    """logits [vocab] -> token id (greedy, or temperature + nucleus sampling)."""
    if opts.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / opts.temperature, dim=-1)
    if opts.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_p.cumsum(-1) - sorted_p >= opts.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def eos_ids(model_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids


def decode(
    step: Callable[[int], torch.Tensor],
    first_logits: torch.Tensor,
    opts: DecodeOptions,
    *,
    tokenizer=None,
    eos: set[int] = frozenset(),
    prefix: Sequence[int] = (),
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate from the logits after the prompt; `step` feeds one token and returns the next logits.

    `prefix`: tokens generated already (a bundle's warm-up), already in the cache, `first_logits`
    the logits after them. They are the output's start and count towards max_new_tokens and
    the stop strings, exactly as if this loop had produced them.

    `on_text` receives the text as it is decoded, in pieces that add up to the final text: the
    end of the text is held back while it could still begin a stop string, or is an incomplete
    character, so nothing printed is ever taken back."""
    if (opts.stop or on_text) and tokenizer is None:
        raise GriffinError("stop strings and streamed text need a tokenizer")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(opts.seed)
    out = Generation()
    logits = first_logits
    shown = 0  # characters handed to on_text

    def stream(text: str, final: bool) -> None:
        nonlocal shown
        end = len(text) if final else len(text) - _stop_prefix(text, opts.stop)
        while not final and end > shown and text[end - 1] == "\ufffd":  # a multi-byte character not done yet
            end -= 1
        if on_text is not None and end > shown:
            on_text(text[shown:end])
            shown = end

    for i in range(opts.max_new_tokens):
        fed = i < len(prefix)
        tok = prefix[i] if fed else next_token(logits, opts, gen)
        if opts.stop_at_eos and tok in eos:
            out.stop_reason = "eos"
            break
        out.token_ids.append(tok)
        if opts.stop or on_text:
            text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in opts.stop if s in text), default=-1)
            if cut >= 0:
                out.text, out.stop_reason = text[:cut], "stop"
                stream(out.text, final=True)
                out.decode_s = time.perf_counter() - t0
                return out
            stream(text, final=False)
        if not fed and i + 1 < opts.max_new_tokens:  # the last token needs no forward
            logits = step(tok)
    if tokenizer is not None:
        out.text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        stream(out.text, final=True)
    out.decode_s = time.perf_counter() - t0
    return out


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back from the stream)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
