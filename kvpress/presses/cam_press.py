# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CAMPress: cache merging during decoding (CaM, https://openreview.net/forum?id=LCTmppB165).

The one idea: an evicted token's information is not simply thrown away. Each evicted token that was attended
more than the kept tokens right after it is, with that probability, merged into their values (its value is
spread over the next `merge_budget` kept tokens), so the output of attention changes less than with plain
eviction. Same API as upstream kvpress (https://github.com/NVIDIA/kvpress).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvpress.attention_weights import attention_probabilities
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.decoding_press import DecodingPress, remap_masked_key_indices
from kvpress.presses.scorer_press import ScorerPress
from kvpress.token_selection import check_scores, gather_tokens
from kvpress.transformers_adapter import position_embeddings_of
from kvpress.utils import (
    apply_rope,
    extract_keys_and_values,
    get_prerope_query_states,
    write_keys_and_values,
)
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)


@dataclass
class CAMPress(DecodingPress):
    """DecodingPress that merges evicted values into the kept ones (Cache Merging, CaM).

    At every decoding step the attention of the current token (the eager weights, or recomputed from its query)
    is averaged over each GQA group and added to a running sum per cached token. When the layer is compressed
    (every `compression_interval` steps once it holds more than `target_size` tokens):

    1. the base press scores the tokens; the scores averaged over KV heads rank them, so every head evicts the
       same tokens and the kept `target_size` stay in positional order;
    2. among the evicted tokens, the `k` best scored ones (`k` = steps since the last compression; ties go to the
       later token) are merge candidates;
    3. for a candidate m, its window is the (at most) `merge_budget` kept tokens that follow it; with
       probability `p = clamp(A[m] / mean(A[window]), 0, 1)` (A = running attention sum, per KV head) the value
       `v_m / len(window)` is added to every value of the window.

    `compression_interval=1` merges at every step as in the paper.
    """

    merge_budget: int = 32

    def __post_init__(self):
        super().__post_init__()
        validate_int(self, "merge_budget", self.merge_budget, 1)
        if isinstance(self.base_press, AdaKVPress):
            logger.warning(
                "CAMPress evicts the same tokens in every KV head, so AdaKVPress's head-wise budgets do not apply: "
                "its inner %s scores the tokens.",
                type(self.base_press.press).__name__,
            )

    def reset(self) -> None:
        super().reset()
        self._running_attn_sum: dict[int, torch.Tensor] = {}

    def reset_layer(self, layer_idx: int) -> None:
        super().reset_layer(layer_idx)
        self._running_attn_sum.pop(layer_idx, None)

    @property
    def scorer(self) -> ScorerPress:
        return self.base_press.press if isinstance(self.base_press, AdaKVPress) else self.base_press

    # ------------------------------------------------------------------------------------------------ attention
    @staticmethod
    def _compute_current_token_attention(
        module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        """Attention weights `(B, H, 1, T)` of the last token of `hidden_states` over the cached `keys`."""
        cos, sin = position_embeddings_of(kwargs)
        query = get_prerope_query_states(module, hidden_states[:, -1:])
        query = apply_rope(query, cos[:, -1:], sin[:, -1:])
        return attention_probabilities(module, query, keys, causal=False).to(query.dtype)

    @staticmethod
    def _aggregate_attention_per_kv_head(attentions: torch.Tensor, num_key_value_heads: int) -> torch.Tensor:
        """Average `(B, H, q, T)` attention weights over each GQA group: `(B, H_kv, q, T)`."""
        bsz, num_heads, q_len, k_len = attentions.shape
        grouped = attentions.view(bsz, num_key_value_heads, num_heads // num_key_value_heads, q_len, k_len)
        return grouped.mean(dim=2)

    def accumulate_attention(self, layer_idx: int, current: torch.Tensor) -> torch.Tensor:
        """Add the current token's attention `(B, H_kv, T)` to the layer's running sum (new tokens start at 0)."""
        running = self._running_attn_sum.get(layer_idx)
        k_len = current.shape[-1]
        if running is None or running.shape[-1] > k_len or running.shape[:2] != current.shape[:2]:
            running = current.clone()
        else:
            running = F.pad(running, (0, k_len - running.shape[-1])) + current
        self._running_attn_sum[layer_idx] = running
        return running

    # ------------------------------------------------------------------------------------------------ the hook
    def should_compress(self, layer_idx: int, q_len: int, k_len: float, target: int) -> bool:
        return (
            (self.layer_step_counts[layer_idx] >= self.compression_interval and k_len > target)
            or q_len >= target
            or self.over_the_bound(layer_idx, k_len, target)
        )

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        step = self.observe_step(module, input, kwargs)
        if step is None:
            return output
        hidden_states, cache, layer_idx, q_len = step
        keys, values = extract_keys_and_values(cache, layer_idx)
        attentions = output[1] if len(output) > 1 else None
        if attentions is not None:
            attentions = attentions[:, :, -1:, :]
        else:
            attentions = self._compute_current_token_attention(module, hidden_states, keys, kwargs)
        current = self._aggregate_attention_per_kv_head(attentions, keys.shape[1])[:, :, 0]
        running = self.accumulate_attention(layer_idx, current)
        self.layer_step_counts[layer_idx] += 1

        target = self._resolve_target_size(kwargs)
        if self.should_compress(layer_idx, q_len, keys.shape[2], target):
            buffered_states, buffered_kwargs = self.buffered_inputs(layer_idx, kwargs)
            keys, values = self.compress(module, buffered_states, keys, values, running, buffered_kwargs)
            write_keys_and_values(cache, layer_idx, keys, values)
            self.layer_step_counts[layer_idx] = 0
            self.clear_buffer(layer_idx)
        self.truncate_buffer(layer_idx)
        return output

    # ------------------------------------------------------------------------------------------------ compression
    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge then prune to `target` tokens. `attentions` is the running attention sum `(B, H_kv, T)`."""
        bsz, num_kv_heads, k_len, head_dim = keys.shape
        target = self._resolve_target_size(kwargs)
        n_evict = k_len - target
        if n_evict <= 0:
            return keys, values
        ratio = self._find_target_compression_ratio(k_len, target)
        scorer = self.scorer
        saved = scorer.compression_ratio
        scorer.compression_ratio = ratio
        try:
            scores = scorer.score(module, hidden_states, keys, values, None, kwargs)
        finally:
            scorer.compression_ratio = saved
        check_scores(scorer, scores, keys)
        mean_scores = scores.float().mean(dim=1)  # (B, T): every head evicts the same tokens

        # Stable descending order: ties keep the earlier token; kept and evicted are exact complements.
        order = mean_scores.argsort(dim=-1, descending=True, stable=True)
        kept = order[:, :target].sort(dim=-1).values
        evicted = order[:, target:]

        if attentions is not None:
            layer_idx: int = int(module.layer_idx)  # type: ignore[arg-type]
            n_merge = min(self.layer_step_counts[layer_idx], n_evict)
            if n_merge > 0:
                values = self.merge_values(values, attentions, mean_scores, kept, evicted, n_merge)
            running = attentions.gather(2, kept.unsqueeze(1).expand(bsz, num_kv_heads, target))
            self._running_attn_sum[layer_idx] = running

        kept_per_head = kept.unsqueeze(1).expand(bsz, num_kv_heads, target)
        remap_masked_key_indices(module, kept_per_head, k_len)
        return gather_tokens(keys, kept_per_head), gather_tokens(values, kept_per_head)

    def merge_values(
        self,
        values: torch.Tensor,
        attentions: torch.Tensor,
        mean_scores: torch.Tensor,
        kept: torch.Tensor,
        evicted: torch.Tensor,
        n_merge: int,
    ) -> torch.Tensor:
        """Return a copy of `values` where the `n_merge` best evicted tokens are merged into the kept ones.

        `kept` `(B, n_kept)` is sorted by position, `evicted` `(B, n_evict)` lists the other positions.
        """
        bsz, num_kv_heads, _, head_dim = values.shape
        n_kept = kept.shape[1]
        # Best evicted tokens, ties to the later position: order by position descending, then stable by score.
        by_position = evicted.sort(dim=-1, descending=True).values
        evicted_scores = mean_scores.gather(1, by_position)
        best = evicted_scores.argsort(dim=-1, descending=True, stable=True)[:, :n_merge]
        merged = by_position.gather(1, best).sort(dim=-1).values  # (B, k)

        # Window of each merged token: the next `merge_budget` kept tokens after it.
        start = torch.searchsorted(kept.contiguous(), merged.contiguous(), right=True)  # (B, k)
        slots = start.unsqueeze(-1) + torch.arange(self.merge_budget, device=kept.device)  # (B, k, M)
        valid = slots < n_kept
        window = kept.gather(1, slots.clamp(max=n_kept - 1).flatten(1)).view_as(slots)  # positions, (B, k, M)
        budget = valid.sum(dim=-1)  # (B, k)

        k, m = window.shape[1], window.shape[2]
        window_h = window.unsqueeze(1).expand(bsz, num_kv_heads, k, m)
        attn = attentions.float()
        window_attn = attn.gather(2, window_h.flatten(2)).view(bsz, num_kv_heads, k, m) * valid.unsqueeze(1)
        mean_window_attn = window_attn.sum(dim=-1) / budget.clamp(min=1).unsqueeze(1)  # (B, H_kv, k)
        merged_attn = attn.gather(2, merged.unsqueeze(1).expand(bsz, num_kv_heads, k))
        probability = torch.nan_to_num(merged_attn / mean_window_attn, nan=0.0, posinf=1.0).clamp(0, 1)
        accept = torch.bernoulli(probability)  # (B, H_kv, k)

        weight = accept / budget.clamp(min=1).unsqueeze(1)  # (B, H_kv, k); no window -> no valid slot
        merged_values = values.float().gather(2, merged.view(bsz, 1, k, 1).expand(bsz, num_kv_heads, k, head_dim))
        update = merged_values * weight.unsqueeze(-1)  # (B, H_kv, k, d)
        update = update.unsqueeze(3) * valid.view(bsz, 1, k, m, 1)  # (B, H_kv, k, M, d)
        new_values = values.float().clone()
        index = window_h.reshape(bsz, num_kv_heads, k * m, 1).expand(bsz, num_kv_heads, k * m, head_dim)
        new_values.scatter_add_(2, index, update.reshape(bsz, num_kv_heads, k * m, head_dim))
        return new_values.to(values.dtype)
