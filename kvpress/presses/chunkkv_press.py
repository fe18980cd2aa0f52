# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ChunkKVPress: keep or drop whole chunks of consecutive tokens instead of single tokens
(ChunkKV, https://arxiv.org/abs/2502.00299).

Token-level pruning fragments phrases; ChunkKV scores every token with an inner press, averages the scores over
fixed-length chunks (summed over KV heads) and keeps the best chunks, so the kept context is made of intact spans.
All KV heads keep the same tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress
from kvpress.token_selection import gather_tokens
from kvpress.validation import check_token_count

logger = logging.getLogger(__name__)


@dataclass
class ChunkKVPress(ScorerWrapperPress):
    """Split the context into chunks of `chunk_length` tokens (plus a shorter last chunk when `T % chunk_length`),
    score each chunk by the mean over its tokens of the inner scores summed over KV heads, and keep the best
    `max(1, int(n_chunks * (1 - compression_ratio)))` chunks, in positional order. A context shorter than one
    chunk falls back to the inner press's own token-level compression.
    """

    chunk_length: int = 20

    def __post_init__(self):
        super().__post_init__()
        check_token_count("chunk_length", self.chunk_length, "tokens per chunk")

    def chunk_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """`(B, n_chunks)`: mean over each chunk's tokens of `scores` `(B, H_kv, T)` summed over KV heads."""
        token_scores = scores.sum(dim=1)
        k_len = token_scores.shape[-1]
        n_full = k_len // self.chunk_length
        full = token_scores[:, : n_full * self.chunk_length].reshape(-1, n_full, self.chunk_length).mean(dim=-1)
        if k_len % self.chunk_length == 0:
            return full
        remainder = token_scores[:, n_full * self.chunk_length :].mean(dim=-1, keepdim=True)
        return torch.cat([full, remainder], dim=-1)

    def compress_with_inner(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_len = keys.shape[2]
        if k_len < self.chunk_length:
            return self.press.compress(module, hidden_states, keys, values, attentions, kwargs)
        scores = self.inner_scores(module, hidden_states, keys, values, attentions, kwargs)
        chunk_scores = self.chunk_scores(scores)
        n_chunks = chunk_scores.shape[-1]
        n_chunks_kept = max(1, int(n_chunks * (1 - self.compression_ratio)))
        # The cache keeps the same number of tokens for every batch item, so one set of chunks is chosen for the
        # whole batch: the best chunks by their scores summed over the batch items.
        chosen = chunk_scores.sum(dim=0).topk(n_chunks_kept).indices.sort().values
        starts = chosen * self.chunk_length
        indices = torch.cat(
            [torch.arange(s, min(s + self.chunk_length, k_len), device=keys.device) for s in starts.tolist()]
        )
        indices = indices.expand(keys.shape[0], keys.shape[1], -1)
        return gather_tokens(keys, indices), gather_tokens(values, indices)
