# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""A decoding cache that does not copy: preallocated per-layer buffers written in place.

After prefill (and compression) the cache of each layer is copied once into a buffer with room for the question and
the answer (capacity rounded up to a bucket, so that samples of nearby lengths share shapes). Each decoding step then
writes its keys and values in place at the layer's own length: no `torch.cat` of the whole cache per token, no new
allocation per step, and the attention always sees the same key length (the capacity), so attention backends that
plan per shape (cuDNN) plan once per bucket instead of once per step and per layer length.

Attention over the buffer hides the unused slots with a per-layer mask built from the layer's own length (layers may
hold different lengths, e.g. after PyramidKV): `attention_patch` asks `inplace_attention_mask` for it. Rolling back
after a question only resets the lengths. A press that evicts during decoding (a `cache_budget`, DecodingPress)
reads the valid slots and writes the kept entries back into the start of the same buffers (`InPlaceLayer.replace`,
through `kvpress.utils.write_keys_and_values`).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin

from kvpress.transformers_adapter import CannotCompressError

DEFAULT_BUCKET = 1024
_LAYER_ATTRIBUTE = "_kvpress_inplace_layer"


def bucketed_capacity(length: int, bucket: int = DEFAULT_BUCKET) -> int:
    """`length` rounded up to a multiple of `bucket` (at least one bucket)."""
    if bucket < 1:
        raise ValueError(f"bucket must be a positive number of tokens, got {bucket!r}")
    return max(bucket, -(-length // bucket) * bucket)


class InPlaceLayer(CacheLayerMixin):
    """One layer: `keys`/`values` `(B, H, capacity, d)` buffers, valid slots `[0, length)`. Not a DynamicLayer, so
    presses refuse to resize it."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.is_initialized = True
        bsz, heads, length, _ = keys.shape
        if capacity < length:
            raise ValueError(f"capacity {capacity} is smaller than the {length} cached tokens")
        self.capacity = capacity
        self.keys = keys.new_zeros(bsz, heads, capacity, keys.shape[-1])
        self.values = values.new_zeros(bsz, heads, capacity, values.shape[-1])
        self.keys[:, :, :length].copy_(keys)
        self.values[:, :, :length].copy_(values)
        self.length = length
        # The same length on the device: writes and masks read it, so a decoding step needs no host value and can be
        # captured once in a CUDA graph and replayed (`kvpress.graphed_decoding`).
        self.position = torch.tensor(length, dtype=torch.long, device=keys.device)
        self.device = keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n_new = key_states.shape[-2]
        end = self.length + n_new
        if end > self.capacity:
            raise CannotCompressError(
                f"The in-place decoding cache holds {self.capacity} tokens per layer and this forward would bring it "
                f"to {end}: build it with a larger `extra_tokens` (question + answer tokens) or bucket."
            )
        slots = self.position + torch.arange(n_new, device=self.position.device)
        self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, slots, value_states.to(self.values.dtype))
        self.position.add_(n_new)
        self.length = end
        return self.keys, self.values

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold exactly `keys`/`values` `(B, H, n, d)` from now on, written into the start of the buffers (a press
        that evicts during decoding compacts the layer in place: no new allocation, the same shapes for attention)."""
        n = keys.shape[2]
        if keys.shape[:2] != self.keys.shape[:2] or keys.shape[-1] != self.keys.shape[-1] or values.shape != keys.shape:
            raise ValueError(
                f"keys {tuple(keys.shape)} / values {tuple(values.shape)} do not fit this in-place layer of "
                f"(batch, heads, capacity, head_dim) = {tuple(self.keys.shape)}"
            )
        if n > self.capacity:
            raise CannotCompressError(
                f"The in-place decoding cache holds {self.capacity} tokens per layer; a press wrote {n} into it."
            )
        # the new entries may be views of the buffers (e.g. a prefix); copy out first when they overlap
        if keys.untyped_storage().data_ptr() == self.keys.untyped_storage().data_ptr():
            keys = keys.clone()
        if values.untyped_storage().data_ptr() == self.values.untyped_storage().data_ptr():
            values = values.clone()
        self.keys[:, :, :n].copy_(keys)
        self.values[:, :, :n].copy_(values)
        self.set_length(n)

    def set_length(self, length: int) -> None:
        """Forget the slots from `length` on (they are overwritten by later tokens)."""
        self.length = length
        self.position.fill_(length)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers exist from the start."""

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.capacity, 0

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return self.capacity

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.set_length(0)

    @property
    def valid_keys(self) -> torch.Tensor:
        return self.keys[:, :, : self.length]

    @property
    def valid_values(self) -> torch.Tensor:
        return self.values[:, :, : self.length]


class InPlaceCache(DynamicCache):
    """A cache of `InPlaceLayer`s, built from a filled (compressed) cache by `InPlaceCache.from_cache`."""

    @classmethod
    def from_cache(
        cls, cache: Cache, extra_tokens: int, bucket: int = DEFAULT_BUCKET, model: Optional[torch.nn.Module] = None
    ) -> "InPlaceCache":
        """Copy every layer of `cache` into buffers with room for `extra_tokens` more tokens (rounded up to `bucket`
        over the longest layer). With `model`, its attention modules learn their layer (for the masks)."""
        if extra_tokens < 0:
            raise ValueError(f"extra_tokens must be non-negative, got {extra_tokens!r}")
        layers = []
        for layer in cache.layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or getattr(layer, "is_sliding", False):
                raise CannotCompressError(
                    f"InPlaceCache copies full-attention dynamic layers; got {type(layer).__name__} (sliding-window "
                    "or empty layers, e.g. Gemma3's, keep the dynamic cache)."
                )
            layers.append((keys, values))
        capacity = bucketed_capacity(max(k.shape[2] for k, _ in layers) + extra_tokens, bucket)
        new = cls()
        new.layers = [InPlaceLayer(keys, values, capacity) for keys, values in layers]  # type: ignore[misc]
        if model is not None:
            new.attach(model)
        return new

    def attach(self, model: torch.nn.Module) -> None:
        """Tell each attention module of `model` which in-place layer it reads (for its mask)."""
        for module in model.modules():
            layer_idx = getattr(module, "layer_idx", None)
            if isinstance(layer_idx, int) and hasattr(module, "o_proj") and layer_idx < len(self.layers):
                module.__dict__[_LAYER_ATTRIBUTE] = self.layers[layer_idx]

    @staticmethod
    def detach(model: torch.nn.Module) -> None:
        for module in model.modules():
            module.__dict__.pop(_LAYER_ATTRIBUTE, None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]  # type: ignore[attr-defined]

    def rollback(self, lengths: list[int]) -> None:
        """Forget every token written after the layers held `lengths` (the buffers are simply overwritten later)."""
        for layer, length in zip(self.layers, lengths):
            layer.set_length(length)  # type: ignore[attr-defined]


def inplace_attention_mask(module, query: torch.Tensor, key: torch.Tensor):
    """For an attention module reading an in-place layer, the `(1, 1, q, capacity)` boolean mask of the slots each of
    this forward's queries may see (the valid slots, causal among the new tokens); None for any other module."""
    layer = module.__dict__.get(_LAYER_ATTRIBUTE)
    if layer is None or key.shape[2] != layer.capacity:
        return None
    q_len = query.shape[2]
    # after the update, the layer's position is one past the last new token; new token i sits at position - q + i
    slots = torch.arange(layer.capacity, device=query.device)
    limits = layer.position.to(query.device) - q_len + 1 + torch.arange(q_len, device=query.device)
    return (slots[None, :] < limits[:, None])[None, None]


def can_decode_in_place(model: torch.nn.Module, cache: Cache) -> bool:
    """Whether `cache` can be copied into an `InPlaceCache` for decoding `model`: a plain dynamic cache (no quantized,
    sliding-window or empty layer) under sdpa or eager attention (flash attention takes no mask)."""
    from transformers.cache_utils import DynamicLayer

    from kvpress.utils import attention_implementation

    if attention_implementation(model) not in ("sdpa", "eager") or not cache.layers:
        return False
    return all(
        type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4
        for layer in cache.layers
    )


# Slots per chunk of the weights @ values product of `inplace_attention` (the bucket size: capacities are multiples)
VALUE_SPLIT = 1024

# Query rows up to which a forward over an in-place layer uses `inplace_attention` (a decoding step, a question).
MAX_INPLACE_QUERY_ROWS = 64


def inplace_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: Optional[float] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Attention of a few query rows over an in-place buffer, as two batched matrix products per KV head.

    Each KV head's query group is folded into the rows of one product (no `repeat_kv` copy), and the boolean `mask`
    `(1, 1, q, capacity)` (or a per-head `(B, H, q, capacity)` one) hides the unused slots. This reads every key and
    value once at the memory bandwidth; SDPA's kernels that take a mask handle one query row per head poorly.
    Returns `(B, q, H, d)`, as transformers' attention functions do.
    """
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    groups = num_heads // num_kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5
    rows = query.reshape(bsz, num_kv_heads, groups * q_len, head_dim)  # query head h reads KV head h // groups
    logits = torch.matmul(rows, key.transpose(-1, -2)).float() * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask.shape[0] == 1 and mask.shape[1] == 1:
        visible = mask.reshape(q_len, -1).repeat(groups, 1)  # rows are ordered (group, query)
    else:  # a per-head mask (head-wise presses whose entries no fake key can hide)
        visible = mask.expand(bsz, num_heads, q_len, -1).reshape(bsz, num_kv_heads, groups * q_len, -1)
    logits = logits.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(logits, dim=-1).to(value.dtype)
    capacity = value.shape[2]
    if capacity % VALUE_SPLIT == 0 and capacity > VALUE_SPLIT:
        # weights @ values reduces over the whole buffer with only (batch x KV heads) output tiles: too few thread
        # blocks to read the values at the memory bandwidth. Split the buffer into chunks (views of the buffer, no
        # copy), one product per chunk in one batched call, then add the partial outputs (in float32).
        splits = capacity // VALUE_SPLIT
        rows_count = weights.shape[2]
        chunked_weights = weights.reshape(bsz, num_kv_heads, rows_count, splits, VALUE_SPLIT).transpose(2, 3)
        chunked_values = value.reshape(bsz, num_kv_heads, splits, VALUE_SPLIT, value.shape[-1])
        partial = torch.matmul(chunked_weights, chunked_values)  # (B, H_kv, splits, rows, d)
        output = partial.sum(dim=2, dtype=torch.float32).to(value.dtype)
    else:
        output = torch.matmul(weights, value)
    output = output.reshape(bsz, num_heads, q_len, -1)
    return output.transpose(1, 2).contiguous()
