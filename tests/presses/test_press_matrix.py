# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Every press, alone and inside every wrapper, on every architecture: the cache ends at the size it should."""

import pytest
import torch
from transformers import DynamicCache

from kvpress import AdaKVPress, ChunkPress, ComposedPress, KeyRerotationPress, KnormPress
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
        model.model(input_ids=random_input_ids(batch_size, seq_len), past_key_values=cache)
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


def wrap(wrapper: str, press):
    if wrapper == "composed":
        return ComposedPress([press, KnormPress(0.5)])
    if wrapper == "rerotation":
        return KeyRerotationPress(press)
    if wrapper == "adakv":
        return AdaKVPress(press)
    if wrapper == "chunk":
        return ChunkPress(press, chunk_length=24)
    raise ValueError(wrapper)


def expected_length(wrapper: str, ratio: float) -> int:
    if wrapper == "composed":
        return int(int(SEQ_LEN * (1 - ratio)) * 0.5)
    if wrapper == "adakv":
        return SEQ_LEN  # head-wise: masked, not removed
    if wrapper == "chunk":
        return sum(max(1, int(n * (1 - ratio))) for n in (24, SEQ_LEN - 24))
    return int(SEQ_LEN * (1 - ratio))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("wrapper", ["composed", "rerotation", "adakv", "chunk"])
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
    if wrapper == "adakv":
        attention = model.model.language_model if arch == "gemma3" else model.model
        module = attention.layers[compressed[0]].self_attn
        masked = module.masked_key_indices[0].numel()
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
        out = model(input_ids=random_input_ids(1, 1), past_key_values=cache, position_ids=torch.tensor([[SEQ_LEN]]))
        assert torch.isfinite(out.logits).all()
