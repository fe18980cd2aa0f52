# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ChunkPress: compress each fixed-length chunk of the context on its own, for uniform compression over long inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.scorer_press import ScorerWrapperPress, check_prefill_lengths, check_token_count, gather_tokens

logger = logging.getLogger(__name__)

# Attention kwargs laid out along the query/token axis (dim 1 for (B, T, ...) tensors, dim 0 for cache_position).
_TOKEN_AXIS_KWARGS = ("hidden_states", "position_ids")


def chunk_kwargs(kwargs: dict, start: int, end: int, q_len: int) -> dict:
    """A shallow copy of the attention `kwargs` whose per-token entries cover only tokens `[start, end)`."""
    sliced = dict(kwargs)
    for name in _TOKEN_AXIS_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == q_len:
            sliced[name] = value[:, start:end]
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.dim() == 1 and cache_position.shape[0] == q_len:
        sliced["cache_position"] = cache_position[start:end]
    position_embeddings = kwargs.get("position_embeddings")
    if isinstance(position_embeddings, (tuple, list)) and all(
        isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == q_len for t in position_embeddings
    ):
        sliced["position_embeddings"] = tuple(t[:, start:end] for t in position_embeddings)
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-2] == q_len:
        sliced["attention_mask"] = attention_mask[..., start:end, start:end]
    return sliced


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

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compression_ratio == 0:
            return keys, values
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
