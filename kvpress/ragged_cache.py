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
its segment. Rolling back after a question resets the lengths (`state()` / `rollback()`), as for `InPlaceCache`.

Presses cannot resize a ragged layer: convert after the presses that act on the context. Head-wise eviction during
decoding (DMSPress(decoding=True), DecodingPress over AdaKVPress) works on it unchanged: presses read the layer as a
dense `(B, H_kv, T, d)` view (`dense_keys_and_values`, through `kvpress.utils.extract_keys_and_values`), and every
entry they mask is evicted from its segment at once (`RaggedCache.attach` makes the layer the eviction sink of
`kvpress.headwise_masks`), so its row is free for the next tokens. Entries evicted during a question are brought back
by `rollback` to a `state()` taken before it: the first eviction after `state()` copies the layer once.
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any, Optional, Union

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from kvpress.headwise_masks import attach_mask_sink, clear_masks, detach_mask_sink, masks_as_bool
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
        # the logical length on the device, changed in place (attention masks read it without a host value)
        self.logical_position = torch.tensor(seq_len, dtype=torch.int32, device=keys.device)  # as `positions`
        # bumped whenever the buffers or offsets are replaced (growth, restore): plans built on them are stale
        self.version = 0
        self._starts: Optional[tuple[int, torch.Tensor]] = None  # (version, offsets[:-1] as int64): `_segment_starts`
        self.last_query: Optional[torch.Tensor] = None  # the query of the last attention (fake keys of the view)
        self.plans: dict = {}  # attention plans of kvpress.ragged_attention, by (q_len, groups)
        self._protected: Optional[dict] = None  # the backup holder of the state() to roll back to (see evict)
        self._last_view: Optional[weakref.ref] = None
        self._track_free_rows()

    def _track_free_rows(self) -> None:
        """Host-side bookkeeping read by every step without a device sync: the fewest free rows of any segment and
        the largest segment capacity; the device copy of the logical length is refreshed in place."""
        self.min_free_rows = int((self.capacities - self.lengths).min()) if self.num_segments else 0
        self.max_capacity = int(self.capacities.max()) if self.num_segments else 0
        self.logical_position.fill_(self.logical_length)

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
            self._grow(2 * n_new)  # room for as many again: growth stays rare
        # a decoding step (one token) launches as few kernels as the in-place cache's: its rows are the segment
        # ends, its position the device copy of the logical length (no host value that changes from step to step)
        ends = self._segment_starts() + self.lengths
        if n_new == 1:
            rows, new_positions = ends, self.logical_position.expand(self.num_segments)
        else:
            steps = torch.arange(n_new, device=self.device)
            rows = (ends[:, None] + steps).reshape(-1)
            new_positions = (self.logical_position + steps.to(torch.int32)).repeat(self.num_segments)
        self.keys.index_copy_(0, rows, key_states.reshape(-1, key_states.shape[-1]).to(self.keys.dtype))
        self.values.index_copy_(0, rows, value_states.reshape(-1, value_states.shape[-1]).to(self.values.dtype))
        self.positions.index_copy_(0, rows, new_positions)
        self.lengths += n_new
        self.logical_length += n_new
        self.logical_position.add_(n_new)
        self.min_free_rows -= n_new
        return self.keys[None, None], self.values[None, None]

    def _segment_starts(self) -> torch.Tensor:
        """The first row of every segment as int64 indices, kept until the offsets are replaced (`version`)."""
        cached = self._starts
        if cached is None or cached[0] != self.version:
            cached = (self.version, self.offsets[:-1].long())
            self._starts = cached
        return cached[1]

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

    def state(self) -> tuple:
        """What `rollback` returns to. Until then (or until a rollback with `release=True`), the first eviction
        copies the layer once, so that the entries it drops can be brought back."""
        holder: dict = {}
        self._protected = holder
        return self.lengths.clone(), self.logical_length, holder

    def rollback(self, state: tuple, release: bool = False) -> None:
        """Forget every entry written after `state` (from `state()`): later tokens overwrite the spare rows, and
        entries evicted since are restored from the copy the first eviction made. With `release`, the state is not
        needed again: later evictions make no copy."""
        lengths, logical_length = state[0], state[1]
        holder = state[2] if len(state) > 2 else None
        if holder is not None and holder.get("buffers") is not None:
            saved = holder["buffers"]
            for name, tensor in saved.items():
                setattr(self, name, tensor if release else tensor.clone())
            if release:
                holder["buffers"] = None
            self.version += 1
        self._protected = None if release else holder
        self.lengths.copy_(lengths)
        self.logical_length = logical_length
        self._track_free_rows()

    def _protect_before_eviction(self) -> None:
        """Copy the layer once, before the first eviction after `state()` changes its rows."""
        holder = self._protected
        if holder is not None and holder.get("buffers") is None:
            names = ("keys", "values", "positions", "offsets", "capacities")
            holder["buffers"] = {name: getattr(self, name).clone() for name in names}

    def rows_in_use(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment of every row `(rows,)` and whether the row is in use `(rows,)`."""
        n_rows = self.keys.shape[0]
        row_segment = torch.repeat_interleave(
            torch.arange(self.num_segments, device=self.device), self.capacities.long(), output_size=n_rows
        )
        in_use = (
            torch.arange(n_rows, device=self.device) - self.offsets.long()[row_segment]
            < self.lengths.long()[row_segment]
        )
        return row_segment, in_use

    # -- the dense view presses read during decoding ------------------------------------------------------------
    def dense_keys_and_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(B, H_kv, T, d)` over the logical sequence, for a press acting during decoding.

        Each held entry sits at its logical position. An evicted entry has a zero value and, as on the masking
        path (where the patched attention overwrites masked keys in place), the fake key of the layer's last
        queries (`kvpress.attention_patch.search_hyperplane`), so scorers rank it lowest and the press scores what
        it scores on a dense cache. When no fake key exists for all those queries (the masking path then masks
        explicitly and leaves the original keys in place, which the ragged layer no longer holds), the fake key of
        the last query row is used: the choices may then differ from the masking path's (zero key when none
        exists either)."""
        from kvpress.attention_patch import search_hyperplane

        segments, seq_len = self.num_segments, self.logical_length
        row_segment, in_use = self.rows_in_use()
        rows = in_use.nonzero().squeeze(-1)
        segment, position = row_segment[rows], self.positions[rows].long()
        keys = self.keys.new_zeros(segments, seq_len, self.keys.shape[-1])
        values = self.values.new_zeros(segments, seq_len, self.values.shape[-1])
        held = torch.zeros(segments, seq_len, dtype=torch.bool, device=self.device)
        keys[segment, position] = self.keys[rows]
        values[segment, position] = self.values[rows]
        held[segment, position] = True
        query = self.last_query
        if query is not None and query.shape[0] == self.batch_size and not bool(held.all()):
            groups = query.shape[1] // self.num_kv_heads
            fake = None
            # the masking path's fake key (every query row of the head), else one for the last query row alone
            for rows in (query, query[:, :, -1:]):
                try:
                    folded = rows.reshape(segments, groups * rows.shape[2], rows.shape[-1]).float()
                    fake = search_hyperplane(folded).to(keys.dtype)  # (segments, d)
                    break
                except ValueError:
                    continue
            if fake is not None:
                missing_segment, missing_position = (~held).nonzero(as_tuple=True)
                keys[missing_segment, missing_position] = fake[missing_segment]
        shape = (self.batch_size, self.num_kv_heads, seq_len)
        keys, values = keys.view(*shape, -1), values.view(*shape, -1)
        self._last_view = weakref.ref(keys)
        return keys, values

    def write_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """What a press writes back after reading `dense_keys_and_values`: the view itself (its evictions went
        through the head-wise masks, already applied). Anything else would resize or rewrite the layer, which a
        ragged layer does not do: CannotCompressError."""
        view = self._last_view() if self._last_view is not None else None
        if view is not None and keys is view:
            return
        raise CannotCompressError(
            f"a press wrote keys of shape {tuple(keys.shape)} into a ragged cache layer (logical length "
            f"{self.logical_length}): the ragged cache keeps each head's own entries and takes decoding-time eviction "
            "only as head-wise masks (DMSPress(decoding=True), DecodingPress over AdaKVPress). Decode with the "
            "masking path (ragged_cache=False) for presses that resize the cache."
        )

    def refuses_remap(self) -> str:
        return "its cache is ragged, which cannot be resized (uniform decoding-time compression needs a dense cache)"

    def segment_rows(self, segment: int) -> torch.Tensor:
        """The rows of `segment` in use (for tests and inspection)."""
        start = int(self.offsets[segment])
        return torch.arange(start, start + int(self.lengths[segment]), device=self.device)

    def reserve(self, n_new: int) -> bool:
        """Make room now for `n_new` more tokens in every segment (growing, that is copying the used rows, only if some
        segment has fewer free rows), so that the next `n_new` appends copy nothing. Returns whether it grew."""
        if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 0:
            raise ValueError(f"n_new must be a non-negative number of rows per segment, got {n_new!r}.")
        if n_new <= self.min_free_rows:
            return False
        self._grow(n_new)
        return True

    def _grow(self, free_rows: int) -> None:
        """Reallocate so that every segment has at least `free_rows` free rows, copying the used rows."""
        old_offsets, lengths = self.offsets.long(), self.lengths.long()
        capacities = torch.maximum(self.capacities.long(), lengths + free_rows)
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
        self.version += 1
        self._track_free_rows()

    def evict(self, batch_idx: torch.Tensor, head_idx: torch.Tensor, positions: torch.Tensor) -> int:
        """Drop the entries at logical `positions` of segments (batch_idx, head_idx) and close the gaps in place
        (each segment's later entries move up; its free rows grow). Entries not held are ignored. Returns the
        number of entries dropped."""
        if positions.numel() == 0:
            return 0
        big = self.logical_length + 1
        offsets = self.offsets.long()
        n_rows = self.keys.shape[0]
        row_segment, in_use = self.rows_in_use()
        # a sorted key per row: segment-major, positions ascending within a segment, free rows last
        sort_key = row_segment * big + torch.where(in_use, self.positions.long(), big - 1)
        positions = positions.to(self.device).long()
        wanted = (batch_idx.to(self.device).long() * self.num_kv_heads + head_idx.to(self.device).long()) * big
        # a position outside the logical sequence would alias an entry of the next segment: it matches nothing
        wanted = torch.where((positions >= 0) & (positions < self.logical_length), wanted + positions, -1)
        found = torch.searchsorted(sort_key, wanted).clamp(max=n_rows - 1)
        hit = (sort_key[found] == wanted) & in_use[found]
        drop = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        drop[found[hit]] = True
        n_dropped = int(drop.sum())
        if n_dropped == 0:
            return 0
        self._protect_before_eviction()
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
            layers.append(ragged_layer_from(layer, modules.get(layer_idx), extra_tokens))
        new.layers = layers
        new.attach(model)
        return new

    def attach(self, model: torch.nn.Module) -> None:
        """Tell each attention module of `model` which ragged layer it reads; the masks it holds now are already
        applied (decoding-time masks set later are evicted in place)."""
        self.attach_layers(attention_modules_by_layer(model))

    def attach_layers(self, modules: dict) -> None:
        """`attach`, given the attention modules by layer index (`attention_modules_by_layer`)."""
        for layer_idx, module in modules.items():
            if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], RaggedLayer):
                module.__dict__[_LAYER_ATTRIBUTE] = self.layers[layer_idx]
                attach_mask_sink(module, self.layers[layer_idx])  # entries masked from now on are evicted

    @staticmethod
    def detach(model: torch.nn.Module) -> None:
        for module in model.modules():
            if module.__dict__.pop(_LAYER_ATTRIBUTE, None) is not None:
                detach_mask_sink(module)

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
        """What `rollback` returns to (entries evicted after it included, see `RaggedLayer.state`)."""
        return [layer.state() if isinstance(layer, RaggedLayer) else None for layer in self.layers]

    def rollback(self, state: list, release: bool = False) -> None:
        """Return to `state`; with `release`, for the last time (later evictions make no copy)."""
        for layer, saved in zip(self.layers, state):
            if saved is not None:
                layer.rollback(saved, release=release)  # type: ignore[attr-defined]


def ragged_layer_from(layer: DynamicLayer, module: Optional[torch.nn.Module], extra_tokens: int) -> RaggedLayer:
    """A ragged layer holding the entries of the filled dense `layer` that the head-wise masks of `module` (its
    attention module, None for none) do not hide, with `extra_tokens` spare rows per segment. The one conversion
    `RaggedCache.from_cache` and `ragged_prefill` share, so both build the same layer."""
    keys, values = layer.keys, layer.values
    kept = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    if module is not None:
        kept = ~masks_as_bool(module, tuple(keys.shape[:3]), device=keys.device)
    return RaggedLayer(keys, values, kept, extra_tokens)


def attention_modules_by_layer(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The attention modules of `model` (those with a `layer_idx` and an `o_proj`) by layer index."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and hasattr(module, "o_proj"):
            found[layer_idx] = module
    return found


def forget_applied_masks(model: torch.nn.Module) -> None:
    """Drop the head-wise masks of every attention module of `model` once a RaggedCache holds only the kept entries
    (they are applied; a press that evicts while decoding reads them back, so keep them for one)."""
    for module in attention_modules_by_layer(model).values():
        clear_masks(module)


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
    """The ragged layer `module` reads when `key` is its buffer (as its update returned it), else None. (Entries
    masked on `module` were evicted when the masks were set: `kvpress.headwise_masks` is the writer.)"""
    layer = module.__dict__.get(_LAYER_ATTRIBUTE)
    if layer is None:
        return None
    if key.dim() != 4 or key.shape[:2] != (1, 1) or key.shape[2] != layer.keys.shape[0]:
        return None
    return layer


_LOGGED: set = set()


def log_once(message: str) -> None:
    """Say `message` in the log the first time only (fallbacks would otherwise repeat for every sample)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


def _nested_presses(press: Any) -> list:
    """The presses nested in `press` (fields holding a press, or lists/tuples of presses), at any depth."""
    from kvpress.presses.base_press import BasePress

    found: list = []
    stack = [value for value in vars(press).values()]
    while stack:
        value = stack.pop()
        if isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, BasePress) and all(value is not seen for seen in found):
            found.append(value)
            stack.extend(vars(value).values())
    return found


def decoding_eviction_problem(press: Any) -> Optional[str]:
    """Why the ragged cache cannot serve `press` while it decodes (None when it can): every press that acts during
    decoding must evict head by head, being head-wise itself (DMSPress) or acting through a nested head-wise press
    (DecodingPress over AdaKVPress); presses that resize the cache (DecodingPress over a ScorerPress, a
    cache_budget) need a dynamic cache."""
    from kvpress.presses.base_press import BasePress

    if not isinstance(press, BasePress):
        return None if press is None or press is False else "a press acting during decoding"

    def served(item: Any) -> bool:
        if not item.acts_during_decoding or item.head_wise:
            return True
        nested = _nested_presses(item)
        acting = [inner for inner in nested if inner.acts_during_decoding]
        return any(inner.head_wise for inner in nested) and all(served(inner) for inner in acting)

    for item in [press, *_nested_presses(press)]:
        if not served(item):
            return f"{type(item).__name__} resizes the cache while decoding"
    return None


def ragged_cache_for(
    model: torch.nn.Module,
    cache: Cache,
    press: Union[bool, Any],
    extra_tokens: int,
    release_source: bool = False,
) -> Optional[RaggedCache]:
    """A RaggedCache holding the kept entries of `cache` for decoding `model` with `press` acting during decoding
    (a press, None or False when none acts; True for one not given), or None (said once in the log) when it cannot
    apply: the press resizes the cache while decoding (`decoding_eviction_problem`), or the cache holds layers the
    ragged cache cannot copy (quantized). Head-wise masks then stay on the masking path. With `release_source`, the
    dense layers of `cache` are dropped once copied (the caller no longer needs them)."""
    if press is True:
        log_once("ragged_cache: the press acts during decoding and resizes a dynamic cache; using the masking path")
        return None
    problem = decoding_eviction_problem(press)
    if problem is not None:
        log_once(f"ragged_cache: not applicable ({problem}: it needs a dynamic cache); using the masking path")
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
