# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The press context manager: hooks, prefill-only compression, model.generate, unsupported models."""

import logging
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from kvpress import KnormPress, ScorerPress
from kvpress.presses.base_press import is_prefilling
from kvpress.transformers_adapter import cache_kwargs, output_cache
from tests.fixtures import compressed_layers, get_model, is_press_hook, random_input_ids

pytestmark = pytest.mark.core


def attention_modules(model):
    from kvpress.utils import get_language_model

    return [layer.self_attn for layer in get_language_model(model).layers]


def hook_counts(model):
    """Press forward hooks per attention module (transformers may hold output-recording hooks of its own)."""
    return [sum(is_press_hook(h) for h in module._forward_hooks.values()) for module in attention_modules(model)]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_hooks_are_registered_inside_and_removed_after(arch):
    model = get_model(arch)
    compressed = set(compressed_layers(model))
    with KnormPress(0.2)(model):
        assert hook_counts(model) == [1 if i in compressed else 0 for i in range(len(hook_counts(model)))]
    assert hook_counts(model) == [0] * len(hook_counts(model))


def test_hooks_are_removed_when_the_forward_raises():
    model = get_model("llama")

    @dataclass
    class FailingPress(ScorerPress):
        def score(self, *args, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with FailingPress(0.5)(model):
            model.model(input_ids=random_input_ids(1, 16), **cache_kwargs(model.model, DynamicCache()))
    assert hook_counts(model) == [0, 0]


def test_no_hook_is_left_when_post_init_fails():
    model = get_model("llama")

    @dataclass
    class BadInitPress(KnormPress):
        def post_init_from_model(self, model):
            raise ValueError("cannot initialise")

    with pytest.raises(ValueError, match="cannot initialise"):
        with BadInitPress(0.5)(model):
            pass
    assert hook_counts(model) == [0, 0]


def test_compresses_inside_the_context_only():
    model = get_model("llama")
    ids = random_input_ids(2, 50)
    with KnormPress(0.2)(model):
        cache = DynamicCache()
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    assert [layer.keys.shape for layer in cache.layers] == [torch.Size([2, 2, 40, 16])] * 2
    cache = DynamicCache()
    model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    assert [layer.keys.shape[2] for layer in cache.layers] == [50, 50]


def test_decoding_steps_are_not_compressed():
    model = get_model("llama")
    ids = random_input_ids(1, 40)
    cache = DynamicCache()
    with KnormPress(0.5)(model):
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        assert cache.get_seq_length() == 20
        # A multi-token forward on a non-empty cache (e.g. a question) is not a prefill either.
        model.model(input_ids=ids[:, :7], position_ids=torch.arange(40, 47)[None], **cache_kwargs(model.model, cache))
        assert cache.get_seq_length() == 27
        model.model(input_ids=ids[:, :1], position_ids=torch.tensor([[47]]), **cache_kwargs(model.model, cache))
        assert cache.get_seq_length() == 28


def test_model_generate_compresses_the_prompt_only():
    model = get_model("llama")
    ids = random_input_ids(1, 40)
    n_new = 6
    with KnormPress(0.5)(model):
        out = model.generate(
            ids,
            max_new_tokens=n_new,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
            min_new_tokens=n_new,
        )
    # The prompt is halved; each generated token but the last is appended uncompressed.
    assert output_cache(out).get_seq_length() == 20 + n_new - 1
    assert out.sequences.shape[1] == 40 + n_new
    without = model.generate(ids, max_new_tokens=n_new, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert output_cache(without).get_seq_length() == 40 + n_new - 1


def test_is_prefilling_matches_upstream_definition():
    assert is_prefilling(torch.arange(10), 10)
    assert not is_prefilling(torch.arange(5, 10), 5)
    assert not is_prefilling(torch.tensor([12]), 1)


def test_model_without_attention_modules_is_rejected():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match="not supported.*self_attn|not supported.*decoder"):
        with KnormPress(0.5)(gpt2):
            pass

    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="self_attn"):
        with KnormPress(0.5)(NoLayers()):
            pass


def test_untested_model_class_warns(caplog):
    from transformers import OlmoConfig, OlmoForCausalLM

    custom = OlmoForCausalLM(
        OlmoConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    with caplog.at_level(logging.WARNING, logger="kvpress.presses.base_press"):
        with KnormPress(0.5)(custom):
            pass
    assert "not tested" in caplog.text
