# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ChunkPress: compress each fixed-length chunk of the context on its own, for uniform compression over long inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress
from kvpress.token_selection import gather_tokens
from kvpress.transformers_adapter import chunk_kwargs
from kvpress.validation import check_prefill_lengths, check_token_count

logger = logging.getLogger(__name__)


@dataclass
class ChunkPress(ScorerWrapperPress):
    """Split the context into chunks of `chunk_length` tokens and let the inner scorer prune each chunk separately.

    Every chunk keeps `max(1, int(len(chunk) * (1 - compression_ratio)))` tokens per KV head, so no region of a long
    context is emptied. The scorer sees the chunk's own hidden states, keys, values, positions (cos/sin,
    position_ids) and, under eager attention, the attention of the chunk's queries over the chunk's keys.
    """

    chunk_length: int = 1024

    def __post_init__(self):
        super().__post_init__()
        check_token_count("chunk_length", self.chunk_length, "tokens per chunk")

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
        q_len = hidden_states.shape[1]
        check_prefill_lengths("ChunkPress", q_len, k_len)
        kept = []
        for start in range(0, k_len, self.chunk_length):
            end = min(start + self.chunk_length, k_len)
            chunk_attentions = None if attentions is None else attentions[:, :, start:end, start:end]
            scores = self.inner_scores(
                module,
                hidden_states[:, start:end],
                keys[:, :, start:end],
                values[:, :, start:end],
                chunk_attentions,
                chunk_kwargs(kwargs, start, end, q_len),
            )
            n_kept = max(1, int((end - start) * (1 - self.compression_ratio)))
            kept.append(scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values + start)
        indices = torch.cat(kept, dim=-1)
        return gather_tokens(keys, indices), gather_tokens(values, indices)
