# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""MergingPress: evicted values folded into the most similar kept token, against a direct computation."""

import math

import pytest
import torch

from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.merging_press import _EPS, MergingPress
from kvpress.presses.scorer_press import gather_tokens
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, prefill, random_input_ids

SEQ_LEN = 40


def reference_merge(keys, values, kept, threshold=0.0, fraction=1.0):
    """The merged values, computed token by token in float64."""
    bsz, num_kv_heads, k_len, _ = keys.shape
    merged = values.clone().double()
    for b in range(bsz):
        for h in range(num_kv_heads):
            kept_list = kept[b, h].tolist()
            evicted = [t for t in range(k_len) if t not in kept_list]
            k, v = keys[b, h].double(), values[b, h].double()
            best_sim, best_target = [], []
            for e in evicted:
                sims = [(k[e] @ k[t] / (max(k[e].norm(), _EPS) * max(k[t].norm(), _EPS))).item() for t in kept_list]
                best = max(range(len(kept_list)), key=lambda i: sims[i])
                best_sim.append(sims[best])
                best_target.append(kept_list[best])
            ok = [s >= threshold for s in best_sim]
            if fraction < 1 and any(ok):
                masked = torch.tensor([s if o else float("-inf") for s, o in zip(best_sim, ok)])
                if all(ok):  # upstream's definition: the (1 - fraction) quantile (linear interpolation)
                    cut = torch.quantile(masked, 1 - fraction).item()
                    ok = [s >= cut for s in best_sim]
                else:  # the same count of most similar tokens, without the -inf interpolation
                    n_merged = len(evicted) - math.ceil((1 - fraction) * (len(evicted) - 1))
                    top = set(sorted(range(len(evicted)), key=lambda i: -masked[i].item())[:n_merged])
                    ok = [o and i in top for i, o in enumerate(ok)]
            total = {t: torch.zeros_like(v[0]) for t in kept_list}
            weight = {t: 0.0 for t in kept_list}
            for e, s, t, o in zip(evicted, best_sim, best_target, ok):
                if not o:
                    continue
                w = max(s, 0.0) * v[e].norm().item() / (v[e].norm().item() + v[t].norm().item() + _EPS)
                total[t] += w * v[e]
                weight[t] += w
            for t in kept_list:
                if weight[t] > 0:
                    merged[b, h, t] = (v[t] + total[t]) / (1 + weight[t])
    return merged.to(values.dtype)


def constructed(seed=0, bsz=2, num_kv_heads=2, k_len=12, head_dim=6, n_kept=5):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(bsz, num_kv_heads, k_len, head_dim, generator=generator)
    values = torch.randn(bsz, num_kv_heads, k_len, head_dim, generator=generator)
    kept = torch.stack(
        [torch.randperm(k_len, generator=generator)[:n_kept].sort().values for _ in range(bsz * num_kv_heads)]
    ).view(bsz, num_kv_heads, n_kept)
    return keys, values, kept


@pytest.mark.parametrize(
    "threshold, fraction", [(0.0, 1.0), (0.3, 1.0), (0.0, 0.5), (0.0, 0.3), (0.2, 0.4), (0.9, 0.5)]
)
def test_merge_equals_direct_computation(threshold, fraction):
    keys, values, kept = constructed()
    press = MergingPress(KnormPress(0.5), similarity_threshold=threshold, merge_fraction=fraction)
    out_keys, out_values = press.merge(keys, values, kept)
    expected = reference_merge(keys, values, kept, threshold, fraction)
    assert out_keys is keys
    torch.testing.assert_close(out_values, expected, atol=1e-6, rtol=1e-5)
    evicted = torch.ones(keys.shape[:3], dtype=torch.bool).scatter(-1, kept, False)
    assert torch.equal(out_values[evicted], values[evicted])  # only kept positions change
    changed = (gather_tokens(out_values, kept) != gather_tokens(values, kept)).any(dim=-1)
    if threshold < 0.9:
        assert changed.any()


def test_merge_fraction_keeps_the_most_similar_share():
    keys, values, kept = constructed(seed=1, k_len=21, n_kept=1, bsz=1, num_kv_heads=1)
    # 20 evicted tokens, all with a positive similarity to the single kept key
    keys[0, 0] = keys[0, 0, kept[0, 0, 0]] + 0.8 * keys[0, 0]
    sims = torch.nn.functional.cosine_similarity(keys[0, 0], keys[0, 0, kept[0, 0, 0]][None], dim=-1)
    assert (sims > 0).all()  # so the reference uses upstream's quantile definition
    _, merged_all = MergingPress(KnormPress(0.5)).merge(keys, values, kept)
    _, merged_half = MergingPress(KnormPress(0.5), merge_fraction=0.5).merge(keys, values, kept)
    assert not torch.allclose(merged_all, merged_half)
    torch.testing.assert_close(merged_half, reference_merge(keys, values, kept, fraction=0.5), atol=1e-6, rtol=1e-5)
    # no evicted key is exactly parallel to the kept one: with threshold 1 nothing is merged
    _, untouched = MergingPress(KnormPress(0.5), similarity_threshold=1.0).merge(keys, values, kept)
    assert torch.equal(untouched, values)


def test_merge_fraction_with_few_mergeable_tokens_merges_them():
    """Only 1 of 5 evicted tokens is similar enough; merge_fraction=0.5 still merges it (upstream's quantile over
    -inf entries is NaN there and silently merges nothing)."""
    generator = torch.Generator().manual_seed(5)
    anchor = torch.randn(6, generator=generator)
    noise = 0.05 * torch.randn(5, 6, generator=generator)
    evicted = torch.cat([anchor[None] + noise[:1], -anchor[None] + noise[1:]])  # similarities ~ +1, -1, -1, -1, -1
    keys = torch.cat([anchor[None], evicted])[None, None]
    values = torch.randn(1, 1, 6, 6, generator=generator)
    kept = torch.tensor([[[0]]])
    _, merged = MergingPress(KnormPress(0.5), merge_fraction=0.5).merge(keys, values, kept)
    assert not torch.equal(merged[0, 0, 0], values[0, 0, 0])
    torch.testing.assert_close(merged, reference_merge(keys, values, kept, fraction=0.5), atol=1e-6, rtol=1e-5)


def test_merge_edge_cases_and_half_precision():
    keys, values, kept = constructed(seed=2)
    press = MergingPress(KnormPress(0.5))
    all_kept = torch.arange(12).expand(2, 2, 12)
    assert press.merge(keys, values, all_kept) == (keys, values)
    assert press.merge(keys, values, all_kept[..., :0]) == (keys, values)
    out_keys, out_values = press.merge(keys.half(), values.half(), kept)
    assert out_values.dtype == torch.float16 and torch.isfinite(out_values).all()
    torch.testing.assert_close(out_values.float(), reference_merge(keys, values, kept), atol=2e-2, rtol=1e-2)


def test_merging_press_on_a_model_equals_direct_computation():
    model = get_model("llama")
    input_ids = random_input_ids(2, 64, seed=3)
    cache = prefill(model, input_ids, MergingPress(KnormPress(0.5)))
    full = prefill(model, input_ids)
    knorm = prefill(model, input_ids, KnormPress(0.5))
    for layer_idx in compressed_layers(model):
        keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        full_keys, full_values = full.layers[layer_idx].keys, full.layers[layer_idx].values
        kept = (-full_keys.norm(dim=-1)).topk(32, dim=-1).indices.sort(dim=-1).values
        assert keys.shape[2] == 32
        assert torch.equal(keys, knorm.layers[layer_idx].keys)  # the same tokens as the inner press
        expected = gather_tokens(reference_merge(full_keys, full_values, kept), kept)
        torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(values, knorm.layers[layer_idx].values)  # merged, not hard-evicted


def test_merging_delegation_and_bad_input():
    press = MergingPress(KnormPress(0.25))
    assert (press.similarity_threshold, press.merge_fraction) == (0.0, 1.0)
    assert press.compression_ratio == 0.25
    press.compression_ratio = 0.0
    assert prefill(get_model("llama"), random_input_ids(1, 20), press).get_seq_length() == 20
    with pytest.raises(TypeError, match="ScorerPress"):
        MergingPress()
    with pytest.raises(TypeError, match="ScorerPress"):
        MergingPress(ComposedPress([KnormPress(0.5)]))
    with pytest.raises(ValueError, match="similarity_threshold"):
        MergingPress(KnormPress(0.5), similarity_threshold=1.5)
    with pytest.raises(ValueError, match="merge_fraction"):
        MergingPress(KnormPress(0.5), merge_fraction=0.0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("inner", ["knorm", "snapkv"])
def test_merging_on_every_architecture(arch, inner):
    model = get_model(arch)
    make = (lambda: KnormPress(0.5)) if inner == "knorm" else (lambda: SnapKVPress(0.5, window_size=2))
    input_ids = random_input_ids(2, SEQ_LEN, seed=4)
    cache = prefill(model, input_ids, MergingPress(make()))
    plain = prefill(model, input_ids, make())
    merged_somewhere = False
    for layer_idx in compressed_layers(model):
        assert cache.layers[layer_idx].keys.shape[2] == int(SEQ_LEN * 0.5)
        assert torch.equal(cache.layers[layer_idx].keys, plain.layers[layer_idx].keys)
        merged_somewhere |= not torch.equal(cache.layers[layer_idx].values, plain.layers[layer_idx].values)
    assert merged_somewhere
    with torch.no_grad():
        logits = model(random_input_ids(2, 1, seed=5), **cache_kwargs(model, cache)).logits
    assert torch.isfinite(logits).all()
