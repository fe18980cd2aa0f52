# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""BlockPress (block-wise selection) and ChunkKVPress (whole chunks): bookkeeping against direct computations."""

from dataclasses import dataclass, field

import pytest
import torch

from kvpress.presses.block_press import BlockPress, gather_kwargs
from kvpress.presses.chunkkv_press import ChunkKVPress
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.observed_attention_press import ObservedAttentionPress
from kvpress.presses.scorer_press import ScorerPress, gather_tokens
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import (
    ARCHITECTURES,
    compressed_layers,
    distinct_ids,
    get_model,
    prefill,
    random_input_ids,
    record_layers,
)

SEQ_LEN = 40


@dataclass
class HiddenStatesPress(ScorerPress):
    """Score = mean of each token's hidden state, the same for every KV head."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return hidden_states.mean(dim=-1).unsqueeze(1).expand(-1, keys.shape[1], -1)


@dataclass
class RecordingKnormPress(KnormPress):
    """KnormPress that records what each `score` call received."""

    calls: list = field(default_factory=list, repr=False)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        self.calls.append(
            dict(
                layer=module.layer_idx,
                hidden_states=hidden_states,
                keys=keys,
                position_ids=kwargs["position_ids"],
                cos=kwargs["position_embeddings"][0],
                kwargs_hidden_states=kwargs.get("hidden_states"),
            )
        )
        return super().score(module, hidden_states, keys, values, attentions, kwargs)


@dataclass
class FixedScorePress(ScorerPress):
    fixed: torch.Tensor = field(default=None, repr=False)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return self.fixed


def decode_is_finite(model, cache, bsz=2):
    with torch.no_grad():
        logits = model(random_input_ids(bsz, 1, seed=99), **cache_kwargs(model, cache)).logits
    return bool(torch.isfinite(logits).all())


# BlockPress


@pytest.mark.parametrize("inner_cls", [KnormPress, HiddenStatesPress])
def test_block_press_equals_plain_press_for_per_token_scores(inner_cls):
    """A score that depends only on the token itself: block-wise top-k == global top-k, for every block size."""
    model = get_model("llama")
    seq_len, ratio = 128, 0.5
    input_ids = distinct_ids(2, seq_len, seed=1)
    plain = prefill(model, input_ids, inner_cls(ratio))
    for block_size in (2, 4, 8, 64, 128, 256):
        cache = prefill(model, input_ids, BlockPress(inner_cls(ratio), block_size=block_size))
        for layer_idx in compressed_layers(model):
            keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
            assert keys.shape[2] == int(seq_len * (1 - ratio))
            assert torch.equal(keys, plain.layers[layer_idx].keys), block_size
            assert torch.equal(values, plain.layers[layer_idx].values), block_size


def test_block_press_scorer_sees_kept_tokens_plus_block():
    model = get_model("llama")
    seq_len, ratio, block_size = 30, 0.5, 4
    input_ids = random_input_ids(1, seq_len, seed=2)
    recorded = record_layers(model, input_ids)
    inner = RecordingKnormPress(ratio)
    prefill(model, input_ids, BlockPress(inner, block_size=block_size))
    full_cos, _ = model.model.rotary_emb(torch.zeros(1), torch.arange(seq_len)[None])

    n_kept = int(seq_len * (1 - ratio))
    starts = list(range(n_kept, seq_len, block_size))
    assert [call["layer"] for call in inner.calls] == [0] * len(starts) + [1] * len(starts)
    for call, start in zip(inner.calls, starts * 2):
        end = min(start + block_size, seq_len)
        positions = call["position_ids"][0]
        assert positions.shape[0] == n_kept + end - start == call["keys"].shape[2]
        assert positions[-(end - start) :].tolist() == list(range(start, end))  # the new block comes last
        assert positions[:n_kept].max() < start and (positions.diff() > 0).all()
        layer = recorded[call["layer"]]
        # every per-token input is the one of the tokens being scored (head 0's tokens)
        torch.testing.assert_close(call["cos"][0], full_cos[0, positions])
        assert torch.equal(call["keys"][0, 0], layer["keys"][0, 0, positions])
        hidden_slice = layer["hidden_states"][0][:, :32]  # KV head 0 carries the first half of the hidden size
        assert torch.equal(call["hidden_states"][0][:, :32], hidden_slice[positions])
        assert call["kwargs_hidden_states"] is call["hidden_states"]


def test_gather_kwargs_takes_every_per_token_entry_at_the_positions():
    q_len = 10
    positions = torch.tensor([[0, 3, 4, 8], [1, 2, 6, 9]])
    causal = torch.full((1, 1, q_len, q_len), float("-inf")).triu(1)
    cos, sin = torch.randn(1, q_len, 4), torch.randn(1, q_len, 4)
    kwargs = {
        "hidden_states": torch.zeros(2, q_len, 8),
        "position_ids": torch.arange(q_len)[None],
        "cache_position": torch.arange(q_len),
        "position_embeddings": (cos, sin),
        "attention_mask": causal,
        "other": "kept as is",
    }
    new_hidden = torch.ones(2, 4, 8)
    gathered = gather_kwargs(kwargs, new_hidden, positions, q_len)
    assert gathered["hidden_states"] is new_hidden and gathered["other"] == "kept as is"
    assert torch.equal(gathered["position_ids"], positions)
    assert torch.equal(gathered["cache_position"], positions[0])
    for b in range(2):
        assert torch.equal(gathered["position_embeddings"][0][b], cos[0, positions[b]])
        assert torch.equal(gathered["position_embeddings"][1][b], sin[0, positions[b]])
        expected_mask = causal[0, 0][positions[b]][:, positions[b]]
        assert torch.equal(gathered["attention_mask"][b, 0], expected_mask)
    assert torch.equal(gathered["attention_mask"][0, 0], torch.full((4, 4), float("-inf")).triu(1))
    assert kwargs["position_ids"].shape == (1, q_len)  # the original kwargs are untouched


def test_block_press_eager_attention_equals_sdpa_recomputation():
    """Under eager the scorer gets the block queries' attention renormalised over the kept tokens; SnapKV under sdpa
    recomputes that attention: both give the same block-wise selection (which differs from the global one)."""
    input_ids = distinct_ids(1, 64, seed=3)
    caches = {}
    for attn in ("sdpa", "eager"):
        press = BlockPress(SnapKVPress(0.5, window_size=4), block_size=8)
        caches[attn] = prefill(get_model("llama", attn), input_ids, press)
    plain = prefill(get_model("llama"), input_ids, SnapKVPress(0.5, window_size=4))
    differs = False
    for layer_idx in compressed_layers(get_model("llama")):
        sdpa_keys, eager_keys = caches["sdpa"].layers[layer_idx].keys, caches["eager"].layers[layer_idx].keys
        assert sdpa_keys.shape[2] == 32
        torch.testing.assert_close(eager_keys, sdpa_keys, atol=1e-5, rtol=1e-5)
        differs |= not torch.equal(sdpa_keys, plain.layers[layer_idx].keys)
    assert differs


def test_block_press_with_attention_weights_scorer_under_eager():
    model = get_model("llama", "eager")
    cache = prefill(model, random_input_ids(2, SEQ_LEN, seed=4), BlockPress(ObservedAttentionPress(0.5), block_size=8))
    assert [layer.keys.shape[2] for layer in cache.layers] == [20, 20]
    assert decode_is_finite(model, cache)


def test_block_press_delegation_and_bad_input():
    press = BlockPress(KnormPress(0.3), block_size=16)
    assert press.compression_ratio == 0.3
    press.compression_ratio = 0.0
    assert press.press.compression_ratio == 0.0
    assert prefill(get_model("llama"), random_input_ids(1, 20), press).get_seq_length() == 20
    with pytest.raises(TypeError, match="ScorerPress"):
        BlockPress(ComposedPress([KnormPress(0.5)]))
    with pytest.raises(ValueError, match="block_size"):
        BlockPress(KnormPress(0.5), block_size=0)
    with pytest.raises(ValueError, match="compression_ratio"):
        BlockPress(KnormPress(1.5))


# ChunkKVPress


def reference_chunk_indices(scores: torch.Tensor, ratio: float, chunk_length: int) -> list[int]:
    """Token indices of the kept chunks: chunk score = mean over its tokens of the scores summed over heads (and
    over batch items, as the whole batch keeps the same chunks)."""
    token_scores = scores.sum(dim=(0, 1)).tolist()
    k_len = len(token_scores)
    chunks = [(s, min(s + chunk_length, k_len)) for s in range(0, k_len, chunk_length)]
    means = [sum(token_scores[s:e]) / (e - s) for s, e in chunks]
    n_chunks_kept = max(1, int(len(chunks) * (1 - ratio)))
    best = sorted(sorted(range(len(chunks)), key=lambda i: -means[i])[:n_chunks_kept])
    return [t for i in best for t in range(*chunks[i])]


def expand_indices(indices: list[int], keys: torch.Tensor) -> torch.Tensor:
    return torch.tensor(indices).expand(keys.shape[0], keys.shape[1], -1)


@pytest.mark.parametrize("chunk_length", [2, 4, 8, 128])
def test_chunkkv_keeps_the_best_whole_chunks(chunk_length):
    model = get_model("llama")
    input_ids = random_input_ids(1, 256, seed=5)
    cache = prefill(model, input_ids, ChunkKVPress(KnormPress(0.5), chunk_length=chunk_length))
    full = prefill(model, input_ids)
    for layer_idx in compressed_layers(model):
        full_keys, full_values = full.layers[layer_idx].keys, full.layers[layer_idx].values
        indices = expand_indices(reference_chunk_indices(-full_keys.norm(dim=-1), 0.5, chunk_length), full_keys)
        assert cache.layers[layer_idx].keys.shape[2] == 128
        assert torch.equal(cache.layers[layer_idx].keys, gather_tokens(full_keys, indices))
        assert torch.equal(cache.layers[layer_idx].values, gather_tokens(full_values, indices))


@pytest.mark.parametrize("remainder_wins", [True, False])
def test_chunkkv_remainder_chunk_counts_its_own_length(remainder_wins):
    """T=40, chunk_length=6: six full chunks and a 4-token remainder; 3 of the 7 chunks are kept."""
    generator = torch.Generator().manual_seed(6)
    keys = torch.randn(1, 2, SEQ_LEN, 8, generator=generator)
    scores = torch.rand(1, 2, SEQ_LEN, generator=generator)
    scores[..., 36:] += 5.0 if remainder_wins else -5.0
    press = ChunkKVPress(FixedScorePress(0.5, fixed=scores), chunk_length=6)
    out_keys, out_values = press.compress(None, torch.zeros(1, SEQ_LEN, 16), keys, keys.clone(), None, {})
    expected = reference_chunk_indices(scores, 0.5, 6)
    assert (36 in expected) == remainder_wins
    assert out_keys.shape[2] == len(expected) == (2 * 6 + 4 if remainder_wins else 3 * 6)
    assert torch.equal(out_keys, gather_tokens(keys, expand_indices(expected, keys)))


def test_chunkkv_batch_shares_the_chunks_best_over_the_batch():
    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 2, 30, 8, generator=generator)
    scores = torch.rand(2, 2, 30, generator=generator)
    scores[0, :, 10:20] += 1.0  # item 0 prefers chunk 1 a little
    scores[1, :, 20:30] += 3.0  # item 1 prefers chunk 2 a lot
    out_keys, _ = ChunkKVPress(FixedScorePress(0.5, fixed=scores), chunk_length=10).compress(
        None, torch.zeros(2, 30, 16), keys, keys, None, {}
    )
    expected = reference_chunk_indices(scores, 0.5, 10)
    assert expected == list(range(20, 30))
    assert torch.equal(out_keys, gather_tokens(keys, expand_indices(expected, keys)))


def test_chunkkv_short_context_falls_back_to_the_inner_press():
    model = get_model("llama")
    input_ids = distinct_ids(1, 15, seed=8)
    cache = prefill(model, input_ids, ChunkKVPress(KnormPress(0.4), chunk_length=20))
    plain = prefill(model, input_ids, KnormPress(0.4))
    for layer_idx in compressed_layers(model):
        assert cache.layers[layer_idx].keys.shape[2] == int(15 * 0.6)
        assert torch.equal(cache.layers[layer_idx].keys, plain.layers[layer_idx].keys)


def test_chunkkv_runs_with_attention_weights_under_eager():
    model = get_model("llama", "eager")
    cache = prefill(model, random_input_ids(2, SEQ_LEN, seed=9), ChunkKVPress(ObservedAttentionPress(0.5), 10))
    assert [layer.keys.shape[2] for layer in cache.layers] == [20, 20]
    assert decode_is_finite(model, cache)


def test_chunkkv_delegation_and_bad_input():
    press = ChunkKVPress(KnormPress(0.3))
    assert press.chunk_length == 20 and press.compression_ratio == 0.3
    press.compression_ratio = 0.0
    assert prefill(get_model("llama"), random_input_ids(1, 45), press).get_seq_length() == 45
    with pytest.raises(TypeError, match="ScorerPress"):
        ChunkKVPress(ComposedPress([KnormPress(0.5)]))
    with pytest.raises(ValueError, match="chunk_length"):
        ChunkKVPress(KnormPress(0.5), chunk_length=-3)


# every architecture, two inner presses (and a per-token scorer for the comparisons with a direct computation:
# Knorm is degenerate on Qwen3/Gemma3, whose k_norm makes every key norm about sqrt(d))

INNER = {
    "knorm": lambda r: KnormPress(r),
    "snapkv": lambda r: SnapKVPress(r, window_size=2),
    "hidden": lambda r: HiddenStatesPress(r),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("inner", list(INNER))
def test_block_and_chunkkv_on_every_architecture(arch, inner):
    model = get_model(arch)
    input_ids = distinct_ids(2, SEQ_LEN, seed=10)
    ratio = 0.5
    block = prefill(model, input_ids, BlockPress(INNER[inner](ratio), block_size=6))
    chunked = prefill(model, input_ids, ChunkKVPress(INNER[inner](ratio), chunk_length=8))
    if inner == "hidden":
        plain = prefill(model, input_ids, HiddenStatesPress(ratio))
        recorded = record_layers(model, input_ids)
    for layer_idx in compressed_layers(model):
        assert block.layers[layer_idx].keys.shape[2] == int(SEQ_LEN * (1 - ratio))
        assert chunked.layers[layer_idx].keys.shape[2] == 2 * 8  # int(5 chunks * 0.5) whole chunks
        if inner == "hidden":
            assert torch.equal(block.layers[layer_idx].keys, plain.layers[layer_idx].keys)
            full_keys = recorded[layer_idx]["keys"]
            scores = recorded[layer_idx]["hidden_states"].mean(dim=-1)[:, None].expand(-1, 2, -1)
            indices = expand_indices(reference_chunk_indices(scores, ratio, 8), full_keys)
            assert torch.equal(chunked.layers[layer_idx].keys, gather_tokens(full_keys, indices))
    assert decode_is_finite(model, block) and decode_is_finite(model, chunked)
