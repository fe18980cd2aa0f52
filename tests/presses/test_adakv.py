# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""AdaKVPress: head-wise budgets through `masked_key_indices`, under sdpa and eager attention."""

import copy

import pytest
import torch
from transformers import AttentionInterface

from kvpress import AdaKVPress, ComposedPress, KnormPress, RandomPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, prefill, random_input_ids

REFERENCE_ATTENTION = "kvpress_test_headwise_reference"
# layer_idx -> bool (B, H_kv, T_prefill): entries the reference attention treats as removed
_REMOVED: dict[int, torch.Tensor] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention that truly removes, per KV head, the entries listed in `_REMOVED`."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q_len, k_len = query.shape[2], key.shape[2]
    scores = query @ key.transpose(-1, -2) * scaling
    positions = torch.arange(k_len)
    visible = positions[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
    visible = visible[None, None].expand(query.shape[0], query.shape[1], q_len, k_len)
    removed = _REMOVED.get(module.layer_idx)
    if removed is not None:
        removed = torch.nn.functional.pad(removed, (0, k_len - removed.shape[-1]))
        visible = visible & ~removed.repeat_interleave(groups, dim=1)[:, :, None, :]
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention)


def _attention_modules(model):
    language_model = getattr(model.model, "language_model", model.model)
    return [layer.self_attn for layer in language_model.layers]


def _masked_bool(model, layer_idx, shape):
    """`masked_key_indices` of one layer as a bool tensor of `shape` (B, H_kv, T)."""
    batch_idx, head_idx, seq_idx = _attention_modules(model)[layer_idx].masked_key_indices
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[batch_idx.cpu(), head_idx.cpu(), seq_idx.cpu()] = True
    return mask


@pytest.mark.parametrize("compression_ratio", [0.2, 0.4, 0.6, 0.8])
def test_masks_prune_the_layerwise_lowest_scores_with_safeguard(compression_ratio):
    model = get_model("llama")
    bsz, seq_len, alpha = 2, 128, 0.2
    press = AdaKVPress(KnormPress(compression_ratio), alpha_safeguard=alpha)
    cache = prefill(model, random_input_ids(bsz, seq_len, seed=1), press)

    n_kept = int(seq_len * (1 - compression_ratio))
    n_safe = int(n_kept * alpha)
    for layer_idx in compressed_layers(model):
        keys = cache.layers[layer_idx].keys
        assert keys.shape[2] == seq_len  # the cache stays dense
        masked = _masked_bool(model, layer_idx, keys.shape[:3])
        num_kv_heads = keys.shape[1]
        assert masked.sum().item() == bsz * num_kv_heads * (seq_len - n_kept)
        assert abs(masked.float().mean().item() - compression_ratio) < 1e-2

        scores = -keys.norm(dim=-1)
        kept_per_head = (~masked).sum(dim=-1)
        assert (kept_per_head >= n_safe).all()
        assert not (kept_per_head == n_kept).all(), "AdaKV should give heads different budgets"
        # each head's top n_safe tokens are always kept
        safe = scores.topk(n_safe, dim=-1).indices
        assert not masked.gather(-1, safe).any()
        # outside the safeguard, the layer's lowest scores (across heads) are the masked ones (ties: equal
        # tokens have equal key norms, RoPE does not change a norm)
        guarded = scores.clone().scatter_(-1, safe, float("inf"))
        for b in range(bsz):
            assert guarded[b][masked[b]].max() <= guarded[b][~masked[b]].min()


def test_compression_ratio_delegates_and_ratio_zero_sets_no_mask():
    press = AdaKVPress(KnormPress(0.3))
    assert press.compression_ratio == 0.3
    press.compression_ratio = 0.0
    assert press.press.compression_ratio == 0.0
    model = get_model("llama")
    cache = prefill(model, random_input_ids(1, 32), press)
    assert all(getattr(m, "masked_key_indices", None) is None for m in _attention_modules(model))
    assert cache.get_seq_length() == 32


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eager_attention_gives_masked_entries_zero_weight(arch):
    """Unlike upstream, the attention patch covers eager attention: masked entries get exactly zero weight."""
    model = get_model(arch, attn_implementation="eager")
    bsz, seq_len = 2, 48
    cache = prefill(model, random_input_ids(bsz, seq_len, seed=2), AdaKVPress(KnormPress(0.5)))
    layers = compressed_layers(model)
    masks = {i: _masked_bool(model, i, cache.layers[i].keys.shape[:3]) for i in layers}

    with torch.no_grad():
        out = model(random_input_ids(bsz, 1, seed=3), output_attentions=True, **cache_kwargs(model, cache))
    for layer_idx in layers:
        weights = out.attentions[layer_idx][:, :, -1, :seq_len]  # (B, H, T) of the new token over the context
        groups = weights.shape[1] // masks[layer_idx].shape[1]
        masked = masks[layer_idx].repeat_interleave(groups, dim=1)
        assert (weights[masked] == 0).all()
        assert (weights[~masked] > 0).all()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decoding_step_equals_truly_removing_entries_per_head(arch):
    """sdpa and eager logits after AdaKV equal attention where the pruned entries are really removed per head."""
    bsz, seq_len = 2, 64
    context, new_token = random_input_ids(bsz, seq_len, seed=4), random_input_ids(bsz, 1, seed=5)

    logits = {}
    for attn in ("sdpa", "eager"):
        model = get_model(arch, attn_implementation=attn)
        cache = prefill(model, context, AdaKVPress(RandomPress(0.6, seed=0), alpha_safeguard=0.1))
        masks = {i: _masked_bool(model, i, cache.layers[i].keys.shape[:3]) for i in compressed_layers(model)}
        with torch.no_grad():
            logits[attn] = model(new_token, **cache_kwargs(model, cache)).logits[:, -1]

    reference = copy.deepcopy(get_model(arch))
    reference.set_attn_implementation(REFERENCE_ATTENTION)
    _REMOVED.clear()
    cache = prefill(reference, context)
    _REMOVED.update(masks)
    try:
        with torch.no_grad():
            expected = reference(new_token, **cache_kwargs(reference, cache)).logits[:, -1]
    finally:
        _REMOVED.clear()
    with torch.no_grad():
        unpruned = get_model(arch)(torch.cat([context, new_token], dim=1)).logits[:, -1]

    torch.testing.assert_close(logits["sdpa"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits["eager"], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, unpruned, atol=1e-3), "the masks should change the output"


def test_masks_reset_at_next_prefill_and_persist_during_decoding():
    model = get_model("llama")
    cache = prefill(model, random_input_ids(1, 40), AdaKVPress(KnormPress(0.5)))
    modules = _attention_modules(model)
    masks = [m.masked_key_indices for m in modules]
    assert all(mask is not None for mask in masks)
    with torch.no_grad():
        model(random_input_ids(1, 2, seed=1), **cache_kwargs(model, cache))  # decoding keeps the masks
    assert all(m.masked_key_indices is masks[i] for i, m in enumerate(modules))
    prefill(model, random_input_ids(1, 40, seed=2))  # a new context without press
    assert all(m.masked_key_indices is None for m in modules)


def test_generate_runs_with_adakv():
    model = get_model("qwen2")
    input_ids = random_input_ids(2, 50)
    with torch.no_grad(), AdaKVPress(KnormPress(0.5))(model):
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 54)


def test_bad_input():
    with pytest.raises(TypeError, match="ScorerPress"):
        AdaKVPress(ComposedPress([KnormPress(0.5)]))
    with pytest.raises(ValueError, match="alpha_safeguard"):
        AdaKVPress(KnormPress(0.5), alpha_safeguard=1.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        AdaKVPress(KnormPress(1.2))
