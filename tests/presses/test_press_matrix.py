# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Every press, alone and inside every wrapper, on every architecture: the cache ends at the size it should."""

import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    AdaKVPress,
    BlockPress,
    ChunkKVPress,
    ChunkPress,
    ComposedPress,
    CriticalAdaKVPress,
    CriticalKVPress,
    DMSPress,
    KeyRerotationPress,
    KnormPress,
    MergingPress,
)
from kvpress.transformers_adapter import cache_kwargs
from tests.default_presses import default_presses, eager_presses
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, random_input_ids

SEQ_LEN = 40

CASES = [(entry["cls"], kwargs) for entry in default_presses for kwargs in entry["kwargs"]]
RATIOS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
RATIO_CASES = [
    (entry["cls"], {**entry["kwargs"][0], "compression_ratio": r}) for entry in default_presses for r in RATIOS
]


def case_id(case):
    cls, kwargs = case
    return f"{cls.__name__}-{kwargs['compression_ratio']}"


def prefill(model, press, seq_len=SEQ_LEN, batch_size=1):
    cache = DynamicCache(config=model.config)
    with press(model):
        model.model(input_ids=random_input_ids(batch_size, seq_len), **cache_kwargs(model.model, cache))
    return cache


def cache_lengths(cache):
    return [layer.keys.shape[2] for layer in cache.layers]


@pytest.mark.core
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("case", RATIO_CASES, ids=[case_id(c) for c in RATIO_CASES])
def test_press_alone_keeps_int_t_times_one_minus_ratio(arch, case):
    cls, kwargs = case
    model = get_model(arch)
    cache = prefill(model, cls(**kwargs), batch_size=2)
    n_kept = int(SEQ_LEN * (1 - kwargs["compression_ratio"]))
    compressed = compressed_layers(model)
    for layer_idx, length in enumerate(cache_lengths(cache)):
        if layer_idx in compressed:
            assert length == n_kept
        else:  # Gemma3's sliding-window layer holds at most its window
            assert length <= SEQ_LEN


WRAPPERS = (
    "composed",
    "rerotation",
    "adakv",
    "chunk",
    "criticalkv",
    "critical_adakv",
    "dms",
    "merging",
    "block",
    "chunkkv",
)
HEADWISE_WRAPPERS = ("adakv", "critical_adakv", "dms")


def wrap(wrapper: str, press):
    if wrapper == "composed":
        return ComposedPress([press, KnormPress(0.5)])
    if wrapper == "rerotation":
        return KeyRerotationPress(press)
    if wrapper == "adakv":
        return AdaKVPress(press)
    if wrapper == "chunk":
        return ChunkPress(press, chunk_length=24)
    if wrapper == "criticalkv":
        return CriticalKVPress(press)
    if wrapper == "critical_adakv":
        return CriticalAdaKVPress(press)
    if wrapper == "dms":
        return DMSPress(press, threshold=-0.5, sliding_window_size=32)
    if wrapper == "merging":
        return MergingPress(press)
    if wrapper == "block":
        return BlockPress(press, block_size=8)
    if wrapper == "chunkkv":
        return ChunkKVPress(press, chunk_length=8)
    raise ValueError(wrapper)


def expected_length(wrapper: str, ratio: float) -> int:
    if wrapper == "composed":
        return int(int(SEQ_LEN * (1 - ratio)) * 0.5)
    if wrapper in HEADWISE_WRAPPERS:
        return SEQ_LEN  # head-wise: masked, not removed
    if wrapper == "chunk":
        return sum(max(1, int(n * (1 - ratio))) for n in (24, SEQ_LEN - 24))
    if wrapper == "chunkkv":
        return 8 * max(1, int(SEQ_LEN // 8 * (1 - ratio)))
    return int(SEQ_LEN * (1 - ratio))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_press_inside_each_wrapper(arch, wrapper, case):
    cls, kwargs = case
    model = get_model(arch)
    press = wrap(wrapper, cls(**kwargs))
    cache = prefill(model, press)
    compressed = compressed_layers(model)
    ratio = kwargs["compression_ratio"]
    for layer_idx, length in enumerate(cache_lengths(cache)):
        if layer_idx in compressed:
            assert length == expected_length(wrapper, ratio), (layer_idx, length)
    if wrapper in HEADWISE_WRAPPERS:
        attention = model.model.language_model if arch == "gemma3" else model.model
        module = attention.layers[compressed[0]].self_attn
        indices = module.masked_key_indices
        masked = 0 if indices is None else indices[0].numel()
        if wrapper == "dms":
            # entries are only evicted once they leave the 32-token window, and only if they score below threshold
            fractions = []
            for layer_idx in compressed:
                layer_indices = attention.layers[layer_idx].self_attn.masked_key_indices
                assert layer_indices is None or int(layer_indices[2].max()) < SEQ_LEN - 32
                n_masked = 0 if layer_indices is None else layer_indices[0].numel()
                fractions.append(n_masked / (2 * SEQ_LEN))
            assert press.compression_ratio == pytest.approx(sum(fractions) / len(fractions))
        else:
            n_kept = int(SEQ_LEN * (1 - ratio))
            assert masked == model.config.get_text_config().num_key_value_heads * (SEQ_LEN - n_kept)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("entry", eager_presses, ids=lambda e: e["cls"].__name__)
def test_eager_presses(arch, entry):
    model = get_model(arch, "eager")
    for kwargs in entry["kwargs"]:
        cache = prefill(model, entry["cls"](**kwargs))
        for layer_idx in compressed_layers(model):
            assert cache.layers[layer_idx].keys.shape[2] == int(SEQ_LEN * (1 - kwargs["compression_ratio"]))
        # and the compressed cache still decodes
        out = model(
            input_ids=random_input_ids(1, 1), position_ids=torch.tensor([[SEQ_LEN]]), **cache_kwargs(model, cache)
        )
        assert torch.isfinite(out.logits).all()
