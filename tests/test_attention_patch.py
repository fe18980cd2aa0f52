# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The head-wise masking trick: fake keys, mask application and reset, and idempotent patching."""

import importlib
from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import kvpress  # noqa: F401  (importing kvpress applies the patch)
from kvpress.attention_patch import _EAGER_MODULES, attention_patch, patch_attention_functions, search_hyperplane


def _is_patched(func) -> bool:
    return bool(getattr(func, "_kvpress_patched", False))


def test_search_hyperplane_gives_exactly_zero_attention_weight():
    torch.manual_seed(0)
    X = torch.rand(50, 500, 128)
    Y = search_hyperplane(X)
    assert Y.shape == (50, 128)
    assert torch.exp(torch.einsum("bsd,bd->bs", X, Y)).max() == 0


def test_search_hyperplane_on_centred_queries():
    torch.manual_seed(0)
    X = torch.randn(8, 64, 16) + 0.5  # not all in one orthant, but still linearly separable from the origin
    Y = search_hyperplane(X)
    assert torch.exp(torch.einsum("bsd,bd->bs", X, Y)).max() == 0


def test_search_hyperplane_raises_when_no_hyperplane_exists():
    X = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # x and -x: no Y has a positive product with both
    with pytest.raises(ValueError, match="Could not find fake keys"):
        search_hyperplane(X, max_iter=10)


def test_patch_is_applied_once_and_is_idempotent():
    before = dict(ALL_ATTENTION_FUNCTIONS.items())
    eager_before = {name: importlib.import_module(name).eager_attention_forward for name in _EAGER_MODULES}
    # functions registered by users after `import kvpress` are only wrapped by a later patch call
    assert all(_is_patched(before[name]) for name in ("sdpa", "flash_attention_2", "flex_attention"))
    assert all(_is_patched(func) for func in eager_before.values())

    patch_attention_functions()
    patch_attention_functions()
    for name, func in ALL_ATTENTION_FUNCTIONS.items():
        assert _is_patched(func)
        assert not _is_patched(func.__wrapped__), f"{name} is wrapped twice"
        if _is_patched(before[name]):
            assert func is before[name]
    for name, func in eager_before.items():
        assert importlib.import_module(name).eager_attention_forward is func
        assert not _is_patched(func.__wrapped__)
    assert attention_patch(before["sdpa"]) is before["sdpa"]


def _recording_attention():
    calls = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        calls.append({"key": key.clone(), "kwargs": kwargs})
        return None, None

    return attention, calls


def test_wrapper_resets_masks_on_square_calls_and_writes_fake_keys_otherwise():
    attention, calls = _recording_attention()
    wrapped = attention_patch(attention)
    bsz, num_heads, num_kv_heads, head_dim = 2, 4, 2, 8
    module = SimpleNamespace(masked_key_indices="stale")

    # square attention (prefill): masks of an earlier context are dropped
    x = torch.randn(bsz, num_heads, 6, head_dim)
    wrapped(module, x, torch.randn(bsz, num_kv_heads, 6, head_dim), None, None)
    assert module.masked_key_indices is None

    # non-square attention (decoding): masked entries of the key tensor are overwritten in place
    query = torch.randn(bsz, num_heads, 1, head_dim)
    key = torch.randn(bsz, num_kv_heads, 7, head_dim)
    original = key.clone()
    module.masked_key_indices = (torch.tensor([0, 1, 1]), torch.tensor([1, 0, 0]), torch.tensor([2, 3, 5]))
    wrapped(module, query, key, torch.randn_like(key), None)
    changed = (key != original).any(dim=-1)
    expected = torch.zeros_like(changed)
    expected[0, 1, 2] = expected[1, 0, 3] = expected[1, 0, 5] = True
    assert torch.equal(changed, expected)
    assert torch.equal(calls[-1]["key"], key)  # the wrapped function saw the fake keys
    groups = num_heads // num_kv_heads
    for b, h, s in [(0, 1, 2), (1, 0, 3), (1, 0, 5)]:
        logits = query[b, h * groups : (h + 1) * groups, 0] @ key[b, h, s]
        assert torch.exp(logits).max() == 0
    assert torch.equal(key[1, 0, 3], key[1, 0, 5])  # one fake key per (batch, KV head)


def test_wrapper_sets_flash_varlen_key_length():
    attention, calls = _recording_attention()
    wrapped = attention_patch(attention)
    module = SimpleNamespace()
    cu_seq_lens_k = torch.tensor([0, 100])
    key = torch.randn(1, 2, 37, 8)
    wrapped(module, torch.randn(1, 4, 1, 8), key, key, None, cu_seq_lens_k=cu_seq_lens_k)
    assert cu_seq_lens_k.tolist() == [0, 37]
    assert calls[-1]["kwargs"]["cu_seq_lens_k"] is cu_seq_lens_k
