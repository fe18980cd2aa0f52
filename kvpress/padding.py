# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Left-padded batches: every row is compressed as if it ran alone.

`tok.padding_side = "left"; model.generate(**tok([long, short], padding=True, return_tensors="pt"))` inside a press
gives, row by row, the greedy tokens each row gives alone:

- at the prefill, a decoder pre-hook reads the 2-D `attention_mask` and records each row's left padding;
- each layer is compressed row by row (`compress_rows`): the row's padding is stripped from its keys, values, hidden
  states, attention weights, RoPE and masks, and the press compresses the row alone, so padding is never scored and
  never kept in place of a real token, and each row keeps what the press keeps of its own length (for a ratio:
  `int(n_real * (1 - compression_ratio))` of its `n_real` real tokens);
- the compressed rows are left-padded again to the longest one; those padding slots are hidden exactly at attention
  time (`hide_padding_slots`, called by `kvpress.attention_patch`), and a head-wise press's masked entries of each
  row move with the row (`module.masked_key_indices`);
- during decoding the decoder receives an all-visible 2-D mask over the compressed cache (the padding slots are
  hidden per layer), and, after a press that re-rotates the kept keys, each row continues at its own kept length.

Right padding, holes in the mask, rows without any token, models with sliding-window layers (Gemma3) and presses
that compress during decoding or run their own passes over the context (`padding_refusal`) are refused with a
ValueError when a padded batch arrives. A batch without padding (the pipeline's batch of 1) takes the usual path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generator, Optional

import torch
from torch import nn

from kvpress.transformers_adapter import attention_mask_of, find_cache, input_tokens_of, replace_inputs, row_kwargs

if TYPE_CHECKING:
    from kvpress.presses.base_press import BasePress

# Attribute (on the language model and on each hooked attention module) holding the `PaddingState` of a press block.
_STATE = "_kvpress_padding"


@dataclass
class PaddingState:
    """The padding of the batch a press block is processing.

    - `input_pad`: left-padding tokens of each row `(B,)` in the current prefill, None when the batch has none;
    - `cache_pad`: by layer index, the padding slots `(B,)` at the start of each row of the compressed layer (set
      once the layer was compressed row by row; empty when nothing was).
    """

    press: Any
    input_pad: Optional[torch.Tensor] = None
    cache_pad: dict = field(default_factory=dict)

    def compress_rows(
        self,
        press: "BasePress",
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: Optional[torch.Tensor],
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`press.compress` on each row alone (its padding stripped), the results left-padded to one tensor."""
        if self.input_pad is None:
            raise RuntimeError("compress_rows runs on a padded prefill only (see padded_prefill).")
        layer_idx = int(module.layer_idx)  # type: ignore[arg-type]
        input_pad = self.input_pad.tolist()
        cache_pad = self.cache_pad.get(layer_idx, self.input_pad).tolist()
        q_len = hidden_states.shape[1]
        previous = getattr(module, "masked_key_indices", None)
        rows, row_masks = [], []
        try:
            for row, (start, cached_start) in enumerate(zip(input_pad, cache_pad)):
                row_attentions = None
                if isinstance(attentions, torch.Tensor):
                    row_attentions = attentions[row : row + 1, :, start:, start:]
                setattr(module, "masked_key_indices", _row_indices(previous, row, cached_start))
                row_keys, row_values = press.compress(
                    module,
                    hidden_states[row : row + 1, start:],
                    keys[row : row + 1, :, cached_start:],
                    values[row : row + 1, :, cached_start:],
                    row_attentions,
                    row_kwargs(kwargs, row, start, q_len),
                )
                rows.append((row_keys, row_values))
                row_masks.append(getattr(module, "masked_key_indices", None))
        except BaseException:
            setattr(module, "masked_key_indices", previous)
            raise
        length = max(row_keys.shape[2] for row_keys, _ in rows)
        bsz, num_kv_heads = keys.shape[:2]
        new_keys = keys.new_zeros(bsz, num_kv_heads, length, rows[0][0].shape[-1])
        new_values = values.new_zeros(bsz, num_kv_heads, length, rows[0][1].shape[-1])
        pads = []
        for row, (row_keys, row_values) in enumerate(rows):
            pad = length - row_keys.shape[2]
            new_keys[row, :, pad:] = row_keys[0]
            new_values[row, :, pad:] = row_values[0]
            pads.append(pad)
        self.cache_pad[layer_idx] = torch.tensor(pads, dtype=torch.long)
        setattr(module, "masked_key_indices", _batch_indices(row_masks, pads, keys.device))
        return new_keys, new_values


def _row_indices(indices: Optional[tuple], row: int, start: int) -> Optional[tuple]:
    """The masked entries `(batch_idx, head_idx, seq_idx)` of batch row `row`, as indices of that row alone whose
    first `start` slots (padding) are cut off; None when it has none."""
    if indices is None:
        return None
    batch_idx, head_idx, seq_idx = indices
    selected = (batch_idx == row) & (seq_idx >= start)
    if not bool(selected.any()):
        return None
    return torch.zeros_like(batch_idx[selected]), head_idx[selected], seq_idx[selected] - start


def _batch_indices(row_masks: list, pads: list, device: torch.device) -> Optional[tuple]:
    """The head-wise masked entries of the re-padded batch: each row's own, shifted past its padding slots; None when
    no row has any."""
    parts = []
    for row, (masked, pad) in enumerate(zip(row_masks, pads)):
        if masked is not None:
            batch_idx, head_idx, seq_idx = (index.to(device) for index in masked)
            parts.append((torch.full_like(batch_idx, row), head_idx, seq_idx + pad))
    if not parts:
        return None
    return tuple(torch.cat([part[i] for part in parts]) for i in range(3))


def hide_padding_slots(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any) -> Any:
    """The attention mask of a layer compressed row by row, with each row's padding slots hidden exactly (for every
    query, whatever it is: a fake key would not hide them from an all-zero query); `attention_mask` unchanged
    elsewhere. Called by `kvpress.attention_patch` for backends that take a mask."""
    state = module.__dict__.get(_STATE)
    pad = state.cache_pad.get(getattr(module, "layer_idx", None)) if state is not None else None
    if pad is None:
        return attention_mask
    bsz, _, q_len, _ = query.shape
    k_len = key.shape[2]
    if pad.shape[0] != bsz or k_len <= q_len:
        return attention_mask
    slots = torch.arange(k_len, device=query.device)
    allowed = (slots[None, :] >= pad.to(query.device)[:, None])[:, None, None, :]
    allowed = allowed & torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(diagonal=k_len - q_len)
    if isinstance(attention_mask, torch.Tensor):
        given = attention_mask[..., -k_len:]
        allowed = allowed & (given if given.dtype == torch.bool else given == 0)
        if attention_mask.dtype == torch.bool:
            return allowed
        dtype = attention_mask.dtype
    else:
        dtype = query.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=query.device).masked_fill(~allowed, torch.finfo(dtype).min)


def padding_refusal(press: Any) -> Optional[str]:
    """Why `press` cannot compress a padded batch row by row, or None when it can.

    Row by row works for every press that compresses through `compress` at the prefill (scorers, head-wise presses,
    wrappers such as AdaKV, ChunkPress, KeyRerotationPress, and ComposedPress / PerLayerCompressionPress around
    them). Presses that prune during decoding keep per-step state for the whole batch, and presses with their own
    entry or hook (KVzip-style repeat passes, FinchPress, KVCompose, ...) run passes this module does not split."""
    from kvpress.presses.base_press import BasePress
    from kvpress.presses.composed_press import ComposedPress
    from kvpress.presses.full_press import FullPress
    from kvpress.presses.h2o_press import H2OPress
    from kvpress.presses.per_layer_compression_press import PerLayerCompressionPress
    from kvpress.presses.scorer_press import ScorerPress

    name = type(press).__name__
    if getattr(press, "acts_during_decoding", False):
        return (
            f"{name} also compresses during decoding (a cache_budget, or a decoding press), which is not done row "
            "by row"
        )
    if type(press).__call__ is not BasePress.__call__:
        return f"{name} runs its own passes over the context when applied, which are not done row by row"
    if isinstance(press, ComposedPress):
        for inner in press.presses:
            reason = padding_refusal(inner)
            if reason is not None:
                return reason
        return None
    if isinstance(press, PerLayerCompressionPress):
        return padding_refusal(press.press)
    hook = type(press).forward_hook
    if hook not in (BasePress.forward_hook, ScorerPress.forward_hook, H2OPress.forward_hook, FullPress.forward_hook):
        return f"{name} compresses through its own hook, which does not compress row by row"
    return None


def left_padding(mask: torch.Tensor) -> torch.Tensor:
    """Left-padding tokens `(B,)` of a 2-D attention mask (1 = token, 0 = padding); ValueError unless every row is
    padding followed by tokens, with at least one token."""
    visible = mask != 0
    n_tokens = visible.sum(dim=1)
    if bool((n_tokens == 0).any()):
        rows = (n_tokens == 0).nonzero().flatten().tolist()
        raise ValueError(f"Rows {rows} of the attention_mask have no token (all padding); give each row a token.")
    pad = mask.shape[1] - n_tokens
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] >= pad[:, None]
    if not torch.equal(visible, expected):
        right = torch.arange(mask.shape[1], device=mask.device)[None, :] < n_tokens[:, None]
        if torch.equal(visible, right):
            raise ValueError(
                "Right padding is not supported by presses: the padding would sit between a row's context and the "
                "tokens generated after it. Pad on the left (tokenizer.padding_side = 'left')."
            )
        raise ValueError(
            "The attention_mask has padding inside a row (a 0 after a 1); presses support left padding only "
            "(tokenizer.padding_side = 'left')."
        )
    return pad.cpu()


def padded_prefill(module: nn.Module) -> Optional[PaddingState]:
    """The padding state of an attention module during a padded prefill inside a press block, else None."""
    state = module.__dict__.get(_STATE)
    return state if state is not None and state.input_pad is not None else None


def cache_left_padding(language_model: nn.Module) -> Optional[torch.Tensor]:
    """Padding slots `(B,)` at the start of each row of the first layer's compressed cache (the layer whose length
    transformers reads), None when the cache was not compressed row by row."""
    state = language_model.__dict__.get(_STATE)
    if state is None or not state.cache_pad:
        return None
    return state.cache_pad[min(state.cache_pad)]


def _before_decoder(state: PaddingState, language_model: nn.Module):
    sliding = any(getattr(layer.self_attn, "is_sliding", False) for layer in language_model.layers)

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        mask = attention_mask_of(kwargs)
        tokens = input_tokens_of(args, kwargs)
        cache = find_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool((mask != 0).all())
        name = type(state.press).__name__
        if past == 0:
            state.input_pad, state.cache_pad = None, {}
            if not padded:
                return None
            pad = left_padding(mask)
            reason = padding_refusal(state.press)
            if reason is None and sliding:
                reason = "the model has sliding-window layers, which presses leave uncompressed"
            if reason is None and "flash" in str(getattr(language_model.config, "_attn_implementation", "")):
                reason = "flash attention takes no mask that could hide the padding slots of the compressed rows"
            if reason is not None:
                raise ValueError(
                    f"{name} cannot compress a padded batch: {reason}. Run the rows one at a time (or as a batch of "
                    "rows of equal length, without padding)."
                )
            state.input_pad = pad
            return None
        state.input_pad = None
        if not state.cache_pad:
            # nothing was compressed row by row: the cache keeps the layout the mask describes
            return None
        q_len = tokens.shape[1] if tokens is not None else 0
        if (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and not bool((mask[:, mask.shape[1] - q_len :] != 0).all())
        ):
            raise ValueError(
                f"{name}: the tokens that follow a compressed padded batch must not be padding (the attention_mask "
                "has a 0 among the new tokens); pad on the left, before the context only."
            )
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        # The padding slots of the compressed layers are hidden per layer (masked_key_indices): every cached entry
        # is otherwise visible, and the new tokens follow.
        visible = mask.new_ones(mask.shape[0], past + q_len)
        return args, replace_inputs(kwargs, attention_mask=visible)

    return hook


@contextmanager
def padded_batches(press: Any, language_model: nn.Module, attentions: list) -> Generator:
    """Inside a press block: record the padding of each prefill and compress padded batches row by row."""
    state = PaddingState(press=press)
    language_model.__dict__[_STATE] = state
    for attention in attentions:
        object.__setattr__(attention, _STATE, state)
    handle = language_model.register_forward_pre_hook(_before_decoder(state, language_model), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        language_model.__dict__.pop(_STATE, None)
        for attention in attentions:
            attention.__dict__.pop(_STATE, None)
