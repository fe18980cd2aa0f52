# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""SimLayerKVPress: the lazy-layer decision against attention computed directly; lazy layers keep exactly their
initial and recent tokens, other layers are untouched."""

import logging

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention

from kvpress.presses.simlayerkv_press import SimLayerKVPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, random_input_ids

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _identity_attention():
    """A Llama attention whose queries equal the hidden states (4 heads x 16 channels, 2 KV heads)."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
    module = LlamaAttention(config, layer_idx=0)
    with torch.no_grad():
        module.q_proj.weight.copy_(torch.eye(64))
    return module


def _kwargs(seq_len):
    return {"position_embeddings": (torch.ones(1, seq_len, HEAD_DIM), torch.zeros(1, seq_len, HEAD_DIM))}


def _reference_lazy_score(hidden_states, keys, n_initial, n_recent):
    """Attention of the last query (n_last = 1) on the initial and recent tokens before it, mean over heads."""
    seq_len = keys.shape[2]
    query = hidden_states[0, -1].view(HEADS, HEAD_DIM)
    key = keys[0].repeat_interleave(HEADS // KV_HEADS, dim=0)  # (H, T, d)
    weights = torch.einsum("hd,htd->ht", query, key).mul(HEAD_DIM**-0.5).softmax(dim=-1)
    before = weights[:, : seq_len - 1].mean(dim=0)
    return (before[:n_initial].sum() + before[-n_recent:].sum()).item()


def _constructed_inputs(seed, focus):
    """Keys where the last query's attention goes to token `focus` (a sink, or a middle token)."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = 24
    hidden_states = torch.randn(1, seq_len, 64, generator=generator)
    keys = 0.3 * torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, generator=generator)
    last_query = hidden_states[0, -1].view(KV_HEADS, HEADS // KV_HEADS, HEAD_DIM).mean(dim=1)
    keys[0, :, focus] = 12 * last_query / last_query.norm(dim=-1, keepdim=True)
    return hidden_states, keys, torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, generator=generator)


@pytest.mark.parametrize("focus", [0, 11])
@pytest.mark.parametrize("n_initial, n_recent", [(2, 4), (4, 1)])
def test_lazy_decision_matches_direct_attention(focus, n_initial, n_recent):
    module = _identity_attention()
    hidden_states, keys, values = _constructed_inputs(seed=focus + n_recent, focus=focus)
    seq_len = keys.shape[2]
    score = _reference_lazy_score(hidden_states, keys, n_initial, n_recent)
    if focus == 0:
        assert score > 0.8  # the sink takes the attention: clearly lazy
    else:
        assert score < 0.2  # a middle token takes it: clearly not lazy

    for threshold, lazy in [(max(score - 0.01, 0.0), True), (min(score + 0.01, 1.0), False)]:
        press = SimLayerKVPress(lazy_threshold=threshold, n_last=1, n_recent=n_recent, n_initial=n_initial)
        assert press.is_lazy(module, hidden_states, keys, _kwargs(seq_len)["position_embeddings"]) is lazy
        out_keys, out_values = press.compress(module, hidden_states, keys, values, None, _kwargs(seq_len))
        if lazy:
            kept = list(range(n_initial)) + list(range(seq_len - n_recent, seq_len))
            assert out_keys.shape[2] == n_initial + n_recent
            torch.testing.assert_close(out_keys, keys[:, :, kept], atol=0, rtol=0)
            torch.testing.assert_close(out_values, values[:, :, kept], atol=0, rtol=0)
            assert press.compression_ratio == pytest.approx((seq_len - n_initial - n_recent) / seq_len)
        else:
            assert out_keys is keys and out_values is values
            assert press.compression_ratio == 0.0


def test_lazy_layer_keeps_initial_and_recent_tokens_non_lazy_layer_untouched():
    """On a real model: the threshold between the two layers' scores (from eager attention weights) makes exactly
    the layer with the higher score lazy."""
    n_initial, n_recent, n_last, seq_len = 2, 6, 3, 40
    input_ids = random_input_ids(1, seq_len, seed=7)
    with torch.no_grad():
        eager = get_model("llama", "eager")
        reference = eager(input_ids, output_attentions=True, **cache_kwargs(eager, DynamicCache()))
    scores = []
    for attentions in reference.attentions:
        before = attentions[:, :, -n_last:, : seq_len - n_last].mean(dim=(0, 1, 2))
        scores.append((before[:n_initial].sum() + before[-n_recent:].sum()).item())
    assert abs(scores[0] - scores[1]) > 1e-5  # far above the float32 error of recomputing the attention
    lazy_layer = int(scores[1] > scores[0])
    threshold = (scores[0] + scores[1]) / 2

    model = get_model("llama")  # sdpa: the press recomputes the window attention itself
    plain, cache = DynamicCache(), DynamicCache()
    press = SimLayerKVPress(lazy_threshold=threshold, n_last=n_last, n_recent=n_recent, n_initial=n_initial)
    with torch.no_grad():
        model(input_ids, **cache_kwargs(model, plain))
        with press(model):
            model(input_ids, **cache_kwargs(model, cache))

    kept = list(range(n_initial)) + list(range(seq_len - n_recent, seq_len))
    for layer_idx in range(2):
        keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        full_keys, full_values = plain.layers[layer_idx].keys, plain.layers[layer_idx].values
        if layer_idx == lazy_layer:
            assert keys.shape[2] == n_initial + n_recent
            torch.testing.assert_close(keys, full_keys[:, :, kept])
            torch.testing.assert_close(values, full_values[:, :, kept])
        else:
            torch.testing.assert_close(keys, full_keys)
            torch.testing.assert_close(values, full_values)
    lazy_ratio = (seq_len - n_initial - n_recent) / seq_len
    assert press.compression_ratio == pytest.approx(lazy_ratio / 2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_layer_lazy_at_threshold_zero(arch):
    """Threshold 0: every compressed layer is lazy. n_recent == n_last keeps n_initial + n_recent tokens (upstream
    keeps the whole sequence plus the initial tokens again)."""
    model = get_model(arch)
    seq_len = 40
    input_ids = random_input_ids(2, seq_len, seed=1)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids, **cache_kwargs(model, plain))
    for n_initial, n_recent, n_last in [(1, 1, 1), (4, 8, 2)]:
        cache = DynamicCache(config=model.config)
        press = SimLayerKVPress(lazy_threshold=0.0, n_last=n_last, n_recent=n_recent, n_initial=n_initial)
        with torch.no_grad(), press(model):
            model(input_ids, **cache_kwargs(model, cache))
        kept = list(range(n_initial)) + list(range(seq_len - n_recent, seq_len))
        layers = compressed_layers(model)
        for layer_idx in layers:
            torch.testing.assert_close(cache.layers[layer_idx].keys, plain.layers[layer_idx].keys[:, :, kept])
        assert len(press.compression_ratios) == len(layers)
        assert press.compression_ratio == pytest.approx((seq_len - n_initial - n_recent) / seq_len)
        with torch.no_grad():
            out = model(random_input_ids(2, 1, seed=2), **cache_kwargs(model, cache))
        assert torch.isfinite(out.logits).all()


def test_disabled_short_sequences_and_ratio_bookkeeping(caplog):
    model = get_model("gemma3_text")  # its layer 0 is a sliding layer that is never hooked
    press = SimLayerKVPress(lazy_threshold=1.0, n_recent=4, n_initial=2)
    with pytest.raises(ValueError, match="Forward pass must be run"):
        press.compression_ratio
    with pytest.raises(AttributeError, match="lazy_threshold"):
        press.compression_ratio = 0.5
    for _ in range(2):  # the per-layer record restarts at each prefill
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model):
            model(random_input_ids(1, 30), **cache_kwargs(model, cache))
        assert press.compression_ratios == [0.0]
        assert cache.layers[1].keys.shape[2] == 30

    short = SimLayerKVPress(lazy_threshold=0.0, n_last=1, n_recent=8, n_initial=4)
    cache = DynamicCache(config=model.config)
    with caplog.at_level(logging.WARNING, logger="kvpress.presses.simlayerkv_press"):
        with torch.no_grad(), short(model):
            model(random_input_ids(1, 13), **cache_kwargs(model, cache))
    assert "shorter than n_initial + n_recent + n_last = 13" in caplog.text
    assert cache.layers[1].keys.shape[2] == 13
    assert short.compression_ratio == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="lazy_threshold"):
        SimLayerKVPress(lazy_threshold=1.5)
    for kwargs in ({"n_last": 0}, {"n_recent": 0}, {"n_initial": -1}, {"n_recent": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SimLayerKVPress(lazy_threshold=0.5, **kwargs)
