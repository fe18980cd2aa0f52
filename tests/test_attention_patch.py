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


def test_search_hyperplane_ignores_all_zero_query_rows():
    torch.manual_seed(0)
    X = torch.rand(2, 10, 8)
    X[:, 3] = 0.0  # e.g. a padding token whose embedding is zero
    Y = search_hyperplane(X)
    nonzero = torch.cat([X[:, :3], X[:, 4:]], dim=1)
    assert torch.exp(torch.einsum("bsd,bd->bs", nonzero, Y)).max() == 0


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_masked_entries_hidden_by_an_explicit_mask_when_no_fake_key_exists(backend):
    """Queries that span every direction admit no fake key: the patch then hides the entries with a per-head mask."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(0)
    bsz, heads, kv_heads, q_len, k_len, dim = 1, 4, 2, 3, 7, 4
    query = torch.randn(bsz, heads, q_len, dim)
    query[:, :, 1] = -query[:, :, 0]  # q and -q in every head: no half-space holds them all
    key, value = torch.randn(bsz, kv_heads, k_len, dim), torch.randn(bsz, kv_heads, k_len, dim)
    masked = (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1]), torch.tensor([1, 2, 3]))
    module = SimpleNamespace(
        masked_key_indices=masked, num_key_value_groups=2, is_causal=True, training=False, config=None
    )
    func = attention_patch(
        ALL_ATTENTION_FUNCTIONS["sdpa"].__wrapped__ if backend == "sdpa" else eager_attention_forward
    )
    out, _ = func(module, query, key.clone(), value, None, scaling=dim**-0.5, dropout=0.0)
    # reference: explicit causal attention with the masked entries removed per KV head
    expected = torch.empty(bsz, q_len, heads, dim)
    for h in range(heads):
        kv = h // 2
        keep = [j for j in range(k_len) if (kv, j) not in {(1, 2), (1, 3), (0, 1)}]
        for i in range(q_len):
            visible = [j for j in keep if j <= k_len - q_len + i]
            logits = (query[0, h, i] @ key[0, kv, visible].T) * dim**-0.5
            expected[0, i, h] = torch.softmax(logits, -1) @ value[0, kv, visible]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
