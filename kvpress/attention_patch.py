# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Head-wise masking for a dense cache.

Head-wise presses (AdaKV, ...) decide to drop a different number of tokens in each KV head. A dense cache cannot
hold heads of different lengths, so the pruned entries stay in the cache and are neutralised at attention time:
their keys are replaced by a "fake key" whose dot product with every query is hugely negative, so that its
softmax weight is exactly 0. The press stores the entries to neutralise in `module.masked_key_indices`, a tuple
`(batch_idx, head_idx, seq_idx)` of 1-D index tensors.

`patch_attention_functions` wraps every attention function of transformers (sdpa, flash, flex, ...) and, unlike
upstream, also the `eager_attention_forward` of each supported model, so that head-wise presses work under eager
attention too. The wrapper also resizes the attention mask of layers whose cache was compressed to another length
than the layer transformers sized the mask from.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpress.chunk_attention import register_chunk_attention
from kvpress.headwise_masks import clear_masks, get_masks
from kvpress.inplace_cache import MAX_INPLACE_QUERY_ROWS, inplace_attention, inplace_attention_mask
from kvpress.padding import hide_padding_slots
from kvpress.ragged_attention import register_ragged_attention, run_ragged_attention
from kvpress.ragged_cache import ragged_layer_of
from kvpress.transformers_adapter import attention_options, drop_causal_flag, fit_varlen_key_length

logger = logging.getLogger(__name__)

_PATCHED_FLAG = "_kvpress_patched"
_EAGER_MODULES = (
    "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.phi3.modeling_phi3",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.gemma3.modeling_gemma3",
)


def search_hyperplane(X: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """Find a key `k` with `exp(<x, k>) == 0` for every query row `x` of `X` `(bsz, seq, d)`; returns `(bsz, d)`.

    A perceptron looks for a direction `Y` with `<x, Y> > 0` for all rows, then the returned key is `Y` flipped and
    scaled to a huge norm, so every dot product underflows to 0 after the exponential. All-zero query rows (e.g. the
    embedding of a padding token) give the same logit to every key whatever it is, so they are left out of the search.
    """
    active = (X.abs().amax(dim=-1, keepdim=True) > 0).to(X.dtype)
    X = X * active
    Y = X.sum(dim=1) / active.sum(dim=1).clamp(min=1)
    for _ in range(max_iter):
        violated = ((torch.einsum("bsd,bd->bs", X, Y) <= 0).unsqueeze(-1) & (active > 0)).to(X.dtype)
        if not violated.any():
            norm = Y.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            return -1e5 * Y / norm**2
        Y = Y + (X * violated).sum(dim=1) / violated.sum(dim=1).clamp(min=1)
    raise ValueError("Could not find fake keys such that for every query q, exp(<q, k>) = 0")


def apply_masked_key_indices(module, query: torch.Tensor, key: torch.Tensor) -> None:
    """Overwrite the masked cache entries of `key` (in place) with a fake key per (batch, KV head).

    Raises ValueError when no fake key exists (the queries of a head do not lie in one half-space).
    """
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    groups = num_heads // num_kv_heads
    queries = query.reshape(bsz * num_kv_heads, groups * q_len, head_dim)
    fake_keys = search_hyperplane(queries.float()).to(key.dtype).view(bsz, num_kv_heads, head_dim)
    batch_idx, head_idx, seq_idx = (idx.to(key.device) for idx in get_masks(module))
    key[batch_idx, head_idx, seq_idx] = fake_keys[batch_idx, head_idx]


def headwise_attention_mask(module, query: torch.Tensor, key: torch.Tensor, attention_mask):
    """A `(B, H, q, k)` mask that hides `module.masked_key_indices` exactly, for backends that take a mask.

    Used when no fake key exists for some head (queries spread over every direction); the causal block of the new
    tokens and any padding of `attention_mask` are kept.
    """
    bsz, num_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    groups = num_heads // key.shape[1]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(diagonal=k_len - q_len)
    allowed = allowed.expand(bsz, num_heads, q_len, k_len).clone()
    if isinstance(attention_mask, torch.Tensor):
        given = attention_mask[..., -k_len:]
        given = given if given.dtype == torch.bool else given == 0
        allowed &= given.expand(bsz, -1, q_len, k_len)
    batch_idx, head_idx, seq_idx = (idx.to(query.device) for idx in get_masks(module))
    for g in range(groups):
        allowed[batch_idx, head_idx * groups + g, :, seq_idx] = False
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        return allowed
    # additive float mask: what eager attention expects, and what sdpa accepts
    dtype = attention_mask.dtype if isinstance(attention_mask, torch.Tensor) else query.dtype
    return torch.zeros_like(allowed, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def hide_masked_entries(module, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """`mask` `(1 or B, 1 or H, q, k)` (True = visible) expanded to `(B, H, q, k)` with `module.masked_key_indices`
    hidden in every query head of their KV head's group."""
    bsz, num_heads = query.shape[:2]
    full = mask.expand(bsz, num_heads, *mask.shape[2:]).clone()
    num_kv_heads = module.config.num_key_value_heads
    groups = num_heads // num_kv_heads
    batch_idx, head_idx, seq_idx = (idx.to(query.device) for idx in get_masks(module))
    for g in range(groups):
        full[batch_idx, head_idx * groups + g, :, seq_idx] = False
    return full


def fit_mask_to_keys(attention_mask, q_len: int, k_len: int):
    """Resize a 4-D attention mask to this layer's number of keys.

    transformers builds one mask for all layers from one layer's cache length. When presses leave layers with
    different lengths (PerLayerCompressionPress, PyramidKV, ...), the other layers need a mask of their own width:
    every cached key stays visible and the new tokens keep their causal block (the last `q_len` columns).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return attention_mask
    if attention_mask.shape[-1] == k_len or k_len < q_len or attention_mask.shape[-1] < q_len:
        return attention_mask
    visible = True if attention_mask.dtype == torch.bool else 0.0
    cached = attention_mask.new_full((*attention_mask.shape[:-1], k_len - q_len), visible)
    return torch.cat([cached, attention_mask[..., -q_len:]], dim=-1)


def attention_patch(func: Callable) -> Callable:
    """Wrap an attention function so that it honours `module.masked_key_indices`."""
    if getattr(func, _PATCHED_FLAG, False):
        return func

    def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
        scaling, softcap, dropout = attention_options(kwargs)
        # a ragged layer (kvpress.ragged_cache) holds only the kept entries: attention runs over its segments
        ragged = ragged_layer_of(module, key)
        if ragged is not None:
            if dropout:
                raise ValueError("ragged attention serves inference only (dropout must be 0)")
            return run_ragged_attention(ragged, query, attention_mask, scaling, softcap), None
        # a preallocated decoding buffer (kvpress.inplace_cache): its own valid slots, whatever mask the model sized
        inplace_mask = inplace_attention_mask(module, query, key)
        if query.shape[2] == key.shape[2]:
            # A square attention is a prefill: masks from an earlier context no longer apply.
            clear_masks(module)
        elif get_masks(module) is not None:
            try:
                apply_masked_key_indices(module, query, key)
            except ValueError:
                if "flash" in getattr(func, "__name__", ""):
                    raise
                # no fake key separates these queries: hide the masked entries with an explicit per-head mask
                if inplace_mask is not None:
                    inplace_mask = hide_masked_entries(module, inplace_mask, query)
                else:
                    attention_mask = headwise_attention_mask(module, query, key, attention_mask)
        fit_varlen_key_length(kwargs, key.shape[-2])  # flash-attn varlen lengths follow the compressed cache
        if inplace_mask is not None and query.shape[2] <= MAX_INPLACE_QUERY_ROWS and not dropout:
            return inplace_attention(module, query, key, value, inplace_mask, scaling, softcap), None
        if inplace_mask is not None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point():
                attention_mask = torch.zeros(inplace_mask.shape, dtype=attention_mask.dtype, device=query.device)
                attention_mask = attention_mask.masked_fill(~inplace_mask, torch.finfo(attention_mask.dtype).min)
            else:
                attention_mask = inplace_mask
            drop_causal_flag(kwargs)
        else:
            attention_mask = fit_mask_to_keys(attention_mask, query.shape[2], key.shape[2])
            attention_mask = hide_padding_slots(module, query, key, attention_mask)  # a padded batch's rows
        return func(module, query, key, value, attention_mask, *args, **kwargs)

    setattr(wrapper, _PATCHED_FLAG, True)
    wrapper.__wrapped__ = func  # type: ignore[attr-defined]
    return wrapper


def patch_attention_functions() -> None:
    """Wrap transformers' attention functions and the supported models' eager attention. Safe to call twice."""
    register_ragged_attention()
    register_chunk_attention()
    for name, func in list(ALL_ATTENTION_FUNCTIONS.items()):
        ALL_ATTENTION_FUNCTIONS[name] = attention_patch(func)
    for module_name in _EAGER_MODULES:
        try:
            modeling = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - every supported model ships with transformers 5.x
            logger.debug("Could not import %s; its eager attention is not patched", module_name)
            continue
        eager = getattr(modeling, "eager_attention_forward", None)
        if eager is not None:
            modeling.eager_attention_forward = attention_patch(eager)  # type: ignore[attr-defined]
