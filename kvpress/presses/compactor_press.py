# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CompactorPress: blend approximate key leverage scores with non-causal chunked attention, keeping sink tokens at
both ends (Compactor, https://arxiv.org/abs/2507.08143)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from kvpress.presses.base_press import NEEDS_EVERY_HIDDEN_STATE
from kvpress.presses.leverage_press import LeverageScorePress, require_prefill
from kvpress.presses.non_causal_attention_press import NonCausalAttnPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.token_selection import pad_with_top_score
from kvpress.transformers_adapter import position_embeddings_of, replace_inputs
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

DEFAULT_BLENDING = 0.35


@dataclass
class CompactorPress(ScorerPress):
    """Score = `blending * leverage + attention`, both z-normalised (see LeverageScorePress and NonCausalAttnPress).

    The first `sink_size_start` and last `sink_size_end` tokens are not scored and always kept. Two deliberate
    departures from the paper, as upstream: `blending` defaults to the compression ratio (more weight on the
    geometric outliers when more is pruned), and the leverage scores are computed with a Cholesky solve.

    `_leverage_press` and `_non_causal_press` are built from the other fields; changing `compression_ratio`,
    `sketch_dimension` or `chunk_size` afterwards updates them. Prefill only.
    """

    compression_ratio: float = 0.0
    sink_size_start: int = 8
    sink_size_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    blending: Optional[float] = None
    _leverage_press: Optional[LeverageScorePress] = None
    _non_causal_press: Optional[NonCausalAttnPress] = None

    # The score needs the hidden state of every cached token, which only a prefill has.
    supports_decoding: ClassVar[bool] = False
    cannot_score_during_decoding: ClassVar[Optional[str]] = NEEDS_EVERY_HIDDEN_STATE
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = NEEDS_EVERY_HIDDEN_STATE

    def __post_init__(self):
        super().__post_init__()
        for name in ("sink_size_start", "sink_size_end"):
            validate_int(self, name, getattr(self, name), 0, "tokens always kept")
        if self.blending is not None and (
            isinstance(self.blending, bool) or not isinstance(self.blending, (int, float))
        ):
            raise ValueError(f"CompactorPress.blending must be a number or None, got {self.blending!r}.")
        self._leverage_press = LeverageScorePress(self.compression_ratio, self.sketch_dimension)
        self._non_causal_press = NonCausalAttnPress(self.compression_ratio, self.chunk_size)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        leverage = self.__dict__.get("_leverage_press")
        non_causal = self.__dict__.get("_non_causal_press")
        if leverage is None or non_causal is None:
            return  # still being initialised
        if name == "compression_ratio":
            leverage.compression_ratio = value
            non_causal.compression_ratio = value
        elif name == "sketch_dimension":
            leverage.sketch_dimension = value
        elif name == "chunk_size":
            non_causal.chunk_size = value

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        require_prefill(self, hidden_states, keys)
        length = keys.shape[-2]
        left = min(self.sink_size_start, length)
        right = min(self.sink_size_end, max(0, length - left))
        end = length - right
        if end <= left:  # every token is a sink
            return torch.ones(keys.shape[:3], dtype=torch.float32, device=keys.device)
        cos, sin = position_embeddings_of(kwargs)
        sliced_kwargs = replace_inputs(kwargs, position_embeddings=(cos[:, left:end], sin[:, left:end]))
        inputs = (
            module,
            hidden_states[:, left:end],
            keys[:, :, left:end],
            values[:, :, left:end],
            None,
            sliced_kwargs,
        )
        leverage = self._leverage_press.score(*inputs)
        attention = self._non_causal_press.score(*inputs)
        if leverage.shape != attention.shape:
            raise RuntimeError(
                f"CompactorPress: leverage scores {tuple(leverage.shape)} and attention scores "
                f"{tuple(attention.shape)} differ in shape."
            )
        if self.blending is not None:
            blending = self.blending
        elif self.compression_ratio is not None:
            blending = self.compression_ratio
        else:
            blending = DEFAULT_BLENDING
        scores = blending * leverage + attention
        # Sinks score above every other token (upstream pads with the maximum itself, a tie).
        scores = pad_with_top_score(scores.detach(), left, left=True)
        return pad_with_top_score(scores, right)
