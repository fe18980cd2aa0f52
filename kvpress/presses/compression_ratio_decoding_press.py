# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CompressionRatioDecodingPress: a DecodingPress whose target is a fraction of the tokens seen so far.

The one idea: instead of a fixed `target_size`, keep `(1 - target_compression_ratio)` of every token the sequence
has produced (prompt and generated), so the cache grows with the sequence at a constant compression ratio.
Same API as upstream kvpress (https://github.com/NVIDIA/kvpress).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from kvpress.presses.base_press import FieldCheck, ratio_check
from kvpress.presses.decoding_press import DecodingPress
from kvpress.transformers_adapter import position_ids_of

logger = logging.getLogger(__name__)


@dataclass
class CompressionRatioDecodingPress(DecodingPress):
    """DecodingPress with target `max(1, int(n_seen * (1 - target_compression_ratio)))`.

    `n_seen` is the number of tokens of the sequence so far, read from the logical `position_ids` of the current
    forward (`max + 1`), not from the (compressed) cache length. `target_size` is not a parameter.
    """

    target_size: int = field(default=1, init=False)
    target_compression_ratio: float = 0.5

    field_checks: ClassVar[Mapping[str, FieldCheck]] = {"target_compression_ratio": ratio_check()}

    def _resolve_target_size(self, kwargs: dict) -> int:
        position_ids = position_ids_of(kwargs)
        if position_ids is None:
            raise NotImplementedError(
                "CompressionRatioDecodingPress requires logical position_ids in kwargs (the number of tokens seen "
                "is read from them); this model's attention layers did not receive `position_ids`."
            )
        total_seen = int(position_ids.max()) + 1
        return max(1, int(total_seen * (1 - self.target_compression_ratio)))
