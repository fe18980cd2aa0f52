# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""RandomPress: keep a random subset of tokens (a baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kvpress.presses.scorer_press import ScorerPress


@dataclass
class RandomPress(ScorerPress):
    """Uniform random scores. With `seed`, the same scores come back on every call, on CPU and on CUDA alike."""

    seed: Optional[int] = None

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        shape = keys.shape[:3]
        if self.seed is None:
            return torch.rand(shape, dtype=keys.dtype, device=keys.device)
        # Drawn on a CPU generator then moved, so a seeded press also works on GPU tensors.
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(shape, generator=generator).to(device=keys.device, dtype=keys.dtype)
