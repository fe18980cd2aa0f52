# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""FullPress: never compress, the full-cache baseline of the reasoning fork (https://arxiv.org/abs/2512.12008).

The one idea: a press that keeps every entry, so that a baseline runs through exactly the same code path as the
compressed runs (hooks, telemetry with `latency = True`) and its numbers are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.base_press import BasePress


@dataclass
class FullPress(BasePress):
    """Keep the whole cache, in prefill and decoding. Its hooks still run, so its telemetry is recorded."""

    @property
    def compression_ratio(self) -> float:
        """Always 0.0: nothing is removed."""
        return 0.0

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return keys, values

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        return output
