# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KVComposePress: token scores against the model's own attention weights when the context is read again, the
composite-token budgets, and the structured (per-layer lengths) and unstructured (head-wise masks) caches."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.kvcompose_press import KVComposePress, MaxAggregator, MeanAggregator, aggregator_by_name
from kvpress.presses.scorer_press import gather_tokens
from kvpress.transformers_adapter import cache_kwargs, output_cache
from tests.fixtures import ARCHITECTURES, attention_modules, compressed_layers, get_model, random_input_ids

SEQ_LEN = 32


def plain_cache(model, input_ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids, **cache_kwargs(model, cache))
    return cache


def reference_scores(arch, input_ids, prompt=None, add_mean=True, v_norm=False):
    """(L, H_kv, C) scores from the eager attention weights of a plain forward that reads the context (or `prompt`)
    again after it: max over batch and queries, mean over each GQA group, plus the layer's mean over heads."""
    model = get_model(arch, "eager")
    cache = plain_cache(model, input_ids)
    values = [cache.layers[i].values.clone() for i in compressed_layers(model)]
    replay = input_ids if prompt is None else prompt.expand(input_ids.shape[0], -1)
    with torch.no_grad():
        attentions = model(replay, output_attentions=True, **cache_kwargs(model, cache)).attentions
    context_len = input_ids.shape[1]
    scores = []
    for layer_idx, layer_values in zip(compressed_layers(model), values):
        weights = attentions[layer_idx][..., :context_len]  # (B, H, q, C)
        per_query_head = weights.amax(dim=(0, 2))  # (H, C)
        per_kv_head = per_query_head.view(2, 2, context_len).mean(dim=1)
        if v_norm:
            per_kv_head = per_kv_head * layer_values.norm(dim=-1).mean(dim=0)
        scores.append(per_kv_head)
    scores = torch.stack(scores)
    if add_mean:
        scores = scores + scores.mean(dim=1, keepdim=True)
    return scores


def reference_budgets(scores, ratio, bound=0):
    """Tokens kept per (layer, head) and per layer: winners of the global top-k over the per-head sorted scores and
    over the per-layer composite tokens (mean over heads; the first layer takes the max over layers)."""
    num_layers, num_kv_heads, context_len = scores.shape
    per_head = scores.sort(dim=-1, descending=True).values
    per_head[..., :bound] += 1e9
    per_layer = per_head.mean(dim=1)
    per_layer[:, :bound] += 1e9
    per_layer[0] = per_layer.max(dim=0).values
    winners = per_head.flatten().topk(int(per_head.numel() * (1 - ratio))).indices // context_len
    budgets_head = torch.bincount(winners, minlength=num_layers * num_kv_heads).view(num_layers, num_kv_heads)
    winners = per_layer.flatten().topk(int(per_layer.numel() * (1 - ratio))).indices // context_len
    return budgets_head, torch.bincount(winners, minlength=num_layers)


def top_tokens(scores, count):
    """The `count` best tokens of one head's scores, in positional order."""
    return scores.argsort(descending=True, stable=True)[:count].sort().values


def run_press(model, input_ids, press, prompts=None):
    """Prefill inside the press; returns the cache and the press's scores and budgets (reset at context exit)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        if prompts is not None:
            press.register_prompt_ids(prompts)
        model(input_ids, **cache_kwargs(model, cache))
        state = {
            "scores": None if press.scores is None else press.scores.clone(),
            "per_head": press.important_per_head,
            "per_layer": press.important_per_layer,
        }
    assert press.scores is None  # state is cleared when the context exits
    return cache, state


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_structured_composite_tokens(arch, attn):
    model = get_model(arch, attn)
    input_ids = random_input_ids(1, SEQ_LEN, seed=1)
    ratio = 0.6
    cache, state = run_press(model, input_ids, KVComposePress(structured=True, compression_ratio=ratio))
    full = plain_cache(model, input_ids)

    # scores: sdpa recomputes the attention, eager reads the model's weights; both equal the reference
    torch.testing.assert_close(state["scores"], reference_scores(arch, input_ids), rtol=1e-4, atol=1e-6)
    budgets_head, budgets_layer = reference_budgets(state["scores"], ratio)
    np.testing.assert_array_equal(state["per_layer"], budgets_layer.numpy())
    np.testing.assert_array_equal(state["per_head"], budgets_head.numpy())
    assert budgets_layer.sum() == int(2 * SEQ_LEN * (1 - ratio))
    assert budgets_layer[0] == budgets_layer.max()  # the first layer gets the largest budget

    for layer in range(2):
        count = int(budgets_layer[layer])
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        assert keys.shape[2] == count  # the scoring pass left nothing behind: at most the context
        indices = torch.stack([top_tokens(state["scores"][layer, head], count) for head in range(2)])[None]
        torch.testing.assert_close(keys, gather_tokens(full.layers[layer].keys, indices))
        torch.testing.assert_close(values, gather_tokens(full.layers[layer].values, indices))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_unstructured_masks_each_heads_own_budget(arch, ratio):
    model = get_model(arch)
    input_ids = random_input_ids(1, SEQ_LEN, seed=2)
    full = plain_cache(model, input_ids)  # first: a prefill resets the masks of the previous one
    cache, state = run_press(model, input_ids, KVComposePress(structured=False, compression_ratio=ratio))
    budgets_head, _ = reference_budgets(state["scores"], ratio)
    np.testing.assert_array_equal(state["per_head"], budgets_head.numpy())
    masked_total = 0
    for layer, module in enumerate(attention_modules(model)):
        # the cache holds exactly the context (upstream leaves the repeated context behind, ~2C tokens)
        torch.testing.assert_close(cache.layers[layer].keys, full.layers[layer].keys)
        masked = torch.zeros(1, 2, SEQ_LEN, dtype=torch.bool)
        batch_idx, head_idx, seq_idx = module.masked_key_indices
        masked[batch_idx, head_idx, seq_idx] = True
        for head in range(2):
            kept = torch.zeros(SEQ_LEN, dtype=torch.bool)
            kept[top_tokens(state["scores"][layer, head], int(budgets_head[layer, head]))] = True
            assert (masked[0, head] == ~kept).all()
        masked_total += int(masked.sum())
    assert masked_total == 2 * 2 * SEQ_LEN - int(2 * 2 * SEQ_LEN * (1 - ratio))
    assert abs(masked_total / (2 * 2 * SEQ_LEN) - ratio) < 1e-2


def test_composite_budgets_on_constructed_scores():
    press = KVComposePress(structured=True, compression_ratio=0.5, add_mean_across_heads=False)
    press.num_layers, press.num_kv_heads, press.context_len = 2, 2, 4
    low, high = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.9, 0.8, 0.7, 0.6])
    press.scores = torch.stack([torch.stack([low, low]), torch.stack([high, high])])  # layer 1 is better
    press.compute_important_per_layer()
    # composite tokens: layer 1 wins every head-wise comparison, but the first layer takes the max over layers
    assert press.important_per_layer.tolist() == [2, 2]
    assert press.important_per_head.tolist() == [[0, 0], [4, 4]]
    torch.testing.assert_close(press.composite_scores_per_layer[0], press.composite_scores_per_layer[1])

    press.keep_token_lower_bound = 1  # every head and every layer keeps at least one token
    press.compute_important_per_layer()
    assert press.important_per_head.tolist() == [[1, 1], [3, 3]]
    assert press.important_per_layer.tolist() == [2, 2]


def test_value_norms_prompts_batches_and_lower_bound():
    model = get_model("llama")
    input_ids = random_input_ids(2, SEQ_LEN, seed=3)
    prompt = random_input_ids(1, 6, seed=4)

    _, state = run_press(model, input_ids, KVComposePress(compression_ratio=0.5, add_v_norm=True))
    torch.testing.assert_close(state["scores"], reference_scores("llama", input_ids, v_norm=True), rtol=1e-4, atol=1e-6)

    # a registered prompt replaces the repeated context as the scoring pass (upstream drops registered prompts)
    press = KVComposePress(compression_ratio=0.5, add_mean_across_heads=False)
    cache, state = run_press(model, input_ids, press, prompts=[prompt[0]])
    expected = reference_scores("llama", input_ids, prompt=prompt, add_mean=False)
    torch.testing.assert_close(state["scores"], expected, rtol=1e-4, atol=1e-6)
    assert press.prompt_ids == []  # cleared at context exit
    # every batch item keeps the same tokens (scores are pooled over the batch)
    full = plain_cache(model, input_ids)
    for layer in range(2):
        count = int(state["per_layer"][layer])
        indices = torch.stack([top_tokens(state["scores"][layer, head], count) for head in range(2)])
        torch.testing.assert_close(
            cache.layers[layer].values, gather_tokens(full.layers[layer].values, indices[None].expand(2, -1, -1))
        )

    cache, state = run_press(model, input_ids, KVComposePress(compression_ratio=0.8, keep_token_lower_bound=5))
    assert (state["per_layer"] >= 5).all() and (state["per_head"] >= 5).all()
    assert all(layer.keys.shape[2] >= 5 for layer in cache.layers)


def test_ratio_zero_runs_no_scoring_pass():
    model = get_model("llama")
    input_ids = random_input_ids(1, SEQ_LEN)
    calls = []
    handle = model.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        cache, state = run_press(model, input_ids, KVComposePress(compression_ratio=0.0))
    finally:
        handle.remove()
    assert len(calls) == 1 and state["scores"] is None
    torch.testing.assert_close(cache.layers[0].keys, plain_cache(model, input_ids).layers[0].keys)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_structured_and_unstructured(arch):
    model = get_model(arch)
    layers = compressed_layers(model)
    input_ids = random_input_ids(1, SEQ_LEN, seed=5)
    ratio = 0.5
    cache, _ = run_press(model, input_ids, KVComposePress(structured=True, compression_ratio=ratio))
    lengths = [cache.layers[i].keys.shape[2] for i in layers]
    assert sum(lengths) == int(len(layers) * SEQ_LEN * (1 - ratio))
    with torch.no_grad():
        out = model(random_input_ids(1, 2, seed=6), **cache_kwargs(model, cache))
    assert torch.isfinite(out.logits).all()

    cache, _ = run_press(model, input_ids, KVComposePress(structured=False, compression_ratio=ratio))
    modules = attention_modules(model)
    masked = sum(modules[i].masked_key_indices[0].numel() for i in layers)
    assert all(cache.layers[i].keys.shape[2] == SEQ_LEN for i in layers)
    assert abs(masked / (len(layers) * 2 * SEQ_LEN) - ratio) < 1e-2
    with torch.no_grad():
        out = model(random_input_ids(1, 2, seed=6), **cache_kwargs(model, cache))
    assert torch.isfinite(out.logits).all()


def test_generate_inside_the_press():
    """Compression happens at the end of the prefill forward, so `model.generate` decodes on the compressed cache."""
    model = get_model("qwen2")
    input_ids = random_input_ids(1, SEQ_LEN, seed=7)
    with torch.no_grad(), KVComposePress(compression_ratio=0.5)(model):
        out = model.generate(input_ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == SEQ_LEN + 3
    lengths = [layer.keys.shape[2] - 2 for layer in output_cache(out).layers]
    assert sum(lengths) == int(2 * SEQ_LEN * 0.5)


def test_aggregators():
    rows = np.array([[1.0, 5.0, -2.0], [3.0, 0.0, -1.0]])
    maximum = MaxAggregator(3)
    assert maximum.transform().tolist() == [float("-inf")] * 3
    maximum.partial_fit(rows).partial_fit(torch.tensor([0.0, 6.0, -3.0]))  # numpy, then a 1-D tensor
    assert maximum.transform().tolist() == [3.0, 6.0, -1.0]
    assert maximum.fit_transform(torch.tensor([[[0.5, 0.5, 0.5]]])).tolist() == [0.5, 0.5, 0.5]  # fit resets

    mean = MeanAggregator(3)
    mean.partial_fit(rows)
    mean.partial_fit(np.array([2.0, 1.0, 0.0]))
    np.testing.assert_allclose(mean.transform().numpy(), [2.0, 2.0, -1.0])
    mean.reset()
    assert mean.transform().tolist() == [0.0, 0.0, 0.0]
    assert aggregator_by_name == {"mean": MeanAggregator, "max": MaxAggregator}
    with pytest.raises(ValueError, match="length 3"):
        mean.partial_fit(np.ones(4))


def test_bad_input():
    with pytest.raises(ValueError, match="compression_ratio"):
        KVComposePress(compression_ratio=1.0)
    with pytest.raises(ValueError, match=r"agg_task must be one of \['max', 'mean'\]"):
        KVComposePress(agg_task="median")
    with pytest.raises(ValueError, match="keep_token_lower_bound"):
        KVComposePress(keep_token_lower_bound=-1)
    with pytest.raises(ValueError, match="non-empty 1-D tensor"):
        KVComposePress().register_prompt_ids([torch.ones(2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="ComposedPress cannot contain"):
        ComposedPress([KVComposePress(compression_ratio=0.5)])
