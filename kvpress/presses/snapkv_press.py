# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""SnapKVPress: keep the tokens that the last queries of the context attend to (https://arxiv.org/abs/2404.14469)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from kvpress.presses.scorer_press import ScorerPress
from kvpress.transformers_adapter import position_embeddings_of
from kvpress.utils import apply_rope, attention_scaling, get_prerope_query_states

logger = logging.getLogger(__name__)


def pad_with_top_score(scores: torch.Tensor, n_pad: int, left: bool = False) -> torch.Tensor:
    """Add `n_pad` positions scored `max + 1` (always kept) to the right of `scores` (or to the left)."""
    top = scores.max().item() + 1 if scores.numel() > 0 else 1.0
    padding = (n_pad, 0) if left else (0, n_pad)
    return F.pad(scores, padding, value=top)


def group_mean(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Reduce per-query-head scores `(B, H, T)` to KV heads `(B, H_kv, T)` by averaging each GQA group."""
    bsz, num_heads, length = scores.shape
    return scores.view(bsz, num_kv_heads, num_heads // num_kv_heads, length).mean(dim=2)


@dataclass
class SnapKVPress(ScorerPress):
    """Score each token by the attention it receives from the last `window_size` queries, smoothed by average
    pooling over `kernel_size` neighbouring tokens. The window itself is always kept.

    Uses the eager attention weights when the model returns them; otherwise it recomputes the window's attention
    from the pre-RoPE queries.

    With a `cache_budget` this is the reasoning fork's SnapKV-D: the observation window slides with generation. At
    every decoding step the window is the last `window_size` tokens (their hidden states, RoPE positions and
    queries are kept per layer), the cache is scored again, and the window itself is always kept. A decoding step's
    eager attention has a single query row, so the window's attention is recomputed from the remembered tokens.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self):
        for name in ("window_size", "kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}.")
        super().__post_init__()

    @property
    def decoding_window(self) -> int:
        return self.window_size

    def check_budget_settings(self, budget: int) -> None:
        if budget < self.window_size:
            raise ValueError(
                f"{type(self).__name__} always keeps its observation window, so cache_budget must be at least "
                f"window_size; got cache_budget={budget}, window_size={self.window_size}."
            )

    @staticmethod
    def compute_window_attention(
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        window_size: int,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Attention of the last `window_size` queries over the keys before the window, `(B, H, w, T - w)`.

        The window's queries are rebuilt from `hidden_states` and rotated with the last `window_size` entries of
        `position_embeddings`; inside the window each query only sees the keys up to its own position.
        """
        bsz, num_kv_heads, k_len, _ = keys.shape
        num_heads = module.config.num_attention_heads
        cos, sin = position_embeddings
        queries = get_prerope_query_states(module, hidden_states[:, -window_size:])
        queries = apply_rope(queries, cos[:, -window_size:], sin[:, -window_size:])
        logits = queries @ repeat_kv(keys, num_heads // num_kv_heads).transpose(2, 3) * attention_scaling(module)
        softcap = getattr(module, "attn_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        # Window query i sits at position k_len - window_size + i and must not see the keys after it.
        future = torch.ones(window_size, k_len, dtype=torch.bool, device=keys.device)
        future = future.triu(diagonal=k_len - window_size + 1)
        logits = logits.masked_fill(future, float("-inf"))
        weights = logits.float().softmax(dim=-1).to(queries.dtype)
        return weights[..., : k_len - window_size]

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        k_len = keys.shape[2]
        window = self.window_size
        if k_len <= window:
            raise ValueError(
                f"{type(self).__name__} needs a context longer than window_size: got {k_len} tokens with "
                f"window_size={window}. Use a longer context or a smaller window_size."
            )
        if attentions is not None and attentions.shape[-2] >= window:
            weights = attentions[..., -window:, :-window]
        else:
            if hidden_states.shape[1] < window:
                raise ValueError(
                    f"{type(self).__name__} recomputes the attention of the last window_size={window} queries but "
                    f"got the hidden states of only {hidden_states.shape[1]} tokens."
                )
            weights = self.compute_window_attention(module, hidden_states, keys, window, position_embeddings_of(kwargs))
        scores = weights.mean(dim=-2)
        n_scored = scores.shape[-1]
        scores = F.avg_pool1d(scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        # An even kernel yields one extra position; keep one score per token.
        scores = scores[..., :n_scored]
        scores = group_mean(scores, keys.shape[1])
        return pad_with_top_score(scores, window)
