# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""PyramidKVPress: per-layer budgets (mean, shape, hand-computed cases), kept tokens and kept sizes on tiny models."""

from types import SimpleNamespace

import pytest
import torch

from kvpress.presses.pyramidkv_press import PyramidKVPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.fixtures import (
    ARCHITECTURES,
    KV_HEADS,
    compressed_layers,
    get_model,
    prefill,
    random_input_ids,
    record_layers,
)

SEQ_LEN = 40
RATIOS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)


def mock_module(num_layers: int, layer_idx: int):
    return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=num_layers), layer_idx=layer_idx)


def layer_budgets(press: PyramidKVPress, num_layers: int, q_len: int) -> list[int]:
    return [press.get_layer_budget(mock_module(num_layers, i), q_len) for i in range(num_layers)]


def reference_budgets(q_len: int, ratio: float, window: int, beta: float, num_layers: int) -> list[int]:
    """PyramidKV's allocation written from the paper: an arithmetic sequence of budgets above the window whose
    mean is the uniform budget; its smallest term is the uniform budget / beta unless the largest would not fit."""
    average = q_len * (1 - ratio)
    total_above_window = 2 * average  # largest + smallest term of an arithmetic sequence whose mean is `average`
    smallest = average / beta
    largest = total_above_window - smallest
    if largest >= q_len - window:
        largest = q_len - window
        smallest = total_above_window - largest
    if not (q_len >= largest >= smallest >= window):
        return [round(average)] * num_layers
    return [round(largest - i * (largest - smallest) / (num_layers - 1)) for i in range(num_layers)]


@pytest.mark.parametrize("num_layers", [32, 64, 128])
def test_mean_layer_budget_is_the_uniform_budget(num_layers):
    for ratio in (0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.8):
        press = PyramidKVPress(ratio)
        for q_len in (1024, 2787, 4096, 6591, 8192):
            budgets = layer_budgets(press, num_layers, q_len)
            mean = sum(budgets) / num_layers
            assert mean == pytest.approx(q_len * (1 - ratio), rel=1e-3), (ratio, q_len)
            # a pyramid: non-increasing with depth, never more than the context
            assert all(a >= b for a, b in zip(budgets, budgets[1:]))
            assert budgets[0] <= q_len


def test_hand_computed_budgets():
    # q_len 1000, window 64, ratio 0.5, beta 20, 4 layers: the largest budget is capped at q_len - window = 936,
    # the smallest is 2 * 500 - 936 = 64, and the 4 budgets step down by 872 / 3.
    assert layer_budgets(PyramidKVPress(0.5), 4, 1000) == [936, 645, 355, 64]
    # q_len 40, window 2, ratio 0.2, 2 layers: 2 * 32 - 38 = 26
    assert layer_budgets(PyramidKVPress(0.2, window_size=2), 2, 40) == [38, 26]
    # q_len 40, window 2, ratio 0.8: the smallest budget (8 / 20) is below the window: uniform round(8.0)
    assert layer_budgets(PyramidKVPress(0.8, window_size=2), 2, 40) == [8, 8]
    # beta 1 is a flat pyramid
    assert layer_budgets(PyramidKVPress(0.75, window_size=4, beta=1), 3, 400) == [100, 100, 100]
    # one layer: no pyramid, the uniform budget (upstream divides by zero)
    assert layer_budgets(PyramidKVPress(0.5, window_size=4), 1, 100) == [50]


def test_budgets_match_reference_formula():
    for num_layers in (2, 3, 5, 32):
        for ratio in (0.05, 0.2, 0.5, 0.7, 0.9):
            for window, beta in ((2, 20), (8, 5), (16, 2)):
                for q_len in (40, 97, 512):
                    press = PyramidKVPress(ratio, window_size=window, beta=beta)
                    expected = reference_budgets(q_len, ratio, window, beta, num_layers)
                    assert layer_budgets(press, num_layers, q_len) == expected, (num_layers, ratio, window, q_len)


def kept_indices(full_keys: torch.Tensor, kept_keys: torch.Tensor) -> torch.Tensor:
    distances = (kept_keys.unsqueeze(3) - full_keys.unsqueeze(2)).norm(dim=-1)
    assert distances.min(dim=-1).values.max() < 1e-5, "a kept key is not in the uncompressed cache"
    return distances.argmin(dim=-1)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_each_layer_keeps_its_budget_of_top_snapkv_tokens(ratio):
    model, window = get_model("llama"), 4
    input_ids = random_input_ids(1, SEQ_LEN, seed=3)
    calls = record_layers(model, input_ids)
    full = prefill(model, input_ids)
    press = PyramidKVPress(ratio, window_size=window)
    compressed = prefill(model, input_ids, press)
    budgets = reference_budgets(SEQ_LEN, ratio, window, 20, 2)
    assert budgets[0] > budgets[1]  # a real pyramid on this configuration
    snapkv = SnapKVPress(ratio, window_size=window)
    for layer_idx, call in calls.items():
        kept = kept_indices(full.layers[layer_idx].keys, compressed.layers[layer_idx].keys)
        assert kept.shape[-1] == budgets[layer_idx]
        with torch.no_grad():
            scores = snapkv.score(
                call["module"], call["hidden_states"], call["keys"], call["values"], None, call["kwargs"]
            )
        for head in range(KV_HEADS):
            expected = scores[0, head].topk(budgets[layer_idx]).indices.sort().values
            assert torch.equal(kept[0, head], expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kept_sizes_on_every_architecture(arch):
    model = get_model(arch)
    num_layers = model.config.get_text_config().num_hidden_layers
    for ratio in RATIOS:
        cache = prefill(model, random_input_ids(2, SEQ_LEN), PyramidKVPress(ratio, window_size=2))
        budgets = [SEQ_LEN] * num_layers if ratio == 0 else reference_budgets(SEQ_LEN, ratio, 2, 20, num_layers)
        for layer_idx in compressed_layers(model):
            layer = cache.layers[layer_idx]
            assert layer.keys.shape == layer.values.shape == (2, KV_HEADS, budgets[layer_idx], 16)


def test_ratio_zero_leaves_the_cache_alone_and_bad_settings_raise():
    model = get_model("llama")
    input_ids = random_input_ids(1, SEQ_LEN, seed=1)
    full, same = prefill(model, input_ids), prefill(model, input_ids, PyramidKVPress(0.0))
    for a, b in zip(full.layers, same.layers):
        assert torch.equal(a.keys, b.keys)
    with pytest.raises(ValueError, match="beta must be a number >= 1"):
        PyramidKVPress(0.5, beta=0)
    with pytest.raises(ValueError, match="window_size"):
        PyramidKVPress(0.5, window_size=0)
    with pytest.raises(ValueError, match="compression_ratio"):
        PyramidKVPress(1.0)
    with pytest.raises(ValueError, match="longer than window_size"):
        prefill(model, random_input_ids(1, 8), PyramidKVPress(0.5, window_size=8))


def test_fields_and_defaults():
    press = PyramidKVPress()
    assert (press.compression_ratio, press.window_size, press.kernel_size, press.beta) == (0.0, 64, 5, 20)
    assert isinstance(press, SnapKVPress)
    assert PyramidKVPress(0.3, 8, 3, 4) == PyramidKVPress(compression_ratio=0.3, window_size=8, kernel_size=3, beta=4)


@pytest.mark.parametrize("num_layers", [2, 6, 32])
def test_a_cache_budget_is_spread_as_a_pyramid_of_the_same_mean(num_layers):
    for budget, window, beta in ((128, 4, 4), (1280, 64, 20), (300, 8, 2.5)):
        press = PyramidKVPress(cache_budget=budget, window_size=window, beta=beta)
        budgets = [press.layer_cache_budget(mock_module(num_layers, i)) for i in range(num_layers)]
        assert sum(budgets) / num_layers == pytest.approx(budget, abs=0.5)
        assert all(a >= b for a, b in zip(budgets, budgets[1:])) and budgets[0] > budgets[-1]
        assert budgets[-1] == round(budget / beta) and min(budgets) >= window
        # the arithmetic sequence of the compression-ratio pyramid, from 2 * budget - budget / beta to budget / beta
        smallest, largest = budget / beta, 2 * budget - budget / beta
        assert budgets == [round(largest - i * (largest - smallest) / (num_layers - 1)) for i in range(num_layers)]


def test_a_cache_budget_too_small_for_a_pyramid_is_the_same_for_every_layer():
    # the smallest layer would keep 1024 / 20 < 64 tokens (the window): every layer keeps the budget
    press = PyramidKVPress(cache_budget=1024)
    assert {press.layer_cache_budget(mock_module(32, i)) for i in range(32)} == {1024}
    assert PyramidKVPress(cache_budget=500, window_size=4).layer_cache_budget(mock_module(1, 0)) == 500
