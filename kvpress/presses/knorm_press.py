# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KnormPress: keep the keys with the smallest L2 norm (https://arxiv.org/abs/2406.11430)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.scorer_press import ScorerPress


@dataclass
class KnormPress(ScorerPress):
    """Score = -||k||: keys with a low norm tend to receive high attention, so they are kept.

    With a `cache_budget`, the norms of the cached keys are compared again after every decoding step (the press is
    stateless: it needs neither hidden states nor attention weights), so the highest-norm key is evicted.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    @property
    def decoding_window(self) -> int:
        return 0

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        return -keys.norm(dim=-1)
