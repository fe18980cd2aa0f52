# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ScorerPress: score every cached token and keep the highest-scoring ones in each KV head."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.base_press import BasePress
from kvpress.utils import validate_compression_ratio

logger = logging.getLogger(__name__)


def keep_top_scores(
    scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_kept: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `n_kept` highest-scoring tokens of each (batch, KV head), in their original positional order."""
    indices = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
    return gather_tokens(keys, indices), gather_tokens(values, indices)


def gather_tokens(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather `(B, H_kv, n, d)` from `states` `(B, H_kv, T, d)` at per-head token `indices` `(B, H_kv, n)`."""
    expanded = indices.unsqueeze(-1).expand(*indices.shape, states.shape[-1])
    return states.gather(2, expanded).contiguous()


def check_scores(press: object, scores: torch.Tensor, keys: torch.Tensor) -> None:
    expected = keys.shape[:3]
    if scores.shape != expected:
        raise ValueError(
            f"{press.__class__.__name__}.score returned shape {tuple(scores.shape)}; it must return one score per "
            f"cached token and KV head, shape (batch, kv_heads, seq_len) = {tuple(expected)}."
        )


def require_scorer_press(wrapper: object, press: object) -> None:
    """Raise a clear error when a wrapper that needs `press.score` is given something else."""
    if not isinstance(press, ScorerPress):
        raise TypeError(
            f"{wrapper.__class__.__name__} wraps a ScorerPress (a press with a `score` method, e.g. KnormPress), "
            f"got {type(press).__name__}."
        )


@dataclass
class ScorerPress(BasePress):
    """Prune a fraction `compression_ratio` of the cache, keeping the tokens with the highest `score`.

    Every KV head keeps the same number of tokens, `int(T * (1 - compression_ratio))`, but each head chooses its
    own tokens. Kept tokens stay in positional order.
    """

    compression_ratio: float = 0.0

    def __post_init__(self):
        validate_compression_ratio(self.compression_ratio)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """Importance of each cached token, `(B, H_kv, T)`; higher is kept."""
        raise NotImplementedError

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        check_scores(self, scores, keys)
        n_kept = int(keys.shape[2] * (1 - self.compression_ratio))
        return keep_top_scores(scores, keys, values, n_kept)


@dataclass
class ScorerWrapperPress(BasePress):
    """Base of the presses that wrap a ScorerPress (AdaKV, KeyRerotation, Chunk, ...).

    Checks that `press` is a ScorerPress, delegates `compression_ratio` to it and forwards `post_init_from_model`.
    """

    press: ScorerPress

    def __post_init__(self):
        require_scorer_press(self, self.press)

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        self.press.compression_ratio = value

    def post_init_from_model(self, model):
        self.press.post_init_from_model(model)

    def inner_scores(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """The inner press's scores `(B, H_kv, T)`, checked for shape."""
        scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs)
        check_scores(self.press, scores, keys)
        return scores
