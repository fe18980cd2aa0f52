# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""AdaKVPress: head-wise budget allocation over an inner scorer (AdaKV, https://arxiv.org/abs/2407.11550)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kvpress.headwise_masks import set_masks
from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress
from kvpress.validation import validate_number

logger = logging.getLogger(__name__)


def check_alpha_safeguard(alpha: object) -> None:
    """Raise a ValueError unless `alpha` (AdaKV's `alpha_safeguard`) is a number in [0, 1]."""
    note = (
        "It is the fraction of each head's uniform budget that the head always keeps (0 lets a head lose everything, "
        "1 disables AdaKV)."
    )
    validate_number(None, "alpha_safeguard", alpha, 0, 1, note=note)


@dataclass
class AdaKVPress(ScorerWrapperPress):
    """Prune the lowest scores of the whole layer instead of the same number of tokens in every KV head.

    The layer keeps `H_kv * int(T * (1 - compression_ratio))` entries in total, chosen across heads, so heads with
    concentrated attention give budget to heads that need more. Each head is guaranteed its own top
    `int(n_kept * alpha_safeguard)` tokens. The cache stays dense: pruned entries are listed in
    `module.masked_key_indices` and neutralised by the patched attention (`kvpress.attention_patch`), under sdpa,
    flash and eager attention alike.
    """

    alpha_safeguard: float = 0.20

    # The masks index the cache positions as they are after this press; a later press that removes tokens would
    # make them point at the wrong entries, so ComposedPress refuses head-wise presses.
    composable: ClassVar[bool] = False
    head_wise: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_alpha_safeguard(self.alpha_safeguard)

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
        bsz, num_kv_heads, k_len = scores.shape
        n_kept = int(k_len * (1 - self.compression_ratio))
        n_safe = int(n_kept * self.alpha_safeguard)
        n_pruned = num_kv_heads * (k_len - n_kept)
        if n_pruned == 0:
            return keys, values

        # Every head's own top-n_safe tokens can never be among the layer's lowest scores.
        scores = scores.clone()
        if n_safe > 0:
            safe = scores.topk(n_safe, dim=-1).indices
            scores.scatter_(-1, safe, torch.finfo(scores.dtype).max)

        pruned = scores.reshape(bsz, num_kv_heads * k_len).topk(n_pruned, dim=-1, largest=False).indices
        batch_idx = torch.arange(bsz, device=pruned.device).repeat_interleave(n_pruned)
        pruned = pruned.reshape(-1)
        # read by the patched attention at every later (non-prefill) attention call of this layer
        set_masks(module, (batch_idx, pruned // k_len, pruned % k_len))
        return keys, values
