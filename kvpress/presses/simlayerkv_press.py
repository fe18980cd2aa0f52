# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""SimLayerKVPress: drop the context of "lazy" layers (SimLayerKV, https://arxiv.org/abs/2410.13846).

The one idea: in some layers the last queries put almost all their attention on the first tokens and on the most
recent ones; such a layer is lazy, and only those initial and recent tokens need to stay in its cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.attention_weights import window_attention
from kvpress.presses.base_press import BasePress
from kvpress.transformers_adapter import position_embeddings_of
from kvpress.validation import validate_int, validate_number

logger = logging.getLogger(__name__)


def _check_int(name: str, value: object, minimum: int) -> None:
    validate_int(None, f"SimLayerKVPress.{name}", value, minimum)


@dataclass
class SimLayerKVPress(BasePress):
    """Keep only the `n_initial` first and `n_recent` last tokens of each lazy layer; leave other layers whole.

    A layer is lazy when the last `n_last` queries (averaged over batch, heads and queries) give more than
    `lazy_threshold` of their attention to the `n_initial` first tokens and the `n_recent` tokens before them.
    `lazy_threshold = 1.0` disables compression. Layers of at most `n_initial + n_recent + n_last` tokens are left
    alone. `compression_ratio` is the mean, over the layers of the last prefill, of the fraction removed; it is only
    known after a forward pass and cannot be set. Recommended thresholds: Llama3 0.9, Llama2 0.65, Mistral 0.8,
    Qwen 0.85.
    """

    lazy_threshold: float = 1.0
    n_last: int = 1
    n_recent: int = 1024
    n_initial: int = 4

    def __post_init__(self) -> None:
        threshold = self.lazy_threshold
        note = (
            "It is the share of attention on the initial and recent tokens above which a layer is lazy (1.0 disables "
            "compression)."
        )
        validate_number(None, "lazy_threshold", threshold, 0, 1, note=note)
        _check_int("n_last", self.n_last, 1)
        _check_int("n_recent", self.n_recent, 1)
        _check_int("n_initial", self.n_initial, 0)
        self.compression_ratios: list[float] = []
        self._last_layer_idx: int | None = None

    @property
    def compression_ratio(self) -> float:
        if len(self.compression_ratios) == 0:
            raise ValueError("Forward pass must be run to compute the compression ratio")
        return sum(self.compression_ratios) / len(self.compression_ratios)

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        raise AttributeError(
            "compression ratio cannot be set for SimLayerKVPress: it results from which layers are lazy; tune "
            "lazy_threshold instead."
        )

    def is_lazy(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> bool:
        """Whether the last `n_last` queries attend mostly to the initial and recent tokens."""
        weights = window_attention(module, hidden_states, keys, self.n_last, position_embeddings)
        attention = weights.float().mean(dim=(0, 1, 2))  # over the keys before the last n_last tokens
        score = attention[: self.n_initial].sum() + attention[-self.n_recent :].sum()
        return bool(score.item() > self.lazy_threshold)

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A layer index that does not increase means a new prefill started (Gemma3 never hooks its layer 0).
        layer_idx = int(module.layer_idx)
        if self._last_layer_idx is None or layer_idx <= self._last_layer_idx:
            self.compression_ratios = []
        self._last_layer_idx = layer_idx

        k_len = keys.shape[2]
        min_length = self.n_initial + self.n_recent + self.n_last
        if k_len <= min_length:
            logger.warning(
                "Sequence length is shorter than n_initial + n_recent + n_last = %d: no compression applied", min_length
            )
        if self.lazy_threshold == 1.0 or k_len <= min_length:
            self.compression_ratios.append(0.0)
            return keys, values

        if not self.is_lazy(module, hidden_states, keys, position_embeddings_of(kwargs)):
            self.compression_ratios.append(0.0)
            return keys, values

        keys = torch.cat([keys[:, :, : self.n_initial], keys[:, :, -self.n_recent :]], dim=2)
        values = torch.cat([values[:, :, : self.n_initial], values[:, :, -self.n_recent :]], dim=2)
        self.compression_ratios.append((k_len - self.n_initial - self.n_recent) / k_len)
        return keys, values
