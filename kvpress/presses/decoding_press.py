# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""DecodingPress: keep the KV cache at `target_size` tokens while the model generates.

The one idea: a prefill press compresses once, but a reasoning trace can be far longer than its prompt. During
generation every `compression_interval` steps, each layer's cache is scored by a ScorerPress (from the hidden states
of the steps since the last compression, kept in a small buffer) and pruned back to `target_size` tokens, so it
never holds more than `target_size + compression_interval - 1` tokens. Same API and behaviour as upstream kvpress
(https://github.com/NVIDIA/kvpress); the README's "Differences from upstream" lists where it departs.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generator, Optional

import torch
from torch import nn

from kvpress.headwise_masks import masks_inside as masked_entries
from kvpress.headwise_masks import merge_masks as merge_masked_key_indices  # noqa: F401 (re-exported)
from kvpress.headwise_masks import remap_masks as remap_masked_key_indices
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.base_press import BasePress, get_hook_inputs, layer_is_prefilling
from kvpress.presses.scorer_press import ScorerPress
from kvpress.recent_tokens import RecentTokens
from kvpress.token_selection import check_scores, gather_tokens
from kvpress.transformers_adapter import position_ids_of
from kvpress.utils import cache_layer_length, extract_keys_and_values, write_keys_and_values
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

DECODING_SCORERS = (
    "KnormPress, RandomPress, StreamingLLMPress, SnapKVPress, TOVAPress, ExpectedAttentionPress, "
    "ObservedAttentionPress, KeyDiffPress, LagKVPress, CURPress, CapPress, QFilterPress, CriticalKVPress, RKVPress, "
    "RKVLSHPress or your own ScorerPress"
)


def decoding_problem(press: BasePress) -> Optional[str]:
    """Why `press` cannot score a layer's cache during decoding, or None: its `cannot_score_during_decoding`, or an
    opt-out flag (`supports_decoding = False` or `scores_during_decoding = False`)."""
    if press.cannot_score_during_decoding is not None:
        return press.cannot_score_during_decoding
    for flag in ("supports_decoding", "scores_during_decoding"):
        if getattr(press, flag, True) is False:
            return f"it declares {flag} = False"
    return None


def require_decoding_scorer(wrapper: object, press: object, allow_adakv: bool = True) -> None:
    """Raise a clear error unless `press` can rank the cache of a layer during decoding."""
    allowed = f"a ScorerPress that can score during decoding ({DECODING_SCORERS})"
    if allow_adakv:
        allowed += ", or an AdaKVPress around one"
    name = type(wrapper).__name__
    if isinstance(press, AdaKVPress) and allow_adakv:
        require_decoding_scorer(wrapper, press.press, allow_adakv=False)
        return
    if not isinstance(press, ScorerPress):
        raise TypeError(f"{name} needs {allowed}; got {type(press).__name__}.")
    budget = getattr(press, "cache_budget", 0)
    if budget:
        raise ValueError(
            f"{name} sets the size of the cache itself (target_size), so its base press must not have a "
            f"cache_budget (got {type(press).__name__} with cache_budget={budget}): the budget would prune the cache "
            "through the press's own hook, which the wrapper does not run, so it would be silently ignored. Set "
            "cache_budget=0, or use the budget press alone."
        )
    problem = decoding_problem(press)
    if problem is not None:
        raise ValueError(f"{name} cannot use {type(press).__name__} during decoding: {problem}. Use {allowed}.")


def lower_masked_scores(module: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """Give masked entries (already evicted by a head-wise press) the lowest score, so they are removed first."""
    masked = masked_entries(module, scores.shape[-1])
    if masked is None or masked[0].numel() == 0:
        return scores
    scores = scores.clone()
    batch_idx, head_idx, seq_idx = (idx.to(scores.device) for idx in masked)
    scores[batch_idx, head_idx, seq_idx] = float("-inf")
    return scores


@dataclass
class DecodingPress(BasePress):
    """Compress the cache during generation, every `compression_interval` steps, down to `target_size` tokens.

    `base_press` (a ScorerPress, or an AdaKVPress around one) compresses the cached tokens through its `compress`,
    with its `compression_ratio` set for each compression so that exactly `target_size` tokens are kept (kept tokens
    stay in positional order), and this step's attention weights (eager attention; None otherwise), as upstream.
    The press is a no-op during prefill; wrap it in PrefillDecodingPress to also compress the prompt. A layer is
    compressed when `compression_interval` steps passed since its last compression, when a single forward brings
    `target_size` tokens or more (upstream's triggers), and as soon as its cache would exceed
    `target_size + compression_interval - 1` tokens once the scorer has its observations (`observations_needed`), so
    that bound holds after every step, also right after a long prompt.

    The scorer sees the hidden states of the forwards since the layer's last compression (at most the last
    `hidden_states_buffer_size` tokens, never fewer than the current forward's), with their own rotary embeddings
    in place of the current forward's; the buffer is emptied after every compression, as upstream, except for the
    scorer's `required_observations` (SnapKV's and R-KV's window of queries, which upstream cannot serve when it is
    longer than the interval): those last tokens stay, and no compression runs before the buffer holds them. Until a
    layer's first compression the buffer also holds the prompt's last tokens, so that a compression right after a
    long prompt has observations. All state is forgotten when the `with press(model)` block exits (and per layer at each
    prefill).
    """

    base_press: ScorerPress | AdaKVPress
    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer_size: int = 256

    @property
    def acts_during_decoding(self) -> bool:
        """Always: the pipeline keeps this press active while it generates the answer."""
        return True

    def __post_init__(self):
        require_decoding_scorer(self, self.base_press)
        validate_int(self, "compression_interval", self.compression_interval, 1)
        validate_int(self, "target_size", self.target_size, 1)
        validate_int(self, "hidden_states_buffer_size", self.hidden_states_buffer_size, 0)
        if self.base_press.compression_ratio:
            logger.warning(
                "%s sets the compression_ratio of its base press at each compression (to keep target_size tokens); "
                "the base press's compression_ratio=%s is ignored.",
                type(self).__name__,
                self.base_press.compression_ratio,
            )
        self.reset()

    def on_exit(self) -> None:
        """The state is reset when the `with` block exits (exceptions included), as upstream."""
        self.reset()

    def reset(self) -> None:
        """Forget every layer's buffered tokens and step count (done when the `with` block exits, and for each layer
        at every prefill)."""
        self.recent_tokens: defaultdict[int, RecentTokens] = defaultdict(RecentTokens)
        self.layer_step_counts: defaultdict[int, int] = defaultdict(int)

    def reset_layer(self, layer_idx: int) -> None:
        self.recent_tokens.pop(layer_idx, None)
        self.layer_step_counts.pop(layer_idx, None)

    def post_init_from_model(self, model):
        self.base_press.post_init_from_model(model)

    # ----------------------------------------------------------------------------------------- hidden-state buffer
    def remember(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict, prefill: bool = False) -> None:
        """Append the hidden states of this forward (and their cos/sin) to the layer's buffer; of a prefill only the
        last `hidden_states_buffer_size` tokens are kept (until the layer's first compression)."""
        buffer = self.recent_tokens[layer_idx]
        position_ids = position_ids_of(kwargs)
        bsz, q_len = hidden_states.shape[:2]
        positions = None
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == q_len:
            positions = position_ids.expand(bsz, q_len)
        buffer.append(hidden_states, kwargs, positions)
        if prefill:
            buffer.keep_last(self.hidden_states_buffer_size)

    @property
    def scorer(self) -> ScorerPress:
        """The press that scores the tokens: the base press, or the scorer inside an AdaKV base."""
        return self.base_press.press if isinstance(self.base_press, AdaKVPress) else self.base_press

    @property
    def required_observations(self) -> int:
        """Buffered tokens the scorer cannot do without (its `required_observations`)."""
        return int(self.scorer.required_observations)

    def clear_buffer(self, layer_idx: int) -> None:
        """Empty the layer's buffer but for the scorer's required observations: done after every compression, so the
        next one sees only the later steps (and the window of queries the scorer needs)."""
        self.recent_tokens[layer_idx].keep_last(self.required_observations)

    def truncate_buffer(self, layer_idx: int, minimum: int = 0) -> None:
        """Keep the last `max(hidden_states_buffer_size, minimum, required_observations)` tokens of the layer's
        buffer."""
        buffer = self.recent_tokens[layer_idx]
        size = max(self.hidden_states_buffer_size, minimum, self.required_observations)
        if buffer.n_tokens > size:
            buffer.keep_last(size)

    def buffered_inputs(self, layer_idx: int, kwargs: dict) -> tuple[torch.Tensor, dict]:
        """The buffered hidden states `(B, n, hidden)` and the kwargs for the scorer, with matching cos/sin."""
        return self.recent_tokens[layer_idx].scoring_inputs(kwargs)

    # ------------------------------------------------------------------------------------------------ the hook
    def cache_length(self, module: nn.Module, cache, bsz: int) -> float:
        """Tokens per KV head in the layer's cache; with an AdaKV base, the entries not masked (on average)."""
        length = cache_layer_length(cache, int(module.layer_idx))  # type: ignore[arg-type]
        if isinstance(self.base_press, AdaKVPress):
            masked = masked_entries(module, length)
            if masked is not None:
                num_kv_heads = int(module.config.num_key_value_heads)  # type: ignore[union-attr]
                return length - masked[0].numel() / (bsz * num_kv_heads)
        return float(length)

    def observations_needed(self) -> int:
        """Buffered tokens the scorer needs before an early compression (one that upstream's triggers would not make):
        its observation window (`decoding_window`, 0 for scorers that do not read hidden states), at most
        `compression_interval` (upstream's own trigger waits no longer) and the buffer's size."""
        window = int(getattr(self.scorer, "decoding_window", 0) or 0)
        return min(window, self.compression_interval, max(self.hidden_states_buffer_size, 1))

    def over_the_bound(self, layer_idx: int, k_len: float, target: int) -> bool:
        """Whether the layer would exceed `target + compression_interval - 1` and the scorer has its observations
        (after a prefill in the same block the buffer holds the prompt's last tokens, so this fires at once)."""
        if k_len < target + self.compression_interval:
            return False
        return self.recent_tokens[layer_idx].n_tokens >= self.observations_needed()

    def should_compress(self, layer_idx: int, q_len: int, k_len: float, target: int) -> bool:
        if self.recent_tokens[layer_idx].n_tokens < self.required_observations:
            return False  # the scorer's window of queries is not there yet (only right after the block starts)
        return (
            self.layer_step_counts[layer_idx] >= self.compression_interval
            or q_len >= target
            or self.over_the_bound(layer_idx, k_len, target)
        )

    def observe_step(self, module: nn.Module, input: tuple, kwargs: dict) -> Optional[tuple]:
        """The common start of the decoding hooks: remember this forward's hidden states.

        Returns None when the hook has nothing more to do: no cache, or a prefill (a new sequence: the layer's state
        is forgotten and the prompt's last hidden states are kept as observations). Otherwise returns
        `(hidden_states, cache, layer_idx, q_len)`, with the buffer holding at least this step's tokens.
        """
        hidden_states, cache = get_hook_inputs(module, input, kwargs)
        if cache is None:
            return None
        layer_idx: int = int(module.layer_idx)  # type: ignore[arg-type]
        q_len = hidden_states.shape[1]
        if layer_is_prefilling(module, cache, q_len):
            self.reset_layer(layer_idx)
            self.remember(layer_idx, hidden_states, kwargs, prefill=True)
            return None

        self.remember(layer_idx, hidden_states, kwargs)
        self.truncate_buffer(layer_idx, minimum=q_len)  # the scorer sees this step's tokens, at least
        return hidden_states, cache, layer_idx, q_len

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        step = self.observe_step(module, input, kwargs)
        if step is None:
            return output
        hidden_states, cache, layer_idx, q_len = step
        self.layer_step_counts[layer_idx] += 1
        target = self._resolve_target_size(kwargs)
        if self.should_compress(layer_idx, q_len, self.cache_length(module, cache, hidden_states.shape[0]), target):
            keys, values = extract_keys_and_values(cache, layer_idx)
            buffered_states, buffered_kwargs = self.buffered_inputs(layer_idx, kwargs)
            attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            keys, values = self.compress(module, buffered_states, keys, values, attentions, buffered_kwargs)
            write_keys_and_values(cache, layer_idx, keys, values)
            self.layer_step_counts[layer_idx] = 0
            self.clear_buffer(layer_idx)
        self.truncate_buffer(layer_idx)
        return output

    # ------------------------------------------------------------------------------------------------ compression
    @contextmanager
    def base_ratio(self, ratio: float) -> Generator:
        """Temporarily set the base press's compression_ratio (StreamingLLM's score, for one, depends on it)."""
        saved = self.base_press.compression_ratio
        self.base_press.compression_ratio = ratio
        try:
            yield
        finally:
            self.base_press.compression_ratio = saved

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the `target` best tokens of the layer (positional order), or mask down to it with an AdaKV base.

        As upstream, the base press's own `compress` runs, with its ratio set for this compression and this step's
        `attentions` (eager weights `(B, H, q_len, T)`, else None): scorers that can use them do (TOVA), the others
        recompute what they need from the buffered hidden states. When a prefill press left head-wise masks on the
        layer, the same selection (score, then top-k, as `ScorerPress.compress`) is made here instead, so that the
        masked entries go first and the masks that remain are moved with the kept tokens.
        """
        target = self._resolve_target_size(kwargs)
        k_len = keys.shape[2]
        if k_len <= target:
            return keys, values
        ratio = self._find_target_compression_ratio(k_len, target)
        if isinstance(self.base_press, AdaKVPress):
            previous = masked_entries(module, k_len)
            with self.base_ratio(ratio):
                keys, values = self.base_press.compress(module, hidden_states, keys, values, attentions, kwargs)
            merge_masked_key_indices(module, previous)
            return keys, values
        masked = masked_entries(module, k_len)
        if masked is None or masked[0].numel() == 0:
            with self.base_ratio(ratio):
                return self.base_press.compress(module, hidden_states, keys, values, attentions, kwargs)
        with self.base_ratio(ratio):
            scores = self.base_press.score(module, hidden_states, keys, values, attentions, kwargs)
        check_scores(self.base_press, scores, keys)
        scores = lower_masked_scores(module, scores)
        kept = scores.topk(target, dim=-1).indices.sort(dim=-1).values
        remap_masked_key_indices(module, kept, k_len)
        return gather_tokens(keys, kept), gather_tokens(values, kept)

    @staticmethod
    def _find_target_compression_ratio(q_len: int, target_tokens: int) -> float:
        """The compression ratio r with `int(q_len * (1 - r)) == target_tokens` (0 when nothing must go)."""
        if q_len <= target_tokens:
            return 0.0
        ratio = 1 - target_tokens / q_len
        low, high = 0.0, 1.0
        for _ in range(20):
            n_kept = int(q_len * (1 - ratio))
            if n_kept == target_tokens:
                return ratio
            if n_kept > target_tokens:
                low, ratio = ratio, (ratio + high) / 2
            else:
                high, ratio = ratio, (low + ratio) / 2
        if int(q_len * (1 - ratio)) != target_tokens:
            logger.warning(
                "No compression ratio keeps exactly %d of %d tokens; using %.6f (keeps %d).",
                target_tokens,
                q_len,
                ratio,
                int(q_len * (1 - ratio)),
            )
        return ratio

    def _resolve_target_size(self, kwargs: dict) -> int:
        """Number of tokens each layer is compressed to."""
        return self.target_size
