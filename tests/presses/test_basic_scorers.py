# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ScorerPress mechanics and the presses that need no attention: Knorm, Random, StreamingLLM."""

from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

from kvpress import KnormPress, RandomPress, ScorerPress, StreamingLLMPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, random_input_ids

pytestmark = pytest.mark.core


class DummyModule(torch.nn.Module):
    head_dim = 8
    layer_idx = 0


def random_kv(batch=2, heads=3, seq=20, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, seq, dim, generator=generator)
    values = torch.randn(batch, heads, seq, dim, generator=generator)
    return keys, values


def test_knorm_keeps_the_smallest_norm_keys_in_positional_order():
    keys, values = random_kv()
    press = KnormPress(0.5)
    kept_keys, kept_values = press.compress(DummyModule(), None, keys, values, None, {})
    assert kept_keys.shape == (2, 3, 10, 8)
    norms = keys.norm(dim=-1)
    for b in range(2):
        for h in range(3):
            expected = norms[b, h].argsort()[:10].sort().values  # smallest norms, in position order
            assert torch.equal(kept_keys[b, h], keys[b, h, expected])
            assert torch.equal(kept_values[b, h], values[b, h, expected])


def test_each_head_chooses_its_own_tokens():
    keys, values = random_kv(batch=1, heads=2)
    keys[0, 0, :5] *= 0.01  # head 0 prefers the first tokens
    keys[0, 1, -5:] *= 0.01  # head 1 prefers the last tokens
    kept_keys, _ = KnormPress(0.75).compress(DummyModule(), None, keys, values, None, {})
    assert torch.equal(kept_keys[0, 0], keys[0, 0, :5])
    assert torch.equal(kept_keys[0, 1], keys[0, 1, -5:])


def test_ratio_zero_returns_inputs_without_scoring():
    @dataclass
    class NeverScore(ScorerPress):
        def score(self, *args, **kwargs):
            raise AssertionError("score must not be called at ratio 0")

    keys, values = random_kv()
    out_keys, out_values = NeverScore(0.0).compress(DummyModule(), None, keys, values, None, {})
    assert out_keys is keys and out_values is values


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
def test_keeps_the_highest_scores_for_every_ratio(ratio):
    @dataclass
    class StoreKnorm(KnormPress):
        seen: list = field(default_factory=list)

        def score(self, *args, **kwargs):
            scores = super().score(*args, **kwargs)
            self.seen.append(scores)
            return scores

    model = get_model("llama")
    press = StoreKnorm(ratio)
    cache = DynamicCache()
    with press(model):
        model.model(input_ids=random_input_ids(3, 64), **cache_kwargs(model.model, cache))
    n_kept = int(64 * (1 - ratio))
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.keys.shape == (3, 2, n_kept, 16)
        if ratio == 0:
            continue
        kept_scores = -layer.keys.norm(dim=-1)
        expected = press.seen[layer_idx].topk(n_kept, dim=-1).values
        torch.testing.assert_close(kept_scores.sort(dim=-1).values, expected.sort(dim=-1).values)


def test_streaming_llm_keeps_sinks_and_recent_window():
    keys, values = random_kv(seq=30)
    kept_keys, _ = StreamingLLMPress(0.5, n_sink=4).compress(DummyModule(), None, keys, values, None, {})
    expected = torch.cat([torch.arange(4), torch.arange(30 - 11, 30)])
    assert torch.equal(kept_keys, keys[:, :, expected])


def test_streaming_llm_rejects_too_short_inputs():
    keys, values = random_kv(seq=4)
    with pytest.raises(ValueError, match="n_sink"):
        StreamingLLMPress(0.5, n_sink=4).compress(DummyModule(), None, keys, values, None, {})


def test_random_press_seed_is_reproducible_and_seeds_differ():
    keys, values = random_kv()
    first, _ = RandomPress(0.5, seed=3).compress(DummyModule(), None, keys, values, None, {})
    again, _ = RandomPress(0.5, seed=3).compress(DummyModule(), None, keys, values, None, {})
    other, _ = RandomPress(0.5, seed=4).compress(DummyModule(), None, keys, values, None, {})
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_random_press_runs_on_cuda():
    keys, values = (t.cuda() for t in random_kv())
    kept, _ = RandomPress(0.5, seed=3).compress(DummyModule(), None, keys, values, None, {})
    cpu_kept, _ = RandomPress(0.5, seed=3).compress(DummyModule(), None, keys.cpu(), values.cpu(), None, {})
    assert torch.equal(kept.cpu(), cpu_kept)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", None])
@pytest.mark.parametrize("press_cls", [KnormPress, RandomPress, StreamingLLMPress])
def test_compression_ratio_out_of_range_is_rejected(press_cls, bad):
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        press_cls(compression_ratio=bad)


def test_score_with_a_wrong_shape_is_reported():
    @dataclass
    class WrongShape(ScorerPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            return keys.norm(dim=-1).mean(dim=1)

    keys, values = random_kv()
    with pytest.raises(ValueError, match=r"shape \(batch, kv_heads, seq_len\)"):
        WrongShape(0.5).compress(DummyModule(), None, keys, values, None, {})


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("press_cls", [KnormPress, RandomPress, StreamingLLMPress])
def test_kept_token_counts_on_every_architecture(arch, press_cls):
    model = get_model(arch)
    compressed = compressed_layers(model)
    seq_len = 48
    for ratio in (0.0, 0.3, 0.5, 0.9):
        cache = DynamicCache()
        with press_cls(ratio)(model):
            model.model(input_ids=random_input_ids(1, seq_len), **cache_kwargs(model.model, cache))
        for layer_idx, layer in enumerate(cache.layers):
            expected = int(seq_len * (1 - ratio)) if layer_idx in compressed else seq_len
            assert layer.keys.shape[2] == expected and layer.values.shape[2] == expected, (arch, ratio, layer_idx)
