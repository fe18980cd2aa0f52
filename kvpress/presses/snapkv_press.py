# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""SnapKVPress: keep the tokens that the last queries of the context attend to (https://arxiv.org/abs/2404.14469)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvpress.attention_weights import group_mean, window_attention
from kvpress.presses.scorer_press import ScorerPress
from kvpress.token_selection import pad_with_top_score
from kvpress.transformers_adapter import position_embeddings_of
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)


@dataclass
class SnapKVPress(ScorerPress):
    """Score each token by the attention it receives from the last `window_size` queries, smoothed by average
    pooling over `kernel_size` neighbouring tokens. The window itself is always kept.

    Uses the eager attention weights when the model returns them; otherwise it recomputes the window's attention
    from the pre-RoPE queries.

    With a `cache_budget` this is the reasoning fork's SnapKV-D: the observation window slides with generation. At
    every decoding step the window is the last `window_size` tokens (their hidden states, RoPE positions and
    queries are kept per layer), the cache is scored again, and the window itself is always kept. A decoding step's
    eager attention has a single query row, so the window's attention is recomputed from the remembered tokens.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5

    # Why DMSPress(decoding=True) cannot score a new token on its own with this press (see BasePress).
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = (
        "it needs an observation window of window_size queries before the scored tokens"
    )

    def __post_init__(self):
        for name in ("window_size", "kernel_size"):
            validate_int(self, name, getattr(self, name), 1)
        super().__post_init__()

    @property
    def decoding_window(self) -> int:
        return self.window_size

    @property
    def required_observations(self) -> int:
        return self.window_size

    def check_budget_settings(self, budget: int) -> None:
        if budget < self.window_size:
            raise ValueError(
                f"{type(self).__name__} always keeps its observation window, so cache_budget must be at least "
                f"window_size; got cache_budget={budget}, window_size={self.window_size}."
            )

    @staticmethod
    def compute_window_attention(
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        window_size: int,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Attention of the last `window_size` queries over the keys before the window, `(B, H, w, T - w)` (upstream's
        static helper; see `kvpress.attention_weights.window_attention`)."""
        return window_attention(module, hidden_states, keys, window_size, position_embeddings)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        k_len = keys.shape[2]
        window = self.window_size
        if k_len <= window:
            raise ValueError(
                f"{type(self).__name__} needs a context longer than window_size: got {k_len} tokens with "
                f"window_size={window}. Use a longer context or a smaller window_size."
            )
        if attentions is not None and attentions.shape[-2] >= window:
            weights = attentions[..., -window:, :-window]
        else:
            if hidden_states.shape[1] < window:
                raise ValueError(
                    f"{type(self).__name__} recomputes the attention of the last window_size={window} queries but "
                    f"got the hidden states of only {hidden_states.shape[1]} tokens."
                )
            weights = self.compute_window_attention(module, hidden_states, keys, window, position_embeddings_of(kwargs))
        scores = weights.mean(dim=-2)
        n_scored = scores.shape[-1]
        scores = F.avg_pool1d(scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        # An even kernel yields one extra position; keep one score per token.
        scores = scores[..., :n_scored]
        scores = group_mean(scores, keys.shape[1])
        return pad_with_top_score(scores, window)
