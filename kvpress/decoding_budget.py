# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Decoding-time cache budgets: a scorer keeps at most `cache_budget` entries per layer and KV head, in prefill and
after every decoding step (the reasoning fork, https://arxiv.org/abs/2512.12008), so long generations stay within
budget.

`CacheBudget` is the part of `ScorerPress` that sizes the cache by a budget: the validation of `cache_budget`, the
per-layer `DecodingState` (recent tokens, positions and statistics of every cached entry), the hooks a press may
override (`update_state`, `on_eviction`, ...) and the budgeted `forward_hook`. `log_eviction` writes what an
eviction cost in attention (`kvpress.timing`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from kvpress.presses.base_press import get_hook_inputs, layer_is_prefilling
from kvpress.recent_tokens import RecentTokens
from kvpress.timing import attention_loss_rows, write_eviction_rows
from kvpress.token_selection import check_scores, gather_tokens, top_indices
from kvpress.transformers_adapter import position_ids_of
from kvpress.utils import cache_layer_length, extract_keys_and_values, is_quantized_layer, write_keys_and_values
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

# Name of the per-entry tensor that holds the token position of every cached entry.
POSITIONS = "positions"


@dataclass
class DecodingState:
    """What a press with a `cache_budget` keeps about one layer of the current sequence (reset at every prefill).

    - `seen`: tokens this layer has processed since the prefill (the prompt included);
    - `steps`: forwards since the prefill (0 during the prefill itself);
    - `recent`: the last tokens (`RecentTokens`: hidden states, RoPE cos/sin, position ids), which the score
      receives during decoding instead of the single new token (see `CacheBudget.decoding_window`);
    - `entries`: one value per cached entry `(B, H_kv, T)`, pruned together with the cache: the token position of each
      entry (`"positions"`, -1 when unknown) and press-specific statistics (e.g. H2O's accumulated attention);
    - `scratch`: what a press computes in `score` and reuses when it logs the eviction (cleared every forward).
    """

    seen: int = 0
    steps: int = 0
    recent: RecentTokens = field(default_factory=RecentTokens)
    entries: dict = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)

    def align_entries(
        self, fill_values: dict, batch: int, num_kv_heads: int, old_len: int, device: torch.device
    ) -> None:
        """Make every per-entry tensor describe the `old_len` entries cached before this forward. A tensor that does
        not (the cache was changed outside the press, or the state was created mid-sequence) restarts from its fill
        value."""
        for name, fill in fill_values.items():
            tensor = self.entries.get(name)
            if tensor is None or tuple(tensor.shape) != (batch, num_kv_heads, old_len):
                dtype = torch.long if name == POSITIONS else torch.float32
                self.entries[name] = torch.full((batch, num_kv_heads, old_len), fill, dtype=dtype, device=device)

    def append_entries(self, new_positions: torch.Tensor, fill_values: dict) -> None:
        """Add the entries of this forward's tokens: their positions `(B, H_kv, q)`, and fill values elsewhere."""
        for name, fill in fill_values.items():
            old = self.entries[name]
            if name == POSITIONS:
                new = new_positions.to(device=old.device, dtype=old.dtype)
            else:
                new = torch.full(new_positions.shape, fill, dtype=old.dtype, device=old.device)
            self.entries[name] = torch.cat([old, new], dim=-1)

    def gather_entries(self, indices: torch.Tensor) -> None:
        """Keep the per-entry values of the kept cache entries `indices` `(B, H_kv, n)`."""
        for name, tensor in self.entries.items():
            self.entries[name] = tensor.gather(-1, indices.to(tensor.device))


_DECODING_STATES = "_kvpress_decoding_states"


def log_eviction(
    csv_path: str,
    module: nn.Module,
    state: DecodingState,
    indices: torch.Tensor,
    k_len: int,
    n_candidates: int,
    observation: torch.Tensor,
) -> None:
    """Append to `csv_path` the attention-loss rows of one eviction (first batch item): the layer of `k_len` entries
    keeps `indices` `(B, H_kv, n)`; only its first `n_candidates` entries could be evicted, and `observation` is the
    attention the observing queries paid to those candidates (see `kvpress.timing.attention_loss_rows`)."""
    evicted = torch.ones(indices.shape[1], k_len, dtype=torch.bool, device=indices.device)
    evicted.scatter_(-1, indices[0], False)
    rows = attention_loss_rows(
        prune_step=state.steps,
        layer_idx=module.layer_idx,
        observation=observation,
        evicted=evicted[:, :n_candidates],
        kv_len_pre=k_len,
        n_kept=indices.shape[-1],
        positions=state.entries[POSITIONS][0, :, :n_candidates],
    )
    write_eviction_rows(csv_path, rows)


class CacheBudget:
    """Mixin of `ScorerPress` for its `cache_budget` field (declared there, keyword-only; 0 means no budget).

    With a budget, every layer keeps at most `cache_budget` entries per KV head. A longer prompt is pruned to the
    budget after prefill; during generation, whenever a layer holds more than `cache_budget + budget_buffer`
    entries, the press scores the cache again and prunes it back to `cache_budget` (every step for scorers, every
    `compress_interval` steps for R-KV); a quantized layer is read (dequantized) only when it is pruned, unless the
    press overrides `update_state`. During decoding `score` receives the last `decoding_window` tokens' hidden
    states (with their RoPE and positions) and the attention weights of the current forward (eager attention only).
    Presses whose score cannot run during decoding set `supports_decoding = False` and refuse a budget.
    """

    cache_budget: int
    compression_ratio: float
    # False for presses whose score cannot run on a decoding step (e.g. it needs every token's hidden state).
    supports_decoding: ClassVar[bool] = True
    score: Callable[..., torch.Tensor]

    def validate_cache_budget(self) -> None:
        """Raise a ValueError, saying what is allowed, when `cache_budget` cannot be used as set."""
        budget = self.cache_budget
        name = type(self).__name__
        meaning = "cache entries kept per layer and KV head; 0 means no budget"
        validate_int(self, "cache_budget", budget, 0, meaning, bound="a non-negative integer")
        if budget == 0:
            return
        if self.compression_ratio:
            raise ValueError(
                f"{name} got both compression_ratio={self.compression_ratio} and cache_budget={budget}; choose one: "
                "compression_ratio prunes a fraction of the context once after prefill, cache_budget keeps at most "
                "that many entries per layer and KV head through prefill and decoding (set the other to 0)."
            )
        # `scores_during_decoding = False` is the opt-out DecodingPress reads; honour both declarations.
        if not self.supports_decoding or getattr(self, "scores_during_decoding", True) is False:
            raise ValueError(
                f"{name} cannot score the cache during decoding, so it cannot take a cache_budget; use "
                "compression_ratio (prefill only), or a press that supports decoding (e.g. KnormPress, SnapKVPress, "
                "H2OPress, RKVPress)."
            )
        self.check_budget_settings(budget)

    def check_budget_settings(self, budget: int) -> None:
        """Raise a ValueError when a nonzero `budget` cannot work with the press's other settings (e.g. a budget
        smaller than a window the press always keeps). Nothing to check by default."""

    @property
    def acts_during_decoding(self) -> bool:
        """True with a `cache_budget`: the press also compresses while the model generates."""
        return bool(self.cache_budget)

    @property
    def budget_buffer(self) -> int:
        """Entries a layer may hold beyond `cache_budget` between decoding steps before it is pruned again (0: the
        cache is pruned back to the budget after every step)."""
        return 0

    @property
    def decoding_window(self) -> int:
        """How many of the most recent tokens (hidden states, RoPE cos/sin, position ids) `score` receives during
        decoding with a budget; 0 when the score does not use hidden states (it then gets the current forward's)."""
        return 64

    @property
    def required_observations(self) -> int:
        """Recent tokens whose hidden states `score` cannot do without during decoding (an observation window it
        recomputes attention from), 0 when it works with any number. DecodingPress keeps that many in its buffer
        across compressions, so a window longer than its `compression_interval` still gets its queries."""
        return 0

    def layer_cache_budget(self, module: nn.Module) -> int:
        """Entries per KV head that layer `module` keeps with a `cache_budget`: the budget itself, the same for every
        layer (PyramidKVPress spreads it over the layers)."""
        return self.cache_budget

    def budget_to_keep(self, module: nn.Module, k_len: int) -> Optional[int]:
        """With a budget, the entries layer `module` keeps out of `k_len` in a prefill, None when all of them fit."""
        self.validate_cache_budget()
        budget = self.layer_cache_budget(module)
        return None if k_len <= budget else budget

    @property
    def decoding_states(self) -> dict:
        """Per-layer `DecodingState` of the current sequence, by layer index (not a dataclass field)."""
        states = self.__dict__.get(_DECODING_STATES)
        if states is None:
            states = self.__dict__[_DECODING_STATES] = {}
        return states

    def layer_state(self, layer_idx: int) -> Optional[DecodingState]:
        """The decoding state of one layer, None when the press keeps none (no budget, or nothing ran yet)."""
        return self.decoding_states.get(layer_idx)

    def reset_decoding_state(self) -> None:
        """Forget every layer's state (done automatically at each prefill; this frees the memory earlier)."""
        self.decoding_states.clear()

    def entry_fill_values(self) -> dict:
        """Per-entry statistics this press tracks, with the value of an entry nothing is known about."""
        return {POSITIONS: -1}

    def update_state(
        self,
        module: nn.Module,
        state: DecodingState,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> None:
        """Called on every forward with a budget, after this forward's tokens were added to `state` and before any
        pruning (e.g. H2O accumulates attention here). Nothing by default."""

    def on_eviction(self, module: nn.Module, state: DecodingState, indices: torch.Tensor, k_len: int) -> None:
        """Called when a layer of `k_len` entries is pruned to the kept `indices` `(B, H_kv, n)`, before the state is
        pruned (e.g. to log the eviction). Nothing by default."""

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        if not self.cache_budget:
            return super().forward_hook(module, input, kwargs, output)  # type: ignore[misc]
        hidden_states, cache = get_hook_inputs(module, input, kwargs)
        if cache is None:
            return output
        q_len = hidden_states.shape[1]
        prefilling = layer_is_prefilling(module, cache, q_len)
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        budget = self.layer_cache_budget(module)
        limit = budget if prefilling else budget + self.budget_buffer
        shape = self._lazy_layer_shape(module, cache)
        if shape is not None and shape[1] <= limit:
            # A quantized layer under its limit: the state needs only its shape, so nothing is dequantized.
            self._observe(module, prefilling, hidden_states, *shape, kwargs)
            return output
        keys, values = extract_keys_and_values(cache, module.layer_idx)
        state = self._observe(module, prefilling, hidden_states, keys.shape[1], keys.shape[2], kwargs)
        self.update_state(module, state, hidden_states, keys, values, attentions, kwargs)

        k_len = keys.shape[2]
        if k_len <= limit:
            return output
        if prefilling or self.decoding_window <= 0 or "hidden_states" not in state.recent:
            scoring_hidden_states, scoring_kwargs = hidden_states, kwargs
        else:
            scoring_hidden_states, scoring_kwargs = state.recent.scoring_inputs(kwargs)
        scores = self.score(module, scoring_hidden_states, keys, values, attentions, scoring_kwargs)
        check_scores(self, scores, keys)
        indices = top_indices(scores, budget)
        self.on_eviction(module, state, indices, k_len)
        state.gather_entries(indices)
        write_keys_and_values(cache, module.layer_idx, gather_tokens(keys, indices), gather_tokens(values, indices))
        return output

    def _lazy_layer_shape(self, module: nn.Module, cache) -> Optional[tuple[int, int]]:
        """`(H_kv, T)` of a quantized cache layer when this press can skip reading it below the budget (it
        does not override `update_state`, which receives the keys and values); None otherwise. Plain caches return
        their live tensors for free, so they are always read."""
        if overrides_update_state(self):
            return None
        layer = cache.layers[module.layer_idx]
        num_kv_heads = getattr(getattr(module, "config", None), "num_key_value_heads", None)
        if not is_quantized_layer(layer) or not isinstance(num_kv_heads, int):
            return None
        return num_kv_heads, cache_layer_length(cache, module.layer_idx)

    def _observe(
        self,
        module: nn.Module,
        prefilling: bool,
        hidden_states: torch.Tensor,
        num_kv_heads: int,
        k_len: int,
        kwargs: dict,
    ) -> DecodingState:
        """Start (at a prefill) or advance the layer's state with this forward's tokens."""
        states = self.decoding_states
        state = states.get(module.layer_idx)
        bsz, q_len = hidden_states.shape[:2]
        if prefilling or state is None:
            self.validate_cache_budget()
            # A new sequence; a state created mid-sequence knows the earlier tokens only by their number.
            state = DecodingState(seen=0 if prefilling else k_len - q_len, steps=0 if prefilling else 1)
            states[module.layer_idx] = state
        else:
            state.steps += 1
        state.scratch = {}
        positions = self._token_positions(state, kwargs, bsz, q_len, hidden_states.device)
        fill_values = self.entry_fill_values()
        if k_len >= q_len:
            state.align_entries(fill_values, bsz, num_kv_heads, k_len - q_len, hidden_states.device)
            state.append_entries(positions[:, None, :].expand(bsz, num_kv_heads, q_len), fill_values)
        else:
            # An earlier press of a ComposedPress already removed tokens of this very forward: which of them are
            # left is not known here, so every entry restarts from its fill value (position -1: unknown).
            state.entries = {}
            state.align_entries(fill_values, bsz, num_kv_heads, k_len, hidden_states.device)
        if self.decoding_window > 0:
            state.recent.append(hidden_states, kwargs, positions)
        state.recent.keep_last(self.decoding_window)
        state.seen += q_len
        return state

    @staticmethod
    def _token_positions(
        state: DecodingState, kwargs: dict, bsz: int, q_len: int, device: torch.device
    ) -> torch.Tensor:
        """Positions `(B, q)` of this forward's tokens: the model's `position_ids`, else the count of seen tokens."""
        position_ids = position_ids_of(kwargs)
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == q_len:
            return position_ids.to(device=device, dtype=torch.long).expand(bsz, q_len)
        return torch.arange(state.seen, state.seen + q_len, device=device).expand(bsz, q_len)


def overrides_update_state(press: Any) -> bool:
    """Whether `press` keeps statistics of its own in `update_state` (it then reads the keys at every forward)."""
    return type(press).update_state is not CacheBudget.update_state
