# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ThinKPress: which key channels are zeroed, against a direct computation on the model's own queries and keys."""

import copy

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention

from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.think_press import ThinKPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, prefill, random_input_ids

RECORDING_ATTENTION = "kvpress_test_think_recording"
_RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, recording the post-RoPE queries and keys each layer attends with."""
    _RECORDED[module.layer_idx] = (query.detach().clone(), key.detach().clone())
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)


def _expected_keys(query, key, ratio, window):
    """Direct computation: zero the `int(d * ratio)` channels with the lowest mean(q^2) * mean(k^2), except in the
    last `window` keys."""
    bsz, num_kv_heads, k_len, head_dim = key.shape
    query_norm = query[:, :, -window:].pow(2).mean(dim=2)
    query_norm = query_norm.view(bsz, num_kv_heads, -1, head_dim).mean(dim=2)
    channel_scores = query_norm * key.pow(2).mean(dim=2)
    n_pruned = int(head_dim * ratio)
    pruned = channel_scores.argsort(dim=-1)[..., :n_pruned]
    expected = key.clone()
    for b in range(bsz):
        for h in range(num_kv_heads):
            expected[b, h, : k_len - window, pruned[b, h]] = 0
    return expected, pruned


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_zeroed_channels_equal_direct_computation(arch):
    model = copy.deepcopy(get_model(arch))
    model.set_attn_implementation(RECORDING_ATTENTION)
    ratio, window, seq_len = 0.5, 4, 40
    _RECORDED.clear()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), ThinKPress(key_channel_compression_ratio=ratio, window_size=window)(model):
        model(random_input_ids(2, seq_len, seed=3), **cache_kwargs(model, cache))

    for layer_idx in compressed_layers(model):
        query, key = _RECORDED[layer_idx]
        keys = cache.layers[layer_idx].keys
        assert keys.shape == key.shape  # no token is removed
        expected, pruned = _expected_keys(query, key, ratio, window)
        torch.testing.assert_close(keys, expected, atol=1e-6, rtol=0)
        # the window keeps every channel; the pruned channels are exactly zero everywhere before it
        torch.testing.assert_close(keys[:, :, -window:], key[:, :, -window:], atol=0, rtol=0)
        zero_channels = (keys[:, :, :-window] == 0).all(dim=2)  # (B, H_kv, d)
        assert (zero_channels.sum(dim=-1) == int(keys.shape[-1] * ratio)).all()
        assert zero_channels.gather(-1, pruned).all()


def _identity_attention():
    """A Llama attention whose queries equal the hidden states (4 heads x 16 channels, 2 KV heads)."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    module = LlamaAttention(config, layer_idx=0)
    with torch.no_grad():
        module.q_proj.weight.copy_(torch.eye(64))
    return module


def _no_rotation(seq_len):
    return torch.ones(1, seq_len, 16), torch.zeros(1, seq_len, 16)


def test_constructed_keys_decide_which_channels_are_pruned():
    module, seq_len = _identity_attention(), 12
    hidden_states = torch.ones(1, seq_len, 64)  # every query channel weighs the same
    magnitude = torch.stack([torch.arange(1.0, 17.0), torch.arange(16.0, 0.0, -1)])  # head 0 rising, head 1 falling
    keys = magnitude[None, :, None, :].expand(1, 2, seq_len, 16).clone()
    values = torch.randn(1, 2, seq_len, 16)
    press = ThinKPress(key_channel_compression_ratio=0.25, window_size=3)
    out_keys, out_values = press.compress(
        module, hidden_states, keys, values, None, {"position_embeddings": _no_rotation(seq_len)}
    )
    assert out_values is values
    zeroed = (out_keys[0, :, : seq_len - 3] == 0).all(dim=1)  # (H_kv, d)
    assert zeroed[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert zeroed[1].nonzero().flatten().tolist() == [12, 13, 14, 15]
    assert not (out_keys[0, :, seq_len - 3 :] == 0).any()
    torch.testing.assert_close(out_keys[0, :, seq_len - 3 :], keys[0, :, seq_len - 3 :])


def test_constructed_window_queries_decide_which_channels_are_pruned():
    module, seq_len, window = _identity_attention(), 12, 2
    channel = torch.arange(1.0, 17.0)
    # query heads 0-1 (KV head 0) weigh the last channels most, heads 2-3 (KV head 1) the first ones
    window_queries = torch.cat([channel, channel, channel.flip(0), channel.flip(0)])
    hidden_states = window_queries.repeat(1, seq_len, 1)
    hidden_states[:, : seq_len - window] = 100 * window_queries.flip(0)  # queries before the window must not count
    keys = torch.ones(1, 2, seq_len, 16)
    press = ThinKPress(key_channel_compression_ratio=0.5, window_size=window)
    out_keys, _ = press.compress(
        module, hidden_states, keys, keys.clone(), None, {"position_embeddings": _no_rotation(seq_len)}
    )
    zeroed = (out_keys[0, :, : seq_len - window] == 0).all(dim=1)
    assert zeroed[0].nonzero().flatten().tolist() == list(range(8))
    assert zeroed[1].nonzero().flatten().tolist() == list(range(8, 16))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_runs_alone_and_composed_on_every_architecture(arch):
    model = get_model(arch)
    input_ids = random_input_ids(1, 40)
    for press, expected_length in [
        (ThinKPress(key_channel_compression_ratio=0.8, window_size=2), 40),
        (ComposedPress([ThinKPress(0.5, window_size=2), KnormPress(0.5)]), 20),
    ]:
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model):
            model(input_ids, **cache_kwargs(model, cache))
        for layer_idx in compressed_layers(model):
            keys = cache.layers[layer_idx].keys
            assert keys.shape[2] == expected_length
            assert ((keys[:, :, :-2] == 0).all(dim=2).sum(dim=-1) >= int(16 * 0.5)).all()  # the window stays whole
        with torch.no_grad():
            out = model(random_input_ids(1, 1, seed=1), **cache_kwargs(model, cache))
        assert torch.isfinite(out.logits).all()


def test_ratio_zero_leaves_the_cache_and_compression_ratio_is_half_the_channel_ratio():
    model = get_model("llama")
    input_ids = random_input_ids(1, 30)
    plain, pressed = DynamicCache(), DynamicCache()
    with torch.no_grad():
        model(input_ids, **cache_kwargs(model, plain))
        with ThinKPress(0.0)(model):
            model(input_ids, **cache_kwargs(model, pressed))
    for layer_plain, layer_pressed in zip(plain.layers, pressed.layers):
        torch.testing.assert_close(layer_pressed.keys, layer_plain.keys, atol=0, rtol=0)

    press = ThinKPress(key_channel_compression_ratio=0.6)
    assert press.compression_ratio == pytest.approx(0.3)
    with pytest.raises(AttributeError, match="key_channel_compression_ratio"):
        press.compression_ratio = 0.1


def test_bad_input():
    with pytest.raises(ValueError, match="key_channel_compression_ratio"):
        ThinKPress(key_channel_compression_ratio=1.0)
    with pytest.raises(ValueError, match="key_channel_compression_ratio"):
        ThinKPress(key_channel_compression_ratio=-0.1)
    with pytest.raises(ValueError, match="window_size"):
        ThinKPress(0.5, window_size=0)


@pytest.mark.parametrize("length", [20, 32])
def test_context_not_longer_than_the_window_runs_and_keeps_every_channel(length):
    """Upstream runs on a context of at most window_size tokens (it scores with the queries there are); here too
    (the error is gone), and since every key is in the window, whose keys keep all their channels, nothing changes."""
    model = get_model("llama")
    input_ids = random_input_ids(1, length)
    cache = prefill(model, input_ids, ThinKPress(0.5, window_size=32))
    plain = prefill(model, input_ids)
    for layer_idx in range(len(cache.layers)):
        assert torch.equal(cache.layers[layer_idx].keys, plain.layers[layer_idx].keys)
        assert torch.equal(cache.layers[layer_idx].values, plain.layers[layer_idx].values)
