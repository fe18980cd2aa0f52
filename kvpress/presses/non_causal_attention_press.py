# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""NonCausalAttnPress: keep the tokens that receive the most bidirectional attention within their chunk of the
context, weighted by their value norm (Compactor, https://arxiv.org/abs/2507.08143)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from kvpress.attention_weights import group_mean
from kvpress.presses.base_press import NEEDS_EVERY_HIDDEN_STATE
from kvpress.presses.leverage_press import global_zscore, require_prefill
from kvpress.presses.scorer_press import ScorerPress
from kvpress.transformers_adapter import position_embeddings_of
from kvpress.utils import apply_rope, get_prerope_query_states
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)


@dataclass
class NonCausalAttnPress(ScorerPress):
    """Score each token by the attention it receives from every query of its chunk (no causal mask).

    The context is cut into chunks of `chunk_size` tokens; inside a chunk, every (RoPE-rotated) query attends to
    every key of the chunk (`softmax(q k^T)`, without the 1/sqrt(d) scale), and a key's score is the sum of the
    attention it receives. Scores are averaged over each GQA group, multiplied by the value norm, smoothed over 3
    neighbouring tokens and z-normalised over the whole layer. Prefill only.
    """

    compression_ratio: float = 0.0
    chunk_size: int = 256

    # The score needs the hidden state of every cached token, which only a prefill has.
    supports_decoding: ClassVar[bool] = False
    cannot_score_during_decoding: ClassVar[Optional[str]] = NEEDS_EVERY_HIDDEN_STATE
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = NEEDS_EVERY_HIDDEN_STATE

    def __post_init__(self):
        super().__post_init__()
        _check_chunk_size(self.chunk_size)

    @staticmethod
    def non_causal_chunked_attn(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Attention received by each key from all queries of its chunk: `(B, H, T)` from `(B, H, T, d)` inputs.

        The last chunk may be shorter; its padding neither attends nor is attended to.
        """
        _check_chunk_size(chunk_size)
        bsz, num_heads, length, head_dim = queries.shape
        if keys.shape[-2] != length:
            raise ValueError(
                f"non_causal_chunked_attn needs as many queries as keys (a prefill), got {length} queries and "
                f"{keys.shape[-2]} keys."
            )
        n_pad = (-length) % chunk_size
        n_chunks = (length + n_pad) // chunk_size
        chunk_shape = (bsz, num_heads, n_chunks, chunk_size, head_dim)
        query_chunks = F.pad(queries, (0, 0, 0, n_pad)).view(chunk_shape)
        key_chunks = F.pad(keys, (0, 0, 0, n_pad)).view(chunk_shape)
        is_padding = torch.zeros(n_chunks, chunk_size, dtype=torch.bool, device=queries.device)
        if n_pad > 0:
            is_padding[-1, chunk_size - n_pad :] = True
        # The (B, H, n, c, c) logits of all chunks at once are T x c x H floats per layer (4.3 GB at 128k tokens, 32
        # heads, c=256): they are computed for groups of chunks of at most _SCORE_ELEMENTS floats each.
        group = max(1, _SCORE_ELEMENTS // (bsz * num_heads * chunk_size * chunk_size))
        received = torch.empty(bsz, num_heads, n_chunks, chunk_size, dtype=torch.float32, device=queries.device)
        for first in range(0, n_chunks, group):
            last = min(first + group, n_chunks)
            logits = (query_chunks[:, :, first:last] @ key_chunks[:, :, first:last].transpose(-1, -2)).float()
            padding = is_padding[first:last]
            if n_pad > 0 and last == n_chunks:
                logits = logits.masked_fill(padding[:, None, :], float("-inf"))  # padded keys get no attention
                weights = logits.softmax(dim=-1).masked_fill(padding[:, :, None], 0.0)  # padded queries give none
            else:
                weights = logits.softmax(dim=-1)
            received[:, :, first:last] = weights.sum(dim=-2)
        return received.flatten(-2)[..., :length]

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
        q_len = hidden_states.shape[1]
        num_kv_heads = keys.shape[1]
        cos, sin = position_embeddings_of(kwargs)
        queries = apply_rope(get_prerope_query_states(module, hidden_states), cos[:, -q_len:], sin[:, -q_len:])
        received = self.non_causal_chunked_attn(
            queries, repeat_kv(keys, queries.shape[1] // num_kv_heads), self.chunk_size
        )
        scores = group_mean(received, num_kv_heads) * values.norm(dim=-1).float()
        scores = F.avg_pool1d(scores, kernel_size=3, padding=1, stride=1)
        return global_zscore(scores)


# Largest number of attention logits (floats) one group of chunks computes at once (256 MiB).
_SCORE_ELEMENTS = 1 << 26


def _check_chunk_size(chunk_size: int) -> None:
    validate_int(None, "NonCausalAttnPress.chunk_size", chunk_size, 1)
