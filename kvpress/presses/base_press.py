# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The press contract: hook every attention layer of a model and compress its KV cache after prefill.

Every registered hook is wrapped by `kvpress.timing`, so any press reports its time and token counts when
`press.latency = True` (`get_timing_metrics()`, `reset_timing()`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Mapping, Optional

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from kvpress.padding import cache_left_padding, padded_batches, padded_prefill
from kvpress.timing import telemetry_of, timed_hook
from kvpress.transformers_adapter import CacheWatch, find_cache, hook_inputs, input_tokens_of, replace_inputs
from kvpress.utils import cache_layer_length, extract_keys_and_values, get_language_model, write_keys_and_values
from kvpress.validation import FieldCheck, integer_check, ratio_check  # noqa: F401 (importable from here)

logger = logging.getLogger(__name__)

SUPPORTED_MODELS = (
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ForCausalLM,
)


def is_prefilling(cache_position: torch.Tensor, q_len: int) -> bool:
    """Upstream's test: the current forward starts at cache position 0."""
    last = cache_position[-1]
    return bool((last.item() if isinstance(last, torch.Tensor) else last) + 1 == q_len)


_PREFILL_FLAG = "_kvpress_prefilling"

# True while `kvpress.chunked_prefill` runs a chunk of a context through the model: every chunk is a prefill, although
# the layers already hold the (compressed) earlier chunks.
PREFILL_CHUNK: ContextVar[bool] = ContextVar("kvpress_prefill_chunk", default=False)

# What a press does under chunked prefill (`BasePress.chunked_prefill`): "exact" keeps the tokens it keeps unchunked,
# "approximate" scores each chunk with what it sees (the kept cache and the chunk), "unsupported" refuses.
CHUNKED_PREFILL_SUPPORT = ("exact", "approximate", "unsupported")

# The `cannot_score_during_decoding` / `cannot_score_new_tokens_alone` of scorers that need every token's hidden state.
NEEDS_EVERY_HIDDEN_STATE = "it recomputes its scores from the hidden states of every cached token (prefill only)"


def layer_is_prefilling(module: nn.Module, cache, q_len: int) -> bool:
    """Whether the forward that just ran on this attention layer was a prefill (it started on an empty layer).

    transformers >= 5.3 no longer passes `cache_position` to attention modules, so the state of the cache layer is
    used instead. Inside `with press(model):` a forward pre-hook records, before the layer runs, whether its cache
    layer had never been filled; that stays right when presses chained by ComposedPress shrink the layer during the
    same forward, and when a layer was compressed to 0 tokens (it is not prefilled again by later tokens). Outside
    (a hook called by hand), the layer is prefilling when it holds no more than the tokens of this forward.
    """
    recorded = getattr(module, _PREFILL_FLAG, None)
    if recorded is not None:
        return bool(recorded)
    return cache_layer_length(cache, module.layer_idx) <= q_len


def _record_prefill_state(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: remember whether this layer's cache is still empty, before the attention appends to it."""
    cache = find_cache(kwargs)
    layer_idx = int(module.layer_idx)  # type: ignore[arg-type]
    if cache is None:
        prefilling = False
    elif layer_idx >= len(cache.layers):
        prefilling = True
    else:
        prefilling = PREFILL_CHUNK.get() or not cache.layers[layer_idx].is_initialized
    object.__setattr__(module, _PREFILL_FLAG, prefilling)


def get_hook_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, object]:
    """The attention input and the cache (read by `kvpress.transformers_adapter`, under any of its names)."""
    return hook_inputs(args, kwargs)


def hook_phase(module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[bool, int, torch.device]]:
    """`(is_prefill, n_tokens, device)` of the forward a hook sees, or None when it runs without a cache."""
    hidden_states, cache = get_hook_inputs(module, args, kwargs)
    if cache is None:
        return None
    bsz, q_len = hidden_states.shape[:2]
    return layer_is_prefilling(module, cache, q_len), bsz * q_len, hidden_states.device


def _pass_through(module: nn.Module, args: tuple, kwargs: dict, output):
    return output


# Attribute of a language model naming the press whose hooks are registered on it (inside `with press(model):`).
_ACTIVE_PRESS = "_kvpress_active_press"


def refuse_nested_press(press: "BasePress", model: nn.Module) -> None:
    """Raise when a press's hooks are already registered on `model`: a second press (or the same one again) inside
    its block would compress the cache a second time, silently (252 tokens to 63 at ratio 0.5)."""
    _refuse_nested_on(press, get_language_model(model))


def _refuse_nested_on(press: "BasePress", language_model: nn.Module) -> None:
    active = language_model.__dict__.get(_ACTIVE_PRESS)
    if active is None:
        return
    name, active_name = type(press).__name__, type(active).__name__
    same = " (the same press object)" if active is press else ""
    raise ValueError(
        f"{name} cannot be applied: {active_name} is already applied to this model{same}, its "
        "`with press(model):` block is still open. Presses applied one inside another compress the cache once each, "
        "one after the other. Apply one press per block (blocks one after the other are fine); to chain presses on "
        f"purpose, use a single ComposedPress([{active_name}(...), {name}(...)]) in one `with` block."
    )


def _continue_at_cache_length(module: nn.Module, args: tuple, kwargs: dict):
    """Decoder forward pre-hook: the new tokens take the positions right after the cached ones (cache length + i).

    After a press re-rotated the kept keys to positions 0..n_kept-1, this is where generation must continue; the
    logical positions that `generate` passes would leave a gap of (prompt length - n_kept) to every cached key."""
    cache = find_cache(kwargs)
    if cache is None or cache.get_seq_length() == 0:
        return None
    tokens = input_tokens_of(args, kwargs)
    if tokens is None:
        return None
    batch, length = tokens.shape[:2]
    past = cache.get_seq_length()
    positions = torch.arange(past, past + length, device=tokens.device).unsqueeze(0).expand(batch, -1)
    padding = cache_left_padding(module)  # a padded batch: each row continues at its own kept length
    if padding is not None:
        positions = positions - padding.to(tokens.device)[:, None]
    return args, replace_inputs(kwargs, position_ids=positions)


# True while `_assign_unchecked` runs: the field checks are skipped for that one assignment (and what it triggers).
_CHECKS_SUSPENDED: ContextVar[bool] = ContextVar("kvpress_field_checks_suspended", default=False)


def _assign_unchecked(press: Any, name: str, value: Any) -> None:
    token = _CHECKS_SUSPENDED.set(True)
    try:
        setattr(press, name, value)
    finally:
        _CHECKS_SUSPENDED.reset(token)


def _field_check(cls: type, name: str) -> Optional[FieldCheck]:
    """The check of field `name` of press class `cls`: the nearest `field_checks` entry along the MRO. None when
    `name` is no dataclass field of `cls`, or is one shadowed by a property (its setter decides: wrappers delegate to
    the inner press, computed ratios refuse to be set)."""
    if name not in getattr(cls, "__dataclass_fields__", {}) or isinstance(getattr(cls, name, None), property):
        return None
    for klass in cls.__mro__:
        checks = klass.__dict__.get("field_checks")
        if checks is not None and name in checks:
            return checks[name]
    return None


@contextmanager
def compression_ratio_set_to(press: Any, ratio: float) -> Generator:
    """`press.compression_ratio` is `ratio` inside the block and its previous value after it.

    For a press that applies a ratio it already validated, to an inner press or to itself: PerLayerCompressionPress's
    per-layer ratios (1 allowed), RestoreKV's enlarged ratio. These two assignments skip the field checks, which
    would refuse 1; the block itself does not."""
    saved = press.compression_ratio
    _assign_unchecked(press, "compression_ratio", ratio)
    try:
        yield
    finally:
        _assign_unchecked(press, "compression_ratio", saved)


@dataclass
class BasePress:
    """Base class of every press.

    `with press(model):` registers `forward_hook` on every attention module of the model; the hook compresses the
    layer's KV cache right after the layer ran on the context (prefill). Subclasses implement `compress`.

    Telemetry (the reasoning fork's API): set `press.latency = True`, run, then read `press.get_timing_metrics()`;
    `press.reset_timing()` zeroes the counters. `press.csv_path` (a file path, default None) turns on the per-step
    eviction log of the presses that write one (H2O, R-KV, R-KV-LSH).
    """

    # Not dataclass fields: plain attributes a user may set on an instance, as in the fork.
    csv_path: ClassVar[Optional[str]] = None

    # Capabilities, declared once on each press class and read by the pipeline, the wrappers, the evaluation CLI and
    # the benchmark (never a press's class name). Also `acts_during_decoding` and `rerotates_kept_keys` below.
    # Whether ComposedPress may chain it (False: it masks head by head, or runs passes of its own).
    composable: ClassVar[bool] = True
    # Whether it masks cache entries head by head (`module.masked_key_indices`) instead of removing tokens.
    head_wise: ClassVar[bool] = False
    # Whether it scores with the attention weights of the whole context, which only eager attention returns.
    needs_attention_weights: ClassVar[bool] = False
    # Why DecodingPress cannot rank a layer's cache by its score from the recent hidden states (None: it can).
    cannot_score_during_decoding: ClassVar[Optional[str]] = None
    # Why DMSPress(decoding=True) cannot score a new token on its own with it (None: it can).
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = None

    # Checks of dataclass fields, by name, run on every assignment: in the constructor and whenever a field is set
    # later (`press.compression_ratio = 1.5` raises the constructor's error). Subclasses declare their own fields'
    # checks in their own `field_checks`; the nearest class along the MRO that names a field gives its check.
    field_checks: ClassVar[Mapping[str, FieldCheck]] = {"compression_ratio": ratio_check()}

    # Under chunked prefill (`kvpress.chunked_prefill`): one of CHUNKED_PREFILL_SUPPORT, set by each press class that
    # supports it. Unsupported by default: a press must be shown to work on a chunk and the kept cache.
    chunked_prefill: ClassVar[str] = "unsupported"

    if not TYPE_CHECKING:  # hidden from mypy, which keeps checking assignments against the declared attributes

        def __setattr__(self, name: str, value: Any) -> None:
            check = _field_check(type(self), name)
            if check is not None and not _CHECKS_SUSPENDED.get():
                value = check(self, name, value)
            super().__setattr__(name, value)

    @property
    def latency(self) -> bool:
        """Whether telemetry is recorded (default False: no overhead, every metric stays 0)."""
        return telemetry_of(self).enabled

    @latency.setter
    def latency(self, value: bool) -> None:
        telemetry_of(self).enabled = bool(value)

    def get_timing_metrics(self) -> dict:
        """`prefill_time`, `decoding_time`, `total_time` (seconds of press work), `total_prefill_tokens`,
        `total_decoding_tokens`, `output_tokens_per_second` (decoding tokens per second of press time, as in the
        fork) and `peak_memory_bytes` (CUDA peak allocation, 0 without CUDA), accumulated since the last reset."""
        return telemetry_of(self).metrics()

    def reset_timing(self) -> None:
        """Zero the telemetry counters (and the CUDA peak-memory statistics when CUDA is in use)."""
        telemetry_of(self).reset()

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        """Initialise model-dependent state (called each time the press is entered). No-op by default."""

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the compressed `(keys, values)` of one layer, `(B, H_kv, T', d)` each."""
        raise NotImplementedError("compress method must be implemented in subclass")

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        """Compress the layer's cache after its attention ran on the context; decoding steps are left alone."""
        hidden_states, cache = get_hook_inputs(module, input, kwargs)
        if cache is None:
            return output
        q_len = hidden_states.shape[1]
        if not layer_is_prefilling(module, cache, q_len):
            return output
        keys, values = extract_keys_and_values(cache, module.layer_idx)
        rows = padded_prefill(module)  # a left-padded batch: each row is compressed alone (kvpress.padding)
        if rows is not None:
            keys, values = rows.compress_rows(self, module, hidden_states, keys, values, output[1], kwargs)
        else:
            keys, values = self.compress(module, hidden_states, keys, values, output[1], kwargs)
        write_keys_and_values(cache, module.layer_idx, keys, values)
        return output

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        """Context manager that applies the press to `model`; hooks are always removed on exit.

        Raises ValueError when a press is already applied to `model` (nested blocks would compress twice): chain
        presses with ComposedPress instead."""
        language_model = get_language_model(model)
        refuse_nested_press(self, model)
        if not isinstance(model, SUPPORTED_MODELS):
            logger.warning(
                "Model %s not tested, supported models: %s",
                type(model).__name__,
                ", ".join(cls.__name__ for cls in SUPPORTED_MODELS),
            )
        self.post_init_from_model(model)
        try:
            with self._hooked(language_model, self.forward_hook), self._positions_after_rerotation(language_model):
                yield
        finally:
            self.on_exit()

    def on_exit(self) -> None:
        """Called when the press's `with` block exits (exceptions included), after its hooks are removed. Presses
        with decoding state (DecodingPress, PrefillDecodingPress) forget it here, as upstream does."""

    @property
    def acts_during_decoding(self) -> bool:
        """Whether the press also compresses while the model generates (the pipeline then keeps it on while it
        answers): DecodingPress, a press with a `cache_budget`, DMSPress(decoding=True), ..."""
        return False

    @property
    def rerotates_kept_keys(self) -> bool:
        """Whether compression moves the kept keys to positions 0..n_kept-1, so that what follows the compressed
        cache continues at position n_kept (KeyRerotationPress, FinchPress with `rerotate_keys`)."""
        return False

    @contextmanager
    def _positions_after_rerotation(self, language_model: nn.Module) -> Generator:
        """Inside `with press(model): model.generate(...)`, tokens after a re-rotated cache continue at the cache
        length, as in the pipeline. Not on models with sliding-window layers: those are not compressed and keep their
        logical positions, so no single position would be right for every layer there (logical positions are kept)."""
        sliding = any(getattr(layer.self_attn, "is_sliding", False) for layer in language_model.layers)
        if not self.rerotates_kept_keys or sliding:
            yield
            return
        handle = language_model.register_forward_pre_hook(_continue_at_cache_length, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def track_timing(self, model: PreTrainedModel) -> Generator:
        """Record telemetry (tokens, and zero press time) without applying the press: for the phases a press does not
        act on, e.g. the pipeline's answer of a press that only compresses the context."""
        with self._hooked(get_language_model(model), _pass_through):
            yield

    @contextmanager
    def _hooked(self, language_model: nn.Module, hook: Callable) -> Generator:
        """Register `hook` (wrapped by the telemetry) and the prefill pre-hook on every compressed attention layer.

        The language model records this press as active while the hooks are registered: a second `_hooked` on the
        same model (another press, or this one again) raises instead of stacking a second set of hooks."""
        _refuse_nested_on(self, language_model)
        handles = []
        attentions = [
            layer.self_attn
            for layer in language_model.layers
            # Sliding-window layers already bound their cache; compressing them would evict from the window.
            if not getattr(layer.self_attn, "is_sliding", False)
        ]
        counting_layer = attentions[0].layer_idx if attentions else None
        timed = timed_hook(self, hook, counting_layer, hook_phase)
        # Never a silent no-op: a forward that returned a cache none of these hooks could find raises.
        watch = CacheWatch(type(self).__name__)

        def watched(module: nn.Module, args: tuple, kwargs: dict, output):
            watch.saw(kwargs, find_cache(kwargs) is not None)
            return timed(module, args, kwargs, output)

        language_model.__dict__[_ACTIVE_PRESS] = self
        try:
            handles.append(language_model.register_forward_pre_hook(watch.enter, with_kwargs=True))
            handles.append(language_model.register_forward_hook(watch.leave, with_kwargs=True))
            for attention in attentions:
                # Plain attribute, not a registered submodule: presses need the shared RoPE of the decoder.
                object.__setattr__(attention, "rotary_emb", language_model.rotary_emb)
                handles.append(attention.register_forward_pre_hook(_record_prefill_state, with_kwargs=True))
                handles.append(attention.register_forward_hook(watched, with_kwargs=True))
            with padded_batches(self, language_model, attentions):
                yield
        finally:
            language_model.__dict__.pop(_ACTIVE_PRESS, None)
            watch.abandon()
            for handle in handles:
                handle.remove()
            for layer in language_model.layers:
                layer.self_attn.__dict__.pop(_PREFILL_FLAG, None)
