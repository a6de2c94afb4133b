"""The one decoding loop, shared by the PyTorch and ONNX runtimes.

A runtime only supplies `step(token_id) -> logits [vocab]`; sampling, stop strings and
limits live here, so equal weights give equal tokens in both runtimes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import GriffinError
from ..settings import DecodeOptions


@dataclass
class Generation:
    """What a generation produced: its token ids and text (a stop string cut off), why it stopped
    (length, eos or stop) and the seconds its decoding loop took."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"  # length | eos | stop
    decode_s: float = 0.0  # the decoding loop's time: no prefill, no model preparation
    extra: dict = field(default_factory=dict)  # what the runtime adds: a routed prompt's class, say


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


class Continuation:
    """One sequence being decoded: it picks its tokens from the logits it is shown and applies the
    warm-up prefix, end-of-sequence, stop strings and the token limit. `decode` runs one; a batch
    runs one per sequence, each with its own generator seeded with opts.seed, so a prompt samples
    as it would alone whatever batch it is in (up to float rounding of its logits).

    `prefix`: tokens generated already (a bundle's warm-up), already in the cache, and the first
    logits are the ones after them. They are the output's start and count towards max_new_tokens
    and the stop strings, exactly as if this loop had produced them.

    `on_text` receives the text as it is decoded, in pieces that add up to the final text: the
    end of the text is held back while it could still begin a stop string, or is an incomplete
    character, so nothing printed is ever taken back."""

    def __init__(self, opts: DecodeOptions, *, tokenizer=None, eos: set[int] = frozenset(),
                 prefix: Sequence[int] = (), on_text: Callable[[str], None] | None = None):
        if (opts.stop or on_text) and tokenizer is None:
            raise GriffinError("stop strings and streamed text need a tokenizer")
        self.opts, self.tokenizer, self.eos, self.prefix, self.on_text = opts, tokenizer, eos, list(prefix), on_text
        self.t0 = time.perf_counter()
        self.gen = torch.Generator().manual_seed(opts.seed)
        self.out = Generation()
        self.i = 0  # tokens decided, the prefix's included
        self.shown = 0  # characters handed to on_text

    def advance(self, logits: torch.Tensor) -> int | None:
        """The logits after the last token fed ([vocab]) -> the next token to feed, or None once
        the sequence is done (its Generation is `result`). Prefix tokens need no forward."""
        o = self.opts
        while self.i < o.max_new_tokens:
            fed = self.i < len(self.prefix)
            tok = self.prefix[self.i] if fed else next_token(logits, o, self.gen)
            self.i += 1
            if o.stop_at_eos and tok in self.eos:
                self.out.stop_reason = "eos"
                break
            self.out.token_ids.append(tok)
            if o.stop or self.on_text:
                text = self.tokenizer.decode(self.out.token_ids, skip_special_tokens=True)
                start = len(text) - len(text.lstrip()) if o.stop_after_text else 0
                cut = min((i for s in o.stop if (i := text.find(s, start)) >= 0), default=-1)
                if cut >= 0:
                    self.out.text, self.out.stop_reason = text[:cut], "stop"
                    return self._finish(final_text=self.out.text)
                self._stream(text, final=False)
            if not fed and self.i < o.max_new_tokens:  # the last token needs no forward
                return tok
        return self._finish()

    @property
    def result(self) -> Generation:
        return self.out

    def _finish(self, final_text: str | None = None) -> None:
        if final_text is None and self.tokenizer is not None:
            final_text = self.out.text = self.tokenizer.decode(self.out.token_ids, skip_special_tokens=True)
        if final_text is not None:
            self._stream(final_text, final=True)
        self.out.decode_s = time.perf_counter() - self.t0
        return None

    def _stream(self, text: str, final: bool) -> None:
        end = len(text) if final else len(text) - _stop_prefix(text, self.opts.stop)
        while not final and end > self.shown and text[end - 1] == "\ufffd":  # a multi-byte character not done yet
            end -= 1
        if self.on_text is not None and end > self.shown:
            self.on_text(text[self.shown:end])
            self.shown = end


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
    """Generate from the logits after the prompt; `step` feeds one token and returns the next
    logits. `prefix` and `on_text`: see Continuation."""
    seq = Continuation(opts, tokenizer=tokenizer, eos=eos, prefix=prefix, on_text=on_text)
    tok = seq.advance(first_logits)
    while tok is not None:
        tok = seq.advance(step(tok))
    return seq.result


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back from the stream)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
