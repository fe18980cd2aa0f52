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
from kvpress.transformers_adapter import cache_kwargs
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
        model(input_ids, **cache_kwargs(model, full))

    hidden = {}

    def record_input(module, args, kwargs):
        hidden[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handles = [m.register_forward_pre_hook(record_input, with_kwargs=True) for m in modules.values()]
    cache = DynamicCache()
    try:
        with torch.no_grad(), KeyRerotationPress(KnormPress(ratio))(model):
            model(input_ids, **cache_kwargs(model, cache))
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
        model(_distinct_ids(40), **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 40
    with pytest.raises(TypeError, match="ScorerPress"):
        KeyRerotationPress(ComposedPress([KnormPress(0.5)]))


def _record_positions(model) -> tuple[list, object]:
    """The position ids of every decoder forward, recorded where they are used (the shared rotary embedding, which
    Gemma3 calls twice per forward: once per RoPE kind, hence no consecutive repeats)."""
    language_model = getattr(model.model, "language_model", model.model)
    seen: list = []

    def record(module, args, kwargs):
        positions = (kwargs["position_ids"] if "position_ids" in kwargs else args[1])[0].tolist()
        if not seen or seen[-1] != positions:
            seen.append(positions)

    return seen, language_model.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)


def _generate(model, press, input_ids, new_tokens):
    seen, handle = _record_positions(model)
    try:
        with torch.no_grad(), press(model):
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,  # all `new_tokens` steps, whatever the random model predicts
            )
    finally:
        handle.remove()
    return out[0, input_ids.shape[1] :].tolist(), seen


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_inside_the_press_continues_at_the_compressed_length(arch):
    model = get_model(arch)
    input_ids, new_tokens, ratio = _distinct_ids(64), 4, 0.5
    n_kept = int(64 * (1 - ratio))
    generated, seen = _generate(model, KeyRerotationPress(KnormPress(ratio)), input_ids, new_tokens)
    # the prefill at 0..63, then each new token right after the re-rotated cache (the pipeline's positions)
    assert seen[0] == list(range(64)) and seen[1:] == [[n_kept + i] for i in range(new_tokens - 1)]

    # the same tokens by hand: compress, then decode greedily at positions n_kept, n_kept + 1, ... outside the press
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with KeyRerotationPress(KnormPress(ratio))(model):
            logits = model(input_ids, **cache_kwargs(model, cache)).logits
        expected = [int(logits[0, -1].argmax())]
        for i in range(new_tokens - 1):
            position = torch.tensor([[n_kept + i]])
            step = model(torch.tensor([[expected[-1]]]), position_ids=position, **cache_kwargs(model, cache))
            expected.append(int(step.logits[0, -1].argmax()))
    assert cache.get_seq_length() == n_kept + new_tokens - 1
    assert generated == expected

    # a press that does not re-rotate keeps the logical positions (its keys stay where they were cached)
    _, plain = _generate(model, KnormPress(ratio), input_ids, new_tokens)
    assert plain[1:] == [[64 + i] for i in range(new_tokens - 1)]


def test_generate_keeps_logical_positions_on_models_with_sliding_window_layers():
    # Gemma3's sliding layers are not compressed and keep their logical positions, so the position ids are left as
    # `generate` passes them (documented limitation: no single position is right for every layer there).
    model = get_model("gemma3_text")
    input_ids, new_tokens = _distinct_ids(64), 3
    _, seen = _generate(model, KeyRerotationPress(KnormPress(0.5)), input_ids, new_tokens)
    assert seen[1:] == [[64 + i] for i in range(new_tokens - 1)]
