# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KeyRerotationPress: pruned keys are moved to positions 0..n_kept-1 exactly as if they had been cached there."""

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from kvpress import ComposedPress, KeyRerotationPress, KnormPress
from kvpress.presses.scorer_press import gather_tokens
from kvpress.utils import apply_rope, get_prerope_key_states, rope_cos_sin
from tests.fixtures import ARCHITECTURES, SPECIAL_TOKENS, compressed_layers, get_model

ROPE_PARAMETERS = {
    "default": None,
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
}


def _rotary_module(rope: str) -> SimpleNamespace:
    extra = {} if ROPE_PARAMETERS[rope] is None else {"rope_parameters": ROPE_PARAMETERS[rope]}
    config = LlamaConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512, **extra
    )
    return SimpleNamespace(rotary_emb=LlamaRotaryEmbedding(config))


@pytest.mark.parametrize("rope", list(ROPE_PARAMETERS))
def test_rerotation_equals_rope_at_new_positions(rope):
    module = _rotary_module(rope)
    bsz, num_kv_heads, seq_len, head_dim, n_kept = 2, 2, 128, 32, 50
    torch.manual_seed(0)
    prerope_keys = torch.randn(bsz, num_kv_heads, seq_len, head_dim)
    cos, sin = module.rotary_emb(prerope_keys, torch.arange(seq_len)[None])
    keys = apply_rope(prerope_keys, cos, sin)
    indices = torch.rand(bsz, num_kv_heads, seq_len).topk(n_kept, dim=-1).indices.sort(dim=-1).values

    rerotated = KeyRerotationPress.rerotate_keys(module, indices, keys)

    expected = apply_rope(gather_tokens(prerope_keys, indices), cos[:, :n_kept], sin[:, :n_kept])
    # fp32 RoPE angles carry ~position * 6e-8 of rounding on both sides
    torch.testing.assert_close(rerotated, expected, atol=1e-5, rtol=1e-4)
    if rope == "yarn":  # the attention scaling baked into cos/sin is kept
        assert module.rotary_emb.attention_scaling != 1
        torch.testing.assert_close(rerotated.norm(dim=-1), gather_tokens(keys, indices).norm(dim=-1))


def _distinct_ids(seq_len: int) -> torch.Tensor:
    """Distinct byte tokens, so that no two cached keys tie on their norm."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randperm(250, generator=generator)[:seq_len] + len(SPECIAL_TOKENS))[None]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_press_caches_kept_keys_at_positions_zero_to_n(arch):
    model = get_model(arch)
    input_ids = _distinct_ids(96)
    seq_len, ratio = input_ids.shape[1], 0.3
    n_kept = int(seq_len * (1 - ratio))
    language_model = getattr(model.model, "language_model", model.model)
    modules = {i: language_model.layers[i].self_attn for i in compressed_layers(model)}

    full = DynamicCache()
    with torch.no_grad():
        model(input_ids, past_key_values=full)

    hidden = {}

    def record_input(module, args, kwargs):
        hidden[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handles = [m.register_forward_pre_hook(record_input, with_kwargs=True) for m in modules.values()]
    cache = DynamicCache()
    try:
        with torch.no_grad(), KeyRerotationPress(KnormPress(ratio))(model):
            model(input_ids, past_key_values=cache)
    finally:
        for handle in handles:
            handle.remove()

    for layer_idx, module in modules.items():
        keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        assert keys.shape[2] == values.shape[2] == n_kept
        full_keys, full_values = full.layers[layer_idx].keys, full.layers[layer_idx].values
        indices = (-full_keys.norm(dim=-1)).topk(n_kept, dim=-1).indices.sort(dim=-1).values
        torch.testing.assert_close(values, gather_tokens(full_values, indices))
        with torch.no_grad():
            prerope = get_prerope_key_states(module, hidden[layer_idx])
            cos, sin = rope_cos_sin(module, prerope, torch.arange(n_kept)[None])
        expected = apply_rope(gather_tokens(prerope, indices), cos, sin)
        torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-4)


def test_ratio_delegation_zero_ratio_and_bad_input():
    press = KeyRerotationPress(KnormPress(0.25))
    assert press.compression_ratio == 0.25
    press.compression_ratio = 0.0
    assert press.press.compression_ratio == 0.0
    model = get_model("llama")
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(_distinct_ids(40), past_key_values=cache)
    assert cache.get_seq_length() == 40
    with pytest.raises(TypeError, match="ScorerPress"):
        KeyRerotationPress(ComposedPress([KnormPress(0.5)]))
