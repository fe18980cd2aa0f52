# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CompactorPress and its two parts, LeverageScorePress and NonCausalAttnPress, against reference computations
written here (exact leverage scores, chunked bidirectional attention), their sinks, errors and kept sizes."""

import pytest
import torch

from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.compactor_press import CompactorPress
from kvpress.presses.leverage_press import LeverageScorePress
from kvpress.presses.non_causal_attention_press import NonCausalAttnPress
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
SEQ_LEN = 40
RATIOS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)


def exact_leverage(matrix: torch.Tensor) -> torch.Tensor:
    """Leverage of every row of the centred `matrix` (T, d): diag(X (X^T X)^-1 X^T), in float64."""
    centred = (matrix - matrix.mean(dim=0)).double()
    inverse = torch.linalg.inv(centred.T @ centred)
    return torch.stack([row @ inverse @ row for row in centred])


def zscore(scores: torch.Tensor) -> torch.Tensor:
    flat = scores.flatten().double()
    mean = flat.sum() / len(flat)
    std = (((flat - mean) ** 2).sum() / (len(flat) - 1)).sqrt()
    return ((scores.double() - mean) / std).float()


def rope(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of `x` (T, d) at positions 0..T-1."""
    angles = torch.arange(x.shape[0]).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    half = x.shape[-1] // 2
    return x * angles.cos() + torch.cat([-x[:, half:], x[:, :half]], dim=-1) * angles.sin()


def score_of(press, call, hidden_states=None):
    hidden_states = call["hidden_states"] if hidden_states is None else hidden_states
    with torch.no_grad():
        return press.score(call["module"], hidden_states, call["keys"], call["values"], None, call["kwargs"])


# ---------------------------------------------------------------- leverage


def test_sketched_leverage_equals_exact_leverage_when_the_sketch_spans_the_keys():
    # With more sketch columns than the head dimension, X = K Phi spans the column space of the centred keys, so
    # the leverage of X equals that of K whatever the (random) sketch; the jitter is negligible for large keys.
    generator = torch.Generator().manual_seed(0)
    keys = 30 * torch.randn(2, 3, 50, 8, generator=generator)
    scores = LeverageScorePress.compute_leverage_scores(keys, sketch_dimension=24)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(scores[b, h].double(), exact_leverage(keys[b, h]), rtol=1e-3, atol=1e-4)
    # leverages of a rank-8 centred matrix sum to 8
    torch.testing.assert_close(scores.sum(dim=-1), torch.full((2, 3), 8.0), rtol=1e-3, atol=1e-3)


def test_sketched_leverage_with_a_small_sketch():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 30, 16, generator=generator)
    torch.manual_seed(3)
    scores = LeverageScorePress.compute_leverage_scores(keys, sketch_dimension=4)
    torch.manual_seed(3)
    sketch = torch.randn(1, 2, 16, 4) / 2.0
    for h in range(2):
        x = ((keys[0, h] - keys[0, h].mean(dim=0)) @ sketch[0, h]).double()
        inverse = torch.linalg.inv(x.T @ x + 1e-2 * torch.eye(4, dtype=torch.float64))  # the initial jitter
        expected = torch.stack([row @ inverse @ row for row in x])
        torch.testing.assert_close(scores[0, h].double(), expected, rtol=1e-4, atol=1e-6)


def test_cholesky_jitter_grows_until_it_succeeds():
    singular = torch.zeros(3, 3)
    singular[0, 0] = 1.0
    factor = LeverageScorePress.chol_with_jitter(singular)  # jitter 0 fails, then 1e-2 works
    torch.testing.assert_close(factor @ factor.T, singular + 1e-2 * torch.eye(3))
    indefinite = -torch.eye(3)  # needs a jitter > 1: 0, 1e-2, 1e-1, 1, 10
    factor = LeverageScorePress.chol_with_jitter(indefinite, max_tries=5)
    torch.testing.assert_close(factor @ factor.T, indefinite + 10 * torch.eye(3))
    with pytest.raises(RuntimeError, match="Cholesky failed after 4 tries"):
        LeverageScorePress.chol_with_jitter(indefinite, max_tries=4)


def test_leverage_press_scores_the_pre_rope_keys_of_the_hidden_states():
    model = get_model("llama")
    call = record_layers(model, random_input_ids(1, SEQ_LEN, seed=2))[1]
    # large hidden states make the jitter negligible, so the scores are the exact leverages (see above)
    hidden_states = 50 * torch.randn(1, SEQ_LEN, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    scores = score_of(LeverageScorePress(0.5, sketch_dimension=64), call, hidden_states)
    with torch.no_grad():
        keys = call["module"].k_proj(hidden_states).view(SEQ_LEN, KV_HEADS, HEAD_DIM).transpose(0, 1)
    expected = zscore(torch.stack([exact_leverage(keys[h]).float() for h in range(KV_HEADS)]).unsqueeze(0))
    torch.testing.assert_close(scores, expected, rtol=1e-3, atol=1e-3)
    # z-normalised over the whole layer, not per head
    assert abs(scores.mean().item()) < 1e-5 and abs(scores.std().item() - 1) < 1e-4


def test_leverage_keeps_the_outlier_keys():
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 1, 60, 8, generator=generator)
    keys[..., :3] *= 0.01  # a thin cloud in the first 3 directions ...
    keys[0, 0, [10, 33], :3] = torch.tensor([[5.0, 0, 0], [0, 0, -5.0]])  # ... with two outliers along them
    scores = LeverageScorePress.compute_leverage_scores(keys, sketch_dimension=32)
    assert set(scores[0, 0].topk(2).indices.tolist()) == {10, 33}


def test_prefill_only_presses_refuse_decoding_inputs():
    model = get_model("llama")
    call = record_layers(model, random_input_ids(1, SEQ_LEN, seed=6))[0]
    for press in (LeverageScorePress(0.5), NonCausalAttnPress(0.5), CompactorPress(0.5)):
        with pytest.raises(ValueError, match="only supports prefill"):
            score_of(press, call, call["hidden_states"][:, -1:])


# ---------------------------------------------------------------- non-causal attention


def reference_chunked_attention(queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """Attention received by each key from every query of its chunk (the last chunk may be shorter): (T,)."""
    received = torch.zeros(queries.shape[0])
    for start in range(0, queries.shape[0], chunk):
        q, k = queries[start : start + chunk], keys[start : start + chunk]
        received[start : start + chunk] = (q @ k.T).softmax(dim=-1).sum(dim=0)
    return received


@pytest.mark.parametrize("length, chunk", [(24, 8), (23, 8), (10, 16), (7, 1)])
def test_non_causal_chunked_attention_matches_reference(length, chunk):
    generator = torch.Generator().manual_seed(length)
    queries = torch.randn(2, 3, length, 8, generator=generator)
    keys = torch.randn(2, 3, length, 8, generator=generator)
    received = NonCausalAttnPress.non_causal_chunked_attn(queries, keys, chunk)
    for b in range(2):
        for h in range(3):
            expected = reference_chunked_attention(queries[b, h], keys[b, h], chunk)
            torch.testing.assert_close(received[b, h], expected, rtol=1e-5, atol=1e-6)
    # every query distributes a total mass of 1 within its chunk
    torch.testing.assert_close(received.sum(dim=-1), torch.full((2, 3), float(length)))


def test_padding_of_the_last_chunk_changes_no_score():
    """Kept as a difference: a short last chunk is scored as if it were a chunk of its own length (its padded keys
    get no attention, its padded queries give none). Upstream fills the padded query rows with zero logits, so each
    of them spreads a uniform 1/chunk_size over the last chunk, and leaves the padded keys at -1e-9 (unmasked)."""
    generator = torch.Generator().manual_seed(11)
    queries = torch.randn(1, 2, 21, 8, generator=generator)
    keys = torch.randn(1, 2, 21, 8, generator=generator)
    received = NonCausalAttnPress.non_causal_chunked_attn(queries, keys, 8)
    last = NonCausalAttnPress.non_causal_chunked_attn(queries[:, :, 16:], keys[:, :, 16:], 5)
    torch.testing.assert_close(received[..., 16:], last)
    # what upstream's padding gives instead: every key of the last chunk gets more than it does here
    padded_q = torch.nn.functional.pad(queries[:, :, 16:], (0, 0, 0, 3))
    padded_k = torch.nn.functional.pad(keys[:, :, 16:], (0, 0, 0, 3))
    logits = padded_q @ padded_k.transpose(-1, -2)
    logits[..., 5:, :] = 0.0
    logits[..., :, 5:] = -1e-9
    upstream = logits.softmax(dim=-1).sum(dim=-2)[..., :5]
    assert (upstream - last).abs().min() > 1e-3


def test_non_causal_chunked_attention_errors():
    x = torch.randn(1, 1, 6, 4)
    with pytest.raises(ValueError, match="as many queries as keys"):
        NonCausalAttnPress.non_causal_chunked_attn(x, x[:, :, :5], 2)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        NonCausalAttnPress.non_causal_chunked_attn(x, x, 0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        NonCausalAttnPress(0.5, chunk_size=0)


def reference_non_causal_scores(model, call, chunk):
    attention, hidden_states, keys, values = call["module"], call["hidden_states"], call["keys"], call["values"]
    length = hidden_states.shape[1]
    queries = attention.q_proj(hidden_states)[0].view(length, HEADS, HEAD_DIM)
    if hasattr(attention, "q_norm"):
        queries = attention.q_norm(queries)
    inv_freq = model.model.rotary_emb.inv_freq
    scores = torch.zeros(1, KV_HEADS, length)
    for head in range(HEADS):
        rotated = rope(queries[:, head], inv_freq)
        received = reference_chunked_attention(rotated, keys[0, head // GROUPS], chunk)
        scores[0, head // GROUPS] += received / GROUPS
    scores = scores * values.norm(dim=-1)
    padded = torch.nn.functional.pad(scores, (1, 1))
    pooled = (padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]) / 3
    return zscore(pooled)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("chunk", [256, 16, 7])
def test_non_causal_scores_match_reference(arch, chunk):
    model = get_model(arch)
    calls = record_layers(model, random_input_ids(1, SEQ_LEN, seed=7))
    for call in calls.values():
        with torch.no_grad():
            expected = reference_non_causal_scores(model, call, chunk)
        torch.testing.assert_close(
            score_of(NonCausalAttnPress(0.5, chunk_size=chunk), call), expected, rtol=1e-4, atol=1e-5
        )


# ---------------------------------------------------------------- Compactor


@pytest.mark.parametrize("sinks", [(8, 4), (0, 0), (3, 0), (0, 5)])
@pytest.mark.parametrize("blending", [None, 0.7])
def test_compactor_blends_leverage_and_attention_between_sinks(sinks, blending):
    start, end = sinks
    model = get_model("qwen3")
    call = record_layers(model, random_input_ids(1, SEQ_LEN, seed=8))[0]
    press = CompactorPress(0.3, sink_size_start=start, sink_size_end=end, chunk_size=16, blending=blending)
    torch.manual_seed(11)
    scores = score_of(press, call)

    # the same computation done by hand on the middle tokens, with the same random sketch
    middle = slice(start, SEQ_LEN - end)
    cos, sin = call["kwargs"]["position_embeddings"]
    kwargs = {**call["kwargs"], "position_embeddings": (cos[:, middle], sin[:, middle])}
    inputs = (
        call["module"],
        call["hidden_states"][:, middle],
        call["keys"][:, :, middle],
        call["values"][:, :, middle],
    )
    torch.manual_seed(11)
    with torch.no_grad():
        leverage = LeverageScorePress(0.3, 48).score(*inputs, None, kwargs)
        attention = NonCausalAttnPress(0.3, 16).score(*inputs, None, kwargs)
    expected = (0.3 if blending is None else blending) * leverage + attention
    torch.testing.assert_close(scores[..., middle], expected)
    # the sinks score above every other token
    sink_positions = list(range(start)) + list(range(SEQ_LEN - end, SEQ_LEN))
    if sink_positions:
        assert scores[..., sink_positions].min() > expected.max()


def test_compactor_keeps_its_sinks():
    model = get_model("llama")
    input_ids = random_input_ids(1, SEQ_LEN, seed=9)
    full = prefill(model, input_ids)
    compressed = prefill(model, input_ids, CompactorPress(0.8, sink_size_start=3, sink_size_end=2, chunk_size=16))
    for layer_idx in compressed_layers(model):
        full_keys, kept = full.layers[layer_idx].keys, compressed.layers[layer_idx].keys
        assert kept.shape[2] == int(SEQ_LEN * (1 - 0.8))
        torch.testing.assert_close(kept[:, :, :3], full_keys[:, :, :3], rtol=0, atol=0)
        torch.testing.assert_close(kept[:, :, -2:], full_keys[:, :, -2:], rtol=0, atol=0)


def test_compactor_all_sinks_and_attribute_propagation():
    model = get_model("llama")
    call = record_layers(model, random_input_ids(1, 10, seed=10))[0]
    scores = score_of(CompactorPress(0.5, sink_size_start=8, sink_size_end=4), call)
    assert torch.equal(scores, torch.ones(1, KV_HEADS, 10))

    press = CompactorPress(0.25, sketch_dimension=16, chunk_size=32)
    assert press._leverage_press == LeverageScorePress(0.25, 16)
    assert press._non_causal_press == NonCausalAttnPress(0.25, 32)
    press.compression_ratio, press.sketch_dimension, press.chunk_size = 0.6, 8, 4
    assert press._leverage_press == LeverageScorePress(0.6, 8)
    assert press._non_causal_press == NonCausalAttnPress(0.6, 4)
    with pytest.raises(ValueError, match="sink_size_start must be an integer >= 0"):
        CompactorPress(0.5, sink_size_start=-1)
    with pytest.raises(ValueError, match="compression_ratio"):
        CompactorPress(1.5)


def test_fields_and_defaults():
    press = CompactorPress()
    assert (press.compression_ratio, press.sink_size_start, press.sink_size_end) == (0.0, 8, 4)
    assert (press.chunk_size, press.sketch_dimension, press.blending) == (256, 48, None)
    assert LeverageScorePress().sketch_dimension == 48 and NonCausalAttnPress().chunk_size == 256
    assert CompactorPress(0.5, 1, 2, 64, 16, 0.1) == CompactorPress(
        compression_ratio=0.5, sink_size_start=1, sink_size_end=2, chunk_size=64, sketch_dimension=16, blending=0.1
    )


# ---------------------------------------------------------------- kept sizes


PRESSES = [
    (LeverageScorePress, {}),
    (LeverageScorePress, dict(sketch_dimension=8)),
    (NonCausalAttnPress, {}),
    (NonCausalAttnPress, dict(chunk_size=16)),
    (CompactorPress, dict(sink_size_start=1, sink_size_end=1)),
    (CompactorPress, dict(sink_size_start=0, sink_size_end=0, chunk_size=16, sketch_dimension=8)),
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("cls, options", PRESSES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(PRESSES)])
def test_kept_sizes_on_every_architecture(arch, cls, options):
    model = get_model(arch)
    for ratio in RATIOS:
        cache = prefill(model, random_input_ids(2, SEQ_LEN, seed=12), cls(ratio, **options))
        n_kept = int(SEQ_LEN * (1 - ratio))
        for layer_idx in compressed_layers(model):
            layer = cache.layers[layer_idx]
            assert layer.keys.shape == layer.values.shape == (2, KV_HEADS, n_kept, HEAD_DIM)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_inside_chunk_press(arch):
    # ChunkPress gives each chunk its own hidden states and positions, so these prefill-only scorers work per chunk.
    model = get_model(arch)
    for inner in (LeverageScorePress(0.5), NonCausalAttnPress(0.5, chunk_size=8), CompactorPress(0.5)):
        cache = prefill(model, random_input_ids(1, SEQ_LEN, seed=13), ChunkPress(inner, chunk_length=16))
        for layer_idx in compressed_layers(model):
            assert cache.layers[layer_idx].keys.shape[2] == 8 + 8 + 4
