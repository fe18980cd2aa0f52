# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""H2OPress: accumulated attention equals a direct eager computation, evictions follow the lowest mean received
attention, recent tokens are protected, the eviction log is right, and misuse is refused."""

import csv

import pytest
import torch
from transformers import DynamicCache

from kvpress.presses.h2o_press import ATTENTION_SUM, OBSERVATIONS, H2OPress
from kvpress.presses.observed_attention_press import ObservedAttentionPress
from kvpress.presses.scorer_press import POSITIONS
from kvpress.timing import EVICTION_LOG_COLUMNS
from kvpress.transformers_adapter import cache_kwargs, find_cache, output_cache, replace_inputs
from tests.fixtures import HEADS, KV_HEADS, PAD_ID, get_model, prefill, random_input_ids

GROUPS = HEADS // KV_HEADS


def feed(model, press, input_ids, n_prompt):
    """Prefill `n_prompt` tokens with the press, then feed the rest one token at a time."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids[:, :n_prompt], **cache_kwargs(model, cache))
        for t in range(n_prompt, input_ids.shape[1]):
            position_ids = torch.full((input_ids.shape[0], 1), t)
            model(input_ids[:, t : t + 1], position_ids=position_ids, **cache_kwargs(model, cache))
    return cache


def group_mean(per_head: torch.Tensor) -> torch.Tensor:
    """(B, H, T) -> (B, H_kv, T), averaging each GQA group (heads h*G .. h*G+G-1 share KV head h)."""
    return per_head.view(per_head.shape[0], KV_HEADS, GROUPS, -1).mean(dim=2)


def full_attention_weights(model, input_ids) -> dict:
    """Eager attention weights `(B, H, T, T)` of every layer for one forward over `input_ids`, read from the attention
    modules' outputs (a temporary hook; `output_attentions=True` would leave transformers' capture hooks behind)."""
    weights = {}
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, out: weights.__setitem__(m.layer_idx, out[1]))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return weights


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_accumulated_attention_equals_a_direct_eager_computation(arch, attn_implementation):
    """Under sdpa the press recomputes the weights itself; the eager model (same weights) is the reference."""
    model = get_model(arch, attn_implementation)
    input_ids = random_input_ids(2, 20, seed=5)
    press = H2OPress(cache_budget=64)  # large enough that nothing is evicted
    feed(model, press, input_ids, n_prompt=12)
    attentions = full_attention_weights(get_model(arch, "eager"), input_ids)
    n_tokens = input_ids.shape[1]
    for layer_idx, state in press.decoding_states.items():
        direct = group_mean(attentions[layer_idx].sum(dim=-2))  # attention each token received from all queries
        torch.testing.assert_close(state.entries[ATTENTION_SUM], direct, atol=1e-5, rtol=1e-4)
        observers = torch.arange(n_tokens, 0, -1, dtype=torch.float32)  # token j is seen by T - j queries
        assert torch.equal(state.entries[OBSERVATIONS], observers.expand(2, KV_HEADS, n_tokens))
        assert state.entries[POSITIONS][0, 0].tolist() == list(range(n_tokens))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_evictions_follow_the_lowest_mean_received_attention(tmp_path, attn_implementation):
    """Track every step's attention independently, per token position, and check the press's statistics, the token
    it evicts at every step, and the attention-loss log against it. Under sdpa the press recomputes the weights; the
    reference weights come from the eager model with the same parameters, fed the same cache."""
    model = get_model("llama", attn_implementation)
    reference = get_model("llama", "eager")
    budget, n_prompt, n_tokens = 8, 12, 22
    press = H2OPress(cache_budget=budget)
    press.csv_path = str(tmp_path / "logs" / "h2o.csv")
    input_ids = random_input_ids(1, n_tokens, seed=7)

    step_attentions = {}

    def record_eager(module, args, kwargs):
        if attn_implementation == "sdpa":
            # run the eager twin on a copy of this layer's cache before the sdpa layer appends to it
            cache, twin = find_cache(kwargs), DynamicCache()
            if module.layer_idx < len(cache.layers) and cache.layers[module.layer_idx].is_initialized:
                layer = cache.layers[module.layer_idx]
                twin.update(layer.keys.clone(), layer.values.clone(), module.layer_idx)
            eager_module = reference.model.layers[module.layer_idx].self_attn
            q_len = kwargs["hidden_states"].shape[1]
            k_len = twin.get_seq_length(module.layer_idx) + q_len
            # sdpa runs causal prefills with no mask (is_causal): give the eager twin the causal mask explicitly
            future = torch.ones(q_len, k_len, dtype=torch.bool).triu(diagonal=k_len - q_len + 1)
            causal = torch.zeros(1, 1, q_len, k_len).masked_fill(future, torch.finfo(torch.float32).min)
            twin_kwargs = replace_inputs(kwargs, cache=twin, attention_mask=causal)
            step_attentions[module.layer_idx] = eager_module(**twin_kwargs)[1].detach()

    if attn_implementation == "eager":
        handles = [
            layer.self_attn.register_forward_hook(
                lambda module, args, output: step_attentions.__setitem__(module.layer_idx, output[1].detach())
            )
            for layer in model.model.layers
        ]  # registered before the press: they see every forward's attention before any pruning
    else:
        handles = [
            layer.self_attn.register_forward_pre_hook(record_eager, with_kwargs=True) for layer in model.model.layers
        ]
    tracked = {i: [dict() for _ in range(KV_HEADS)] for i in range(len(model.model.layers))}
    previous = {i: torch.empty(1, KV_HEADS, 0, dtype=torch.long) for i in tracked}
    expected_rows = []
    checked_evictions = 0

    def check_step(n_new):
        nonlocal checked_evictions
        for layer_idx, state in press.decoding_states.items():
            new_positions = torch.arange(state.seen - n_new, state.seen).expand(1, KV_HEADS, n_new)
            before = torch.cat([previous[layer_idx], new_positions], dim=-1)[0]  # positions cached this forward
            weights = step_attentions[layer_idx][0]  # (H, q, T)
            received = weights.sum(dim=-2).view(KV_HEADS, GROUPS, -1).mean(dim=1)  # (H_kv, T)
            k_len = before.shape[-1]
            seen_by = (k_len - torch.arange(k_len)).clamp(max=n_new)
            kept = state.entries[POSITIONS][0]
            for head in range(KV_HEADS):
                stats = tracked[layer_idx][head]
                for j, position in enumerate(before[head].tolist()):
                    total, count = stats.get(position, (0.0, 0))
                    stats[position] = (total + float(received[head, j]), count + int(seen_by[j]))
                kept_set = set(kept[head].tolist())
                evicted = [p for p in before[head].tolist() if p not in kept_set]
                assert len(kept_set) == min(budget, k_len)
                means = {p: stats[p][0] / stats[p][1] for p in before[head].tolist()}
                if evicted:
                    assert max(means[p] for p in evicted) <= min(means[p] for p in kept_set) + 1e-5
                    checked_evictions += 1
                for j, position in enumerate(kept[head].tolist()):
                    total, count = stats[position]
                    assert abs(float(state.entries[ATTENTION_SUM][0, head, j]) - total) < 1e-4
                    assert int(state.entries[OBSERVATIONS][0, head, j]) == count
            if k_len > budget:  # one log row per query head, with the lost attention mass
                evicted_mask = torch.stack([~torch.isin(before[h], kept[h]) for h in range(KV_HEADS)])
                for head in range(HEADS):
                    lost = weights[head][:, evicted_mask[head // GROUPS]].sum()
                    positions = before[head // GROUPS][evicted_mask[head // GROUPS]].tolist()
                    expected_rows.append(
                        (state.steps, layer_idx, head, k_len, float(weights[head].sum()), float(lost), positions)
                    )
            previous[layer_idx] = kept.unsqueeze(0).clone()

    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model):
            model(input_ids[:, :n_prompt], **cache_kwargs(model, cache))
            check_step(n_prompt)
            for t in range(n_prompt, n_tokens):
                model(input_ids[:, t : t + 1], position_ids=torch.tensor([[t]]), **cache_kwargs(model, cache))
                check_step(1)
    finally:
        for handle in handles:
            handle.remove()
    assert checked_evictions == 2 * KV_HEADS * (n_tokens - n_prompt + 1)  # 2 layers; the prefill, then every step

    with open(press.csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == EVICTION_LOG_COLUMNS
    assert len(rows) - 1 == len(expected_rows)
    for row, (step, layer_idx, head, k_len, attn_pre, attn_post, positions) in zip(rows[1:], expected_rows):
        assert [int(v) for v in row[:6]] == [step, layer_idx, head, k_len, budget, k_len - budget]
        assert float(row[6]) == pytest.approx(attn_pre, abs=1e-5)
        assert float(row[7]) == pytest.approx(attn_post, abs=1e-5)
        assert [int(p) for p in row[8].split()] == positions


def test_recent_tokens_are_always_kept():
    model = get_model("llama", "eager")
    press = H2OPress(cache_budget=8, n_recent=4)
    input_ids = random_input_ids(1, 24, seed=2)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids[:, :12], **cache_kwargs(model, cache))
        for t in range(12, 24):
            model(input_ids[:, t : t + 1], position_ids=torch.tensor([[t]]), **cache_kwargs(model, cache))
            for state in press.decoding_states.values():
                kept = state.entries[POSITIONS][0]
                assert kept.shape[-1] == 8
                assert (kept[:, -4:] == torch.arange(t - 3, t + 1)).all()


def test_with_a_compression_ratio_it_keeps_what_observed_attention_keeps():
    model = get_model("llama", "eager")
    input_ids = random_input_ids(2, 40, seed=1)
    h2o = prefill(model, input_ids, H2OPress(0.5))
    observed = prefill(model, input_ids, ObservedAttentionPress(0.5))
    for layer, reference in zip(h2o.layers, observed.layers):
        assert layer.keys.shape[2] == 20
        torch.testing.assert_close(layer.keys, reference.keys)


def test_generate_with_h2o_on_a_batch():
    model = get_model("llama", "eager")
    press = H2OPress(cache_budget=10)
    with torch.no_grad(), press(model):
        out = model.generate(
            random_input_ids(2, 16), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=PAD_ID
        )
    assert out.shape == (2, 28)
    for state in press.decoding_states.values():
        assert state.entries[ATTENTION_SUM].shape == (2, KV_HEADS, 10)
        assert torch.isfinite(state.entries[ATTENTION_SUM]).all()


@pytest.mark.parametrize("keep", [True, False])
def test_output_attentions_flag(keep):
    model = get_model("llama", "eager")
    seen = []
    press = H2OPress(cache_budget=8, output_attentions=keep)
    with torch.no_grad(), press(model):
        handle = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[1]))
        try:
            model(random_input_ids(1, 12), **cache_kwargs(model, DynamicCache()))
        finally:
            handle.remove()
    assert (seen[0] is not None) == keep


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sdpa_gives_the_eager_caches_through_generate(arch):
    """H2OPress(cache_budget=256) as the reasoning fork's README uses it, on a model loaded with the default (sdpa)
    attention: the same evictions as under eager attention, through `generate`."""
    input_ids = random_input_ids(1, 30, seed=3)
    results = {}
    for implementation in ("eager", "sdpa"):
        model = get_model(arch, implementation)
        press = H2OPress(cache_budget=16)
        with torch.no_grad(), press(model):
            out = model.generate(input_ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        cache = output_cache(out)
        results[implementation] = (out.sequences, [layer.keys for layer in cache.layers], press)
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    for eager_keys, sdpa_keys in zip(results["eager"][1], results["sdpa"][1]):
        assert eager_keys.shape == sdpa_keys.shape
        torch.testing.assert_close(eager_keys, sdpa_keys, atol=1e-5, rtol=1e-4)
    eager_states, sdpa_states = results["eager"][2].decoding_states, results["sdpa"][2].decoding_states
    assert eager_states.keys() == sdpa_states.keys() and eager_states
    for layer_idx in eager_states:
        assert torch.equal(eager_states[layer_idx].entries[POSITIONS], sdpa_states[layer_idx].entries[POSITIONS])
        assert eager_states[layer_idx].entries[POSITIONS].shape[-1] <= 16


def test_valid_settings():
    with pytest.raises(ValueError, match="n_recent must be a non-negative integer"):
        H2OPress(n_recent=-1)
    with pytest.raises(ValueError, match="cache_budget must be a non-negative integer"):
        H2OPress(cache_budget=-8)
