# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ExpectedAttentionPress against a direct reference computation, sinks, options, short inputs, kept counts."""

import pytest
import torch

from kvpress import ExpectedAttentionPress
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


def score_of(press, call: dict) -> torch.Tensor:
    with torch.no_grad():
        return press.score(call["module"], call["hidden_states"], call["keys"], call["values"], None, call["kwargs"])


def rope_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`x` (..., d) rotated as RoPE does at each absolute position: (P, ..., d)."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1).view(len(positions), *([1] * (x.dim() - 1)), x.shape[-1])
    half = x.shape[-1] // 2
    return x * angles.cos() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * angles.sin()


def reference_scores(
    model,
    call: dict,
    n_future_positions: int,
    n_sink: int,
    use_covariance=True,
    use_vnorm=True,
    epsilon=0.0,
    n_dropped_queries=None,
    future_start=None,
):
    """Expected attention written out directly, for Llama-like (q_proj) and Qwen3 (q_proj + q_norm) layers: query
    statistics from the hidden states after the first `n_dropped_queries` (default `n_sink`), future positions from
    `future_start` (default the number of hidden states), the first `n_sink` keys kept."""
    attention, hidden_states, keys, values = call["module"], call["hidden_states"], call["keys"], call["values"]
    bsz, length, _ = hidden_states.shape
    dropped = n_sink if n_dropped_queries is None else n_dropped_queries
    queries = attention.q_proj(hidden_states[:, dropped:]).view(bsz, length - dropped, HEADS, HEAD_DIM)
    if hasattr(attention, "q_norm"):
        queries = attention.q_norm(queries)
    queries = queries.transpose(1, 2)[0]  # (H, T', d), batch 1
    inv_freq = model.model.rotary_emb.inv_freq
    start = length if future_start is None else future_start
    future = torch.arange(start, start + n_future_positions)
    # Row i of rope(I) is R_p e_i, so R_p = rope(I)^T.
    mean_rotation = rope_at(torch.eye(HEAD_DIM), future, inv_freq).transpose(1, 2).mean(dim=0)
    scores = torch.zeros(KV_HEADS, keys.shape[2] - n_sink)
    for head in range(HEADS):
        mean = queries[head].mean(dim=0)
        # Rotating each future query directly and averaging equals rotating the mean by the averaged matrix.
        rotated_mean = rope_at(mean, future, inv_freq).mean(dim=0)
        torch.testing.assert_close(rotated_mean, mean_rotation @ mean, rtol=1e-4, atol=1e-6)
        covariance = torch.cov(queries[head].T, correction=0)
        rotated_cov = mean_rotation @ covariance @ mean_rotation.T
        head_keys = keys[0, head // GROUPS, n_sink:]
        logits = torch.stack(
            [
                rotated_mean @ k / HEAD_DIM**0.5 + (k @ rotated_cov @ k / (2 * HEAD_DIM) if use_covariance else 0)
                for k in head_keys
            ]
        )
        scores[head // GROUPS] += logits.softmax(dim=0) / GROUPS
    if use_vnorm:
        scores = (scores + epsilon) * values[0, :, n_sink:].norm(dim=-1)
    return torch.cat([torch.full((KV_HEADS, n_sink), scores.max().item() + 1), scores], dim=1).unsqueeze(0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
@pytest.mark.parametrize(
    "options",
    [
        dict(n_future_positions=16, n_sink=4),
        dict(n_future_positions=512, n_sink=2),
        dict(n_future_positions=32, n_sink=4, use_covariance=False),
        dict(n_future_positions=32, n_sink=0, use_vnorm=False),
        dict(n_future_positions=32, n_sink=3, epsilon=0.01),
    ],
)
def test_scores_match_reference(arch, options):
    model = get_model(arch)
    calls = record_layers(model, random_input_ids(1, 24, seed=1))
    press = ExpectedAttentionPress(0.5, **options)
    for call in calls.values():
        with torch.no_grad():
            expected = reference_scores(model, call, **options)
        torch.testing.assert_close(score_of(press, call), expected, rtol=1e-4, atol=1e-6)


def test_options_change_scores():
    calls = record_layers(get_model("llama"), random_input_ids(1, 32, seed=2))
    call = calls[1]
    base = score_of(ExpectedAttentionPress(0.5, n_future_positions=64), call)
    for options in (dict(use_covariance=False), dict(use_vnorm=False), dict(epsilon=0.5), dict(n_future_positions=8)):
        changed = score_of(ExpectedAttentionPress(0.5, **{"n_future_positions": 64, **options}), call)
        assert not torch.allclose(changed[..., 4:], base[..., 4:]), options
    # Without value-norm weighting, each head's scores are a group mean of softmaxes: they sum to 1.
    plain = score_of(ExpectedAttentionPress(0.5, use_vnorm=False), call)
    torch.testing.assert_close(plain[..., 4:].sum(dim=-1), torch.ones(1, KV_HEADS))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_sinks_always_kept(arch):
    model, length, n_sink = get_model(arch), 40, 6
    input_ids = random_input_ids(1, length, seed=3)
    full = prefill(model, input_ids)
    compressed = prefill(model, input_ids, ExpectedAttentionPress(0.8, n_sink=n_sink))
    for layer_idx in compressed_layers(model):
        kept = compressed.layers[layer_idx].keys
        assert kept.shape[2] == int(length * (1 - 0.8))
        torch.testing.assert_close(kept[:, :, :n_sink], full.layers[layer_idx].keys[:, :, :n_sink], rtol=0, atol=0)


def test_too_short_input_raises():
    model = get_model("llama")
    with pytest.raises(ValueError, match="n_sink"):
        prefill(model, random_input_ids(1, 4), ExpectedAttentionPress(0.5, n_sink=4))
    call = record_layers(model, random_input_ids(1, 12))[0]
    # Fewer cached keys than sinks (e.g. a cache that was already compressed) is refused as well.
    with pytest.raises(ValueError, match="cache holds only 3 tokens"):
        ExpectedAttentionPress(0.5).score(
            call["module"], call["hidden_states"], call["keys"][:, :, :3], call["values"][:, :, :3], None, {}
        )
    # One token after the sinks is enough (its covariance is zero, not NaN).
    scores = score_of(ExpectedAttentionPress(0.5, n_sink=11), call)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kept_token_counts(arch):
    model, length = get_model(arch), 48
    input_ids = random_input_ids(1, length, seed=4)
    full_lengths = [layer.keys.shape[2] for layer in prefill(model, input_ids).layers]
    for ratio in RATIOS:
        cache = prefill(model, input_ids, ExpectedAttentionPress(ratio))
        for layer_idx, layer in enumerate(cache.layers):
            expected = int(length * (1 - ratio)) if layer_idx in compressed_layers(model) else full_lengths[layer_idx]
            assert layer.keys.shape == layer.values.shape == (1, KV_HEADS, expected, HEAD_DIM)
        for layer_idx in compressed_layers(model):
            assert torch.isfinite(cache.layers[layer_idx].keys).all()


def test_fields_and_defaults():
    press = ExpectedAttentionPress()
    assert (press.compression_ratio, press.n_future_positions, press.n_sink) == (0.0, 512, 4)
    assert (press.use_covariance, press.use_vnorm, press.epsilon) == (True, True, 0.0)
    assert ExpectedAttentionPress(0.25, 64, 2, False, False, 0.1) == ExpectedAttentionPress(
        compression_ratio=0.25, n_future_positions=64, n_sink=2, use_covariance=False, use_vnorm=False, epsilon=0.1
    )


def window_call(call: dict, start: int) -> dict:
    """The prefill call seen as a decoding compression does: the hidden states of the tokens from `start` on (a
    window of recent tokens), with their positions and RoPE, and the whole cache."""
    cos, sin = call["kwargs"]["position_embeddings"]
    length = call["hidden_states"].shape[1]
    kwargs = dict(
        call["kwargs"],
        position_ids=torch.arange(start, length).unsqueeze(0),
        position_embeddings=(cos[:, start:], sin[:, start:]),
        hidden_states=call["hidden_states"][:, start:],
    )
    return dict(call, hidden_states=call["hidden_states"][:, start:], kwargs=kwargs)


def test_a_window_of_recent_tokens_drops_no_query_and_looks_past_the_last_position():
    """During decoding (a `cache_budget`'s window, DecodingPress's buffer) the scored hidden states are recent
    tokens, none a sink: every one of them enters the statistics (upstream drops the first n_sink of the window,
    and gets NaN for a window of n_sink tokens or fewer), and the future positions follow the last token's."""
    model = get_model("llama")
    calls = record_layers(model, random_input_ids(1, 24, seed=3))
    press = ExpectedAttentionPress(n_future_positions=16, n_sink=4)
    for call in calls.values():
        window = window_call(call, 18)  # 6 recent tokens, positions 18..23
        with torch.no_grad():
            expected = reference_scores(model, window, 16, 4, n_dropped_queries=0, future_start=24)
            upstream = reference_scores(model, window, 16, 4, n_dropped_queries=4, future_start=6)
        got = score_of(press, window)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got, upstream, rtol=1e-3, atol=1e-5)
        # a window no longer than the sinks still has statistics
        assert torch.isfinite(score_of(press, window_call(call, 21))).all()


def test_prefill_statistics_and_positions_are_upstreams():
    """A whole prompt (positions 0..T-1): the first n_sink queries are dropped and the future starts at T, as
    upstream's q_len rule."""
    model = get_model("llama")
    calls = record_layers(model, random_input_ids(1, 24, seed=4))
    press = ExpectedAttentionPress(n_future_positions=16, n_sink=4)
    for call in calls.values():
        with torch.no_grad():
            expected = reference_scores(model, call, 16, 4, n_dropped_queries=4, future_start=24)
        torch.testing.assert_close(score_of(press, call), expected, rtol=1e-4, atol=1e-6)


def test_chunk_press_chunks_look_past_their_own_end():
    """Inside ChunkPress each chunk's future positions start after the chunk's last position (8, 16, 24 for chunks
    of 8), and only the first chunk holds sink queries. Upstream starts every chunk's future at the chunk length
    (8, 8, 8), as if each chunk were at the start of the sequence, and drops n_sink queries of every chunk. Kept:
    relative to a later chunk's keys, upstream's future queries would sit before them."""
    from kvpress import ChunkPress

    model = get_model("llama")
    seen = []

    class Spy(ExpectedAttentionPress):
        def get_query_statistics(self, module, hidden_states, start_position=None, n_sink_queries=None):
            if module.layer_idx == 0:
                seen.append((hidden_states.shape[1], start_position, n_sink_queries))
            return super().get_query_statistics(module, hidden_states, start_position, n_sink_queries)

    prefill(model, random_input_ids(1, 24, seed=5), ChunkPress(Spy(0.5, n_future_positions=16), chunk_length=8))
    assert seen == [(8, 8, 4), (8, 16, 0), (8, 24, 0)]
