"""Prompt text to token ids, and the context checks every entry point shares (export, class,
both runtimes, bench, eval). It needs a tokenizer and a context length, not a
model, so the ONNX runtime (which has no PyTorch model) calls the same code as the rest."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import GriffinError

if TYPE_CHECKING:  # the model's type only: tokens stays below load in the house
    from .load import LoadedModel

# the tail of check_context's message: classes/build.py recognises over-context prompts by it
OVER_CONTEXT = "the model's context is"


def encode(tokenizer, text: str, *, context: int | None, chat: bool = False, model: str = "the model",
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Prompt text -> ids [1, T], refusing prompts longer than `context` (None: unknown)."""
    if tokenizer is None:
        raise GriffinError(f"{model} has no tokenizer")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GriffinError(f"chat=True: the model {model} has no chat template")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    if not ids:
        raise GriffinError("the prompt encodes to 0 tokens")
    check_context(context, len(ids))
    return torch.tensor([ids], dtype=torch.long, device=device)


def tokenize(lm: LoadedModel, text: str, *, chat: bool = False) -> torch.Tensor:
    """Prompt text -> ids [1, T] on the model's device, refusing prompts longer than its context."""
    return encode(lm.tokenizer, text, context=lm.context_length, chat=chat, model=lm.identity, device=lm.device)


def check_context(context: int | None, n_tokens: int, reserve: int = 1, warmup: int = 0) -> None:
    """Refuse a prompt of n_tokens that leaves no room for `reserve` more tokens (and the warm-up)."""
    if context is not None and n_tokens + max(reserve, warmup + 1) > context:
        warm = f" + {warmup} warm-up tokens" if warmup else ""
        raise GriffinError(f"prompt has {n_tokens} tokens{warm}; {OVER_CONTEXT} {context} (leave room to generate)")


def check_generation_fits(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """Refuse, before any decoding, a generation whose prompt + max_new_tokens (a bundle's warm-up
    tokens are part of them) is past the model's context: one check for both runtimes and the CLI."""
    if context and prompt_tokens + max_new_tokens > context:
        raise GriffinError(f"prompt ({prompt_tokens} tokens) + `max_new_tokens` {max_new_tokens} is past the model's "
                           f"context of {context} tokens")
