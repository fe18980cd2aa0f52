# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Every head-wise press, through the masking path: the cache keeps its length and the masked fraction is the ratio."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    AdaKVPress,
    CriticalAdaKVPress,
    DuoAttentionPress,
    KnormPress,
    KVComposePress,
    KVzipPress,
    LUKVPress,
    SnapKVPress,
)
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import compressed_layers, get_model, load_tokenizer, random_input_ids
from tests.presses.test_fastkvzip import RandomGatesFastKVzipPress

SEQ_LEN = 40
RATIOS = (0.25, 0.5, 0.75)


class MockDuoAttentionPress(DuoAttentionPress):
    """DuoAttention with a random head pattern (sink 2, recent 2) instead of a downloaded one."""

    @staticmethod
    def load_attention_pattern(model):
        config = model.config.get_text_config()
        rng = np.random.default_rng(0)
        return 2, 2, rng.random((config.num_hidden_layers, config.num_key_value_heads))


def uniform_curve(tmp_path) -> str:
    path = tmp_path / "curve.npy"
    np.save(path, np.broadcast_to((np.arange(1, 100) / 100)[:, None, None], (99, 2, 2)).astype(np.float32))
    return str(path)


FACTORIES = {
    "adakv_knorm": lambda r, tmp: AdaKVPress(KnormPress(r)),
    "adakv_snapkv": lambda r, tmp: AdaKVPress(SnapKVPress(r, window_size=2)),
    "critical_adakv": lambda r, tmp: CriticalAdaKVPress(KnormPress(r)),
    "kvzip_global": lambda r, tmp: KVzipPress(r, layerwise=False, tokenizer=load_tokenizer()),
    "kvzip_layerwise": lambda r, tmp: KVzipPress(r, layerwise=True, tokenizer=load_tokenizer()),
    "fastkvzip": lambda r, tmp: RandomGatesFastKVzipPress(r),
    "kvcompose_unstructured": lambda r, tmp: KVComposePress(compression_ratio=r, structured=False),
    "lukv": lambda r, tmp: LUKVPress(KnormPress(), compression_ratio=r, budget_curve_path=uniform_curve(tmp)),
}


def masked_fraction(model, layers) -> float:
    language_model = getattr(model.model, "language_model", model.model)
    masked = total = 0
    for layer_idx in layers:
        module = language_model.layers[layer_idx].self_attn
        indices = getattr(module, "masked_key_indices", None)
        if indices is not None:
            # count distinct entries: a mask must never name an entry twice
            flat = indices[0] * 10**6 + indices[1] * 10**3 + indices[2]
            assert flat.unique().numel() == flat.numel()
            masked += flat.numel()
        total += 2 * model.config.get_text_config().num_key_value_heads * SEQ_LEN
    return masked / total


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_headwise_press_masks_the_ratio(arch, ratio, name, tmp_path):
    model = get_model(arch)
    press = FACTORIES[name](ratio, tmp_path)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(random_input_ids(2, SEQ_LEN), **cache_kwargs(model, cache))
    layers = compressed_layers(model)
    for layer_idx in layers:
        assert cache.layers[layer_idx].keys.shape[2] == SEQ_LEN  # masked, not removed
    # global budgets (KVzip, FastKVzip, KVCompose) may move budget between layers; the average is the ratio
    assert masked_fraction(model, layers) == pytest.approx(ratio, abs=1.5 / SEQ_LEN)


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_duo_attention_masks_streaming_heads(ratio):
    model = get_model("llama")
    press = MockDuoAttentionPress(head_compression_ratio=ratio)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(random_input_ids(2, SEQ_LEN), **cache_kwargs(model, cache))
    n_heads = 2 * len(compressed_layers(model))
    n_streaming = int(press.streaming_mask.sum())
    assert n_streaming == round(ratio * n_heads) or n_streaming == int(ratio * n_heads)
    expected = n_streaming / n_heads * (SEQ_LEN - 4) / SEQ_LEN
    assert masked_fraction(model, compressed_layers(model)) == pytest.approx(expected)
    assert press.compression_ratio == pytest.approx(expected)
