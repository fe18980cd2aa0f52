# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ObservedAttentionPress: reference scores from the eager weights, the same kept caches under sdpa (recomputed
weights), kept counts."""

import pytest
import torch

from kvpress import ObservedAttentionPress
from kvpress.attention_weights import received_attention_sums
from kvpress.transformers_adapter import find_cache, output_cache
from tests.fixtures import (
    ARCHITECTURES,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    compressed_layers,
    get_model,
    press_hooks,
    random_input_ids,
)

GROUPS = HEADS // KV_HEADS
RATIOS = (0.0, 0.25, 0.5, 0.9)


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen3", "gemma3_text", "gemma3"])
def test_scores_are_mean_received_attention(arch):
    model, length = get_model(arch, "eager"), 24
    input_ids = random_input_ids(1, length, seed=1)
    captured = {}

    class RecordingPress(ObservedAttentionPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            scores = super().score(module, hidden_states, keys, values, attentions, kwargs)
            captured[module.layer_idx] = scores
            return scores

    with torch.no_grad():
        with RecordingPress(0.5)(model):
            model(input_ids, use_cache=True)
        # The model's own attention weights, returned independently of any press.
        weights = model(input_ids, output_attentions=True).attentions
    assert sorted(captured) == compressed_layers(model)
    for layer_idx, scores in captured.items():
        attention = weights[layer_idx][0]  # (H, T, T)
        expected = torch.zeros(KV_HEADS, length)
        for head in range(HEADS):
            for key in range(length):
                # Queries key .. T-1 can see this key; average what they gave it.
                expected[head // GROUPS, key] += attention[head, key:, key].mean() / GROUPS
        torch.testing.assert_close(scores, expected.unsqueeze(0), rtol=1e-4, atol=1e-6)


def test_scores_on_constructed_attention():
    # Uniform causal attention: query i gives 1/(i+1) to each of keys 0..i.
    length = 4
    attentions = torch.tril(torch.ones(length, length)) / torch.arange(1, length + 1)[:, None]
    attentions = attentions.expand(1, HEADS, length, length)
    keys = torch.zeros(1, KV_HEADS, length, HEAD_DIM)
    scores = ObservedAttentionPress(0.5).score(None, torch.zeros(1, length, 8), keys, keys, attentions, {})
    received = [1 + 1 / 2 + 1 / 3 + 1 / 4, 1 / 2 + 1 / 3 + 1 / 4, 1 / 3 + 1 / 4, 1 / 4]
    expected = torch.tensor([total / (length - key) for key, total in enumerate(received)])
    torch.testing.assert_close(scores, expected.expand(1, KV_HEADS, length))
    # Without the division by the number of queries that see a key, token 0 would win by far; with it the last
    # token scores 1/4 and token 0 about 0.52.
    assert scores[0, 0].argmax() == 0 and scores[0, 0, -1] == pytest.approx(0.25)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_sdpa_keeps_what_eager_keeps(arch):
    """Without eager attention the press recomputes the weights from queries and keys (in chunks of queries): the
    kept caches equal those of the eager model with the same parameters. (Padded batches: issue 22.)"""
    input_ids = random_input_ids(2, 40, seed=4)
    mask = torch.ones_like(input_ids)
    caches = {}
    for implementation in ("eager", "sdpa"):
        model = get_model(arch, implementation)
        with torch.no_grad(), ObservedAttentionPress(0.5)(model):
            caches[implementation] = output_cache(model(input_ids, attention_mask=mask, use_cache=True))
        language_model = model.model.language_model if arch == "gemma3" else model.model
        assert all(not press_hooks(layer.self_attn) for layer in language_model.layers)
    for eager_layer, sdpa_layer in zip(caches["eager"].layers, caches["sdpa"].layers):
        assert eager_layer.keys.shape == sdpa_layer.keys.shape
        torch.testing.assert_close(eager_layer.keys, sdpa_layer.keys, atol=1e-5, rtol=1e-4)


def test_recomputed_weights_are_chunked_and_exact():
    """The recomputation in chunks of queries equals one full softmax, whatever the chunk size."""
    model = get_model("llama", "eager")
    attention = model.model.layers[1].self_attn
    hidden = torch.randn(1, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    recorded = {}
    handle = attention.register_forward_hook(
        lambda m, a, kw, out: recorded.update(kwargs=kw, weights=out[1]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(inputs_embeds=hidden, use_cache=True)
    finally:
        handle.remove()
    layer_input = recorded["kwargs"]["hidden_states"]
    keys = find_cache(recorded["kwargs"]).layers[1].keys
    for max_elements in (1 << 26, 24 * HEADS, 1):  # one chunk, one query row per chunk, minimal
        sums, first = received_attention_sums(
            attention, layer_input, keys, recorded["kwargs"], keep_first_batch_item=True, max_elements=max_elements
        )
        torch.testing.assert_close(sums, recorded["weights"].sum(dim=-2), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(first, recorded["weights"][0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kept_token_counts(arch):
    model, length = get_model(arch, "eager"), 48
    input_ids = random_input_ids(1, length, seed=2)
    with torch.no_grad():
        full_lengths = [layer.keys.shape[2] for layer in output_cache(model(input_ids, use_cache=True)).layers]
    for ratio in RATIOS:
        with torch.no_grad(), ObservedAttentionPress(ratio)(model):
            cache = output_cache(model(input_ids, use_cache=True))
        for layer_idx, layer in enumerate(cache.layers):
            expected = int(length * (1 - ratio)) if layer_idx in compressed_layers(model) else full_lengths[layer_idx]
            assert layer.keys.shape == layer.values.shape == (1, KV_HEADS, expected, HEAD_DIM)


def test_keeps_the_most_attended_tokens():
    model, length = get_model("qwen2", "eager"), 32
    input_ids = random_input_ids(1, length, seed=3)
    scores = {}

    class RecordingPress(ObservedAttentionPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            scores[module.layer_idx] = (super().score(module, hidden_states, keys, values, attentions, kwargs), keys)
            return scores[module.layer_idx][0]

    with torch.no_grad(), RecordingPress(0.75)(model):
        cache = output_cache(model(input_ids, use_cache=True))
    for layer_idx, (layer_scores, full_keys) in scores.items():
        expected = layer_scores.topk(length // 4, dim=-1).indices.sort(dim=-1).values
        kept = cache.layers[layer_idx].keys
        torch.testing.assert_close(kept, full_keys.gather(2, expected.unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM)))


def test_with_a_budget_decoding_scores_the_window_of_recent_queries_under_every_backend():
    """With a `cache_budget`, each decoding eviction ranks the keys by the mean attention they received from the
    last `decoding_window` queries (recomputed; eager's single row of the step is not used, which made the press
    TOVA per head under eager only): eager and sdpa evict the same entries at every step."""
    caches = {}
    for implementation in ("eager", "sdpa"):
        model = get_model("llama", implementation)
        press = ObservedAttentionPress(cache_budget=12)
        with torch.no_grad(), press(model):
            out = model.generate(
                random_input_ids(1, 20, seed=6), max_new_tokens=8, do_sample=False, return_dict_in_generate=True
            )
        caches[implementation] = [layer.keys.clone() for layer in output_cache(out).layers]
    for eager, sdpa in zip(caches["eager"], caches["sdpa"]):
        assert eager.shape[2] == 12
        torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)


def test_attention_rows_of_other_queries_are_not_used():
    """Weights that cover the scored queries are used; a decoding step's single row, for a window of several
    queries, is not: the score is then the recomputed one (the same as without weights)."""
    model = get_model("llama", "eager")
    length = 16
    input_ids = random_input_ids(1, length, seed=7)
    records = {}

    def hook(module, args, kwargs, output):
        records[module.layer_idx] = (kwargs, output[1])

    handles = [model.model.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True) for i in (0, 1)]
    with torch.no_grad():
        out = model(input_ids, use_cache=True)
    for handle in handles:
        handle.remove()
    press = ObservedAttentionPress()
    cache = output_cache(out)
    for layer, (kwargs, weights) in records.items():
        module = model.model.layers[layer].self_attn
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        window = kwargs["hidden_states"][:, -4:]
        cos, sin = kwargs["position_embeddings"]
        window_kwargs = dict(
            kwargs,
            hidden_states=window,
            position_embeddings=(cos[:, -4:], sin[:, -4:]),
            position_ids=torch.arange(length - 4, length).unsqueeze(0),
            attention_mask=None,
        )
        with torch.no_grad():
            recomputed = press.score(module, window, keys, values, None, window_kwargs)
            with_last_row = press.score(module, window, keys, values, weights[..., -1:, :], window_kwargs)
            with_rows = press.score(module, window, keys, values, weights[..., -4:, :], window_kwargs)
        torch.testing.assert_close(with_last_row, recomputed)
        torch.testing.assert_close(with_rows, recomputed, atol=1e-5, rtol=1e-4)
        # the reference: the eager rows of the last 4 queries, divided by the number of them that see each key
        n_queries = (length - torch.arange(length)).clamp(max=4).float()
        expected = (weights[0, :, -4:].sum(dim=-2) / n_queries).view(KV_HEADS, GROUPS, length).mean(dim=1)
        torch.testing.assert_close(recomputed[0], expected, atol=1e-5, rtol=1e-4)
