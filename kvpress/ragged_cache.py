# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""A cache that stores only what each KV head keeps: one flat buffer per layer, one segment per (batch, KV head).

Head-wise presses (AdaKV, DMS, KVzip, ...) keep a different number of tokens in each KV head and record the dropped
entries as head-wise masks (`kvpress.headwise_masks`). A dense cache cannot drop them; `RaggedCache.from_cache`
copies a filled (compressed) dense cache once into `RaggedLayer`s that hold only the kept entries:

- `keys`/`values`: flat `(capacity_total, d)` buffers, the segment of (batch b, KV head h) at `s = b * H_kv + h`
  occupying rows `[offsets[s], offsets[s + 1])`, CSR style (`offsets` int32, `B * H_kv + 1` entries);
- `lengths` (int32, `B * H_kv`): the rows of each segment in use; the rest of a segment is spare capacity, so a
  decoding step writes its token at `offsets[s] + lengths[s]` of every segment in place (no copy of the cache);
- `positions` (int32, per row): the index of the entry in the layer's logical sequence (the dense cache it came
  from, then one per appended token). Attention uses them for causality among new tokens and for padding masks,
  and decoding-time eviction finds the entries it drops by them.

The attention over a ragged layer (`kvpress.ragged_attention`) folds each KV head's query group into the rows of
its segment. Rolling back after a question resets the lengths (`lengths()` / `rollback()`), as for `InPlaceCache`.
Presses cannot resize a ragged layer (it is not a `DynamicLayer`): convert after the presses that act on the
context. Head-wise masks set later (decoding-time eviction) are applied in place by `evict_masked`.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from kvpress.headwise_masks import get_masks, masks_as_bool
from kvpress.transformers_adapter import CannotCompressError

logger = logging.getLogger(__name__)

_LAYER_ATTRIBUTE = "_kvpress_ragged_layer"


class RaggedLayer(CacheLayerMixin):
    """One layer of a ragged cache, built from dense `keys`/`values` `(B, H_kv, T, d)` and `kept` `(B, H_kv, T)`
    (True = the entry stays), with `spare` free rows per segment for the tokens decoding appends."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, spare: int):
        super().__init__()
        if keys.dim() != 4 or values.shape[:3] != keys.shape[:3]:
            raise ValueError(
                f"keys and values must be (batch, kv_heads, seq_len, dim) of one length, got {tuple(keys.shape)} "
                f"and {tuple(values.shape)}."
            )
        if kept.shape != keys.shape[:3] or kept.dtype != torch.bool:
            raise ValueError(
                f"kept must be a boolean tensor of shape {tuple(keys.shape[:3])}, got {kept.dtype} "
                f"{tuple(kept.shape)}."
            )
        if isinstance(spare, bool) or not isinstance(spare, int) or spare < 0:
            raise ValueError(f"spare must be a non-negative number of rows per segment, got {spare!r}.")
        self.is_initialized = True
        bsz, num_kv_heads, seq_len, _ = keys.shape
        self.batch_size, self.num_kv_heads = bsz, num_kv_heads
        self.device = keys.device
        n_segments = bsz * num_kv_heads
        kept = kept.to(keys.device).reshape(n_segments, seq_len)
        lengths = kept.sum(dim=-1)
        capacities = lengths + spare
        offsets = torch.zeros(n_segments + 1, dtype=torch.long, device=keys.device)
        offsets[1:] = capacities.cumsum(0)
        total = int(offsets[-1])
        self.keys = keys.new_zeros(total, keys.shape[-1])
        self.values = values.new_zeros(total, values.shape[-1])
        self.positions = torch.full((total,), -1, dtype=torch.int32, device=keys.device)
        # row of every kept entry: its segment's offset plus its rank among the segment's kept entries
        segment, token = kept.nonzero(as_tuple=True)  # segment-major, tokens in order
        rank = kept.long().cumsum(dim=-1)[segment, token] - 1
        rows = offsets[segment] + rank
        self.keys[rows] = keys.reshape(n_segments, seq_len, -1)[segment, token]
        self.values[rows] = values.reshape(n_segments, seq_len, -1)[segment, token]
        self.positions[rows] = token.to(torch.int32)
        self.offsets = offsets.to(torch.int32)
        self.lengths = lengths.to(torch.int32)
        self.capacities = capacities.to(torch.int32)
        self.logical_length = seq_len
        self._track_free_rows()

    def _track_free_rows(self) -> None:
        """Host-side bookkeeping read by every step without a device sync: the fewest free rows of any segment, the
        largest segment capacity, and the logical length on the device (for the attention masks)."""
        self.min_free_rows = int((self.capacities - self.lengths).min()) if self.num_segments else 0
        self.max_capacity = int(self.capacities.max()) if self.num_segments else 0
        self.logical_position = torch.tensor(self.logical_length, dtype=torch.long, device=self.device)

    # -- transformers' cache-layer interface --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers exist from the start."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `key_states`/`value_states` `(B, H_kv, q, d)` at the end of every segment, in place. Returns the
        flat buffers as `(1, 1, rows, d)` tensors; only `kvpress.ragged_attention` reads them."""
        bsz, num_kv_heads, n_new, _ = key_states.shape
        if (bsz, num_kv_heads) != (self.batch_size, self.num_kv_heads):
            raise ValueError(
                f"this ragged layer holds batch {self.batch_size} x {self.num_kv_heads} KV heads; the forward brought "
                f"{bsz} x {num_kv_heads}."
            )
        if n_new > self.min_free_rows:
            self._grow(n_new)
        rows = (self.offsets[:-1] + self.lengths).long()[:, None] + torch.arange(n_new, device=self.device)
        rows = rows.reshape(-1)
        self.keys.index_copy_(0, rows, key_states.reshape(-1, key_states.shape[-1]).to(self.keys.dtype))
        self.values.index_copy_(0, rows, value_states.reshape(-1, value_states.shape[-1]).to(self.values.dtype))
        new_positions = torch.arange(self.logical_length, self.logical_length + n_new, device=self.device)
        self.positions.index_copy_(0, rows, new_positions.to(torch.int32).repeat(bsz * num_kv_heads))
        self.lengths += n_new
        self.logical_length += n_new
        self.logical_position.add_(n_new)
        self.min_free_rows -= n_new
        return self.keys[None, None], self.values[None, None]

    def get_seq_length(self, *args, **kwargs) -> int:
        """The logical length (what a dense cache would hold): positions and masks of new tokens follow it."""
        return self.logical_length

    def get_mask_sizes(self, query_length=None, *args, **kwargs) -> tuple[int, int]:
        """Masks are sized on the logical sequence; the ragged attention reads their columns at `positions`."""
        if isinstance(query_length, torch.Tensor):  # transformers < 5.x passes cache_position
            query_length = query_length.shape[0]
        return self.logical_length + int(query_length or 0), 0

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.rollback((torch.zeros_like(self.lengths), 0))

    # -- ragged bookkeeping --------------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return self.batch_size * self.num_kv_heads

    def kv_bytes(self) -> int:
        """Bytes of the key and value buffers (capacity, spare rows included)."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def used_rows(self) -> int:
        return int(self.lengths.sum())

    def state(self) -> tuple[torch.Tensor, int]:
        return self.lengths.clone(), self.logical_length

    def rollback(self, state: tuple[torch.Tensor, int]) -> None:
        """Forget every entry written after `state` (from `state()`): later tokens overwrite the spare rows.

        Entries evicted in place since then are not brought back (their rows were reused)."""
        lengths, logical_length = state
        self.lengths.copy_(lengths)
        self.logical_length = logical_length
        self._track_free_rows()

    def segment_rows(self, segment: int) -> torch.Tensor:
        """The rows of `segment` in use (for tests and inspection)."""
        start = int(self.offsets[segment])
        return torch.arange(start, start + int(self.lengths[segment]), device=self.device)

    def _grow(self, n_new: int) -> None:
        """Reallocate with room for `n_new` more rows per segment (plus as many again), copying the used rows."""
        extra = max(n_new, 1) * 2
        old_offsets, lengths = self.offsets.long(), self.lengths.long()
        capacities = torch.maximum(self.capacities.long(), lengths + extra)
        offsets = torch.zeros_like(old_offsets)
        offsets[1:] = capacities.cumsum(0)
        total = int(offsets[-1])
        logger.debug("RaggedLayer: growing from %d to %d rows", self.keys.shape[0], total)
        segment = torch.repeat_interleave(torch.arange(self.num_segments, device=self.device), lengths)
        within = torch.arange(segment.numel(), device=self.device) - (lengths.cumsum(0) - lengths)[segment]
        old_rows, new_rows = old_offsets[segment] + within, offsets[segment] + within
        for name in ("keys", "values", "positions"):
            old = getattr(self, name)
            new = (
                old.new_full((total, *old.shape[1:]), -1)
                if name == "positions"
                else old.new_zeros(total, *old.shape[1:])
            )
            new[new_rows] = old[old_rows]
            setattr(self, name, new)
        self.offsets, self.capacities = offsets.to(torch.int32), capacities.to(torch.int32)
        self._track_free_rows()

    def evict(self, batch_idx: torch.Tensor, head_idx: torch.Tensor, positions: torch.Tensor) -> int:
        """Drop the entries at logical `positions` of segments (batch_idx, head_idx) and close the gaps in place
        (each segment's later entries move up; its free rows grow). Entries not held are ignored. Returns the
        number of entries dropped."""
        if positions.numel() == 0:
            return 0
        big = self.logical_length + 1
        lengths, offsets = self.lengths.long(), self.offsets.long()
        n_rows = self.keys.shape[0]
        row_segment = torch.repeat_interleave(
            torch.arange(self.num_segments, device=self.device), self.capacities.long(), output_size=n_rows
        )
        in_use = torch.arange(n_rows, device=self.device) - offsets[row_segment] < lengths[row_segment]
        # a sorted key per row: segment-major, positions ascending within a segment, free rows last
        sort_key = row_segment * big + torch.where(in_use, self.positions.long(), big - 1)
        wanted = (batch_idx.to(self.device).long() * self.num_kv_heads + head_idx.to(self.device).long()) * big
        wanted = wanted + positions.to(self.device).long()
        found = torch.searchsorted(sort_key, wanted).clamp(max=n_rows - 1)
        hit = (sort_key[found] == wanted) & in_use[found]
        drop = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        drop[found[hit]] = True
        n_dropped = int(drop.sum())
        if n_dropped == 0:
            return 0
        stays = in_use & ~drop
        rank = torch.cumsum(stays.long(), 0)
        segment_start = torch.zeros(self.num_segments + 1, dtype=torch.long, device=self.device)
        segment_start[1:] = (
            torch.zeros(self.num_segments, dtype=torch.long, device=self.device)
            .index_add_(0, row_segment, stays.long())
            .cumsum(0)
        )
        source = stays.nonzero().squeeze(-1)
        target = offsets[row_segment[source]] + rank[source] - 1 - segment_start[row_segment[source]]
        for name in ("keys", "values", "positions"):
            buffer = getattr(self, name)
            buffer[target] = buffer[source].clone()
        self.lengths.copy_((segment_start[1:] - segment_start[:-1]).to(torch.int32))
        self._track_free_rows()
        return n_dropped


class RaggedCache(DynamicCache):
    """A cache of `RaggedLayer`s (layers it cannot serve, e.g. Gemma3's sliding-window ones, stay as they were),
    built from a filled (compressed) cache by `RaggedCache.from_cache`."""

    @classmethod
    def from_cache(
        cls, cache: Cache, model: torch.nn.Module, extra_tokens: int = 0, detach_masks: bool = False
    ) -> "RaggedCache":
        """Copy every full-attention dynamic layer of `cache` into a ragged layer keeping only the entries the
        head-wise masks of `model`'s attention modules do not hide, with room for `extra_tokens` more tokens per
        segment, and attach the layers to the modules (their attention then runs over the segments).

        Raises CannotCompressError when the cache holds a layer it cannot copy (quantized, empty)."""
        if isinstance(extra_tokens, bool) or not isinstance(extra_tokens, int) or extra_tokens < 0:
            raise ValueError(f"extra_tokens must be a non-negative integer, got {extra_tokens!r}")
        problem = ragged_problem(cache)
        if problem is not None:
            raise CannotCompressError(problem)
        modules = attention_modules_by_layer(model)
        new = cls()
        layers: list = []
        for layer_idx, layer in enumerate(cache.layers):
            if getattr(layer, "is_sliding", False):
                layers.append(copy.deepcopy(layer))  # a window of tokens: copied, so the source cache stays as it is
                continue
            keys, values = layer.keys, layer.values
            module = modules.get(layer_idx)
            kept = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
            if module is not None:
                kept = ~masks_as_bool(module, tuple(keys.shape[:3]), device=keys.device)
            layers.append(RaggedLayer(keys, values, kept, extra_tokens))
        new.layers = layers
        new.attach(model)
        return new

    def attach(self, model: torch.nn.Module) -> None:
        """Tell each attention module of `model` which ragged layer it reads; the masks it holds now are already
        applied (decoding-time masks set later are evicted in place)."""
        for layer_idx, module in attention_modules_by_layer(model).items():
            if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], RaggedLayer):
                module.__dict__[_LAYER_ATTRIBUTE] = (self.layers[layer_idx], get_masks(module))

    @staticmethod
    def detach(model: torch.nn.Module) -> None:
        for module in model.modules():
            module.__dict__.pop(_LAYER_ATTRIBUTE, None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def ragged_layers(self) -> list[RaggedLayer]:
        return [layer for layer in self.layers if isinstance(layer, RaggedLayer)]

    def kv_bytes(self) -> int:
        """Bytes of every layer's key and value buffers (ragged capacity, or the dense tensors of other layers)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, RaggedLayer):
                total += layer.kv_bytes()
            elif getattr(layer, "keys", None) is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total

    def state(self) -> list:
        return [layer.state() if isinstance(layer, RaggedLayer) else None for layer in self.layers]

    def rollback(self, state: list) -> None:
        for layer, saved in zip(self.layers, state):
            if saved is not None:
                layer.rollback(saved)  # type: ignore[attr-defined]


def attention_modules_by_layer(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The attention modules of `model` (those with a `layer_idx` and an `o_proj`) by layer index."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and hasattr(module, "o_proj"):
            found[layer_idx] = module
    return found


def ragged_problem(cache: Cache) -> Optional[str]:
    """Why `cache` cannot be copied into a RaggedCache (None when it can)."""
    if not cache.layers:
        return "the cache is empty"
    for layer_idx, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            continue
        if type(layer) is not DynamicLayer or not layer.is_initialized or getattr(layer, "keys", None) is None:
            return (
                f"layer {layer_idx} is a {type(layer).__name__} (quantized or empty layers keep the masking path; "
                "the ragged cache copies full-attention DynamicLayers)"
            )
        if layer.keys.dim() != 4:
            return f"layer {layer_idx} holds keys of shape {tuple(layer.keys.shape)}, not (batch, kv_heads, seq, d)"
    return None


def ragged_layer_of(module, key: torch.Tensor) -> Optional[RaggedLayer]:
    """The ragged layer `module` reads when `key` is its buffer (as its update returned it), else None. Head-wise
    masks set on `module` since the layer was attached (decoding-time eviction) are evicted first."""
    attached = module.__dict__.get(_LAYER_ATTRIBUTE)
    if attached is None:
        return None
    layer, seen = attached
    if key.dim() != 4 or key.shape[:2] != (1, 1) or key.shape[2] != layer.keys.shape[0]:
        return None
    masks = get_masks(module)
    if masks is not None and masks is not seen:
        layer.evict(*masks)
        module.__dict__[_LAYER_ATTRIBUTE] = (layer, masks)
    return layer


_LOGGED: set = set()


def log_once(message: str) -> None:
    """Say `message` in the log the first time only (fallbacks would otherwise repeat for every sample)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


def ragged_cache_for(
    model: torch.nn.Module,
    cache: Cache,
    press_acts_during_decoding: bool,
    extra_tokens: int,
    release_source: bool = False,
) -> Optional[RaggedCache]:
    """A RaggedCache holding the kept entries of `cache` for decoding `model`, or None (said once in the log) when
    it cannot apply: the press acts during decoding (it resizes a dynamic cache), or the cache holds layers the
    ragged cache cannot copy (quantized). Head-wise masks then stay on the masking path. With `release_source`, the
    dense layers of `cache` are dropped once copied (the caller no longer needs them)."""
    if press_acts_during_decoding:
        log_once("ragged_cache: the press acts during decoding and resizes a dynamic cache; using the masking path")
        return None
    problem = ragged_problem(cache)
    if problem is not None:
        log_once(f"ragged_cache: not applicable ({problem}); using the masking path")
        return None
    ragged = RaggedCache.from_cache(cache, model, extra_tokens=extra_tokens)
    if release_source:
        release_dense_layers(cache)
    return ragged


def release_dense_layers(cache: Cache) -> None:
    """Drop the tensors of `cache`'s full-attention dynamic layers (copied into a RaggedCache), so that only the kept
    entries stay resident; the cache is empty afterwards."""
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.keys = layer.values = None
            layer.is_initialized = False
