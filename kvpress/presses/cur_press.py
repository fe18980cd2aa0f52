# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CURPress: keep the tokens with the largest (approximate) CUR leverage scores of the keys and values
(CurDKV, https://arxiv.org/abs/2509.15038)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kvpress.presses.scorer_press import ScorerPress
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

LEVERAGE_TYPES = ("key", "value", "kv_avg", "kv_product")
RANDOM_PROJECTION_DIM = 20


@dataclass
class CURPress(ScorerPress):
    """Score each token by the squared norm of its key and/or value, the row-sampling probability of a CUR
    decomposition of the key and value matrices.

    - `use_random_leverage`: first project keys and values on `RANDOM_PROJECTION_DIM` (20) random Gaussian
      directions (a fresh projection on every call), as in a sketched leverage estimate.
    - `use_local_approximation`: normalise the squared norms within consecutive windows of `local_window_size`
      tokens, so every region of the context competes locally.
    - `leverage_type`: "key" (keys only), "value" (values only), "kv_avg" (mean of both) or "kv_product"
      (product of both).

    The scores are normalised to sum to 1 over the sequence, then the first `num_sinks` tokens get score 1.0 (kept).
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    num_sinks: int = 4
    leverage_type: Literal["key", "value", "kv_avg", "kv_product"] = "kv_product"
    use_random_leverage: bool = False
    use_local_approximation: bool = True
    local_window_size: int = 16

    def __post_init__(self):
        super().__post_init__()
        _check_leverage_type(self.leverage_type)
        for name in ("num_sinks", "local_window_size"):
            minimum = 0 if name == "num_sinks" else 1
            validate_int(self, name, getattr(self, name), minimum, bound=f"an integer >= {minimum}")

    def local_normalize(self, squared_norms: torch.Tensor) -> torch.Tensor:
        """Divide each entry of `(B, H_kv, T)` by the sum over its window of `local_window_size` tokens."""
        length = squared_norms.shape[-1]
        window = self.local_window_size
        n_pad = (-length) % window
        padded = F.pad(squared_norms, (0, n_pad), value=0.0)
        windows = padded.view(*padded.shape[:-1], -1, window)
        # A window of all-zero rows stays zero instead of becoming NaN.
        windows = windows / windows.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(windows.dtype).tiny)
        return windows.flatten(-2)[..., :length]

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        _check_leverage_type(self.leverage_type)
        if self.use_random_leverage:
            projection = torch.randn(keys.shape[-1], RANDOM_PROJECTION_DIM, device=keys.device, dtype=torch.float32)
            projection = projection / RANDOM_PROJECTION_DIM**0.5
            keys = keys.float() @ projection
            values = values.float() @ projection
        key_norms = keys.pow(2).sum(dim=-1)
        value_norms = values.pow(2).sum(dim=-1)
        if self.use_local_approximation:
            key_norms = self.local_normalize(key_norms)
            value_norms = self.local_normalize(value_norms)
        if self.leverage_type == "key":
            scores = key_norms
        elif self.leverage_type == "value":
            scores = value_norms
        elif self.leverage_type == "kv_avg":
            scores = (key_norms + value_norms) / 2
        else:
            scores = key_norms * value_norms
        scores = scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        scores[..., : self.num_sinks] = 1.0
        return scores


def _check_leverage_type(leverage_type: str) -> None:
    if leverage_type not in LEVERAGE_TYPES:
        raise ValueError(f"CURPress.leverage_type must be one of {LEVERAGE_TYPES}, got {leverage_type!r}.")
