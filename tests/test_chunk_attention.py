# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""`kvpress.chunk_attention`: a prefill chunk attends to its cache lower-right causal, with no mask built.

- the attention function equals eager attention written out here (softmax over the allowed keys), GQA included;
- a chunked prefill through it gives the caches and logits of the chunked prefill with transformers' own masks
  (every chunk), with and without a press, and the unchunked ones without a press;
- no mask is built: transformers' mask function is never called for the chunks;
- models it cannot serve exactly (sliding windows, eager attention) keep their attention and masks; the attention
  implementation is restored after the prefill, also when the prefill raises.
"""

import math
from unittest import mock

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from kvpress import KnormPress, SnapKVPress, StreamingLLMPress
from kvpress.chunk_attention import CHUNK_ATTENTION, chunk_attention, lower_right_causal_prefill, serves_model
from kvpress.chunked_prefill import chunked_prefill
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import _common, get_model

LENGTH, CHUNK = 70, 16


def _ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def _written_out(query, key, value, scale):
    """Eager attention with the lower-right causal pattern: query i sees keys j <= i + (k - q)."""
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    logits = query @ key.transpose(-1, -2) * scale
    allowed = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (weights @ value).transpose(1, 2)


class _Module(torch.nn.Module):
    pass


@pytest.mark.parametrize("q_len,k_len", [(5, 5), (1, 9), (4, 23), (16, 16)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_attention_equals_the_written_out_lower_right_causal_attention(q_len, k_len, heads, kv_heads):
    generator = torch.Generator().manual_seed(q_len * 100 + k_len)
    query = torch.randn(2, heads, q_len, 8, generator=generator)
    key = torch.randn(2, kv_heads, k_len, 8, generator=generator)
    value = torch.randn(2, kv_heads, k_len, 8, generator=generator)
    scale = 1 / math.sqrt(8) * 1.3
    output, weights = chunk_attention(_Module().eval(), query, key, value, None, scaling=scale)
    assert weights is None
    assert output.shape == (2, q_len, heads, 8)
    torch.testing.assert_close(output, _written_out(query, key, value, scale), atol=1e-5, rtol=1e-5)


def test_attention_refuses_more_queries_than_keys():
    query, key = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="6 queries cannot attend to only 5 keys"):
        chunk_attention(_Module().eval(), query, key, key, None)


def _stock_chunked(model, ids, press):
    """The chunked prefill with transformers' masks for every chunk (the path before kvpress.chunk_attention)."""
    cache = DynamicCache(config=model.config)
    with mock.patch("kvpress.chunked_prefill.lower_right_causal_prefill", _keep_attention):
        logits = chunked_prefill(model, ids, cache, press=press, chunk_size=CHUNK)
    return cache, logits


class _keep_attention:
    def __init__(self, model):
        pass

    def __enter__(self):
        return False

    def __exit__(self, *exc):
        return False


def _assert_same_caches(cache, reference):
    assert cache.get_seq_length() == reference.get_seq_length()
    for layer, ref_layer in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "qwen2", "mistral"])
@pytest.mark.parametrize(
    "press", [None, KnormPress(0.5), StreamingLLMPress(0.6, n_sink=3), SnapKVPress(0.4, window_size=4)]
)
def test_chunked_prefill_through_it_equals_the_masked_chunked_prefill(arch, press):
    model = get_model(arch)
    assert serves_model(model)
    ids = _ids()
    reference, reference_logits = _stock_chunked(model, ids, press)
    cache = DynamicCache(config=model.config)
    logits = chunked_prefill(model, ids, cache, press=press, chunk_size=CHUNK)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-4)
    _assert_same_caches(cache, reference)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_no_press_chunked_through_it_equals_unchunked(arch):
    model = get_model(arch)
    ids = _ids()
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        reference_logits = model(input_ids=ids, logits_to_keep=1, **cache_kwargs(model, reference)).logits
    cache = DynamicCache(config=model.config)
    logits = chunked_prefill(model, ids, cache, chunk_size=CHUNK)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-4)
    _assert_same_caches(cache, reference)


def test_chunks_build_no_mask_and_run_through_chunk_attention():
    model = get_model("llama")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    import kvpress.chunk_attention as module

    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    calls = {"mask": 0, "lower_right": 0}

    def counting_mask(*args, **kwargs):
        calls["mask"] += 1
        return sdpa_mask(*args, **kwargs)

    def counting_lower_right(q_len, k_len):
        calls["lower_right"] += 1
        return causal_lower_right(q_len, k_len)

    masks = mock.patch.dict(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, {"sdpa": counting_mask})
    with masks, mock.patch.object(module, "causal_lower_right", counting_lower_right):
        chunked_prefill(model, _ids(), DynamicCache(config=model.config), chunk_size=CHUNK)
        assert calls["mask"] == 0
        # the first chunk is square (plain causal); every later chunk of every layer runs lower-right, unmasked
        assert calls["lower_right"] == (math.ceil(LENGTH / CHUNK) - 1) * model.config.num_hidden_layers
        # the unchunked prefill is today's: transformers' mask function decides (and skips the mask for sdpa)
        model(input_ids=_ids(), **cache_kwargs(model, DynamicCache(config=model.config)))
        assert calls["mask"] == 1


def test_sliding_window_and_eager_models_keep_their_masks():
    sliding = MistralForCausalLM._from_config(
        MistralConfig(**_common(head_dim=16, sliding_window=24)), attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    assert not serves_model(sliding)
    assert not serves_model(get_model("gemma3_text"))
    assert not serves_model(get_model("llama", attn_implementation="eager"))
    with lower_right_causal_prefill(sliding) as used:
        assert used is False
        assert sliding.config._attn_implementation == "sdpa"
    # the sliding window still applies to the chunks: same as the masked chunked prefill, not the full-causal one
    ids = _ids(batch=1)
    reference, reference_logits = _stock_chunked(sliding, ids, None)
    cache = DynamicCache(config=sliding.config)
    logits = chunked_prefill(sliding, ids, cache, chunk_size=CHUNK)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-4)


def test_attention_implementation_is_restored_when_the_prefill_raises():
    model = get_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with lower_right_causal_prefill(model) as used:
            assert used is True
            assert model.config._attn_implementation == CHUNK_ATTENTION
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
