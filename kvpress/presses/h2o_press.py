# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""H2OPress: Heavy-Hitter Oracle, keep the tokens that received the most attention (https://arxiv.org/abs/2306.14048).

The one idea: a few "heavy hitter" tokens receive most of the attention over the whole generation, so the attention
each cached token has received is accumulated step after step, and the tokens with the least are evicted. This is the
reasoning fork's H2OPress (https://arxiv.org/abs/2512.12008), with its accumulation kept in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from kvpress.attention_weights import group_mean, received_attention_sums
from kvpress.decoding_budget import DecodingState, log_eviction
from kvpress.presses.scorer_press import ScorerPress
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

ATTENTION_SUM = "attention_sum"
OBSERVATIONS = "observations"


def received_attention(attentions: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention each cached entry received from this forward's queries, and how many of them could see it.

    `attentions` `(B, H, q, T)`: the eager attention weights of the q new tokens over the T cached entries (the new
    ones last, in positional order). Returns the per-entry sum over the queries, averaged over each GQA group,
    `(B, H_kv, T)` in float32, and the number of queries that see entry j causally, `min(q, T - j)`, `(T,)`.
    """
    q_len, k_len = attentions.shape[-2:]
    sums = group_mean(attentions.float().sum(dim=-2), num_kv_heads)
    positions = torch.arange(k_len, device=attentions.device)
    observers = (k_len - positions).clamp(max=q_len).to(torch.float32)
    return sums, observers


@dataclass
class H2OPress(ScorerPress):
    """Score = mean attention a token has received per step since it was cached ("accumulated attention" divided by
    the number of queries that could see it), averaged over each GQA group; the `n_recent` most recent tokens are
    always kept. Works with every attention backend: under eager attention the layer's own weights are used, under
    sdpa or flash attention the press recomputes them from the queries and the cached keys (a decode step is one query
    row per head; a prefill is done in chunks of queries, so nothing of size T x T is held at once).

    With `compression_ratio` it prunes the context once after prefill (the score then equals ObservedAttention's).
    With `cache_budget` (the reasoning fork's use) it keeps, per layer and KV head, the sum of the attention every
    cached token has received and the number of queries that saw it, updates both after every step, and evicts the
    lowest mean once a layer holds more than the budget. The statistics follow the kept entries, are kept in
    float32, and restart at every prefill.

    `n_recent` = 0 reproduces the fork (no protected window); the H2O paper keeps half of the budget for the most
    recent tokens (`n_recent = cache_budget // 2`). With `output_attentions=False` the hook drops the attention
    weights from the attention module's output once it has used them (the fork's flag).
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    n_recent: int = 0
    output_attentions: bool = True

    # Why it cannot score during decoding, nor a new token alone (see BasePress).
    cannot_score_during_decoding: ClassVar[Optional[str]] = (
        "it accumulates the attention each token received through its own hook; use H2OPress(cache_budget=...) on an "
        "eager model instead"
    )
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = cannot_score_during_decoding

    def __post_init__(self):
        validate_int(self, "n_recent", self.n_recent, 0, bound="a non-negative integer")
        super().__post_init__()

    def check_budget_settings(self, budget: int) -> None:
        if self.n_recent > budget:
            raise ValueError(
                f"H2OPress keeps the n_recent={self.n_recent} most recent tokens within cache_budget={budget}; "
                "n_recent must not exceed cache_budget."
            )

    @property
    def decoding_window(self) -> int:
        return 0

    def entry_fill_values(self) -> dict:
        return {**super().entry_fill_values(), ATTENTION_SUM: 0.0, OBSERVATIONS: 0.0}

    def received(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Attention received by every cached entry from this forward's queries: the per-entry sums averaged over
        each GQA group `(B, H_kv, T)` (float32), the number of queries that could see each entry `(T,)`, and, when
        the eviction log is on, the weights of the first batch item `(H, q, T)`. Uses the eager weights when the
        layer returned them, else recomputes them (`kvpress.attention_weights`)."""
        if attentions is not None:
            sums, observers = received_attention(attentions, keys.shape[1])
            return sums, observers, (attentions[0].float() if self.csv_path else None)
        raw, observation = received_attention_sums(
            module, hidden_states, keys, kwargs, keep_first_batch_item=bool(self.csv_path)
        )
        k_len = keys.shape[2]
        positions = torch.arange(k_len, device=keys.device)
        observers = (k_len - positions).clamp(max=hidden_states.shape[1]).to(torch.float32)
        return group_mean(raw, keys.shape[1]), observers, observation

    def update_state(
        self,
        module: nn.Module,
        state: DecodingState,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> None:
        sums, observers, observation = self.received(module, hidden_states, keys, attentions, kwargs)
        state.entries[ATTENTION_SUM] = state.entries[ATTENTION_SUM] + sums
        state.entries[OBSERVATIONS] = state.entries[OBSERVATIONS] + observers
        if observation is not None:
            state.scratch["observation"] = observation

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        state = self.layer_state(module.layer_idx) if self.cache_budget else None
        k_len = keys.shape[2]
        if state is not None and state.entries[ATTENTION_SUM].shape[-1] == k_len:
            sums, observers = state.entries[ATTENTION_SUM], state.entries[OBSERVATIONS]
        else:
            sums, observers, _ = self.received(module, hidden_states, keys, attentions, kwargs)
        scores = sums / observers.clamp(min=1.0)
        if self.n_recent > 0:
            scores = scores.clone()
            scores[..., -self.n_recent :] = scores.max() + 1
        return scores

    def on_eviction(self, module: nn.Module, state: DecodingState, indices: torch.Tensor, k_len: int) -> None:
        observation = state.scratch.get("observation")
        if not self.csv_path or observation is None:
            return
        n_candidates = k_len - self.n_recent
        log_eviction(self.csv_path, module, state, indices, k_len, n_candidates, observation[..., :n_candidates])

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        output = super().forward_hook(module, input, kwargs, output)
        if not self.output_attentions and isinstance(output, tuple) and len(output) > 1:
            output = (output[0], None, *output[2:])
        return output
