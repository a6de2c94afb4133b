"""What both runtimes share: one generate over their own start / step.

A runtime supplies `tokenize(text)`, `check_room(prompt_tokens, max_new_tokens)` (refuse, before
any prefill, what cannot fit), `start(ids)` -> (state, first logits) and `step(state, token)`;
`stepper` may hand back a faster step for one generation (the lean PyTorch step does).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..bundle import Bundle
from ..decoding import DecodeOptions, Generation, decode


class Runtime:
    bundle: Bundle | None
    tokenizer: object | None
    eos: set[int]

    def tokenize(self, text: str) -> torch.Tensor:
        raise NotImplementedError

    def check_room(self, prompt_tokens: int, max_new_tokens: int) -> None:
        raise NotImplementedError

    def start(self, ids: torch.Tensor | None = None):
        raise NotImplementedError

    def step(self, state, token: int) -> torch.Tensor:
        raise NotImplementedError

    def stepper(self, state, cached: int, room: int) -> Callable[[int], torch.Tensor]:
        """The step for one generation from `state` holding `cached` positions, `room` positions in all."""
        return lambda tok: self.step(state, tok)

    def generate(self, opts: DecodeOptions | None = None, *, prompt: str | None = None,
                 ids: torch.Tensor | None = None, on_text=None) -> Generation:
        """Decode from the bundle's own prompt (or `prompt` / `ids`); `on_text` gets the text as
        it is decoded (decoding.decode)."""
        opts = opts or DecodeOptions()
        if prompt is not None:
            ids = self.tokenize(prompt)
        b = self.bundle
        own = ids is None and b is not None and b.prompt_ids is not None
        # a bundle's warm-up tokens count towards max_new_tokens: its prompt plus max_new_tokens must fit
        prompt_tokens = ids.shape[1] if ids is not None else (b.info.prompt_tokens if own else 0)
        if ids is not None or own:
            self.check_room(prompt_tokens, opts.max_new_tokens)
        state, logits = self.start(ids)
        warm = b.warmup() if ids is None and b is not None else []  # from its own prompt: the output's start
        cached = ids.shape[1] if ids is not None else (b.cached_tokens if b is not None else 0)
        step = self.stepper(state, cached, max(cached + 1, prompt_tokens + opts.max_new_tokens))
        return decode(step, logits, opts, tokenizer=self.tokenizer, eos=self.eos, prefix=warm, on_text=on_text)
