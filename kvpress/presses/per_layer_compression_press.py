# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""PerLayerCompressionPress: run an inner scorer with a different compression ratio in each layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, List, Mapping

from kvpress.presses.base_press import BasePress, FieldCheck, compression_ratio_set_to
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.scorer_wrapper_press import require_scorer_press
from kvpress.utils import get_language_model, validate_compression_ratio

logger = logging.getLogger(__name__)


def _check_layer_ratios(press: Any, name: str, value: Any) -> list[float]:
    """A non-empty list of compression ratios in [0, 1], one per decoder layer, stored as floats."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(
            "compression_ratios must be a list with one compression ratio per decoder layer, got "
            f"{type(value).__name__}."
        )
    if len(value) == 0:
        raise ValueError("compression_ratios must hold one compression ratio per decoder layer, got an empty list.")
    return [
        validate_compression_ratio(ratio, name=f"compression_ratios[{layer_idx}]", allow_one=True)
        for layer_idx, ratio in enumerate(value)
    ]


@dataclass
class PerLayerCompressionPress(BasePress):
    """Compress layer `i` with `compression_ratios[i]` (one ratio per decoder layer, each in [0, 1]).

    Layers end up with caches of different lengths; 1.0 drops a layer's context entirely. `compression_ratio` is
    the mean of the list and cannot be set. The attention patch resizes the attention mask of each layer to its own
    cache length, so later forwards work with sdpa, eager and flash attention alike.
    """

    press: ScorerPress
    compression_ratios: List[float]

    field_checks: ClassVar[Mapping[str, FieldCheck]] = {"compression_ratios": _check_layer_ratios}

    def __post_init__(self):
        require_scorer_press(self, self.press)

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
        # checked again here: an item of the list may have been replaced since it was assigned
        ratio = validate_compression_ratio(
            self.compression_ratios[layer_idx], name=f"compression_ratios[{layer_idx}]", allow_one=True
        )
        with compression_ratio_set_to(self.press, ratio):
            return self.press.forward_hook(module, input, kwargs, output)
