# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ScorerWrapperPress: the base of the presses built around an inner ScorerPress (AdaKV, KeyRerotation, Chunk, ...).

It checks the inner press, delegates `compression_ratio` and `post_init_from_model` to it, and returns the inner
scores checked for shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.base_press import BasePress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.token_selection import check_scores


def require_scorer_press(wrapper: object, press: object) -> None:
    """Raise a clear error when a wrapper that needs `press.score` is given something else."""
    if not isinstance(press, ScorerPress):
        raise TypeError(
            f"{wrapper.__class__.__name__} wraps a ScorerPress (a press with a `score` method, e.g. KnormPress), "
            f"got {type(press).__name__}."
        )


def require_no_budget(wrapper: object, press: object) -> None:
    """Raise a clear error when a wrapper that applies `compression_ratio` is given a press with a cache_budget."""
    budget = getattr(press, "cache_budget", 0)
    if budget:
        raise ValueError(
            f"{wrapper.__class__.__name__} prunes with its inner press's compression_ratio after prefill and would "
            f"ignore the cache_budget={budget} of {type(press).__name__}; use the budget press alone (or inside "
            "ComposedPress), or give the inner press a compression_ratio instead."
        )


class InnerPressDelegation:
    """Mixin of the presses built around an inner `press`: `compression_ratio` reads and writes the inner press's,
    `post_init_from_model` is forwarded to it, and `inner_scores` returns its scores checked for shape."""

    press: ScorerPress

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


@dataclass
class ScorerWrapperPress(InnerPressDelegation, BasePress):
    """Base of the presses that wrap a ScorerPress (AdaKV, KeyRerotation, Chunk, ...).

    Checks that `press` is a ScorerPress, delegates `compression_ratio` to it and forwards `post_init_from_model`.
    `compress` leaves the cache alone at `compression_ratio == 0`; otherwise it calls `compress_with_inner`, where a
    wrapper does its own work (usually from `inner_scores`).
    """

    press: ScorerPress

    def __post_init__(self):
        require_scorer_press(self, self.press)
        require_no_budget(self, self.press)

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
        return self.compress_with_inner(module, hidden_states, keys, values, attentions, kwargs)

    def compress_with_inner(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The wrapper's compression, at a nonzero `compression_ratio`."""
        raise NotImplementedError
