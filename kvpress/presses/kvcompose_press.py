# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KVComposePress: attention-guided composite tokens with layer-adaptive budgets
(KVCompose, https://arxiv.org/abs/2509.05165).

The one idea: score each context token per head by the attention it receives when the context is read again,
let every head rank its own tokens, and align the heads' i-th best tokens into one "composite token"; composite
tokens compete globally across layers, so informative layers get larger budgets while every head of a layer keeps
the same number of entries (a uniform cache layout).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Generator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from kvpress.attention_weights import causal_attention_chunks
from kvpress.headwise_masks import set_masks
from kvpress.presses.base_press import BasePress, get_hook_inputs
from kvpress.resources import text_config
from kvpress.token_selection import gather_tokens
from kvpress.transformers_adapter import (
    attention_mask_of,
    decoder_call,
    decoder_inputs_of,
    find_cache,
    input_ids_of,
    input_tokens_of,
    output_cache,
    position_ids_of,
)
from kvpress.utils import (
    cache_layer_length,
    extract_keys_and_values,
    get_language_model,
    restore_cache,
    snapshot_cache,
    validate_compression_ratio,
    write_keys_and_values,
)
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

# Upper bound on the number of attention weights materialised at once when they are recomputed (float32).
# Added to the best `keep_token_lower_bound` composite scores so that they always win.
_KEEP_BONUS = 1e9


class Aggregator:
    """Running reduction of vectors of length `n`: `partial_fit` folds every row of its input (all dimensions but
    the last are reduced), `transform` returns the current result."""

    neutral: float = 0.0

    def __init__(self, n: int, device: torch.device | str | None = None):
        self.n = n
        self.device = device
        self.reset()

    def reset(self) -> "Aggregator":
        self.data = torch.full((self.n,), self.neutral, dtype=torch.float32, device=self.device)
        return self

    def _rows(self, x) -> torch.Tensor:
        rows = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        rows = rows.to(device=self.data.device, dtype=torch.float32)
        if rows.dim() == 0 or rows.shape[-1] != self.n:
            raise ValueError(
                f"{type(self).__name__} aggregates vectors of length {self.n}, got shape {tuple(rows.shape)}."
            )
        return rows.reshape(-1, self.n)

    def partial_fit(self, x) -> "Aggregator":
        raise NotImplementedError

    def transform(self) -> torch.Tensor:
        return self.data

    def fit(self, x) -> "Aggregator":
        return self.reset().partial_fit(x)

    def fit_transform(self, x) -> torch.Tensor:
        return self.fit(x).transform()


class MaxAggregator(Aggregator):
    """Element-wise maximum of every row seen."""

    neutral = float("-inf")

    def partial_fit(self, x) -> "Aggregator":
        rows = self._rows(x)
        if rows.shape[0] > 0:
            self.data = torch.maximum(self.data, rows.max(dim=0).values)
        return self


class MeanAggregator(Aggregator):
    """Element-wise mean of every row seen."""

    neutral = 0.0

    def reset(self) -> "Aggregator":
        super().reset()
        self.sum = torch.zeros(self.n, dtype=torch.float32, device=self.device)
        self.count = 0
        return self

    def partial_fit(self, x) -> "Aggregator":
        rows = self._rows(x)
        if rows.shape[0] > 0:
            self.sum = self.sum + rows.sum(dim=0)
            self.count += rows.shape[0]
            self.data = self.sum / self.count
        return self


aggregator_by_name: dict[str, type[Aggregator]] = {"mean": MeanAggregator, "max": MaxAggregator}


@dataclass
class KVComposePress(BasePress):
    """Compress the context with composite tokens; `structured=False` gives head-wise budgets instead.

    Inside `with press(model):`, a prefill (a forward on an empty cache) is followed, in the same forward, by one
    scoring pass per registered prompt (by default the context itself is read again) on the cache; the attention
    each context token receives from those queries is aggregated with `agg_task` (per query head), then `agg_group`
    (over the query heads of a KV head), optionally multiplied by value norms (`add_v_norm`) and raised by the
    layer's mean over heads (`add_mean_across_heads`). The scoring tokens are then removed and the cache
    compressed:

    - every head sorts its scores; aggregating the sorted vectors over heads (`agg_head`) gives the layer's
      composite tokens; the top `int(n * (1 - compression_ratio))` composite tokens over all layers set each
      layer's budget (the first layer gets the largest), and each head keeps its own best tokens within it
      (`structured=True`: layers of different lengths, heads of equal length);
    - with `structured=False`, the per-head sorted scores compete globally instead, and the pruned entries are
      masked (`module.masked_key_indices`), leaving the cache dense.

    `keep_token_lower_bound` tokens per head and per layer are always kept. Works under every attention backend
    (attention weights are recomputed when the model does not return them). The cache temporarily grows to about
    twice the context during the prefill.
    """

    structured: bool = True
    compression_ratio: float = 0.0
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0

    # Needs its own context manager (the extra scoring pass), which a ComposedPress never enters.
    composable: ClassVar[bool] = False
    head_wise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        validate_compression_ratio(self.compression_ratio)
        for name in ("agg_task", "agg_group", "agg_head"):
            value = getattr(self, name)
            if value not in aggregator_by_name:
                raise ValueError(f"KVComposePress.{name} must be one of {sorted(aggregator_by_name)}, got {value!r}.")
        validate_int(None, "keep_token_lower_bound", self.keep_token_lower_bound, 0, bound="a non-negative integer")
        self.prompt_ids: list[torch.Tensor] = []
        self._scoring = False
        self._prefilling = False
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.task_aggregators: list[list[Aggregator]] = []
        self.cache: Any = None
        self.context_ids: Optional[torch.Tensor] = None
        self.context_len = 0
        self.scores: Optional[torch.Tensor] = None
        self.composite_scores_per_head: Optional[torch.Tensor] = None
        self.composite_scores_per_layer: Optional[torch.Tensor] = None
        self.important_per_head: Optional[np.ndarray] = None
        self.important_per_layer: Optional[np.ndarray] = None
        self.important_masks: Optional[torch.Tensor] = None

    def _register_model(self, model: PreTrainedModel) -> None:
        language_model = get_language_model(model)
        config = text_config(model)
        self.layer_ids = [
            i for i, layer in enumerate(language_model.layers) if not getattr(layer.self_attn, "is_sliding", False)
        ]
        self.num_layers = len(self.layer_ids)
        self.num_att_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_kv_groups = self.num_att_heads // self.num_kv_heads
        self.device = next(model.parameters()).device
        self._attention_modules = [layer.self_attn for layer in language_model.layers]

    def register_context_ids(self, context_ids: Optional[torch.Tensor], context_len: Optional[int] = None) -> None:
        """Start scoring a context: its ids `(B, C)` (None when the model got embeddings, then give `context_len`)."""
        self.context_ids = context_ids
        self.context_len = int(context_ids.shape[-1]) if context_len is None else int(context_len)
        task = aggregator_by_name[self.agg_task]
        self.task_aggregators = [
            [task(self.context_len, device=self.device) for _ in range(self.num_att_heads)]
            for _ in range(self.num_layers)
        ]

    def register_prompt_ids(self, prompt_ids: Sequence[torch.Tensor]) -> None:
        """Score the context with these prompts (token ids, `(n,)` or `(1, n)`) instead of the context itself.

        They are used by every prefill until the press's context manager exits.
        """
        prompts = []
        for prompt in prompt_ids:
            prompt = torch.as_tensor(prompt)
            prompt = prompt[None] if prompt.dim() == 1 else prompt
            if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
                raise ValueError(
                    f"Each prompt must be a non-empty 1-D tensor of token ids, got shape {tuple(prompt.shape)}."
                )
            prompts.append(prompt.long())
        self.prompt_ids = prompts

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        logger.warning(
            "KVComposePress temporarily creates a KV cache of ~2x the context length during prefill; "
            "plan memory accordingly."
        )
        self._register_model(model)
        base_model = model.model
        hooks = [
            base_model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
            base_model.register_forward_hook(self._model_forward_hook, with_kwargs=True),
        ]
        try:
            with super().__call__(model):
                yield
        finally:
            for hook in hooks:
                hook.remove()
            self._scoring = False
            self.prompt_ids = []
            self._reset_state()

    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._scoring:
            return
        cache = find_cache(kwargs)
        self._prefilling = cache is None or all(
            cache_layer_length(cache, i) == 0 for i in range(len(getattr(cache, "layers", [])))
        )

    def _model_forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if self._scoring or not self._prefilling:
            return output
        self._prefilling = False
        cache = output_cache(output)
        if cache is None:
            logger.warning("KVComposePress: the prefill ran without a cache (use_cache=False); nothing compressed.")
            return output
        inputs = decoder_inputs_of(args, kwargs)
        context = input_tokens_of((), inputs)
        if context is None:
            raise ValueError("KVComposePress could not find the prefill's input_ids or inputs_embeds.")
        if self.compression_ratio == 0:
            return output
        self.register_context_ids(input_ids_of((), inputs), context.shape[1])
        self.cache = cache
        snapshot = snapshot_cache(cache)
        self._scoring = True
        try:
            with torch.no_grad():
                for replay in self._scoring_inputs(module, inputs, context.shape[0]):
                    module(**replay)
                    restore_cache(cache, snapshot)
        finally:
            self._scoring = False
            restore_cache(cache, snapshot)
        self.compress_cache()
        self.task_aggregators = []
        self.cache = None
        return output

    def _scoring_inputs(self, decoder: nn.Module, inputs: dict, bsz: int) -> list[dict]:
        """The keyword arguments of each scoring pass: the context again, or each registered prompt."""
        context_len = self.context_len
        mask = attention_mask_of(inputs)
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        position_ids = position_ids_of(inputs)
        if position_ids is not None and position_ids.dim() == 2:
            next_position = position_ids.max(dim=-1, keepdim=True).values + 1
        else:
            position_ids, next_position = None, torch.full((bsz, 1), context_len, device=self.device)
        replays = []
        if not self.prompt_ids:
            offsets = torch.arange(context_len, device=next_position.device)[None]
            positions = (position_ids + next_position) if position_ids is not None else next_position + offsets
            replay_mask = torch.cat([mask, mask], dim=1) if mask is not None else None
            replays.append(decoder_call(decoder, inputs, self.cache, None, positions, replay_mask))
        for prompt in self.prompt_ids:
            tokens = prompt.to(next_position.device).expand(bsz, -1)
            positions = next_position + torch.arange(prompt.shape[1], device=next_position.device)[None]
            replay_mask = torch.cat([mask, mask.new_ones(bsz, prompt.shape[1])], dim=1) if mask is not None else None
            replays.append(decoder_call(decoder, inputs, self.cache, tokens, positions, replay_mask))
        return replays

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        """During a scoring pass, fold the attention the context tokens receive into the task aggregators."""
        if not self._scoring:
            return output
        hidden_states, cache = get_hook_inputs(module, input, kwargs)
        layer = self.layer_ids.index(module.layer_idx)
        keys, _ = extract_keys_and_values(cache, module.layer_idx)
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(attentions, torch.Tensor) and attentions.shape[-1] == keys.shape[2]:
            chunks = [(0, attentions.shape[2], attentions[..., : self.context_len].float())]
        else:
            chunks = causal_attention_chunks(module, hidden_states, keys, kwargs, self.context_len)
        aggregators = self.task_aggregators[layer]
        for _, _, weights in chunks:
            for head, aggregator in enumerate(aggregators):
                aggregator.partial_fit(weights[:, head])
        return output

    # ------------------------------------------------------------------ scores and budgets
    def compute_scores(self) -> torch.Tensor:
        """Per (layer, KV head) token scores `(L, H_kv, C)`: the task scores aggregated over each GQA group."""
        group = aggregator_by_name[self.agg_group]
        scores = torch.empty(self.num_layers, self.num_kv_heads, self.context_len, device=self.device)
        for layer, aggregators in enumerate(self.task_aggregators):
            for kv_head in range(self.num_kv_heads):
                reducer = group(self.context_len, device=self.device)
                for head in range(kv_head * self.num_kv_groups, (kv_head + 1) * self.num_kv_groups):
                    reducer.partial_fit(aggregators[head].transform())
                scores[layer, kv_head] = reducer.transform()
        self.scores = scores
        return scores

    def enhance_scores(self) -> torch.Tensor:
        """Optionally weight the scores by value norms, then add each layer's mean over heads."""
        scores = self.scores
        if self.add_v_norm:
            for layer, layer_idx in enumerate(self.layer_ids):
                values = extract_keys_and_values(self.cache, layer_idx)[1][..., : self.context_len, :]
                scores[layer] = scores[layer] * values.float().norm(dim=-1).mean(dim=0).to(scores.device)
        if self.add_mean_across_heads:
            scores = scores + scores.mean(dim=1, keepdim=True)
        self.scores = scores
        return scores

    def compute_composite_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted per-head scores `(L, H_kv, C)` and the per-layer composite scores `(L, C)`."""
        bound = min(self.keep_token_lower_bound, self.context_len)
        per_head = self.scores.sort(dim=-1, descending=True).values
        per_head[..., :bound] += _KEEP_BONUS
        per_layer = torch.empty(self.num_layers, self.context_len, device=per_head.device)
        reducer = aggregator_by_name[self.agg_head](self.context_len, device=per_head.device)
        for layer in range(self.num_layers):
            per_layer[layer] = reducer.fit_transform(per_head[layer])
        per_layer[:, :bound] += _KEEP_BONUS
        per_layer[0] = per_layer.max(dim=0).values
        self.composite_scores_per_head, self.composite_scores_per_layer = per_head, per_layer
        return per_head, per_layer

    def compute_important_per_layer(self) -> None:
        """How many tokens each (layer, head) and each layer keeps: the winners of a global top-k."""
        per_head, per_layer = self.compute_composite_scores()
        n_kept = int(per_head.numel() * (1 - self.compression_ratio))
        winners = per_head.flatten().topk(n_kept).indices // self.context_len
        counts = torch.bincount(winners, minlength=self.num_layers * self.num_kv_heads)
        self.important_per_head = counts.view(self.num_layers, self.num_kv_heads).cpu().numpy()
        n_kept = int(per_layer.numel() * (1 - self.compression_ratio))
        winners = per_layer.flatten().topk(n_kept).indices // self.context_len
        self.important_per_layer = torch.bincount(winners, minlength=self.num_layers).cpu().numpy()

    def prepare_important_masks(self) -> torch.Tensor:
        """Bool `(L, H_kv, C)`: the tokens each head keeps (its best ones, within its layer's or its own budget)."""
        self.compute_scores()
        self.enhance_scores()
        self.compute_important_per_layer()
        if self.structured:
            counts = torch.as_tensor(self.important_per_layer)[:, None].expand(-1, self.num_kv_heads)
        else:
            counts = torch.as_tensor(self.important_per_head)
        order = self.scores.argsort(dim=-1, descending=True, stable=True)
        ranks = order.argsort(dim=-1)
        self.important_masks = ranks < counts.to(ranks.device)[..., None]
        return self.important_masks

    # ------------------------------------------------------------------ compression
    def compress_cache(self, model: Optional[PreTrainedModel] = None) -> None:
        """Compress `self.cache` (holding exactly the context) with the prepared masks."""
        if model is not None:
            self._register_model(model)
        self.prepare_important_masks()
        if self.structured:
            self.compress_structured()
        else:
            self.compress_unstructured()

    def compress_structured(self) -> None:
        """Keep, in every layer, its budget of best tokens in each head (layers get different lengths)."""
        cache = self.cache
        for layer, layer_idx in enumerate(self.layer_ids):
            keys, values = extract_keys_and_values(cache, layer_idx)
            mask = self.important_masks[layer].to(keys.device)
            count = int(self.important_per_layer[layer])
            indices = mask.nonzero()[:, 1].view(self.num_kv_heads, count)
            indices = indices[None].expand(keys.shape[0], -1, -1)
            write_keys_and_values(cache, layer_idx, gather_tokens(keys, indices), gather_tokens(values, indices))

    def compress_unstructured(self, model: Optional[PreTrainedModel] = None) -> None:
        """Mask the entries each head does not keep (`module.masked_key_indices`); the cache keeps its length."""
        if model is not None:
            self._register_model(model)
        keys, _ = extract_keys_and_values(self.cache, self.layer_ids[0])
        bsz, device = keys.shape[0], keys.device
        for layer, layer_idx in enumerate(self.layer_ids):
            pruned = ~self.important_masks[layer]
            masked = pruned[None].expand(bsz, -1, -1).to(device)
            indices = masked.nonzero(as_tuple=True) if bool(masked.any()) else None
            # read by the patched attention at every later (non-prefill) attention call of this layer
            set_masks(self._attention_modules[layer_idx], indices)
