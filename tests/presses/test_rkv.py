# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""RKVPress and RKVLSHPress: importance and redundancy against direct computations on constructed keys, the older
near-duplicates are evicted, the compression cadence, the SimHash estimate, seeds, the eviction log, bad settings."""

import csv
import math

import pytest
import torch

from kvpress.presses.rkv_lsh_press import (
    RKVLSHPress,
    hamming_cosine_table,
    lsh_redundancy,
    simhash_codes,
)
from kvpress.presses.rkv_press import RKVPress, key_cosine_similarity, redundancy_from_similarity
from kvpress.presses.scorer_press import POSITIONS
from kvpress.timing import EVICTION_LOG_COLUMNS
from kvpress.transformers_adapter import output_cache
from kvpress.utils import get_language_model
from tests.fixtures import (
    ARCHITECTURES,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    PAD_ID,
    get_model,
    random_input_ids,
    record_layers,
)
from tests.presses.test_snapkv_tova import reference_logits

GROUPS = HEADS // KV_HEADS


def reference_redundancy(similarity: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV's redundancy written with loops: zero the diagonal and each row's most recent similar entry, column
    means, softmax."""
    bsz, heads, n, _ = similarity.shape
    out = torch.zeros(bsz, heads, n)
    for b in range(bsz):
        for h in range(heads):
            matrix = similarity[b, h].clone().double()
            for i in range(n):
                matrix[i, i] = 0.0
            exempt = []
            for i in range(n):
                similar = [j for j in range(n) if j != i and matrix[i, j] > threshold]
                if similar:
                    exempt.append((i, max(similar)))
            for i, j in exempt:
                matrix[i, j] = 0.0
            raw = matrix.sum(dim=0) / n
            out[b, h] = raw.softmax(dim=0).float()
    return out


@torch.no_grad()  # the logits come from the model's weights; the reference needs no graph
def reference_rkv_scores(logits: torch.Tensor, keys: torch.Tensor, window: int, kernel: int, lam: float, threshold):
    """R-KV's scores of the candidates `(B, H_kv, T - w)` as the authors' reference code defines them, written with
    loops: importance from the group maximum of the raw window logits softmaxed over the candidates, averaged over
    the window queries and max-pooled; redundancy from the similarities of all keys, each row's most recent entry
    above the threshold (entry 0 when none) and the diagonal zeroed, column means, softmax over all, candidates."""
    bsz, heads_kv, length, _ = keys.shape
    n = length - window
    out = torch.zeros(bsz, heads_kv, n)
    for b in range(bsz):
        for g in range(heads_kv):
            raw = torch.stack([logits[b, h, -window:] for h in range(g * GROUPS, (g + 1) * GROUPS)]).amax(dim=0)
            mean = torch.stack([row[:n].double().softmax(dim=0) for row in raw]).mean(dim=0)
            importance = torch.tensor(
                [float(mean[max(0, j - kernel // 2) : j + kernel // 2 + 1].max()) for j in range(n)]
            )
            unit = keys[b, g].double() / (keys[b, g].double().norm(dim=-1, keepdim=True) + 1e-8)
            matrix = unit @ unit.T
            for i in range(length):
                matrix[i, i] = 0.0
            for i in range(length):
                similar = [j for j in range(length) if matrix[i, j] > threshold]
                matrix[i, max(similar) if similar else 0] = 0.0
            redundancy = (matrix.sum(dim=0) / length).softmax(dim=0)[:n]
            out[b, g] = (lam * importance - (1 - lam) * redundancy).float()
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.0, -1.0, 1.0])
def test_redundancy_equals_a_direct_computation(threshold):
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 15, 8, generator=generator)
    keys[:, :, 9] = keys[:, :, 2] + 0.01  # a few near-duplicates
    similarity = key_cosine_similarity(keys)
    normed = keys / keys.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(similarity, normed @ normed.transpose(-1, -2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        redundancy_from_similarity(similarity, threshold), reference_redundancy(similarity, threshold)
    )


def constructed_case(n_tokens=16):
    """A Llama layer's real inputs, with keys built so that positions 2, 6 and 9 are near-duplicates and every other
    key points in its own direction."""
    model = get_model("llama")
    call = record_layers(model, random_input_ids(1, n_tokens, seed=4))[0]
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(HEAD_DIM, HEAD_DIM, generator=generator))[0]  # orthonormal columns
    keys = torch.empty(1, KV_HEADS, n_tokens, HEAD_DIM)
    for head in range(KV_HEADS):
        for t in range(n_tokens):
            keys[0, head, t] = basis[:, t % HEAD_DIM] * (1 + 0.1 * t)
        for t in [t for t in (2, 6, 9) if t < n_tokens]:
            keys[0, head, t] = basis[:, 2] * 3 + 0.01 * torch.randn(HEAD_DIM, generator=generator)
    values = torch.randn(1, KV_HEADS, n_tokens, HEAD_DIM, generator=generator)
    return model, call, keys, values


@pytest.mark.parametrize("lam, kernel", [(0.3, 3), (0.07, 7), (0.1, 7)])
def test_score_matches_the_reference_definition_on_constructed_keys(lam, kernel):
    model, call, keys, values = constructed_case()
    press = RKVPress(0.25, window_size=4, kernel_size=kernel, lam=lam)
    scores = press.score(call["module"], call["hidden_states"], keys, values, None, call["kwargs"])
    logits = reference_logits(model, 0, call["hidden_states"], keys)
    expected = reference_rkv_scores(logits, keys, window=4, kernel=kernel, lam=lam, threshold=0.5)
    torch.testing.assert_close(scores[..., :-4], expected, atol=1e-5, rtol=1e-4)
    assert (scores[..., -4:] > expected.max()).all()  # the observation window is always kept


def test_kept_sets_equal_the_reference_on_random_keys():
    """Top-k of the press against the reference definition on random keys and a real layer's queries: the same
    kept set (the fork's formula overlapped 79-97% here)."""
    model = get_model("llama")
    call = record_layers(model, random_input_ids(1, 40, seed=8))[1]
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(1, KV_HEADS, 40, HEAD_DIM, generator=generator)
    keys[:, :, 20:30] = keys[:, :, 5:15] + 0.05 * torch.randn(1, KV_HEADS, 10, HEAD_DIM, generator=generator)
    press = RKVPress(0.5)
    scores = press.score(call["module"], call["hidden_states"], keys, keys, None, call["kwargs"])
    expected = reference_rkv_scores(reference_logits(model, 1, call["hidden_states"], keys), keys, 8, 7, 0.1, 0.5)
    kept = scores[..., :-8].topk(16, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(kept, expected.topk(16, dim=-1).indices.sort(dim=-1).values)


def test_defaults_are_the_reference_and_the_fork_settings_are_kept():
    press = RKVPress(cache_budget=64)
    assert (press.compress_interval, press.kernel_size, press.lam, press.window_size) == (128, 7, 0.1, 8)
    fork = RKVPress(cache_budget=64, **RKVPress.FORK_SETTINGS)
    assert (fork.compress_interval, fork.kernel_size, fork.lam) == (64, 5, 0.1)


def test_the_older_near_duplicates_are_evicted():
    _, call, keys, values = constructed_case()
    press = RKVPress(cache_budget=14, window_size=4, lam=0.0)  # pure redundancy; 2 of the 12 candidates go
    kept_keys, _ = press.compress(call["module"], call["hidden_states"], keys, values, None, call["kwargs"])
    expected = [t for t in range(16) if t not in (2, 6)]
    assert torch.equal(kept_keys, keys[:, :, expected])
    redundancy = press.redundancy(keys[:, :, :12])
    # oldest copy most redundant, then the middle one; the most recent copy is exempt like a unique token
    assert (redundancy[..., 2] > redundancy[..., 6]).all()
    others = [t for t in range(12) if t not in (2, 6)]
    assert (redundancy[..., 6:7] > redundancy[..., others]).all()
    # with the default importance weight the near-duplicates still go first
    kept_keys, _ = RKVPress(cache_budget=14, window_size=4).compress(
        call["module"], call["hidden_states"], keys, values, None, call["kwargs"]
    )
    assert torch.equal(kept_keys, keys[:, :, expected])


def test_cache_grows_by_compress_interval_then_returns_to_the_budget():
    model = get_model("llama")
    press = RKVPress(cache_budget=10, window_size=4, compress_interval=4)
    assert press.budget_buffer == 3
    lengths = []
    handle = model.model.register_forward_hook(
        lambda m, a, out: lengths.append([layer.keys.shape[2] for layer in output_cache(out).layers])
    )
    try:
        with torch.no_grad(), press(model):
            model.generate(random_input_ids(1, 16), max_new_tokens=12, min_new_tokens=12, pad_token_id=PAD_ID)
    finally:
        handle.remove()
    assert [step[0] for step in lengths] == [10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13]
    assert all(step[0] == step[1] for step in lengths)  # every layer on the same cadence


def test_eviction_log(tmp_path):
    model = get_model("llama")
    press = RKVPress(cache_budget=10, window_size=4, compress_interval=4)
    press.csv_path = str(tmp_path / "rkv.csv")
    with torch.no_grad(), press(model):
        model.generate(random_input_ids(1, 16), max_new_tokens=10, min_new_tokens=10, pad_token_id=PAD_ID)
    with open(press.csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == EVICTION_LOG_COLUMNS
    rows = rows[1:]
    # prunings: the prompt (16 entries), then decoding steps 4 and 8 (14 entries); 2 layers x 4 query heads each
    assert len(rows) == 3 * 2 * HEADS
    assert sorted({(int(r[0]), int(r[3])) for r in rows}) == [(0, 16), (4, 14), (8, 14)]
    for row in rows:
        kv_len_pre, kept, evicted = int(row[3]), int(row[4]), int(row[5])
        assert kept == 10 and evicted == kv_len_pre - 10
        assert len(row[8].split()) == evicted
        attn_pre, attn_post = float(row[6]), float(row[7])
        assert 0 <= attn_post <= attn_pre <= 4 + 1e-5  # mass of the 4 observation queries on the candidates


def test_hamming_cosine_table_and_simhash_codes():
    table = hamming_cosine_table(3)
    assert table.shape == (8, 8)
    assert table[0, 0] == 1 and table[0b000, 0b111] == pytest.approx(-1.0)
    assert table[0b101, 0b100] == pytest.approx(math.cos(math.pi / 3))
    assert table[0b110, 0b011] == pytest.approx(math.cos(2 * math.pi / 3))
    generator = torch.Generator().manual_seed(0)
    keys, projection = torch.randn(1, 2, 5, 4, generator=generator), torch.randn(4, 3, generator=generator)
    codes = simhash_codes(keys, projection)
    for h in range(2):
        for t in range(5):
            expected = sum(1 << j for j in range(3) if float(keys[0, h, t] @ projection[:, j]) > 0)
            assert int(codes[0, h, t]) == expected


@pytest.mark.parametrize("threshold", [0.5, 0.0, 1.0])
def test_lsh_redundancy_equals_the_exact_redundancy_of_the_estimated_similarities(threshold):
    generator = torch.Generator().manual_seed(3)
    n_bits = 4
    codes = torch.randint(0, 2**n_bits, (2, 3, 40), generator=generator)
    codes[0, 0, 20:25] = codes[0, 0, 3]  # a bucket with many members
    table = hamming_cosine_table(n_bits)
    estimated = table[codes.unsqueeze(-1), codes.unsqueeze(-2)]  # (B, H, C, C)
    torch.testing.assert_close(
        lsh_redundancy(codes, table, threshold), redundancy_from_similarity(estimated, threshold), atol=1e-6, rtol=1e-5
    )


def test_lsh_is_reproducible_with_a_seed():
    _, call, keys, values = constructed_case()
    inputs = (call["module"], call["hidden_states"], keys, values, None, call["kwargs"])
    first = RKVLSHPress(0.25, window_size=4, seed=3)
    assert torch.equal(first.hash_codes(keys), RKVLSHPress(0.25, seed=3).hash_codes(keys))
    assert torch.equal(first.score(*inputs), first.score(*inputs))
    assert torch.equal(first.score(*inputs), RKVLSHPress(0.25, window_size=4, seed=3).score(*inputs))
    assert not torch.equal(first.hash_codes(keys), RKVLSHPress(0.25, seed=4).hash_codes(keys))
    unseeded = RKVLSHPress(0.25, seed=None)
    torch.manual_seed(0)
    a = unseeded.hash_codes(keys)
    torch.manual_seed(0)
    assert torch.equal(a, unseeded.hash_codes(keys))  # seed=None follows torch's global generator
    assert not torch.equal(a, unseeded.hash_codes(keys))


def test_lsh_generation_is_reproducible():
    model = get_model("llama")

    def run(seed):
        press = RKVLSHPress(cache_budget=10, window_size=4, compress_interval=3, n_hash_bits=4, seed=seed)
        with torch.no_grad(), press(model):
            out = model.generate(random_input_ids(1, 16), max_new_tokens=9, min_new_tokens=9, pad_token_id=PAD_ID)
        return out, {i: s.entries[POSITIONS] for i, s in press.decoding_states.items()}

    (out_a, kept_a), (out_b, kept_b) = run(7), run(7)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(kept_a[i], kept_b[i]) for i in kept_a)


def test_bad_settings_are_rejected():
    for kwargs, message in [
        ({"compress_interval": 0}, "compress_interval must be a positive integer"),
        ({"window_size": 0}, "window_size must be a positive integer"),
        ({"kernel_size": 2.0}, "kernel_size must be a positive integer"),
        ({"lam": 1.5}, r"lam must be a number in \[0, 1\]"),
        ({"similarity_threshold": 2}, r"similarity_threshold must be a cosine similarity in \[-1, 1\]"),
        ({"compression_ratio": 0.5, "cache_budget": 16}, "choose one"),
    ]:
        with pytest.raises(ValueError, match=message):
            RKVPress(**kwargs)
    with pytest.raises(ValueError, match=r"n_hash_bits must be an integer in \[1, 12\]"):
        RKVLSHPress(n_hash_bits=13)
    with pytest.raises(ValueError, match="seed must be an integer or None"):
        RKVLSHPress(seed="0")
    _, call, keys, values = constructed_case(n_tokens=8)
    with pytest.raises(ValueError, match="needs more cached tokens"):
        RKVPress(0.5, window_size=8).score(call["module"], call["hidden_states"], keys, values, None, call["kwargs"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_window_logits_use_the_models_own_attention_scale(arch):
    """R-KV's window logits are the model's: softmaxed under the causal mask they equal the eager attention weights
    of the last window queries, on every architecture (Gemma3 scales by query_pre_attn_scalar, not head_dim)."""
    model = get_model(arch, "eager")
    window = 4
    weights = {}

    def hook(module, args, kwargs, output):
        weights[module.layer_idx] = output[1].detach()

    attentions = [layer.self_attn for layer in get_language_model(model).layers]
    handles = [attention.register_forward_hook(hook, with_kwargs=True) for attention in attentions]
    try:
        calls = record_layers(model, random_input_ids(1, 12))
    finally:
        for handle in handles:
            handle.remove()
    press = RKVPress(0.25, window_size=window)
    for layer_idx, call in calls.items():
        logits, _ = press.importance(call["module"], call["hidden_states"], call["keys"], call["kwargs"])
        length = logits.shape[-1]
        causal = torch.ones(window, length, dtype=torch.bool).tril(diagonal=length - window)
        expected = weights[layer_idx][..., -window:, :]
        torch.testing.assert_close(logits.masked_fill(~causal, float("-inf")).softmax(dim=-1), expected)
