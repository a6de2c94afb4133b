"""The paper's classification mode, for multiple-choice log-likelihood: the experts come from all
tokens but the last, and only the last position runs through them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..bundle.experts import installed
from ..errors import GriffinError
from ..model.arch import ff_blocks
from ..model.load import LoadedModel
from ..model.prefill import forward, new_cache
from ..registry import CLASS_METHODS
from .export import expert_weights
from .selection import k_for, select_all
from .statistic import FFStatistic, recording


@contextmanager
def experts(lm: LoadedModel, indices: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run the model with only `indices` [k_i] per layer; the full FF linears come back after."""
    with installed(lm, expert_weights(lm, list(indices))):
        yield


def classification_logits(lm: LoadedModel, ids: torch.Tensor, *, density: float = 0.5, method: str = "topk",
                          seed: int = 0) -> torch.Tensor:
    """The paper's classification mode, for multiple-choice log-likelihood: one pass where the
    experts come from every token but the last and only the last position runs through them.

    ids [1, T], T >= 2 -> float32 logits [T, vocab]: rows 0..T-2 from the full model, row T-1
    (the one that scores the last choice token, or the answer) from the experts. The
    statistic of tokens 0..T-2 does not depend on the last token (causal attention), so this
    equals the paper's single forward with the last position masked.
    """
    if ids.shape[-1] < 2:
        raise GriffinError("classification mode needs at least 2 tokens (experts come from all but the last)")
    if method not in CLASS_METHODS:
        raise GriffinError(f"method {method!r} is not a prompt statistic; use one of {', '.join(CLASS_METHODS)}")
    blocks = ff_blocks(lm.model, lm.spec)
    stat = FFStatistic(len(blocks), lm.d_ff)
    cache = new_cache(lm.model)
    with recording(blocks, stat):
        prefix = forward(lm.model, ids[:, :-1], cache, last_only=False)  # [T-1, vocab]
    indices = select_all(stat.scores(), k_for(density, lm.d_ff), method, seed)
    with experts(lm, indices):
        last = forward(lm.model, ids[:, -1:], cache)  # [1, vocab]
    return torch.cat([prefix, last])


def choice_loglik(lm: LoadedModel, context: torch.Tensor, choice: torch.Tensor, **selection) -> float:
    """Σ log p(choice | context) in classification mode: context [1, C] + choice [1, N] ids.

    As in lm-eval, the model reads context + choice[:-1]; the experts come from all of that
    but its last token, whose position (the one predicting the last choice token) is pruned.
    """
    ids = torch.cat([context, choice], dim=1)[:, :-1]
    logits = classification_logits(lm, ids, **selection)[-choice.shape[1]:]  # [N, vocab]
    return float(torch.log_softmax(logits, dim=-1).gather(1, choice[0, :, None]).sum())
