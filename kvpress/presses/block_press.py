# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""BlockPress: simulate a block-wise prefill with a fixed cache budget, as in KeyDiff's block-wise inference
(https://arxiv.org/abs/2504.15364).

In a memory-bounded prefill the context arrives in blocks; after each block the cache is pruned back to its budget,
so a token is scored only against the tokens still cached when its block arrives. BlockPress reproduces that
selection after an ordinary prefill: starting from the first `n_kept` tokens, it appends the next `block_size`
tokens, scores the union with the inner press and keeps the best `n_kept`, until the context is exhausted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress
from kvpress.token_selection import gather_tokens
from kvpress.transformers_adapter import gather_kwargs
from kvpress.validation import check_prefill_lengths, check_token_count

logger = logging.getLogger(__name__)


def block_attentions(attentions: torch.Tensor, start: int, end: int, current: torch.Tensor) -> torch.Tensor:
    """The attention of the block's queries `[start, end)` over the `current` keys `(B, H_kv, n)` only.

    Restricting a softmax to a subset of keys and renormalising gives exactly the softmax over that subset, so this
    is the attention a block-wise prefill would compute: `(B, H, end - start, n)`.
    """
    num_heads, num_kv_heads = attentions.shape[1], current.shape[1]
    columns = current.repeat_interleave(num_heads // num_kv_heads, dim=1).to(attentions.device)
    rows = attentions[:, :, start:end]
    weights = rows.gather(-1, columns.unsqueeze(2).expand(-1, -1, end - start, -1))
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


@dataclass
class BlockPress(ScorerWrapperPress):
    """Prune block by block: keep the best `int(T * (1 - compression_ratio))` tokens of (kept tokens + next block).

    The inner scorer sees, at each step, the kept tokens and the new block: their keys and values (per KV head),
    hidden states, positions and, under eager attention, the block queries' attention over those tokens only. The
    hidden states of kept tokens are assembled per KV head from slices of the hidden dimension (upstream's trick),
    which is exact when the KV heads keep the same tokens. Kept tokens are stored in positional order.
    """

    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_token_count("block_size", self.block_size, "tokens added per step")

    def compress_with_inner(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, num_kv_heads, k_len, _ = keys.shape
        q_len, hidden_size = hidden_states.shape[1], hidden_states.shape[2]
        check_prefill_lengths("BlockPress", q_len, k_len)
        if hidden_size % num_kv_heads != 0:
            raise ValueError(
                f"BlockPress splits the hidden size across KV heads to gather hidden states per head, but "
                f"hidden_size={hidden_size} is not divisible by num_key_value_heads={num_kv_heads}."
            )
        block_size = min(self.block_size, k_len)
        n_kept = int(k_len * (1 - self.compression_ratio))
        kept = torch.arange(n_kept, device=keys.device).expand(bsz, num_kv_heads, n_kept)
        # (B, H_kv, T, hidden / H_kv): slice h of the hidden dimension travels with KV head h
        split_hidden = hidden_states.view(bsz, k_len, num_kv_heads, -1).transpose(1, 2)
        for start in range(n_kept, k_len, block_size):
            end = min(start + block_size, k_len)
            block = torch.arange(start, end, device=keys.device).expand(bsz, num_kv_heads, end - start)
            current = torch.cat([kept, block], dim=-1)
            current_hidden = gather_tokens(split_hidden, current).transpose(1, 2).reshape(bsz, -1, hidden_size)
            scores = self.inner_scores(
                module,
                current_hidden,
                gather_tokens(keys, current),
                gather_tokens(values, current),
                None if attentions is None else block_attentions(attentions, start, end, current),
                gather_kwargs(kwargs, current_hidden, current[:, 0], q_len),
            )
            kept = current.gather(-1, scores.topk(n_kept, dim=-1).indices).sort(dim=-1).values
        return gather_tokens(keys, kept), gather_tokens(values, kept)
