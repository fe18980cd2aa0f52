# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""PyramidKVPress: SnapKV scores with a pyramid of per-layer budgets, large in the first layers and small in the last
ones (PyramidKV, https://arxiv.org/abs/2406.02069)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.token_selection import check_scores, keep_top_scores
from kvpress.validation import validate_number

logger = logging.getLogger(__name__)


@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV's scores, but layer `i` keeps a budget that decreases linearly with depth.

    The budgets form an arithmetic sequence from `max_num` (layer 0) down to `min_num` (last layer) whose mean is
    `q_len * (1 - compression_ratio)`, so the whole model keeps the same number of tokens as SnapKV. `beta` sets
    how steep the pyramid is: the smallest budget is about `1 / beta` of the average one. When the pyramid does not
    fit (the budgets would exceed the context or fall below the window), every layer keeps
    `round(q_len * (1 - compression_ratio))` tokens.

    With a `cache_budget` (SnapKV-D's sliding window during decoding), the same pyramid spreads the budget over the
    layers: layer `i` holds at most `layer_cache_budget(layer i)` entries, whose mean over the layers is
    `cache_budget` (up to rounding). When the smallest layer budget would fall below `window_size`, every layer
    keeps `cache_budget`.
    """

    chunked_prefill = "unsupported"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5
    beta: int = 20

    # Why it cannot score during decoding, nor a new token alone (see BasePress).
    cannot_score_during_decoding: ClassVar[Optional[str]] = (
        "it sets its own per-layer budgets, which would override the decoding target"
    )
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = cannot_score_during_decoding

    def __post_init__(self):
        super().__post_init__()
        meaning = "the ratio between the average and the smallest layer budget"
        validate_number(self, "beta", self.beta, 1, meaning=meaning)

    def get_layer_budget(self, module: nn.Module, q_len: int) -> int:
        """Number of tokens layer `module.layer_idx` keeps out of `q_len`."""
        if self.beta < 1:
            raise ValueError(f"PyramidKVPress.beta must be >= 1, got {self.beta!r}.")
        return self._pyramid(module, q_len * (1 - self.compression_ratio), ceiling=q_len - self.window_size)

    def layer_cache_budget(self, module: nn.Module) -> int:
        """With a `cache_budget`: this layer's share of a pyramid whose mean over the layers is the budget."""
        return self._pyramid(module, float(self.cache_budget), ceiling=math.inf)

    def _pyramid(self, module: nn.Module, average: float, ceiling: float) -> int:
        """Layer `module.layer_idx`'s term of the arithmetic sequence of mean `average` from `max_num` (first layer,
        at most `ceiling`) down to `min_num` (last layer, about `average / beta`); `round(average)` when the sequence
        would go below the observation window or the model has one layer."""
        window = self.window_size
        min_num = average / self.beta
        max_num = 2 * average - min_num
        if max_num >= ceiling:
            max_num = ceiling
            min_num = 2 * average - max_num
        num_layers = module.config.num_hidden_layers
        if not (max_num >= min_num >= window) or num_layers < 2:
            # With a single layer there is no pyramid: that layer keeps the average budget.
            return round(average)
        steps = (max_num - min_num) / (num_layers - 1)
        return round(max_num - module.layer_idx * steps)

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
        n_kept = self.get_layer_budget(module, keys.shape[2])
        return keep_top_scores(scores, keys, values, n_kept)
