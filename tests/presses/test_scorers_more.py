# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KeyDiffPress, LagKVPress, CURPress and CapPress against straightforward reference computations written here,
the tokens they keep on constructed inputs, their errors, and kept sizes on every architecture."""

import math

import pytest
import torch

from kvpress.presses.cap_press import CapPress
from kvpress.presses.cur_press import CURPress
from kvpress.presses.keydiff_press import KeyDiffPress
from kvpress.presses.lagkv_press import LagKVPress
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


class DummyModule(torch.nn.Module):
    head_dim = 8
    layer_idx = 0


def random_kv(batch=2, heads=2, seq=24, dim=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, seq, dim, generator=generator).to(dtype)
    values = torch.randn(batch, heads, seq, dim, generator=generator).to(dtype)
    return keys, values


def kept_positions(press, keys, values) -> list[list[list[int]]]:
    """Positions of the kept tokens per (batch, head), found by matching the kept keys to the input keys."""
    kept_keys, kept_values = press.compress(DummyModule(), torch.zeros(1, keys.shape[2], 4), keys, values, None, {})
    result = []
    for b in range(keys.shape[0]):
        per_head = []
        for h in range(keys.shape[1]):
            positions = [int((keys[b, h] == k).all(dim=-1).nonzero()[0]) for k in kept_keys[b, h]]
            assert torch.equal(kept_values[b, h], values[b, h, positions])
            per_head.append(positions)
        result.append(per_head)
    return result


# ---------------------------------------------------------------- KeyDiff


def test_keydiff_scores_are_minus_cosine_to_the_mean_unit_key():
    keys, values = random_kv(seed=1)
    scores = KeyDiffPress(0.5).score(DummyModule(), None, keys, values, None, {})
    for b in range(2):
        for h in range(2):
            unit = [k / math.sqrt(float(k @ k)) for k in keys[b, h]]
            anchor = sum(unit) / len(unit)
            for t, k in enumerate(keys[b, h]):
                cosine = float(k @ anchor) / math.sqrt(float(k @ k) * float(anchor @ anchor))
                assert float(scores[b, h, t]) == pytest.approx(-cosine, abs=1e-5)


def test_keydiff_keeps_the_distinctive_keys():
    # 17 keys around one direction (with different norms) and 3 keys pointing elsewhere: the 3 are kept.
    torch.manual_seed(0)
    keys = torch.zeros(1, 1, 20, 8)
    keys[..., 0] = torch.rand(20) * 3 + 1
    keys[..., 1:] = 0.05 * torch.randn(1, 1, 20, 7)
    distinct = [2, 11, 19]
    keys[0, 0, distinct] = torch.tensor(
        [[0.0, 1, 0, 0, 0, 0, 0, 0], [0, 0, -2, 1, 0, 0, 0, 0], [-1, 0, 0, 0, 3, 0, 0, 0]]
    )
    values = torch.randn(1, 1, 20, 8)
    assert kept_positions(KeyDiffPress(0.84), keys, values) == [[distinct]]


# ---------------------------------------------------------------- LagKV


def reference_lagkv(keys, values, n_sink, lag, cross_scoring):
    """Per (batch, head) and partition: min-max normalise with the next partition, std over channels, softmax over
    the partition, mean of key and value scores; ranks unless cross_scoring; 1 for sinks and the tail."""
    bsz, heads, length, _ = keys.shape
    scores = torch.ones(bsz, heads, length)
    n_partitions = (length - n_sink) // lag
    for b in range(bsz):
        for h in range(heads):
            for p in range(n_partitions - 1):
                start = n_sink + p * lag
                part = slice(start, start + lag)
                ref = slice(start + lag, start + 2 * lag)
                total = torch.zeros(lag)
                for states in (keys, values):
                    low, high = states[b, h, ref].min(dim=0).values, states[b, h, ref].max(dim=0).values
                    normalised = (states[b, h, part] - low) / (high - low)
                    spread = torch.tensor([row.std().item() for row in normalised])
                    total += torch.exp(spread) / torch.exp(spread).sum() / 2
                if not cross_scoring:
                    order = sorted(range(lag), key=lambda i: total[i].item())
                    total = torch.tensor([order.index(i) / lag for i in range(lag)])
                scores[b, h, part] = total
    return scores


@pytest.mark.parametrize("cross_scoring", [True, False])
@pytest.mark.parametrize("n_sink, lag, length", [(4, 8, 40), (2, 5, 33), (0, 6, 24), (3, 4, 11)])
def test_lagkv_scores_match_reference(cross_scoring, n_sink, lag, length):
    keys, values = random_kv(seq=length, seed=length)
    press = LagKVPress(0.5, n_sink=n_sink, lag_size=lag, cross_scoring=cross_scoring)
    scores = press.score(DummyModule(), None, keys, values, None, {})
    expected = reference_lagkv(keys, values, n_sink, lag, cross_scoring)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    # sinks and everything after the last scored partition (the last partition plus the remainder) score 1
    n_scored = ((length - n_sink) // lag - 1) * lag
    assert torch.all(scores[..., :n_sink] == 1) and torch.all(scores[..., n_sink + n_scored :] == 1)


def test_lagkv_short_context_uses_recency():
    keys, values = random_kv(seq=19)
    scores = LagKVPress(0.5, n_sink=4, lag_size=8).score(DummyModule(), None, keys, values, None, {})  # 19 < 4 + 16
    expected = torch.ones(2, 2, 19)
    expected[..., 4:] = torch.arange(15) / 15
    torch.testing.assert_close(scores, expected)
    # keeps the sinks and the most recent tokens
    assert kept_positions(LagKVPress(0.5, n_sink=4, lag_size=8), keys, values)[0][0] == [0, 1, 2, 3] + list(
        range(14, 19)
    )
    only_sinks = LagKVPress(0.5, n_sink=4, lag_size=8).score(DummyModule(), None, keys[:, :, :3], values, None, {})
    assert torch.equal(only_sinks, torch.ones(2, 2, 3))


def test_lagkv_keeps_tokens_that_stand_out_from_the_next_partition():
    # 3 partitions of 8 after 2 sinks (+ tail). In partition 0 tokens 3 and 6 have one wild channel, so their
    # normalised channels have the largest spread; cross scoring with ratio leaving 2 of 8 keeps exactly them.
    torch.manual_seed(1)
    keys = torch.rand(1, 1, 2 + 3 * 8, 8)
    values = torch.rand(1, 1, 2 + 3 * 8, 8)
    for token in (2 + 3, 2 + 6):
        keys[0, 0, token, 0] = 10.0
        values[0, 0, token, 1] = 10.0
    press = LagKVPress(0.0, n_sink=2, lag_size=8, cross_scoring=True)
    scores = press.score(DummyModule(), None, keys, values, None, {})
    assert set(scores[0, 0, 2:10].topk(2).indices.tolist()) == {3, 6}


def test_lagkv_constant_channel_gives_finite_scores():
    keys, values = random_kv(seq=40)
    keys[..., 3] = 1.0  # a constant channel: upstream divides by a zero range
    scores = LagKVPress(0.5, n_sink=4, lag_size=8, cross_scoring=True).score(
        DummyModule(), None, keys, values, None, {}
    )
    assert torch.isfinite(scores).all()


# ---------------------------------------------------------------- CUR


def reference_cur(keys, values, leverage_type, num_sinks, window, local):
    bsz, heads, length, _ = keys.shape
    scores = torch.zeros(bsz, heads, length)
    for b in range(bsz):
        for h in range(heads):
            k2 = [float(k @ k) for k in keys[b, h]]
            v2 = [float(v @ v) for v in values[b, h]]
            if local:
                for norms in (k2, v2):
                    for start in range(0, length, window):
                        total = sum(norms[start : start + window])
                        norms[start : start + window] = [n / total for n in norms[start : start + window]]
            combined = {
                "key": k2,
                "value": v2,
                "kv_avg": [(a + c) / 2 for a, c in zip(k2, v2)],
                "kv_product": [a * c for a, c in zip(k2, v2)],
            }[leverage_type]
            total = sum(combined)
            scores[b, h] = torch.tensor([c / total for c in combined])
    scores[..., :num_sinks] = 1.0
    return scores


@pytest.mark.parametrize("leverage_type", ["key", "value", "kv_avg", "kv_product"])
@pytest.mark.parametrize("local, window", [(True, 16), (True, 5), (False, 16)])
def test_cur_scores_match_reference(leverage_type, local, window):
    keys, values = random_kv(seq=23, seed=2)
    press = CURPress(
        0.5, num_sinks=3, leverage_type=leverage_type, use_local_approximation=local, local_window_size=window
    )
    scores = press.score(DummyModule(), None, keys, values, None, {})
    expected = reference_cur(keys, values, leverage_type, 3, window, local)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)


def test_cur_random_leverage_projects_keys_and_values():
    keys, values = random_kv(seq=20, dim=16, seed=3)
    torch.manual_seed(7)
    scores = CURPress(0.5, use_random_leverage=True, use_local_approximation=False).score(
        DummyModule(), None, keys, values, None, {}
    )
    torch.manual_seed(7)
    projection = torch.randn(16, 20) / math.sqrt(20)
    expected = reference_cur(keys @ projection, values @ projection, "kv_product", 4, 16, False)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    # half precision works too (upstream multiplies half keys with a float32 projection and fails)
    half = CURPress(0.5, use_random_leverage=True).score(
        DummyModule(), None, keys.to(torch.bfloat16), values.to(torch.bfloat16), None, {}
    )
    assert half.shape == (2, 2, 20) and torch.isfinite(half).all()


def test_cur_keeps_sinks_and_large_rows():
    keys, values = random_kv(batch=1, heads=1, seq=20, seed=4)
    keys, values = keys * 0.1, values * 0.1
    keys[0, 0, [7, 15]] *= 50
    values[0, 0, [7, 15]] *= 50
    press = CURPress(0.79, num_sinks=2, use_local_approximation=False)
    assert kept_positions(press, keys, values) == [[[0, 1, 7, 15]]]


def test_cur_bad_leverage_type():
    with pytest.raises(ValueError, match="leverage_type must be one of"):
        CURPress(0.5, leverage_type="query")
    press = CURPress(0.5)
    press.leverage_type = "query"
    keys, values = random_kv()
    with pytest.raises(ValueError, match="kv_product"):
        press.score(DummyModule(), None, keys, values, None, {})


# ---------------------------------------------------------------- Cap


def rope_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`x` (d,) rotated as RoPE does at each position: (P, d)."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    half = x.shape[-1] // 2
    return x * angles.cos() + torch.cat([-x[half:], x[:half]]) * angles.sin()


def reference_cap(model, call, tau, n_future, n_sink, epsilon):
    attention, hidden_states, keys, values = call["module"], call["hidden_states"], call["keys"], call["values"]
    length = hidden_states.shape[1]
    queries = attention.q_proj(hidden_states[:, n_sink:]).view(1, length - n_sink, HEADS, HEAD_DIM)
    if hasattr(attention, "q_norm"):
        queries = attention.q_norm(queries)
    queries = queries[0].transpose(0, 1)  # (H, T', d)
    inv_freq = model.model.rotary_emb.inv_freq
    future = torch.arange(length, length + n_future)
    scores = torch.zeros(KV_HEADS, length - n_sink)
    for head in range(HEADS):
        # every query rotated at every future position, averaged: the expected future query direction
        anchor = torch.stack([rope_at(q, future, inv_freq).mean(dim=0) for q in queries[head]]).mean(dim=0)
        head_keys = keys[0, head // GROUPS, n_sink:]
        head_values = values[0, head // GROUPS, n_sink:]
        cosines = torch.stack([torch.dot(anchor, k) / (anchor.norm() * k.norm()) for k in head_keys])
        weights = torch.exp(tau * cosines - (tau * cosines).max())
        matrix = torch.eye(HEAD_DIM) + sum((w + epsilon) * torch.outer(v, v) for w, v in zip(weights, head_values))
        inverse = torch.linalg.inv(matrix.double())
        leverage = torch.stack([v.double() @ inverse @ v.double() for v in head_values]).float()
        scores[head // GROUPS] += weights * leverage / GROUPS
    return torch.cat([torch.full((KV_HEADS, n_sink), scores.max().item() + 1), scores], dim=1).unsqueeze(0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "options",
    [dict(tau=5.0, n_future_positions=512, n_sink=4), dict(tau=10.0, n_future_positions=16, n_sink=0)],
)
def test_cap_scores_match_reference(arch, options):
    model = get_model(arch)
    calls = record_layers(model, random_input_ids(1, 24, seed=5))
    press = CapPress(0.5, epsilon=1e-6, **options)
    for call in calls.values():
        with torch.no_grad():
            scores = press.score(
                call["module"], call["hidden_states"], call["keys"], call["values"], None, call["kwargs"]
            )
            expected = reference_cap(
                model, call, options["tau"], options["n_future_positions"], options["n_sink"], epsilon=1e-6
            )
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_cap_sinks_kept_and_short_inputs_raise():
    model, n_sink = get_model("mistral"), 6
    input_ids = random_input_ids(1, SEQ_LEN, seed=6)
    full = prefill(model, input_ids)
    compressed = prefill(model, input_ids, CapPress(0.8, n_sink=n_sink))
    for layer_idx in compressed_layers(model):
        kept = compressed.layers[layer_idx].keys
        assert kept.shape[2] == int(SEQ_LEN * (1 - 0.8))
        torch.testing.assert_close(kept[:, :, :n_sink], full.layers[layer_idx].keys[:, :, :n_sink], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Input cache length \(4\) must be larger than n_sink=4"):
        prefill(model, random_input_ids(1, 4), CapPress(0.5))
    with pytest.raises(ValueError, match="n_sink"):
        CapPress(0.5, n_sink=-1)


# ---------------------------------------------------------------- all presses of this file


PRESSES = [
    (KeyDiffPress, {}),
    (LagKVPress, dict(n_sink=4, lag_size=8)),
    (LagKVPress, dict(n_sink=2, lag_size=4, cross_scoring=True)),
    (CURPress, {}),
    (CURPress, dict(leverage_type="kv_avg", use_random_leverage=True, local_window_size=8)),
    (CapPress, {}),
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("cls, options", PRESSES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(PRESSES)])
def test_kept_sizes_on_every_architecture(arch, cls, options):
    model = get_model(arch)
    for ratio in RATIOS:
        cache = prefill(model, random_input_ids(2, SEQ_LEN, seed=7), cls(ratio, **options))
        n_kept = int(SEQ_LEN * (1 - ratio))
        for layer_idx in compressed_layers(model):
            layer = cache.layers[layer_idx]
            assert layer.keys.shape == layer.values.shape == (2, KV_HEADS, n_kept, HEAD_DIM)
            assert torch.isfinite(layer.keys).all()


def test_fields_and_defaults():
    assert KeyDiffPress().compression_ratio == 0.0
    lag = LagKVPress()
    assert (lag.compression_ratio, lag.n_sink, lag.lag_size, lag.cross_scoring) == (0.0, 4, 128, False)
    cur = CURPress()
    assert (cur.compression_ratio, cur.num_sinks, cur.leverage_type) == (0.0, 4, "kv_product")
    assert (cur.use_random_leverage, cur.use_local_approximation, cur.local_window_size) == (False, True, 16)
    cap = CapPress()
    assert (cap.compression_ratio, cap.tau, cap.n_future_positions, cap.n_sink, cap.epsilon) == (0.0, 5.0, 512, 4, 1e-6)
    assert CapPress(0.5, 2.0, 64, 2, 0.1) == CapPress(
        compression_ratio=0.5, tau=2.0, n_future_positions=64, n_sink=2, epsilon=0.1
    )
    assert LagKVPress(0.5, 2, 16, True) == LagKVPress(compression_ratio=0.5, n_sink=2, lag_size=16, cross_scoring=True)
    with pytest.raises(ValueError, match="lag_size must be an integer >= 1"):
        LagKVPress(0.5, lag_size=0)
