# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""`kvpress.chunked_mlp`: decoder MLPs over slices of the sequence give the unsliced output with bounded activations.

- logits and caches equal the unsliced forward's (float32, CPU) on four architectures;
- no MLP projection ever sees more than `slice_tokens` tokens (the bound on the activations);
- the instance's `forward` is restored on exit (also an accelerate-style instance forward), errors included;
- an MLP that is not token-wise (returns a tuple) runs whole;
- the ragged prefill slices the MLPs and still builds the cache `RaggedCache.from_cache` builds.
"""

import pytest
import torch
from transformers import DynamicCache

from kvpress import AdaKVPress, SnapKVPress
from kvpress.chunked_mlp import mlp_in_slices
from kvpress.ragged_cache import RaggedCache
from kvpress.ragged_prefill import ragged_prefill
from kvpress.transformers_adapter import cache_kwargs
from kvpress.utils import get_language_model
from tests.fixtures import get_model, random_input_ids

SLICE = 8


def _forward(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(model, cache)).logits
    return logits, cache


def _projections(model):
    return [
        module
        for layer in get_language_model(model).layers
        for module in layer.mlp.modules()
        if isinstance(module, torch.nn.Linear)
    ]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3_text"])
def test_sliced_mlps_give_the_unsliced_logits_and_cache(arch):
    model = get_model(arch)
    ids = random_input_ids(2, 37)
    reference_logits, reference = _forward(model, ids)
    seen = []
    handles = [p.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for p in _projections(model)]
    try:
        with mlp_in_slices(model, SLICE) as wrapped:
            logits, cache = _forward(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    assert wrapped == model.config.num_hidden_layers
    assert seen and max(seen) <= SLICE  # the activations of a slice, never of the 37 tokens
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-5)
    for layer, ref_layer in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-5)


def test_forward_is_restored_on_exit_and_on_error():
    model = get_model("llama")
    mlps = [layer.mlp for layer in get_language_model(model).layers]
    own = mlps[0].forward  # an instance-level forward set before, as accelerate's hooks do
    mlps[0].forward = own
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with mlp_in_slices(model, SLICE):
                assert all("forward" in mlp.__dict__ for mlp in mlps)
                raise RuntimeError("boom")
        assert mlps[0].__dict__["forward"] is own
        assert all("forward" not in mlp.__dict__ for mlp in mlps[1:])
    finally:
        del mlps[0].forward


def test_an_mlp_that_is_not_token_wise_runs_whole():
    class RouterMLP(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states * 2, hidden_states.shape[1]  # e.g. a mixture returning router information

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = RouterMLP()
            self.self_attn = torch.nn.Identity()

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer()])
            self.rotary_emb = torch.nn.Identity()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Decoder()

    model = Model()
    x = torch.randn(1, 20, 4)
    with mlp_in_slices(model, SLICE):
        output, length = model.model.layers[0].mlp(x)
    assert length == 20 and torch.equal(output, x * 2)


def test_bad_slice_sizes_are_refused():
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="slice_tokens must be a positive integer"):
            with mlp_in_slices(get_model("llama"), bad):
                pass


def test_ragged_prefill_slices_the_mlps_and_builds_the_same_cache():
    model = get_model("llama")
    ids = random_input_ids(2, 40)
    press = AdaKVPress(SnapKVPress(0.5, window_size=4))
    seen = []
    handles = [p.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for p in _projections(model)]
    try:
        with torch.no_grad(), press(model), ragged_prefill(model, 4, mlp_slice_tokens=SLICE) as sliced:
            model(ids, **cache_kwargs(model, sliced))
    finally:
        for handle in handles:
            handle.remove()
        RaggedCache.detach(model)
    assert max(seen) <= SLICE
    with torch.no_grad(), press(model), ragged_prefill(model, 4, mlp_slice_tokens=None) as whole:
        model(ids, **cache_kwargs(model, whole))
    RaggedCache.detach(model)
    for ours, theirs in zip(sliced.ragged_layers(), whole.ragged_layers()):
        for name in ("positions", "offsets", "lengths"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
