# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KeyDiffPress: keep the keys that differ most from the average key direction
(KeyDiff, https://arxiv.org/abs/2504.15364)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvpress.presses.scorer_press import ScorerPress

logger = logging.getLogger(__name__)


@dataclass
class KeyDiffPress(ScorerPress):
    """Score = minus the cosine similarity between a key and the anchor, the mean of the unit-normalised keys of
    its head. Distinctive keys tend to receive high attention, so the keys most similar to the anchor are pruned.

    The paper's block-wise variant is `BlockPress(KeyDiffPress(...), block_size=N)`.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)
