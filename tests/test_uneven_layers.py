# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Layers compressed to different lengths keep working: masks are resized per layer, prefill is detected once."""

import pytest
import torch
from transformers import DynamicCache

from kvpress import KnormPress, KVPressTextGenerationPipeline, PerLayerCompressionPress
from kvpress.attention_patch import fit_mask_to_keys
from kvpress.transformers_adapter import cache_kwargs, output_cache
from kvpress.utils import restore_cache, snapshot_cache
from tests.fixtures import get_model, load_tokenizer, random_input_ids

pytestmark = pytest.mark.core


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_multi_token_forward_equals_token_by_token_on_uneven_layers(attn_implementation):
    model = get_model("llama", attn_implementation)
    context, question = random_input_ids(1, 48, seed=1), random_input_ids(1, 5, seed=2)
    cache = DynamicCache()
    with PerLayerCompressionPress(KnormPress(), [0.0, 0.5])(model):
        model.model(input_ids=context, **cache_kwargs(model.model, cache))
    assert [layer.keys.shape[2] for layer in cache.layers] == [48, 24]

    snapshot = snapshot_cache(cache)
    positions = torch.arange(48, 53)[None]
    together = model(input_ids=question, position_ids=positions, **cache_kwargs(model, cache)).logits
    restore_cache(cache, snapshot)
    one_by_one = torch.cat(
        [
            model(
                input_ids=question[:, i : i + 1], position_ids=positions[:, i : i + 1], **cache_kwargs(model, cache)
            ).logits
            for i in range(5)
        ],
        dim=1,
    )
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-4)


def test_pipeline_answers_with_per_layer_ratios():
    model = get_model("llama")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(True), device="cpu")
    out = pipe(
        "A context to compress, long enough. " * 3,
        questions=["a?", "b?"],
        press=PerLayerCompressionPress(KnormPress(), [0.2, 0.7]),
        max_new_tokens=4,
    )
    assert len(out["answers"]) == 2


def test_layer_emptied_by_ratio_one_is_not_prefilled_again_during_generate():
    model = get_model("llama")
    with PerLayerCompressionPress(KnormPress(), [0.5, 1.0])(model):
        out = model.generate(
            random_input_ids(1, 40),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    cache = output_cache(out)
    # 4 generated tokens were appended to each layer (the last one is never cached) and none was evicted.
    assert [layer.keys.shape[2] for layer in cache.layers] == [20 + 4, 0 + 4]


def test_fit_mask_to_keys():
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])[None, None]  # 2 queries, 4 keys
    fitted = fit_mask_to_keys(mask, q_len=2, k_len=3)
    assert torch.equal(fitted[0, 0], torch.tensor([[True, True, False], [True, True, True]]))
    float_mask = torch.where(mask, 0.0, float("-inf"))
    assert torch.equal(
        fit_mask_to_keys(float_mask, 2, 5)[0, 0],
        torch.where(
            torch.tensor([[True, True, True, True, False], [True, True, True, True, True]]), 0.0, float("-inf")
        ),
    )
    assert fit_mask_to_keys(mask, 2, 4) is mask
    assert fit_mask_to_keys(None, 2, 3) is None
