"""What both runtimes share: one generate over their own start / step, and one batched
generate over their start_batch / step_batch.

A runtime supplies `tokenize(text)`, `check_room(prompt_tokens, max_new_tokens)` (refuse, before
any prefill, what cannot fit), `start(ids)` -> (state, first logits) and `step(state, token)`;
`stepper` may hand back a faster step for one generation (the lean PyTorch step does). For
batches: `start_batch(list of ids, max_new_tokens)` -> (state, logits [B, vocab]) and
`step_batch(state, tokens, keep)` -> logits [len(keep), vocab], where `keep` are the rows
(of the previous step's) still decoding: finished sequences leave the batch and cost nothing;
where `joins_batches`, `join_batch(state, new, room)` adds a new start_batch's rows to a running one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..bundle.format import Bundle
from ..errors import GriffinError
from ..model.decoding import Continuation, Generation, decode
from ..settings import DecodeOptions

__all__ = ["BatchStats", "Runtime"]


def left_padded(batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts ids [1, T_b] -> (ids, attention mask, positions), each [B, max T_b] int64 on the
    CPU: every prompt ends at the last column (so each row's last logits are its next token's),
    mask 0 on the padding, positions counted from each prompt's first token."""
    lengths = [int(x.shape[1]) for x in batch]
    T = max(lengths)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for b, x in enumerate(batch):
        ids[b, T - lengths[b]:] = x[0].cpu()
        mask[b, T - lengths[b]:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


@dataclass
class BatchStats:
    """Where a batched generation's time went: the prompts' prefills and the decoding."""

    prefill_s: float = 0.0
    tokens: int = 0  # decoded so far, by the sequences that finished

    def decode_tok_s(self, elapsed_s: float) -> float:
        """Tokens per second of decoding, given the seconds since the generation started."""
        return self.tokens / max(elapsed_s - self.prefill_s, 1e-9)


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

    def start_batch(self, batch: list[torch.Tensor], max_new_tokens: int):
        raise GriffinError(f"{type(self).__name__} does not generate batches")

    def step_batch(self, state, tokens: list[int], keep: list[int]) -> torch.Tensor:
        raise NotImplementedError

    # whether join_batch works: rows that join a running batch (continuous batching, serve/)
    joins_batches = False

    def join_batch(self, state, new, room: int):
        """A running batch with the rows of `new` (a start_batch) after its own, each keeping its cache,
        `room` tokens more for every row; the rows' pending logits are the caller's to join."""
        raise GriffinError(f"{type(self).__name__} does not join batches")

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

    def checked_ids(self, prompts: Sequence[str | torch.Tensor], opts: DecodeOptions,
                    names: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Every prompt's ids [1, T], each checked to leave room for opts.max_new_tokens, before any is
        generated; an error names the prompt (names[i], e.g. "file.jsonl:4", else its index)."""
        ids = []
        for n, p in enumerate(prompts):
            try:
                x = self.tokenize(p) if isinstance(p, str) else p
                self.check_room(x.shape[1], opts.max_new_tokens)
            except GriffinError as e:
                name = names[n] if names is not None else f"prompt {n}"
                raise GriffinError(f"{name}: {e}; no prompt was generated") from None
            ids.append(x)
        return ids

    def generate_batch(self, prompts: Sequence[str | torch.Tensor], opts: DecodeOptions | None = None, *,
                       batch_size: int = 8, on_done: Callable[[int, Generation], None] | None = None,
                       names: Sequence[str] | None = None, stats: BatchStats | None = None) -> list[Generation]:
        """Every prompt (text, or ids [1, T]) prefilled and decoded with the bundle's experts,
        `batch_size` at a time in input order: each batch is prefilled together (left-padded,
        masked), then decoded together; a sequence that finishes (eos, stop string, its token
        limit) leaves the batch, and its slot stays empty until the batch is done. Greedy output
        is each prompt's alone (up to float rounding in near ties); sampling gives every sequence
        its own generator seeded with opts.seed. `on_done(index, generation)` as each finishes.
        Every prompt is checked against the context before any prefill (errors name it by
        `names[i]`, e.g. "file.jsonl:4", else by index). `stats`, where given, adds up the seconds
        spent prefilling and decoding and the tokens decoded, as they happen."""
        opts = opts or DecodeOptions()
        if batch_size < 1:
            raise GriffinError(f"batch size must be >= 1, got {batch_size}")
        ids = self.checked_ids(prompts, opts, names)
        results: list[Generation | None] = [None] * len(ids)
        for first in range(0, len(ids), batch_size):
            rows = list(range(first, min(first + batch_size, len(ids))))
            t0 = time.perf_counter()
            state, logits = self.start_batch([ids[r] for r in rows], opts.max_new_tokens)
            if stats is not None:
                stats.prefill_s += time.perf_counter() - t0
            seqs = {r: Continuation(opts, tokenizer=self.tokenizer, eos=self.eos) for r in rows}
            while rows:
                keep, tokens = [], []
                for j, r in enumerate(rows):
                    tok = seqs[r].advance(logits[j])
                    if tok is None:
                        results[r] = seqs[r].result
                        if stats is not None:
                            stats.tokens += len(seqs[r].result.token_ids)
                        if on_done is not None:
                            on_done(r, seqs[r].result)
                    else:
                        keep.append(j)
                        tokens.append(tok)
                if keep:
                    logits = self.step_batch(state, tokens, keep)
                rows = [rows[j] for j in keep]
        return results  # type: ignore[return-value]
