# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Shared helpers: pre-RoPE projections, RoPE, cache access and model introspection."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from kvpress.inplace_cache import InPlaceLayer
from kvpress.ragged_cache import RaggedLayer
from kvpress.resources import text_config
from kvpress.transformers_adapter import CannotCompressError
from kvpress.validation import real_number, validate_compression_ratio  # noqa: F401 (importable from here as before)

# Attention classes whose per-head q/k RMSNorm is applied after the head reshape (Qwen3, Gemma3).
_QK_NORM_MODELS = ("Qwen3Attention", "Gemma3Attention")


def _split_heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    bsz, q_len, _ = states.shape
    return states.view(bsz, q_len, -1, head_dim).transpose(1, 2)


def _is_phi3(module: nn.Module) -> bool:
    return hasattr(module, "qkv_proj")


def _prerope_states(module: nn.Module, hidden_states: torch.Tensor, kind: str) -> torch.Tensor:
    """Queries (`kind` "q") or keys ("k") before RoPE, `(B, heads, T, d)`, from the module's own projection (Phi-3's
    fused `qkv_proj` sliced: queries first, then keys), with the Qwen3/Gemma3 per-head norm applied."""
    num_heads = module.config.num_attention_heads
    head_dim = module.head_dim
    if _is_phi3(module):
        start = 0 if kind == "q" else num_heads * head_dim
        width = (num_heads if kind == "q" else module.config.num_key_value_heads) * head_dim
        states = module.qkv_proj(hidden_states)[..., start : start + width]
    elif hasattr(module, f"{kind}_proj"):
        states = getattr(module, f"{kind}_proj")(hidden_states)
    else:
        raise NotImplementedError(
            f"Press not yet implemented for {module.__class__.__name__}: it has neither `{kind}_proj` nor `qkv_proj`."
        )
    states = _split_heads(states, head_dim)
    if module.__class__.__name__ in _QK_NORM_MODELS:
        states = getattr(module, f"{kind}_norm")(states)
    return states


def get_prerope_query_states(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Queries before RoPE, `(B, H, q_len, d)`, with the Qwen3/Gemma3 per-head norm applied."""
    return _prerope_states(module, hidden_states, "q")


def get_prerope_key_states(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Keys before RoPE, `(B, H_kv, k_len, d)`, with the Qwen3/Gemma3 per-head norm applied."""
    return _prerope_states(module, hidden_states, "k")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to `x` `(B, H, T, d)` with `cos`/`sin` of shape `(B, T, d)`."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def rope_cos_sin(module: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the model's rotary embedding (attached to the module by the press) at `position_ids`.

    Gemma3 keeps one RoPE per layer type; the module's own `layer_type` selects it.
    """
    rotary_emb = getattr(module, "rotary_emb", None)
    if rotary_emb is None:
        raise AttributeError(
            f"{module.__class__.__name__} has no `rotary_emb`: presses attach it when entering `with press(model)`."
        )
    layer_type = getattr(module, "layer_type", None)
    if layer_type is not None and hasattr(rotary_emb, f"{layer_type}_inv_freq"):
        return rotary_emb(x, position_ids, layer_type)
    return rotary_emb(x, position_ids)


def rope_inv_freq(module: nn.Module) -> torch.Tensor:
    """The inverse frequencies of the RoPE used by this attention module."""
    rotary_emb = module.rotary_emb
    layer_type = getattr(module, "layer_type", None)
    name = (
        f"{layer_type}_inv_freq"
        if layer_type is not None and hasattr(rotary_emb, f"{layer_type}_inv_freq")
        else "inv_freq"
    )
    inv_freq: torch.Tensor = getattr(rotary_emb, name)
    return inv_freq


def attention_scaling(module: nn.Module) -> float:
    """The softmax scale the attention module uses (1/sqrt(d) unless the model says otherwise)."""
    scaling = getattr(module, "scaling", None)
    return float(scaling if scaling is not None else module.head_dim**-0.5)


def is_quantized_layer(cache_layer) -> bool:
    return hasattr(cache_layer, "_quantized_keys") and hasattr(cache_layer, "_dequantize")


def dequantize_layer(cache_layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-precision keys and values of a quantized cache layer: the quantized part then the residual part."""
    keys = cache_layer._dequantize(cache_layer._quantized_keys)
    values = cache_layer._dequantize(cache_layer._quantized_values)
    residual_keys = getattr(cache_layer, "keys", None)
    if residual_keys is not None and residual_keys.dim() == 4 and residual_keys.shape[-2] > 0:
        keys = torch.cat([keys, residual_keys.to(keys.dtype)], dim=-2)
        values = torch.cat([values, cache_layer.values.to(values.dtype)], dim=-2)
    return keys, values


def resizable_layer(cache: Cache, layer_idx: int):
    """`cache.layers[layer_idx]`, checked to be a layer a press can shrink: a dynamic (growing) layer, a quantized
    one, an in-place decoding layer (written back into its own buffers), or a ragged layer (read as a dense view; it
    takes only head-wise eviction, see `RaggedLayer.write_dense`). Raises CannotCompressError for any other
    layout (a static, preallocated layer; an unknown class)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        raise CannotCompressError(
            f"{type(cache).__name__} has no layer {layer_idx} (layers: {len(layers) if layers is not None else 'none'})"
            ": kvpress compresses caches that hold one layer object per attention layer (DynamicCache, QuantizedCache)."
        )
    cache_layer = layers[layer_idx]
    if is_quantized_layer(cache_layer) or isinstance(cache_layer, (DynamicLayer, InPlaceLayer, RaggedLayer)):
        return cache_layer
    raise CannotCompressError(
        f"Cannot resize layer {layer_idx} of {type(cache).__name__}: its {type(cache_layer).__name__} keeps a fixed "
        "length, so compressed keys and values cannot be stored in it. Use a DynamicCache (the default of "
        "model.generate and of the pipeline) or a QuantizedCache."
    )


def extract_keys_and_values(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer, `(B, H_kv, T, d)`. Plain caches return their live tensors (no copy)."""
    cache_layer = resizable_layer(cache, layer_idx)
    if is_quantized_layer(cache_layer):
        return dequantize_layer(cache_layer)
    if isinstance(cache_layer, InPlaceLayer):
        return cache_layer.valid_keys, cache_layer.valid_values
    if isinstance(cache_layer, RaggedLayer):
        return cache_layer.dense_keys_and_values()
    return cache_layer.keys, cache_layer.values


def _quantize(cache_layer, tensor: torch.Tensor, axis_name: str):
    axis = getattr(cache_layer, axis_name, None)
    if axis is None:  # backends without grouping (e.g. FP8) calibrate on the whole tensor
        return cache_layer._quantize(tensor.contiguous())
    return cache_layer._quantize(tensor.contiguous(), axis=axis)


def write_keys_and_values(cache: Cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store compressed keys and values back into `cache.layers[layer_idx]`, quantized layers included."""
    cache_layer = resizable_layer(cache, layer_idx)
    if is_quantized_layer(cache_layer):
        cache_layer._quantized_keys = _quantize(cache_layer, keys, "axis_key")
        cache_layer._quantized_values = _quantize(cache_layer, values, "axis_value")
        empty = torch.zeros(0, dtype=keys.dtype, device=keys.device)
        cache_layer.keys, cache_layer.values = empty, empty.clone()
        cache_layer.cumulative_length = keys.shape[2]
    elif isinstance(cache_layer, InPlaceLayer):
        cache_layer.replace(keys, values)
    elif isinstance(cache_layer, RaggedLayer):
        cache_layer.write_dense(keys, values)
    else:
        cache_layer.keys = keys
        cache_layer.values = values


def cache_layer_length(cache: Cache, layer_idx: int) -> int:
    """Number of tokens held by one cache layer (0 when the layer was never filled)."""
    if layer_idx >= len(cache.layers):
        return 0
    cache_layer = cache.layers[layer_idx]
    if not getattr(cache_layer, "is_initialized", True):
        return 0
    return int(cache_layer.get_seq_length())


def snapshot_cache(cache: Cache) -> list[dict]:
    """References to the state of every cache layer, so that `restore_cache` can roll back exactly.

    Dynamic and quantized layers replace their tensors on every update instead of writing in place, so keeping
    the references is enough to undo the tokens appended afterwards.
    """
    names = ("keys", "values", "_quantized_keys", "_quantized_values", "cumulative_length", "is_initialized")
    return [{name: getattr(layer, name) for name in names if hasattr(layer, name)} for layer in cache.layers]


def restore_cache(cache: Cache, snapshot: list[dict]) -> None:
    """Undo everything added to `cache` since `snapshot_cache` (layers created since then are emptied)."""
    for layer_idx, layer in enumerate(cache.layers):
        if layer_idx < len(snapshot):
            for name, value in snapshot[layer_idx].items():
                setattr(layer, name, value)
        else:
            layer.reset()


def describe_hub_source(name_or_path: str) -> str:
    """How a load error names `name_or_path` after it failed as a local directory or Hugging Face Hub repo."""
    if os.path.isdir(name_or_path):
        return f"the local directory {name_or_path!r}"
    return f"{name_or_path!r}, which is neither a local directory or file nor a reachable Hugging Face Hub repo"


def get_language_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM or of a conditional-generation model (e.g. Gemma3 with vision)."""
    base = getattr(model, "model", None)
    if base is None:
        raise ValueError(
            f"{model.__class__.__name__} is not supported: kvpress expects a transformers causal LM with a `.model` "
            "attribute holding the decoder (e.g. LlamaForCausalLM, Qwen3ForCausalLM)."
        )
    language_model = getattr(base, "language_model", base)
    layers = getattr(language_model, "layers", None)
    if layers is None or len(layers) == 0 or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{model.__class__.__name__} is not supported: kvpress hooks `model.model.layers[i].self_attn` (or "
            "`model.model.language_model.layers[i].self_attn`), and this model has no such attention modules."
        )
    if not hasattr(language_model, "rotary_emb"):
        raise ValueError(
            f"{model.__class__.__name__} is not supported: its decoder has no shared `rotary_emb` (RoPE), which "
            "presses need to score keys."
        )
    return language_model


def attention_implementation(model: nn.Module) -> str | None:
    """The attention backend the language model runs ("eager", "sdpa", ...), composite configs included."""
    config = model.config
    implementation = getattr(text_config(model), "_attn_implementation", None)
    if implementation is None:
        implementation = getattr(config, "_attn_implementation", None)
    return implementation
