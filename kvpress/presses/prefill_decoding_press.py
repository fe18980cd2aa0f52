# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""PrefillDecodingPress: one press for the prompt, another one during generation.

The one idea: prefill and decoding call for different presses (e.g. SnapKV on the prompt, then a DecodingPress
that keeps the cache at a fixed size while the answer is generated); this wrapper dispatches each forward to the
right one. Same API as upstream kvpress (https://github.com/NVIDIA/kvpress).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kvpress.presses.base_press import BasePress, get_hook_inputs, layer_is_prefilling
from kvpress.presses.decoding_press import DecodingPress
from kvpress.transformers_adapter import find_cache

logger = logging.getLogger(__name__)


@dataclass
class PrefillDecodingPress(BasePress):
    """Apply `prefilling_press` to the prompt and `decoding_press` during generation; either may be None.

    The decoding press also sees the prefill (without compressing it), so that its state is reset for the new
    sequence and its hidden-state buffer starts with the prompt's last tokens. No `compression_ratio`.
    """

    prefilling_press: Optional[BasePress] = None
    decoding_press: Optional[DecodingPress] = None

    def __post_init__(self):
        if self.prefilling_press is not None and not isinstance(self.prefilling_press, BasePress):
            raise TypeError(
                "PrefillDecodingPress.prefilling_press must be a kvpress press (a BasePress, e.g. SnapKVPress(0.5)) "
                f"or None, got {type(self.prefilling_press).__name__}."
            )
        if isinstance(self.prefilling_press, DecodingPress):
            raise TypeError(
                "PrefillDecodingPress.prefilling_press compresses the prompt, but a DecodingPress does nothing during "
                "prefill: pass it as decoding_press instead."
            )
        if self.decoding_press is not None and not isinstance(self.decoding_press, DecodingPress):
            raise TypeError(
                "PrefillDecodingPress.decoding_press must be a DecodingPress (DecodingPress, "
                f"CompressionRatioDecodingPress or CAMPress) or None, got {type(self.decoding_press).__name__}."
            )

    @property
    def acts_during_decoding(self) -> bool:
        """The pipeline keeps the press active while it generates when there is a decoding press."""
        return self.decoding_press is not None

    def post_init_from_model(self, model):
        if self.prefilling_press is not None:
            self.prefilling_press.post_init_from_model(model)
        if self.decoding_press is not None:
            self.decoding_press.post_init_from_model(model)

    def on_exit(self) -> None:
        """The state is reset when the `with` block exits (exceptions included), as upstream."""
        self.reset()

    def reset(self) -> None:
        """Forget the decoding press's state (done when the `with` block exits; also per layer at every prefill)."""
        if self.decoding_press is not None:
            self.decoding_press.reset()

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        hidden_states, cache = get_hook_inputs(module, input, kwargs)
        if cache is None:
            return output
        if layer_is_prefilling(module, cache, hidden_states.shape[1]):
            if self.prefilling_press is not None:
                output = self.prefilling_press.forward_hook(module, input, kwargs, output)
            if self.decoding_press is not None:  # resets its state for the new sequence; never compresses here
                output = self.decoding_press.forward_hook(module, input, kwargs, output)
            return output
        if self.decoding_press is not None:
            return self.decoding_press.forward_hook(module, input, kwargs, output)
        return output

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's dispatch by phase: the prefilling press on a prefill, the decoding press on a decoding step
        (the phase is read from the cache this forward received; without one, a forward that holds only its own
        tokens is a prefill). Warns and returns the inputs when the phase has no press."""
        cache = find_cache(kwargs)
        q_len = hidden_states.shape[1]
        prefilling = layer_is_prefilling(module, cache, q_len) if cache is not None else keys.shape[2] <= q_len
        press = self.prefilling_press if prefilling else self.decoding_press
        if press is not None:
            return press.compress(module, hidden_states, keys, values, attentions, kwargs)
        logger.warning("No compression applied during prefill or decoding phase")
        return keys, values
