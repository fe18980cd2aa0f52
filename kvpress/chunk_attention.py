# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Attention of a prefill chunk over its cache without a materialized mask: SDPA's flash kernel, lower-right causal.

When a chunk of `q` tokens attends to a cache of `k > q` tokens (the cached context, then the chunk itself),
transformers builds a boolean mask of `(batch, 1, q, k)` for sdpa, and sdpa with a mask cannot use its flash
kernel: it repeats the keys and values of every KV head over its query group and runs the memory-efficient kernel.
At 128k tokens and chunks of 4096 on the Llama-3.1-8B shape that is a 0.5 GiB mask plus 2 GiB of repeated keys and
values in the last chunk, and a prefill 1.85x slower than the unchunked one (issue 20); at a million tokens the mask
alone is 4 GiB.

An unpadded chunk needs no mask: query `i` sees the keys `j <= i + (k - q)`, the causal pattern aligned to the lower
right corner, which `torch.nn.attention.bias.causal_lower_right` expresses and which SDPA's flash kernel serves
natively, with grouped-query attention (`enable_gqa`) and no repeated keys. `chunk_attention` is that attention
function, registered with transformers' `AttentionInterface` as `"kvpress_chunk_sdpa"` but deliberately not with its
mask interface: transformers builds no mask for an implementation it has no mask function for.

`lower_right_causal_prefill(model)` switches a model to it for the duration of a chunked prefill, where this is exact:
sdpa attention, every layer full causal attention (no sliding window, no soft-capping), no padding (the chunked
prefill takes unpadded `input_ids`). Any other model keeps its attention and its masks unchanged.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Generator, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

logger = logging.getLogger(__name__)

CHUNK_ATTENTION = "kvpress_chunk_sdpa"


def chunk_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention of `query` `(B, H, q, D)` over `key`/`value` `(B, H_kv, k, D)`, the `q` queries being the
    last `q` of the `k` positions. Returns `(output (B, q, H, D), None)` like transformers' attention functions.

    A mask, when one is given after all, is honoured through transformers' own sdpa attention."""
    if attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len > k_len:
        raise ValueError(f"a prefill chunk of {q_len} queries cannot attend to only {k_len} keys (its own included).")
    dropout_p = dropout if module.training else 0.0
    enable_gqa = query.shape[1] != key.shape[1]
    if q_len == k_len:
        output = F.scaled_dot_product_attention(
            query, key, value, is_causal=q_len > 1, dropout_p=dropout_p, scale=scaling, enable_gqa=enable_gqa
        )
    else:
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=causal_lower_right(q_len, k_len),
            dropout_p=dropout_p,
            scale=scaling,
            enable_gqa=enable_gqa,
        )
    return output.transpose(1, 2).contiguous(), None


def register_chunk_attention() -> None:
    """Register `chunk_attention` with transformers' AttentionInterface (idempotent; no mask function on purpose)."""
    from transformers import AttentionInterface

    AttentionInterface.register(CHUNK_ATTENTION, chunk_attention)


def _all_layers_full_causal(config) -> bool:
    if not getattr(config, "is_causal", True) or getattr(config, "attn_logit_softcapping", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


def serves_model(model: torch.nn.Module) -> bool:
    """Whether a chunked prefill of `model` can run through `chunk_attention` exactly (see the module docstring)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "text_config", None) is not None and config.text_config is not config:
        return False  # a multimodal wrapper: its sub-configs choose their own attention
    return _all_layers_full_causal(config)


@contextmanager
def lower_right_causal_prefill(model: torch.nn.Module) -> Generator[bool, None, None]:
    """Run the model's attention through `chunk_attention` inside the block when `serves_model(model)`; yields
    whether it did. The model's attention implementation is restored on exit, exception or not."""
    if not serves_model(model):
        yield False
        return
    from kvpress.attention_patch import patch_attention_functions

    patch_attention_functions()  # registers chunk_attention and wraps it like every attention function
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = CHUNK_ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = previous
