# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Pre-RoPE projections and RoPE helpers reproduce what every supported architecture computes."""

import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv

from kvpress.utils import (
    apply_rope,
    attention_scaling,
    get_prerope_key_states,
    get_prerope_query_states,
    rope_cos_sin,
    validate_compression_ratio,
)
from tests.fixtures import ARCHITECTURES, get_model, random_input_ids, record_layers, save_tiny_model

pytestmark = pytest.mark.core


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prerope_keys_rotated_equal_the_cached_keys(arch):
    model = get_model(arch)
    for call in record_layers(model, random_input_ids(2, 24)).values():
        module, hidden_states = call["module"], call["hidden_states"]
        cos, sin = call["kwargs"]["position_embeddings"]
        keys = apply_rope(get_prerope_key_states(module, hidden_states), cos, sin)
        torch.testing.assert_close(keys, call["keys"])
        # rope_cos_sin recomputes the same cos/sin from positions (Gemma3: the layer's own RoPE type)
        recomputed = rope_cos_sin(module, hidden_states, torch.arange(24)[None])
        torch.testing.assert_close(recomputed[0], cos)
        torch.testing.assert_close(recomputed[1], sin)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prerope_queries_reproduce_the_eager_attention_weights(arch):
    model = get_model(arch, "eager")
    for call in record_layers(model, random_input_ids(1, 20)).values():
        module, keys = call["module"], call["keys"]
        cos, sin = call["kwargs"]["position_embeddings"]
        queries = apply_rope(get_prerope_query_states(module, call["hidden_states"]), cos, sin)
        logits = (
            queries @ repeat_kv(keys, queries.shape[1] // keys.shape[1]).transpose(2, 3) * attention_scaling(module)
        )
        causal = torch.ones(20, 20, dtype=torch.bool).triu(1)
        weights = logits.masked_fill(causal, float("-inf")).softmax(dim=-1)
        torch.testing.assert_close(weights, call["attentions"])


def test_validate_compression_ratio_messages():
    validate_compression_ratio(0.0)
    validate_compression_ratio(0.99)
    validate_compression_ratio(1.0, allow_one=True)
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\), got 1.0"):
        validate_compression_ratio(1.0)
    with pytest.raises(ValueError, match=r"ratios\[2\] must be a number in \[0, 1\], got -0.5"):
        validate_compression_ratio(-0.5, name="ratios[2]", allow_one=True)
    with pytest.raises(ValueError, match="got True"):
        validate_compression_ratio(True)


def test_saving_the_tiny_model_leaves_the_shared_model_as_it_was(tmp_path):
    """tests.fixtures.save_tiny_model (behind saved_model_dir) saves the cached tiny model: its config keeps the dtype
    it had (transformers 5.25's save_pretrained turns a torch dtype into a string), or later tests that read it see
    "float32"."""
    model = get_model("llama")
    before = model.config.dtype
    assert not isinstance(before, str)
    save_tiny_model("llama", tmp_path)
    assert (tmp_path / "config.json").exists()
    assert get_model("llama") is model
    assert model.config.dtype is before
