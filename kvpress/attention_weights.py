# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Attention weights recomputed from queries and keys, for presses that need them under any attention backend.

The numerics live here once: `attention_logits` (q k^T at the layer's scaling, Gemma's soft-capping), `future_mask`
(causal masking at the queries' cache positions), `attention_probabilities` (both, then the softmax),
`window_attention` (the last queries of a window over the keys before it: SnapKV, TOVA, Finch, SimLayerKV) and
`group_mean` (per-query-head scores reduced to KV heads).

Only eager attention returns its weights. Presses that score with them (H2O, ObservedAttention, KVCompose) rebuild
them here from the layer's hidden states and cached keys instead, by chunks of queries, so that nothing of size
q_len x T is ever held at once: a decode step is one query row per head, a prefill is cut into chunks of at most
`MAX_ATTENTION_ELEMENTS` weights. The numerics are the model's: RoPE'd queries, the layer's scaling, Gemma's
logit soft-capping, causal masking at the queries' cache positions and the forward's 4-D attention mask (padding).
"""

from __future__ import annotations

from typing import Generator, Optional

import torch
from torch import nn

from kvpress.transformers_adapter import attention_mask_of, position_embeddings_of
from kvpress.utils import apply_rope, attention_scaling, get_prerope_query_states

# Weights held at once per chunk (float32): 2**26 is 256 MiB.
MAX_ATTENTION_ELEMENTS = 1 << 26


def group_mean(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Reduce per-query-head scores `(B, H, T)` to KV heads `(B, H_kv, T)` by averaging each GQA group."""
    bsz, num_heads, length = scores.shape
    return scores.view(bsz, num_kv_heads, num_heads // num_kv_heads, length).mean(dim=2)


def soft_cap(module: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The model's attention-logit soft-capping (`tanh(x / c) * c`, Gemma), or `logits` unchanged."""
    softcap = getattr(module, "attn_logit_softcapping", None)
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def attention_logits(module: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention logits `(B, H, q, T)` in float32 of `queries` `(B, H, q, d)` over `keys` `(B, H_kv, T, d)` (each KV
    head serving its GQA group): `q k^T` times the layer's scaling, soft-capped as the model does."""
    groups = queries.shape[1] // keys.shape[1]
    if groups > 1 and keys.shape[1] > 1:  # one KV head broadcasts over the query heads without a copy
        keys = keys.repeat_interleave(groups, dim=1)
    return soft_cap(module, (queries @ keys.transpose(2, 3)).float() * attention_scaling(module))


def future_mask(q_len: int, k_len: int, device: torch.device, first_position: Optional[int] = None) -> torch.Tensor:
    """`(q_len, k_len)`, True where key j comes after query i, query i sitting at cache position `first_position + i`
    (by default the queries are the last `q_len` entries: `first_position = k_len - q_len`)."""
    first_position = k_len - q_len if first_position is None else first_position
    query_positions = torch.arange(q_len, device=device) + first_position
    return torch.arange(k_len, device=device)[None, :] > query_positions[:, None]


def attention_probabilities(
    module: nn.Module, queries: torch.Tensor, keys: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """Attention weights `(B, H, q, T)` in float32 of `queries` over `keys` (see `attention_logits`); with `causal`,
    the queries are the last `q` cached entries and see no later key."""
    logits = attention_logits(module, queries, keys)
    if causal:
        logits = logits.masked_fill(future_mask(queries.shape[2], keys.shape[2], keys.device), float("-inf"))
    return logits.softmax(dim=-1)


def window_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    window_size: int,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Attention of the last `window_size` queries over the keys before the window, `(B, H, w, T - w)`, in the
    queries' dtype.

    The window's queries are rebuilt from `hidden_states` and rotated with the last `window_size` entries of
    `position_embeddings`; inside the window each query only sees the keys up to its own position.
    """
    cos, sin = position_embeddings
    queries = get_prerope_query_states(module, hidden_states[:, -window_size:])
    queries = apply_rope(queries, cos[:, -window_size:], sin[:, -window_size:])
    weights = attention_probabilities(module, queries, keys).to(queries.dtype)
    return weights[..., : keys.shape[2] - window_size]


def causal_attention_chunks(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    kwargs: dict,
    n_context: Optional[int] = None,
    max_elements: int = MAX_ATTENTION_ELEMENTS,
) -> Generator[tuple[int, int, torch.Tensor], None, None]:
    """Attention weights of the forward's queries over the first `n_context` cached keys (all by default), by chunks.

    The queries are the last `q_len` entries of the cache; query i sees the keys up to its own cache position. Yields
    `(start, end, weights)` with weights `(B, H, end - start, n_context)` in float32.
    """
    bsz, num_kv_heads, k_len, _ = keys.shape
    n_context = k_len if n_context is None else n_context
    q_len = hidden_states.shape[1]
    cos, sin = position_embeddings_of(kwargs)
    queries = apply_rope(get_prerope_query_states(module, hidden_states), cos, sin)
    num_heads = queries.shape[1]
    expanded_keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)
    mask = attention_mask_of(kwargs)
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] == k_len else None
    chunk = max(1, max_elements // max(1, bsz * num_heads * k_len))
    for start in range(0, q_len, chunk):
        end = min(start + chunk, q_len)
        logits = attention_logits(module, queries[:, :, start:end], expanded_keys)
        future = future_mask(end - start, k_len, keys.device, first_position=start + k_len - q_len)
        logits = logits.masked_fill(future, float("-inf"))
        if mask is not None:
            block = mask[:, :, start:end]
            logits = logits.masked_fill(~block, float("-inf")) if block.dtype == torch.bool else logits + block.float()
        yield start, end, logits.softmax(dim=-1)[..., :n_context]


def received_attention_sums(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    kwargs: dict,
    keep_first_batch_item: bool = False,
    max_elements: int = MAX_ATTENTION_ELEMENTS,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The attention every cached key received from this forward's queries, summed over the queries.

    Returns the sums `(B, H, T)` in float32 and, when `keep_first_batch_item`, the full weights of the first batch
    item `(H, q_len, T)` (for eviction logs); the latter is None otherwise.
    """
    bsz, _, k_len, _ = keys.shape
    sums = None
    first_item = []
    for _, _, weights in causal_attention_chunks(module, hidden_states, keys, kwargs, max_elements=max_elements):
        part = weights.sum(dim=-2)
        sums = part if sums is None else sums + part
        if keep_first_batch_item:
            first_item.append(weights[0])
    if sums is None:  # a forward without queries
        sums = keys.new_zeros(bsz, module.config.num_attention_heads, k_len, dtype=torch.float32)
    return sums, (torch.cat(first_item, dim=1) if keep_first_batch_item and first_item else None)
