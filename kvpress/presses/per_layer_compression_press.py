# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""PerLayerCompressionPress: run an inner scorer with a different compression ratio in each layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List

from kvpress.presses.base_press import BasePress
from kvpress.presses.scorer_press import ScorerPress, require_scorer_press
from kvpress.utils import get_language_model, validate_compression_ratio

logger = logging.getLogger(__name__)


@dataclass
class PerLayerCompressionPress(BasePress):
    """Compress layer `i` with `compression_ratios[i]` (one ratio per decoder layer, each in [0, 1]).

    Layers end up with caches of different lengths; 1.0 drops a layer's context entirely. `compression_ratio` is
    the mean of the list and cannot be set. The attention patch resizes the attention mask of each layer to its own
    cache length, so later forwards work with sdpa, eager and flash attention alike.
    """

    press: ScorerPress
    compression_ratios: List[float]

    def __post_init__(self):
        require_scorer_press(self, self.press)
        if isinstance(self.compression_ratios, (str, bytes)) or not hasattr(self.compression_ratios, "__len__"):
            raise TypeError(
                "compression_ratios must be a list with one compression ratio per decoder layer, got "
                f"{type(self.compression_ratios).__name__}."
            )
        self.compression_ratios = list(self.compression_ratios)
        if len(self.compression_ratios) == 0:
            raise ValueError("compression_ratios must hold one compression ratio per decoder layer, got an empty list.")
        for layer_idx, ratio in enumerate(self.compression_ratios):
            validate_compression_ratio(ratio, name=f"compression_ratios[{layer_idx}]", allow_one=True)

    @property
    def compression_ratio(self) -> float:
        return sum(self.compression_ratios) / len(self.compression_ratios)

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        raise AttributeError(
            "PerLayerCompressionPress.compression_ratio is the mean of `compression_ratios`; set that list instead."
        )

    def post_init_from_model(self, model):
        n_layers = len(get_language_model(model).layers)
        if len(self.compression_ratios) != n_layers:
            raise ValueError(
                f"PerLayerCompressionPress got {len(self.compression_ratios)} compression_ratios but "
                f"{type(model).__name__} has {n_layers} decoder layers; give exactly one ratio per layer."
            )
        self.press.post_init_from_model(model)

    def forward_hook(self, module, input, kwargs, output):
        layer_idx = module.layer_idx
        if not 0 <= layer_idx < len(self.compression_ratios):
            raise ValueError(
                f"PerLayerCompressionPress has {len(self.compression_ratios)} compression_ratios, none for layer "
                f"{layer_idx}; give exactly one ratio per decoder layer."
            )
        original = self.press.compression_ratio
        self.press.compression_ratio = self.compression_ratios[layer_idx]
        try:
            return self.press.forward_hook(module, input, kwargs, output)
        finally:
            self.press.compression_ratio = original
