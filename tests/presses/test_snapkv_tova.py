# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""SnapKVPress and TOVAPress: recomputed window attention, kept tokens, constructed inputs, kept counts."""

import pytest
import torch

from kvpress import SnapKVPress, TOVAPress
from tests.fixtures import (
    ARCHITECTURES,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    compressed_layers,
    get_model,
    prefill,
    random_input_ids,
    record_layers,
)

GROUPS = HEADS // KV_HEADS
RATIOS = (0.0, 0.25, 0.5, 0.9)


def score_of(press, call: dict, attentions) -> torch.Tensor:
    return press.score(call["module"], call["hidden_states"], call["keys"], call["values"], attentions, call["kwargs"])


def kept_indices(full_keys: torch.Tensor, kept_keys: torch.Tensor) -> torch.Tensor:
    """Position in the full cache of every kept key, `(B, H_kv, n)`."""
    distances = (kept_keys.unsqueeze(3) - full_keys.unsqueeze(2)).norm(dim=-1)
    assert distances.min(dim=-1).values.max() < 1e-5, "a kept key is not in the uncompressed cache"
    return distances.argmin(dim=-1)


def reference_attention(model, layer_idx: int, hidden_states: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Causal attention weights `(B, H, T, T)` of a Llama layer, computed by hand from q_proj and the cached keys."""
    logits = reference_logits(model, layer_idx, hidden_states, keys)
    length = logits.shape[-1]
    future = torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def reference_logits(model, layer_idx: int, hidden_states: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Raw attention logits `(B, H, T, T)` (no mask) of a Llama layer, by hand from q_proj and the cached keys."""
    attention = model.model.layers[layer_idx].self_attn
    bsz, length, _ = hidden_states.shape
    queries = attention.q_proj(hidden_states).view(bsz, length, HEADS, HEAD_DIM).transpose(1, 2)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * model.model.rotary_emb.inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    half = HEAD_DIM // 2
    rotated = torch.cat([-queries[..., half:], queries[..., :half]], dim=-1)
    queries = queries * angles.cos() + rotated * angles.sin()
    return queries @ keys.repeat_interleave(GROUPS, dim=1).transpose(2, 3) / HEAD_DIM**0.5


def reference_snapkv_scores(attention: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """Window-mean attention, zero-padded moving average over `kernel` tokens, GQA group mean: `(B, H_kv, T - w)`."""
    observed = attention[..., -window:, :-window].mean(dim=-2)
    length = observed.shape[-1]
    pooled = torch.zeros_like(observed)
    for j in range(length):
        lo, hi = max(0, j - kernel // 2), min(length, j + kernel // 2 + 1)
        pooled[..., j] = observed[..., lo:hi].sum(dim=-1) / kernel
    return pooled.view(pooled.shape[0], KV_HEADS, GROUPS, length).mean(dim=2)


def test_eager_and_sdpa_models_share_weights():
    for arch in ("llama", "phi3", "qwen3", "gemma3_text", "gemma3"):
        eager, sdpa = get_model(arch, "eager").state_dict(), get_model(arch, "sdpa").state_dict()
        assert eager.keys() == sdpa.keys()
        assert all(torch.equal(eager[name], sdpa[name]) for name in eager)


@pytest.mark.parametrize("arch", ["llama", "mistral", "phi3", "qwen2", "qwen3", "gemma3_text", "gemma3"])
@pytest.mark.parametrize("press", [SnapKVPress(0.5, window_size=8), TOVAPress(0.5)], ids=["snapkv", "tova"])
def test_recomputed_attention_matches_eager_weights(arch, press):
    input_ids = random_input_ids(1, 48, seed=1)
    eager_calls = record_layers(get_model(arch, "eager"), input_ids)
    sdpa_calls = record_layers(get_model(arch, "sdpa"), input_ids)
    assert sorted(eager_calls) == sorted(sdpa_calls) == compressed_layers(get_model(arch))
    for layer_idx, eager_call in eager_calls.items():
        assert eager_call["attentions"] is not None and sdpa_calls[layer_idx]["attentions"] is None
        with torch.no_grad():
            from_weights = score_of(press, eager_call, eager_call["attentions"])
            recomputed_same_input = score_of(press, eager_call, None)
            recomputed_sdpa = score_of(press, sdpa_calls[layer_idx], None)
        assert from_weights.shape == (1, KV_HEADS, 48)
        assert from_weights[..., :-8].std() > 0  # real scores, not a constant
        torch.testing.assert_close(recomputed_same_input, from_weights, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(recomputed_sdpa, from_weights, rtol=1e-4, atol=1e-6)


def test_snapkv_keeps_window_and_most_attended_tokens():
    model, window, kernel, length = get_model("llama"), 8, 5, 64
    input_ids = random_input_ids(1, length, seed=2)
    calls = record_layers(model, input_ids)
    full = prefill(model, input_ids)
    compressed = prefill(model, input_ids, SnapKVPress(0.5, window_size=window, kernel_size=kernel))
    n_kept = int(length * 0.5)
    for layer_idx, call in calls.items():
        with torch.no_grad():
            attention = reference_attention(model, layer_idx, call["hidden_states"], call["keys"])
        reference = reference_snapkv_scores(attention, window, kernel)
        kept = kept_indices(full.layers[layer_idx].keys, compressed.layers[layer_idx].keys)
        for head in range(KV_HEADS):
            expected = set(reference[0, head].topk(n_kept - window).indices.tolist()) | set(
                range(length - window, length)
            )
            assert set(kept[0, head].tolist()) == expected
        # Kept tokens stay in positional order.
        assert torch.equal(kept, kept.sort(dim=-1).values)


def test_snapkv_reference_attention_is_the_models_attention():
    """Guards the hand-written reference used above against drifting from the model's real attention."""
    model = get_model("llama", "eager")
    calls = record_layers(model, random_input_ids(1, 32, seed=3))
    for layer_idx, call in calls.items():
        with torch.no_grad():
            reference = reference_attention(model, layer_idx, call["hidden_states"], call["keys"])
        torch.testing.assert_close(reference, call["attentions"], rtol=1e-4, atol=1e-6)


def test_tova_keeps_last_token_and_tokens_it_attends_to():
    model, length = get_model("llama"), 64
    input_ids = random_input_ids(1, length, seed=4)
    calls = record_layers(model, input_ids)
    full = prefill(model, input_ids)
    compressed = prefill(model, input_ids, TOVAPress(0.75))
    n_kept = int(length * 0.25)
    for layer_idx, call in calls.items():
        with torch.no_grad():
            attention = reference_attention(model, layer_idx, call["hidden_states"], call["keys"])
        last_row = attention[0, :, -1, :-1].mean(dim=0)  # all query heads together
        expected = set(last_row.topk(n_kept - 1).indices.tolist()) | {length - 1}
        kept = kept_indices(full.layers[layer_idx].keys, compressed.layers[layer_idx].keys)
        for head in range(KV_HEADS):
            assert set(kept[0, head].tolist()) == expected


def constructed_attentions(length: int, rows: dict[int, dict[int, float]], last_rows: int) -> torch.Tensor:
    """Eager-like weights `(1, HEADS, length, length)`: the last `last_rows` queries of head h put mass
    rows[h][j] on token j and spread the rest uniformly over the other tokens before them."""
    attentions = torch.zeros(1, HEADS, length, length)
    for head in range(HEADS):
        for query in range(length - last_rows, length):
            spikes = rows.get(head, {})
            rest = [j for j in range(query + 1) if j not in spikes]
            attentions[0, head, query, rest] = (1 - sum(spikes.values())) / len(rest)
            for token, mass in spikes.items():
                attentions[0, head, query, token] = mass
    return attentions


def test_snapkv_scores_on_constructed_attention():
    length, window = 32, 4
    # KV head 0 (query heads 0, 1) looks at tokens 5 and 17; KV head 1 (query heads 2, 3) at 9 and 25.
    rows = {0: {5: 0.4, 17: 0.3}, 1: {5: 0.4, 17: 0.3}, 2: {9: 0.4, 25: 0.3}, 3: {9: 0.4, 25: 0.3}}
    attentions = constructed_attentions(length, rows, window)
    keys = torch.randn(1, KV_HEADS, length, HEAD_DIM)
    press = SnapKVPress(1 - 6 / length, window_size=window, kernel_size=1)
    scores = press.score(None, torch.zeros(1, length, 8), keys, keys, attentions, {})
    assert scores.shape == (1, KV_HEADS, length)
    assert set(scores[0, 0].topk(6).indices.tolist()) == {5, 17, 28, 29, 30, 31}
    assert set(scores[0, 1].topk(6).indices.tolist()) == {9, 25, 28, 29, 30, 31}
    assert torch.all(scores[..., -window:] == scores[..., :-window].max() + 1)

    # The moving average spreads a spike over its kernel, with the zero padding counted at the edges.
    pooled = SnapKVPress(0.5, window_size=window, kernel_size=3).score(
        None, torch.zeros(1, length, 8), keys, keys, attentions, {}
    )
    observed = attentions[0, 0, -window:, :-window].mean(dim=0)
    for token in (4, 5, 6):
        expected = observed[token - 1 : token + 2].sum() / 3
        torch.testing.assert_close(pooled[0, 0, token], expected)
    torch.testing.assert_close(pooled[0, 0, 0], observed[:2].sum() / 3)


def test_snapkv_even_kernel_keeps_one_score_per_token():
    model = get_model("qwen2")
    input_ids = random_input_ids(1, 40, seed=5)
    call = record_layers(model, input_ids)[0]
    with torch.no_grad():
        scores = score_of(SnapKVPress(0.5, window_size=8, kernel_size=4), call, None)
    assert scores.shape == (1, KV_HEADS, 40)
    cache = prefill(model, input_ids, SnapKVPress(0.5, window_size=8, kernel_size=4))
    assert all(layer.keys.shape[2] == 20 for layer in cache.layers)


def test_tova_averages_over_all_heads():
    length = 16
    # Query heads 0-1 (KV head 0) favour token 3 and 10, heads 2-3 (KV head 1) token 7 and 10. Over all heads
    # tokens 3 and 7 lead, so both KV heads keep them (a per-group mean would keep 10 instead of 7 / of 3).
    rows = {0: {3: 0.9}, 1: {10: 0.2}, 2: {10: 0.2}, 3: {7: 0.9}}
    attentions = constructed_attentions(length, rows, 1)
    keys = torch.randn(1, KV_HEADS, length, HEAD_DIM)
    scores = TOVAPress(1 - 3 / length).score(None, torch.zeros(1, length, 8), keys, keys, attentions, {})
    assert scores.shape == (1, KV_HEADS, length)
    assert torch.equal(scores[0, 0], scores[0, 1])
    assert set(scores[0, 0].topk(3).indices.tolist()) == {3, 7, length - 1}
    assert scores[0, 0, -1] == scores[0, 0, :-1].max() + 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kept_token_counts(arch):
    model, length = get_model(arch), 64
    input_ids = random_input_ids(1, length, seed=6)
    full_lengths = [layer.keys.shape[2] for layer in prefill(model, input_ids).layers]
    for press_class, options in ((SnapKVPress, dict(window_size=4)), (TOVAPress, {})):
        for ratio in RATIOS:
            cache = prefill(model, input_ids, press_class(ratio, **options))
            for layer_idx, layer in enumerate(cache.layers):
                expected = (
                    int(length * (1 - ratio)) if layer_idx in compressed_layers(model) else full_lengths[layer_idx]
                )
                assert layer.keys.shape == (1, KV_HEADS, expected, HEAD_DIM)
                assert layer.values.shape == (1, KV_HEADS, expected, HEAD_DIM)


def test_snapkv_default_window_needs_longer_context():
    model = get_model("llama")
    with pytest.raises(ValueError, match="longer than window_size"):
        prefill(model, random_input_ids(1, 64), SnapKVPress(0.5))  # default window_size is 64
    cache = prefill(model, random_input_ids(1, 80), SnapKVPress(0.5))
    assert cache.layers[0].keys.shape[2] == 40


def test_snapkv_fields_and_validation():
    press = SnapKVPress()
    assert (press.compression_ratio, press.window_size, press.kernel_size) == (0.0, 64, 5)
    assert SnapKVPress(0.3, 16, 3) == SnapKVPress(compression_ratio=0.3, window_size=16, kernel_size=3)
    for bad in (dict(window_size=0), dict(kernel_size=0), dict(compression_ratio=1.0)):
        with pytest.raises(ValueError):
            SnapKVPress(**bad)
