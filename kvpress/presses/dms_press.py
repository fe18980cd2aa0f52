# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""DMSPress: threshold eviction with a delay, as in Dynamic Memory Sparsification (https://arxiv.org/abs/2506.05345).

The one idea: score every token once, when it enters the cache, and evict it if its score is below `threshold`,
but only after `sliding_window_size` newer tokens have arrived, so recent tokens are always visible. Without
trained eviction heads, any per-token scorer (e.g. KVzapPress, KnormPress) gives the scores. Eviction is head-wise
(each KV head evicts its own tokens) and simulated by masking (`module.masked_key_indices`). Same API as upstream
kvpress (https://github.com/NVIDIA/kvpress).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import torch
from torch import nn

from kvpress.headwise_masks import add_masks, clear_masks, get_masks
from kvpress.presses.base_press import BasePress, FieldCheck, get_hook_inputs, layer_is_prefilling
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.scorer_wrapper_press import require_scorer_press
from kvpress.utils import extract_keys_and_values, real_number
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

PER_TOKEN_SCORERS = (
    "KnormPress, RandomPress, KVzapPress, QFilterPress, TOVAPress, KeyDiffPress, LagKVPress, CURPress, "
    "ObservedAttentionPress or your own ScorerPress that scores the new tokens on their own"
)


def _check_threshold(press: Any, name: str, value: Any) -> Optional[float]:
    """None (to be set before the first forward) or a real number, stored as float. NaN is refused: no score is
    below it, so nothing would ever be evicted. -inf (evict nothing) and inf (evict every token once it leaves the
    sliding window) are allowed."""
    if value is None:
        return None
    number = real_number(value)
    if number is None:
        raise TypeError(f"DMSPress.threshold must be a number (tokens scored below it are evicted), got {value!r}.")
    if math.isnan(number):
        raise ValueError(
            "DMSPress.threshold must be a number, not NaN: no score is below NaN, so no token would ever be evicted. "
            "Tokens scored below the threshold are evicted, e.g. DMSPress(KVzapPress(), threshold=-4.0)."
        )
    return number


@dataclass
class DMSPress(BasePress):
    """Mask the tokens whose `press` score is below `threshold` once `sliding_window_size` newer tokens exist.

    In prefill the prompt's tokens are scored (all but the last `sliding_window_size` are decided at once); with
    `decoding=True` every new token is scored as it arrives and decided when it leaves the window, so masks
    accumulate during generation. Masks are reset at the next prefill. `compression_ratio` (read-only) is the
    fraction of masked entries, averaged over the compressed layers, known after a forward pass.
    """

    press: ScorerPress
    threshold: Optional[float] = None
    sliding_window_size: int = 128
    decoding: bool = False
    scores_buffer: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    compression_ratios: dict[int, float] = field(default_factory=dict, init=False, repr=False)

    # Masks index the cache as this press leaves it; a press that removed tokens afterwards would break them.
    composable: ClassVar[bool] = False
    head_wise: ClassVar[bool] = True

    field_checks: ClassVar[Mapping[str, FieldCheck]] = {"threshold": _check_threshold}

    def __post_init__(self):
        require_scorer_press(self, self.press)
        budget = getattr(self.press, "cache_budget", 0)
        if budget:
            raise ValueError(
                f"DMSPress evicts by threshold and only uses its press's score; the cache_budget={budget} of "
                f"{type(self.press).__name__} would be ignored: set cache_budget=0."
            )
        validate_int(self, "sliding_window_size", self.sliding_window_size, 0)
        if not isinstance(self.decoding, bool):
            raise TypeError(f"DMSPress.decoding must be True or False, got {self.decoding!r}.")
        if self.decoding:
            # As upstream, a decoding step's score sees only the new token (KVzapPress, the intended scorer, scores
            # each token from its own hidden state). Presses whose score cannot run on one token declare why; upstream
            # accepts them here and fails with an AssertionError at the first generated token.
            problem = self.press.cannot_score_new_tokens_alone
            if problem is not None:
                raise ValueError(
                    f"DMSPress(decoding=True) scores each new token on its own (a decoding step brings one token), "
                    f"which {type(self.press).__name__} cannot do: {problem}. Use a scorer that can "
                    f"({PER_TOKEN_SCORERS}), or decoding=False."
                )

    @property
    def acts_during_decoding(self) -> bool:
        """The pipeline keeps the press active while it generates when `decoding` is set."""
        return self.decoding

    @property
    def compression_ratio(self) -> float:
        """Fraction of masked cache entries, averaged over the compressed layers (after a forward pass)."""
        if not self.compression_ratios:
            raise ValueError(
                "DMSPress.compression_ratio is measured, not set: run a forward pass with the press first."
            )
        return sum(self.compression_ratios.values()) / len(self.compression_ratios)

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        raise AttributeError(
            "DMSPress.compression_ratio cannot be set: it is the measured fraction of evicted entries; tune "
            "`threshold` instead."
        )

    def post_init_from_model(self, model):
        self.press.post_init_from_model(model)

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        hidden_states, cache = get_hook_inputs(module, input, kwargs)
        if cache is None:
            return output
        layer_idx: int = int(module.layer_idx)  # type: ignore[arg-type]
        q_len = hidden_states.shape[1]
        prefilling = layer_is_prefilling(module, cache, q_len)
        if prefilling:
            self.scores_buffer.pop(layer_idx, None)
            self.compression_ratios.pop(layer_idx, None)
            clear_masks(module)
        elif not self.decoding:
            return output
        if self.threshold is None:
            raise ValueError(
                "DMSPress.threshold is None: set the score below which tokens are evicted, e.g. "
                "DMSPress(KVzapPress(), threshold=-4.0)."
            )

        keys, values = extract_keys_and_values(cache, layer_idx)
        bsz, num_kv_heads, cache_len, _ = keys.shape
        # As upstream, the scorer gets no attention weights (also in prefill): the presses that need them recompute
        # them from the new tokens, so the scores are the same under every attention backend.
        scores = self.press.score(module, hidden_states, keys[:, :, -q_len:], values[:, :, -q_len:], None, kwargs)
        if scores.shape != (bsz, num_kv_heads, q_len):
            raise ValueError(
                f"{type(self.press).__name__}.score returned shape {tuple(scores.shape)}; DMSPress scores the "
                f"{q_len} new tokens and needs (batch, kv_heads, new_tokens) = {(bsz, num_kv_heads, q_len)}."
            )
        previous = self.scores_buffer.get(layer_idx)
        if prefilling or previous is None:
            buffer = scores
        else:
            buffer = torch.cat([previous.to(scores.device), scores], dim=-1)

        n_decided = buffer.shape[-1] - self.sliding_window_size
        if n_decided > 0:
            decided, buffer = buffer[..., :n_decided], buffer[..., n_decided:]
            batch_idx, head_idx, seq_idx = torch.where(decided < self.threshold)
            if seq_idx.numel() > 0:
                # The buffer held the scores of the last n_decided + window cache entries.
                seq_idx = seq_idx + (cache_len - n_decided - self.sliding_window_size)
                self._add_masks(module, batch_idx, head_idx, seq_idx)
        self.scores_buffer[layer_idx] = buffer

        masked = get_masks(module)
        n_masked = 0 if masked is None else masked[0].numel()
        self.compression_ratios[layer_idx] = n_masked / (bsz * num_kv_heads * cache_len)
        return output

    @staticmethod
    def _add_masks(module: nn.Module, batch_idx: torch.Tensor, head_idx: torch.Tensor, seq_idx: torch.Tensor) -> None:
        add_masks(module, batch_idx, head_idx, seq_idx)
