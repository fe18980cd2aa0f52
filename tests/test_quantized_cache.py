# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Presses write back into quantized caches, and the pipeline rolls them back exactly."""

import pytest
import torch
import transformers
from transformers import QuantizedCache
from transformers.cache_utils import Cache, QuantizedLayer

from kvpress import KnormPress, KVPressTextGenerationPipeline
from kvpress.transformers_adapter import cache_kwargs
from kvpress.utils import extract_keys_and_values, restore_cache, snapshot_cache
from tests.fixtures import get_model, load_tokenizer, random_input_ids

pytestmark = pytest.mark.core


class Int8Layer(QuantizedLayer):
    """A tiny per-channel int8 backend, so quantized caches are tested without optional packages."""

    def _quantize(self, tensor, axis):
        scale = tensor.abs().amax(dim=axis, keepdim=True).clamp(min=1e-8) / 127
        return (tensor / scale).round().to(torch.int8), scale

    def _dequantize(self, q_tensor):
        quantized, scale = q_tensor
        return quantized.to(scale.dtype) * scale


class Int8Cache(QuantizedCache):
    def __init__(self, num_layers: int, residual_length: int = 4):
        layers = [
            Int8Layer(nbits=8, axis_key=0, axis_value=0, q_group_size=64, residual_length=residual_length)
            for _ in range(num_layers)
        ]
        Cache.__init__(self, layers=layers)


def make_caches(model):
    caches = [Int8Cache(model.config.num_hidden_layers)]
    if hasattr(transformers.cache_utils, "Fp8QuantizedLayer"):  # transformers >= 5.3
        caches.append(QuantizedCache(backend="fp8", config=model.config))
    return caches


@pytest.mark.parametrize("cache_index", [0, 1])
def test_prefill_compression_writes_into_the_quantized_cache(cache_index):
    model = get_model("llama")
    caches = make_caches(model)
    if cache_index >= len(caches):
        pytest.skip("the FP8 quantized cache needs transformers >= 5.3")
    cache = caches[cache_index]
    ids = random_input_ids(1, 40)
    with KnormPress(0.5)(model):
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    assert cache.get_seq_length() == 20
    for layer_idx in range(len(cache.layers)):
        keys, values = extract_keys_and_values(cache, layer_idx)
        assert keys.shape == values.shape == (1, 2, 20, 16)

    # The kept keys are the smallest-norm keys of the full-precision prefill, up to quantization error.
    reference = transformers.DynamicCache()
    with KnormPress(0.5)(model):
        model.model(input_ids=ids, **cache_kwargs(model.model, reference))
    keys, _ = extract_keys_and_values(cache, 0)
    assert torch.allclose(keys, reference.layers[0].keys, atol=0.1 * reference.layers[0].keys.abs().max().item())

    # Decoding keeps working on the compressed quantized cache.
    model.model(input_ids=ids[:, :6], position_ids=torch.arange(40, 46)[None], **cache_kwargs(model.model, cache))
    assert cache.get_seq_length() == 26
    assert extract_keys_and_values(cache, 0)[0].shape[2] == 26


def test_pipeline_with_quantized_cache_rolls_back_exactly():
    model = get_model("llama")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(False), device="cpu")
    cache = Int8Cache(model.config.num_hidden_layers)
    out = pipe("A context that is long enough. " * 2, questions=["a?", "b?"], press=KnormPress(0.5), cache=cache)
    assert len(out["answers"]) == 2
    n_context = pipe.preprocess("A context that is long enough. " * 2, [""], "", 10_000)["context_ids"].shape[1]
    assert cache.get_seq_length() == int(n_context * 0.5)

    snapshot = snapshot_cache(cache)
    before = [extract_keys_and_values(cache, i) for i in range(len(cache.layers))]
    question = pipe.tokenizer.encode("c?\n", return_tensors="pt", add_special_tokens=False)
    pipe.generate_answer(question, cache, n_context, max_new_tokens=8)
    assert cache.get_seq_length() > int(n_context * 0.5)
    restore_cache(cache, snapshot)
    assert cache.get_seq_length() == int(n_context * 0.5)
    for layer_idx, (keys, values) in enumerate(before):
        after_keys, after_values = extract_keys_and_values(cache, layer_idx)
        assert torch.equal(keys, after_keys) and torch.equal(values, after_values)


def _decode_with_budget(model, press, steps: int):
    cache = Int8Cache(model.config.num_hidden_layers)
    input_ids = random_input_ids(1, 16)
    with torch.no_grad(), press(model):
        logits = model(input_ids=input_ids, use_cache=True, **cache_kwargs(model, cache)).logits
        for _ in range(steps):
            token = logits[:, -1:].argmax(-1)
            logits = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache)).logits
    return [tuple(t.clone() for t in extract_keys_and_values(cache, i)) for i in range(len(cache.layers))]


def test_budget_press_reads_a_quantized_layer_only_when_it_prunes(monkeypatch):
    import kvpress.decoding_budget as scorer_module

    model = get_model("llama")
    calls = []
    read = scorer_module.extract_keys_and_values
    monkeypatch.setattr(
        scorer_module, "extract_keys_and_values", lambda cache, idx: calls.append(idx) or read(cache, idx)
    )
    # prompt 16, budget 24: steps 1 to 8 stay within the budget, steps 9 to 12 prune every layer once
    lazy = _decode_with_budget(model, KnormPress(cache_budget=24), steps=12)
    layers = model.config.num_hidden_layers
    assert len(calls) == 4 * layers, calls
    assert all(keys.shape[2] == 24 for keys, _ in lazy)
    calls.clear()
    monkeypatch.setattr(scorer_module.CacheBudget, "_lazy_layer_shape", lambda self, *args: None)
    eager = _decode_with_budget(model, KnormPress(cache_budget=24), steps=12)
    assert len(calls) == 13 * layers  # the prefill and every step read the layer
    for (k1, v1), (k2, v2) in zip(lazy, eager):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
