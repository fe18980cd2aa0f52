# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""MergingPress: prune like the inner press, but fold each evicted token's value into the kept token whose key is
the most similar, instead of dropping it (token merging as in D2O, https://arxiv.org/abs/2406.13035).

A query that attended to an evicted token attends, after pruning, mostly to the kept tokens with similar keys. Adding
the evicted value to the most similar kept token's value (a weighted average) keeps part of its contribution to
the attention output. Keys are never changed, so the attention pattern is the one of plain pruning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress
from kvpress.token_selection import gather_tokens
from kvpress.validation import validate_number

logger = logging.getLogger(__name__)

_EPS = 1e-6


@dataclass
class MergingPress(ScorerWrapperPress):
    """Keep the inner press's top `int(T * (1 - compression_ratio))` tokens per KV head, after merging the values of
    the evicted tokens into the kept ones.

    Each evicted token e goes to the kept token t with the highest key cosine similarity s. It is merged when
    `s >= similarity_threshold` and, with `merge_fraction < 1`, only when s is in the top `merge_fraction` of the
    head's evicted tokens. Its weight is `max(s, 0) * |v_e| / (|v_e| + |v_t| + eps)`; a kept value receiving merges
    becomes `(v_t + sum_e w_e v_e) / (1 + sum_e w_e)`.
    """

    press: ScorerPress = None
    similarity_threshold: float = 0.0
    merge_fraction: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        threshold = self.similarity_threshold
        note = (
            "Evicted tokens whose best key cosine similarity with a kept token is below it are dropped instead of "
            "merged."
        )
        validate_number(None, "similarity_threshold", threshold, 0, 1, note=note)
        fraction = self.merge_fraction
        note = (
            "It is the fraction of each head's evicted tokens (the most similar ones) that may be merged; 1 merges all "
            "of them."
        )
        validate_number(None, "merge_fraction", fraction, 0, 1, open_minimum=True, note=note)

    def compress_with_inner(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.inner_scores(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = int(keys.shape[2] * (1 - self.compression_ratio))
        indices = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        keys, values = self.merge(keys, values, indices)
        return gather_tokens(keys, indices), gather_tokens(values, indices)

    def merge(
        self, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold the values of the tokens not in `indices` `(B, H_kv, n_kept)` into the kept ones.

        Returns `keys` unchanged and a copy of `values` where the kept positions hold their merged values (the
        evicted positions are left as they were; the caller gathers the kept ones).
        """
        k_len, n_kept = keys.shape[2], indices.shape[-1]
        n_evicted = k_len - n_kept
        if n_evicted == 0 or n_kept == 0:
            return keys, values
        kept_mask = torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device)
        kept_mask.scatter_(-1, indices, True)
        # a stable sort puts the evicted positions (False) first, in ascending order
        evicted = kept_mask.to(torch.int8).argsort(dim=-1, stable=True)[..., :n_evicted]

        kept_keys, evicted_keys = gather_tokens(keys, indices).float(), gather_tokens(keys, evicted).float()
        kept_keys = kept_keys / kept_keys.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        evicted_keys = evicted_keys / evicted_keys.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        max_sim, target = (evicted_keys @ kept_keys.transpose(-1, -2)).max(dim=-1)  # (B, H_kv, n_evicted)

        mergeable = max_sim >= self.similarity_threshold
        if self.merge_fraction < 1 and mergeable.any():
            mergeable &= max_sim >= self._fraction_threshold(max_sim.masked_fill(~mergeable, float("-inf")))

        kept_values, evicted_values = gather_tokens(values, indices).float(), gather_tokens(values, evicted).float()
        evicted_norm = evicted_values.norm(dim=-1)
        target_norm = kept_values.norm(dim=-1).gather(-1, target)
        weights = max_sim.clamp_min(0) * mergeable * evicted_norm / (evicted_norm + target_norm + _EPS)

        merged = torch.zeros_like(kept_values)
        merged.scatter_add_(2, target.unsqueeze(-1).expand_as(evicted_values), weights.unsqueeze(-1) * evicted_values)
        total_weight = weights.new_zeros(kept_values.shape[:3]).scatter_add_(-1, target, weights)
        updated = total_weight > 0
        new_kept = torch.where(
            updated.unsqueeze(-1),
            ((kept_values + merged) / (1 + total_weight.unsqueeze(-1))).to(values.dtype),
            gather_tokens(values, indices),
        )
        new_values = values.clone()
        new_values.scatter_(2, indices.unsqueeze(-1).expand_as(new_kept), new_kept)
        return keys, new_values

    def _fraction_threshold(self, max_sim: torch.Tensor) -> torch.Tensor:
        """The `(1 - merge_fraction)` quantile of each head's evicted similarities `(B, H_kv, 1)`, taking the next
        higher sample (non-mergeable tokens are -inf; with fewer mergeable tokens than the fraction, all of them
        pass)."""
        n_evicted = max_sim.shape[-1]
        rank = math.ceil((1 - self.merge_fraction) * (n_evicted - 1) - 1e-9)
        return max_sim.kthvalue(rank + 1, dim=-1, keepdim=True).values
