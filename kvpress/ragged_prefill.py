# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Compact each layer into the ragged cache during the prefill, so that the dense caches of all layers never coexist.

`RaggedCache.from_cache` copies a cache once the whole prefill has run: until then every layer holds its full dense
(masked) keys and values, so the prefill peak of a head-wise press is the peak without compression. Inside
`ragged_prefill(model, extra_tokens)`, layer i is compacted as soon as its forward is over (its press hooks wrote
its head-wise masks): its kept entries move into a `RaggedLayer` and its dense keys and values are dropped before
layer i + 1 runs. The prefill then holds the kept entries of the layers already run plus one layer's full KV.

    with press(model), ragged_prefill(model, extra_tokens=64) as cache:
        model.generate(input_ids, cache=cache, max_new_tokens=32)  # `past_key_values=` before transformers 5.24
        # or model(context_ids, cache=cache) (one forward for the whole context), then decode with `cache`
    # the attention modules read their ragged layers until RaggedCache.detach(model)

The cache is the one `RaggedCache.from_cache` builds from the same prefill (the same conversion,
`ragged_layer_from`, on the same masks). Layer i is compacted when the next attention module starts (or when the
decoder's forward ends, for the last layer), so all of layer i's hooks have run whichever block was entered first.

Only presses whose masks of a layer are final once that layer ran can be compacted this way
(`prefill_compaction_problem`): those that run passes of their own over the context after the layers (KVzip,
FastKVzip, RestoreKV, KVCompose score every layer with a second pass or a hook on the whole model; DecodingPress,
PrefillDecodingPress and Finch wrap their own context managers) need every dense layer after the prefill and keep
`RaggedCache.from_cache`. The context must be prefilled in one forward (a later chunk would find ragged layers that
its press cannot compress).
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import contextmanager
from typing import Any, Generator, Optional

import torch
from transformers.cache_utils import DynamicLayer

from kvpress.chunked_mlp import DEFAULT_SLICE_TOKENS, mlp_in_slices
from kvpress.headwise_masks import clear_masks
from kvpress.ragged_cache import (
    RaggedCache,
    attention_modules_by_layer,
    decoding_eviction_problem,
    log_once,
    ragged_layer_from,
)
from kvpress.transformers_adapter import find_cache
from kvpress.utils import get_language_model

logger = logging.getLogger(__name__)


def prefill_compaction_problem(press: Any) -> Optional[str]:
    """Why the layers cannot be compacted one by one during a prefill with `press` (None when they can): the press
    must write each layer's masks in that layer's forward hook (BasePress's own context manager)."""
    from kvpress.presses.base_press import BasePress

    if press is None:
        return None
    if not isinstance(press, BasePress):
        raise TypeError(f"press must be a BasePress or None, got {type(press).__name__}")
    from kvpress.presses.composed_press import ComposedPress

    if isinstance(press, ComposedPress):
        return next((problem for inner in press.presses if (problem := prefill_compaction_problem(inner))), None)
    if type(press).__call__ is not BasePress.__call__:
        return (
            f"{type(press).__name__} runs with a context manager of its own (passes over the context or hooks beyond "
            "the layers' forward hooks), so every layer's dense cache must stay until the prefill ends"
        )
    if type(press).on_exit is not BasePress.on_exit:
        return (
            f"{type(press).__name__} keeps a decoding state of its own across its block (a wrapper that also "
            "compresses while decoding), so its layers are converted once the prefill ends"
        )
    return None


def _compact(cache: RaggedCache, modules: dict, below: int, extra_tokens: int, keep_masks: bool) -> None:
    """Move every filled full-attention dense layer of `cache` with index < `below` into a ragged layer, drop its
    dense tensors (and, unless `keep_masks`, the masks it applied) and attach it to its attention module."""
    for layer_idx in range(min(below, len(cache.layers))):
        layer = cache.layers[layer_idx]
        if type(layer) is not DynamicLayer or not layer.is_initialized or getattr(layer, "keys", None) is None:
            continue  # already ragged, a sliding window (left as it is), or not run yet
        if layer.keys.dim() != 4:
            raise ValueError(
                f"layer {layer_idx} holds keys of shape {tuple(layer.keys.shape)}, not (batch, kv_heads, seq, d)"
            )
        ragged = ragged_layer_from(layer, modules.get(layer_idx), extra_tokens)
        cache.layers[layer_idx] = ragged
        layer.keys = layer.values = None  # the dense tensors go now, before the next layer runs
        layer.is_initialized = False
        module = modules.get(layer_idx)
        if not keep_masks and module is not None:
            clear_masks(module)  # applied: 24 bytes per dropped entry that would stay resident for every layer
        logger.debug("ragged_prefill: layer %d compacted to %d rows", layer_idx, ragged.keys.shape[0])
    cache.attach_layers(modules)


@contextmanager
def ragged_prefill(
    model: torch.nn.Module,
    extra_tokens: int,
    cache: Optional[RaggedCache] = None,
    keep_masks: bool = True,
    mlp_slice_tokens: Optional[int] = DEFAULT_SLICE_TOKENS,
) -> Generator[RaggedCache, None, None]:
    """Yield an empty RaggedCache (`cache`, or a new one for `model`'s config) whose layers are compacted one by one
    while a forward prefills it (see the module's docstring), with room for `extra_tokens` more tokens per segment.

    `keep_masks`: whether each layer's head-wise masks stay recorded on its attention module once applied (as after
    `RaggedCache.from_cache`). Presses acting during decoding read them back (DMS counts them, DecodingPress merges
    with them); otherwise `keep_masks=False` drops them at once (three int64 indices per dropped entry: at 0.8,
    about a fifth of the kept keys and values at head_dim 128 in bf16).

    `mlp_slice_tokens`: inside the block the decoder layers' MLPs run over that many tokens at a time
    (`kvpress.chunked_mlp`, the same output): with the cache compacted layer by layer, the MLP activations are what is
    left of the prefill's peak, and this bounds them. None runs them whole.

    On leaving the block the hooks are removed; the ragged layers stay attached to the attention modules for
    decoding (`RaggedCache.detach(model)` afterwards, as after `RaggedCache.from_cache`), except after an error."""
    if isinstance(extra_tokens, bool) or not isinstance(extra_tokens, int) or extra_tokens < 0:
        raise ValueError(f"extra_tokens must be a non-negative integer, got {extra_tokens!r}")
    if not isinstance(keep_masks, bool):
        raise TypeError(f"keep_masks must be True or False, got {keep_masks!r}")
    if cache is None:
        cache = RaggedCache(config=model.config)
    elif not isinstance(cache, RaggedCache):
        raise TypeError(f"cache must be a RaggedCache (or None for a new one), got {type(cache).__name__}")
    elif cache.get_seq_length() > 0:
        raise ValueError(
            f"ragged_prefill needs an empty cache, got one holding {cache.get_seq_length()} tokens: pass a new "
            "RaggedCache (or none) for every context"
        )
    modules = attention_modules_by_layer(model)
    target = cache

    def before_attention(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # every hook of the layers before this one has run: their masks are final
        if find_cache(kwargs) is target:
            _compact(target, modules, int(module.layer_idx), extra_tokens, keep_masks)

    def after_decoder(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if find_cache(kwargs) is target:
            _compact(target, modules, len(target.layers), extra_tokens, keep_masks)

    handles = [module.register_forward_pre_hook(before_attention, with_kwargs=True) for module in modules.values()]
    handles.append(get_language_model(model).register_forward_hook(after_decoder, with_kwargs=True))
    slices = mlp_in_slices(model, mlp_slice_tokens) if mlp_slice_tokens is not None else contextlib.nullcontext()
    try:
        with slices:
            yield cache
    except BaseException:
        RaggedCache.detach(model)
        raise
    finally:
        for handle in handles:
            handle.remove()


def compacts_during_prefill(
    press: Any, decoding_press: Any, chunk_size: Optional[int], context_length: int, own_cache: bool = True
) -> bool:
    """Whether a prefill of `context_length` tokens with `press` (in chunks of `chunk_size`, None for one forward)
    can compact its layers one by one into a ragged cache, for decoding with `decoding_press` (the press acting
    during decoding, or None) in a cache the caller made (`own_cache`; a cache a user passes keeps its dense
    compressed context). When it cannot, the log says why once: the ragged cache is then built after the prefill
    (`RaggedCache.from_cache`), or not at all when the decoding press resizes the cache."""
    if not own_cache:
        log_once("ragged_cache: the cache was passed in, so it is copied after the prefill and left dense")
        return False
    if decoding_eviction_problem(decoding_press) is not None:
        return False  # no ragged cache at all: ragged_cache_for says why
    problem = prefill_compaction_problem(press)
    if problem is None and chunk_size is not None and chunk_size < context_length:
        problem = "the context is prefilled in chunks, and a press cannot compress a later chunk into ragged layers"
    if problem is not None:
        log_once(f"ragged_cache: converting after the prefill, not layer by layer ({problem})")
        return False
    return True
