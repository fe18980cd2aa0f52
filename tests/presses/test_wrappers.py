# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ComposedPress, PerLayerCompressionPress and ChunkPress."""

from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    AdaKVPress,
    BasePress,
    ChunkPress,
    ComposedPress,
    KeyRerotationPress,
    KnormPress,
    KVzipPress,
    ObservedAttentionPress,
    PerLayerCompressionPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
)
from kvpress.presses.scorer_press import gather_tokens
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import compressed_layers, get_model, prefill, random_input_ids, record_layers


@dataclass
class RecordingKnormPress(KnormPress):
    """KnormPress that records what each `score` call received, and the models it was initialised with."""

    calls: list = field(default_factory=list, repr=False)
    initialised_with: list = field(default_factory=list, repr=False)

    def post_init_from_model(self, model):
        self.initialised_with.append(model)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        cos, sin = kwargs["position_embeddings"]
        self.calls.append(
            {
                "layer": module.layer_idx,
                "ratio": self.compression_ratio,
                "hidden_states": hidden_states,
                "kwargs_hidden_states": kwargs["hidden_states"],
                "keys": keys,
                "cos": cos,
                "sin": sin,
                "position_ids": kwargs["position_ids"],
                "attentions": attentions,
            }
        )
        return super().score(module, hidden_states, keys, values, attentions, kwargs)


# ComposedPress


def test_composed_chains_presses_on_the_compressed_cache():
    model = get_model("llama")
    input_ids = random_input_ids(2, 128)
    press = ComposedPress([KnormPress(0.5), StreamingLLMPress(0.5, n_sink=4)])
    assert press.compression_ratio == pytest.approx(1 - 0.5 * 0.5)

    cache = prefill(model, input_ids, press)
    knorm_only = prefill(model, input_ids, KnormPress(0.5))
    for layer_idx in compressed_layers(model):
        keys = cache.layers[layer_idx].keys
        assert keys.shape[2] == int(int(128 * 0.5) * 0.5) == 32
        # StreamingLLM on Knorm's output (kept in positional order): 4 sinks then the 28 most recent entries
        knorm_keys = knorm_only.layers[layer_idx].keys
        torch.testing.assert_close(keys, torch.cat([knorm_keys[:, :, :4], knorm_keys[:, :, -28:]], dim=2))
    assert press.compression_ratio == pytest.approx(0.75)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_composed_under_eager_drops_attentions_after_a_press_removed_tokens(batch_size):
    """The known failure: under eager, SnapKV after Knorm got the full context's attention weights (shape mismatch).
    The second press now scores the compressed cache as it would under sdpa (attentions=None, its window's attention
    recomputed over the kept keys): the same kept entries as the sdpa model (same weights), and the same as SnapKV
    called directly on Knorm's cache."""
    input_ids = random_input_ids(batch_size, 100, seed=5)
    eager = prefill(get_model("llama", "eager"), input_ids, ComposedPress([KnormPress(0.3), SnapKVPress(0.3)]))
    sdpa = prefill(get_model("llama"), input_ids, ComposedPress([KnormPress(0.3), SnapKVPress(0.3)]))
    model = get_model("llama")
    knorm = prefill(model, input_ids, KnormPress(0.3))
    calls = record_layers(model, input_ids)
    for layer_idx in compressed_layers(model):
        keys = eager.layers[layer_idx].keys
        assert keys.shape[2] == int(int(100 * 0.7) * 0.7) == 49
        torch.testing.assert_close(keys, sdpa.layers[layer_idx].keys, atol=1e-5, rtol=1e-5)
        call = calls[layer_idx]
        knorm_keys, knorm_values = knorm.layers[layer_idx].keys, knorm.layers[layer_idx].values
        expected, _ = SnapKVPress(0.3).compress(
            call["module"], call["hidden_states"], knorm_keys, knorm_values, None, call["kwargs"]
        )
        torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-5)


def test_composed_keeps_eager_attentions_while_they_match_the_cache():
    """ObservedAttention first (the cache still matches the weights) gets the eager weights; after a press that
    removed tokens it cannot score with them and says so."""
    model = get_model("llama", "eager")
    input_ids = random_input_ids(1, 64, seed=6)
    composed = prefill(model, input_ids, ComposedPress([ObservedAttentionPress(0.5), KnormPress(0.5)]))
    observed = prefill(model, input_ids, ObservedAttentionPress(0.5))
    for layer_idx in compressed_layers(model):
        knorm_of_observed = -observed.layers[layer_idx].keys.norm(dim=-1)  # Knorm keeps the smallest key norms
        kept = knorm_of_observed.topk(16, dim=-1).indices.sort(dim=-1).values
        expected = observed.layers[layer_idx].keys.gather(2, kept[..., None].expand(-1, -1, -1, 16))
        torch.testing.assert_close(composed.layers[layer_idx].keys, expected)
    with pytest.raises(ValueError, match="Put ObservedAttentionPress first"):
        prefill(model, input_ids, ComposedPress([KnormPress(0.5), ObservedAttentionPress(0.5)]))


def test_composed_ratio_follows_inner_presses_and_is_read_only():
    inner = KnormPress(0.2)
    press = ComposedPress([inner, RandomPress(0.5)])
    assert press.compression_ratio == pytest.approx(1 - 0.8 * 0.5)
    inner.compression_ratio = 0.0
    assert press.compression_ratio == pytest.approx(0.5)
    with pytest.raises(AttributeError, match="inner presses"):
        press.compression_ratio = 0.3
    assert ComposedPress([KnormPress(0.5), BasePress()]).compression_ratio is None


def test_composed_forwards_post_init_and_works_in_generate():
    model = get_model("qwen3")
    first, second = RecordingKnormPress(0.25), RecordingKnormPress(0.5)
    input_ids = random_input_ids(1, 64)
    with torch.no_grad(), ComposedPress([first, KeyRerotationPress(second)])(model):
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 67)
    assert first.initialised_with == [model] and second.initialised_with == [model]
    assert [call["keys"].shape[2] for call in second.calls] == [48] * len(compressed_layers(model))


@dataclass
class NotComposablePress(KnormPress):
    composable = False


@pytest.mark.parametrize(
    "press", [AdaKVPress(KnormPress(0.5)), KVzipPress(0.5), NotComposablePress(0.5)], ids=lambda p: type(p).__name__
)
def test_composed_rejects_headwise_and_custom_context_presses(press):
    with pytest.raises(ValueError, match="cannot be composed"):
        ComposedPress([KnormPress(0.5), press])


def test_composed_bad_input():
    with pytest.raises(TypeError, match="list of presses"):
        ComposedPress(KnormPress(0.5))
    with pytest.raises(TypeError, match="not a kvpress press"):
        ComposedPress([KnormPress(0.5), "knorm"])


# PerLayerCompressionPress


def test_per_layer_ratios_give_per_layer_lengths():
    model = get_model("llama")
    inner = RecordingKnormPress(0.3)
    press = PerLayerCompressionPress(inner, [0.1, 1.0])
    assert press.compression_ratio == pytest.approx(0.55)
    cache = prefill(model, random_input_ids(5, 256), press)
    assert cache.layers[0].keys.shape == (5, 2, 230, 16)
    assert cache.layers[1].keys.shape == (5, 2, 0, 16)
    assert [(call["layer"], call["ratio"]) for call in inner.calls] == [(0, 0.1), (1, 1.0)]
    assert inner.compression_ratio == 0.3  # restored after each layer
    assert inner.initialised_with == [model]  # post_init_from_model is forwarded (upstream does not)


def test_per_layer_skips_gemma3_sliding_layers():
    model = get_model("gemma3")
    cache = prefill(model, random_input_ids(1, 64), PerLayerCompressionPress(KnormPress(), [0.5, 0.25]))
    reference = prefill(model, random_input_ids(1, 64))
    assert cache.layers[1].keys.shape[2] == 48
    assert torch.equal(cache.layers[0].keys, reference.layers[0].keys)  # the sliding layer is left as it is


def test_per_layer_generate_continues_with_different_layer_lengths():
    """sdpa single-token decoding (model.generate, no padding) works although layers hold different lengths."""
    model = get_model("mistral")
    input_ids = random_input_ids(2, 64)
    cache = DynamicCache()
    with torch.no_grad(), PerLayerCompressionPress(KnormPress(), [0.5, 0.25])(model):
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=4,
            do_sample=False,
            **cache_kwargs(model, cache),
        )
    assert out.shape == (2, 68)
    assert [layer.keys.shape[2] for layer in cache.layers] == [32 + 3, 48 + 3]


def test_per_layer_bad_input():
    with pytest.raises(ValueError, match=r"compression_ratios\[1\]"):
        PerLayerCompressionPress(KnormPress(), [0.1, 1.5])
    with pytest.raises(ValueError, match=r"compression_ratios\[0\]"):
        PerLayerCompressionPress(KnormPress(), [-0.1, 0.5])
    with pytest.raises(ValueError, match="empty"):
        PerLayerCompressionPress(KnormPress(), [])
    with pytest.raises(TypeError, match="one compression ratio per decoder layer"):
        PerLayerCompressionPress(KnormPress(), 0.5)
    with pytest.raises(TypeError, match="ScorerPress"):
        PerLayerCompressionPress(AdaKVPress(KnormPress(0.5)), [0.1, 0.2])
    press = PerLayerCompressionPress(KnormPress(), [0.1, 0.2, 0.3])
    with pytest.raises(AttributeError, match="compression_ratios"):
        press.compression_ratio = 0.5
    with pytest.raises(ValueError, match="3 compression_ratios but LlamaForCausalLM has 2 decoder layers"):
        prefill(get_model("llama"), random_input_ids(1, 16), press)


# ChunkPress


@pytest.mark.parametrize("chunk_length", [2, 4, 8, 128])
def test_chunk_keeps_the_top_scores_of_each_chunk(chunk_length):
    model = get_model("llama")
    input_ids = random_input_ids(2, 256)
    cache = prefill(model, input_ids, ChunkPress(KnormPress(0.5), chunk_length=chunk_length))
    full = prefill(model, input_ids)
    for layer_idx in compressed_layers(model):
        keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        assert keys.shape[2] == 128
        full_keys, full_values = full.layers[layer_idx].keys, full.layers[layer_idx].values
        scores = -full_keys.norm(dim=-1)
        indices = []
        for start in range(0, 256, chunk_length):
            chunk = scores[..., start : start + chunk_length]
            indices.append(chunk.topk(chunk_length // 2, dim=-1).indices.sort(dim=-1).values + start)
        indices = torch.cat(indices, dim=-1)
        assert torch.equal(keys, gather_tokens(full_keys, indices))
        assert torch.equal(values, gather_tokens(full_values, indices))
        if chunk_length < 128:  # chunking changes the selection compared with one global top-k
            global_top = scores.topk(128, dim=-1).indices.sort(dim=-1).values
            assert not torch.equal(indices, global_top)


def test_chunk_counts_floor_per_chunk_and_keep_at_least_one():
    model = get_model("llama")
    cache = prefill(model, random_input_ids(1, 100), ChunkPress(KnormPress(0.9), chunk_length=4))
    assert cache.get_seq_length() == 25  # max(1, int(4 * 0.1)) = 1 per chunk
    cache = prefill(model, random_input_ids(1, 100), ChunkPress(KnormPress(0.5), chunk_length=32))
    assert cache.get_seq_length() == 3 * 16 + 2


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_chunk_scorer_sees_its_own_chunk(attn_implementation):
    """Unlike upstream, each chunk gets its own cos/sin, position_ids and hidden states (and attention under eager)."""
    model = get_model("llama", attn_implementation)
    seq_len, chunk_length = 40, 16
    input_ids = random_input_ids(1, seq_len)
    inner = RecordingKnormPress(0.5)
    prefill(model, input_ids, ChunkPress(inner, chunk_length=chunk_length))
    full_cos, full_sin = model.model.rotary_emb(torch.zeros(1), torch.arange(seq_len)[None])

    starts = [0, 16, 32]
    assert [call["layer"] for call in inner.calls] == [0, 0, 0, 1, 1, 1]
    for call, start in zip(inner.calls, starts * 2):
        end = min(start + chunk_length, seq_len)
        torch.testing.assert_close(call["cos"], full_cos[:, start:end])
        torch.testing.assert_close(call["sin"], full_sin[:, start:end])
        assert call["position_ids"].tolist() == [list(range(start, end))]
        assert call["keys"].shape[2] == call["hidden_states"].shape[1] == end - start
        assert torch.equal(call["kwargs_hidden_states"], call["hidden_states"])
        if attn_implementation == "eager":
            assert call["attentions"].shape == (1, 4, end - start, end - start)
        else:
            assert call["attentions"] is None


def test_chunk_delegation_and_bad_input():
    press = ChunkPress(KnormPress(0.4), chunk_length=8)
    assert press.compression_ratio == 0.4
    press.compression_ratio = 0.0
    assert press.press.compression_ratio == 0.0
    assert prefill(get_model("llama"), random_input_ids(1, 20), press).get_seq_length() == 20
    with pytest.raises(TypeError, match="ScorerPress"):
        ChunkPress(ComposedPress([KnormPress(0.5)]))
    with pytest.raises(ValueError, match="chunk_length"):
        ChunkPress(KnormPress(0.5), chunk_length=0)
    with pytest.raises(ValueError, match="compression_ratio"):
        ChunkPress(KnormPress(-0.5))
