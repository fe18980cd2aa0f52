# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The Triton ragged backend (`kvpress.ragged_triton`) against the reference path: split segments, empty segments,
causality among several new tokens, padding, softcap; and end to end through a model's decoding steps. On a machine
with a GPU the kernels compile for it; without one they run on CPU under Triton's interpreter (`tests/conftest.py`
sets TRITON_INTERPRET=1 before Triton is imported)."""

import copy

import pytest
import torch
from transformers import DynamicCache

import kvpress.ragged_triton as ragged_triton
from kvpress import AdaKVPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.ragged_attention import reference_ragged_attention, set_ragged_backend
from kvpress.ragged_cache import RaggedCache, RaggedLayer
from kvpress.ragged_triton import split_size, triton_ragged_attention
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import get_model, random_input_ids

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4} if DEVICE.type == "cuda" else {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def auto_backend_after():
    yield
    set_ragged_backend("auto")


def _layer(bsz=2, kv_heads=2, seq_len=150, head_dim=32, empty_head=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(bsz, kv_heads, seq_len, head_dim, generator=generator)
    values = torch.randn(bsz, kv_heads, seq_len, head_dim, generator=generator)
    keep = torch.rand(bsz, kv_heads, 1, generator=generator) * 0.8 + 0.1  # a different share per head
    kept = torch.rand(bsz, kv_heads, seq_len, generator=generator) < keep
    kept[..., -3:] = True  # the newest tokens, so that causality among new queries hides some entries
    if empty_head:
        kept[0, 1] = False  # a segment with nothing: its queries read zeros
    return RaggedLayer(keys.to(DEVICE), values.to(DEVICE), kept.to(DEVICE), spare=5)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_triton_matches_the_reference(monkeypatch, q_len, softcap):
    monkeypatch.setattr(ragged_triton, "_multiprocessors", lambda device: 2)  # chunks of 64 rows: several a segment
    layer = _layer()
    assert split_size(layer.keys.shape[0], layer.max_capacity, 2)[1] >= 2
    groups, head_dim = 3, layer.keys.shape[-1]
    query = torch.randn(layer.batch_size, layer.num_kv_heads * groups, q_len, head_dim, device=DEVICE)
    expected = reference_ragged_attention(layer, query, None, 0.3, softcap)
    got = triton_ragged_attention(layer, query, None, 0.3, softcap)
    assert got.shape == expected.shape == (layer.batch_size, q_len, layer.num_kv_heads * groups, head_dim)
    torch.testing.assert_close(got, expected, **TOLERANCE)
    assert got[0, :, groups : 2 * groups].abs().max() == 0  # the empty segment's query heads


def test_triton_applies_the_padding_mask():
    layer = _layer(empty_head=False, seed=1)
    seq_len, groups = layer.logical_length, 2
    query = torch.randn(layer.batch_size, layer.num_kv_heads * groups, 1, layer.keys.shape[-1], device=DEVICE)
    mask = torch.zeros(layer.batch_size, 1, 1, seq_len, device=DEVICE)
    mask[0, ..., :40] = float("-inf")  # left padding of the first row
    expected = reference_ragged_attention(layer, query, mask)
    got = triton_ragged_attention(layer, query, mask)
    torch.testing.assert_close(got, expected, **TOLERANCE)
    unpadded = triton_ragged_attention(layer, query, None)
    assert not torch.allclose(unpadded[0], got[0])  # the mask changed the first row's output...
    torch.testing.assert_close(unpadded[1], got[1], **TOLERANCE)  # ...and not the second's
    plan = layer.plans[("triton", 1, groups)]
    assert not plan.padded and bool(plan.padding.row_visible.all())


def test_triton_follows_appends_without_a_new_plan():
    layer = _layer(bsz=1, empty_head=False, seed=2)
    groups, head_dim = 2, layer.keys.shape[-1]
    query = torch.randn(1, layer.num_kv_heads * groups, 1, head_dim, device=DEVICE)
    triton_ragged_attention(layer, query)
    plan = layer.plans[("triton", 1, groups)]
    for _ in range(3):
        new = torch.randn(2, 1, layer.num_kv_heads, 1, head_dim, device=DEVICE)
        layer.update(new[0], new[1])
        torch.testing.assert_close(
            triton_ragged_attention(layer, query), reference_ragged_attention(layer, query), **TOLERANCE
        )
    assert layer.plans[("triton", 1, groups)] is plan


def test_split_size_balances_the_programs():
    chunk, parts = split_size(total_rows=131_072, max_capacity=30_000, multiprocessors=132)
    assert chunk % ragged_triton.BLOCK_N == 0 and 131_072 / chunk <= ragged_triton.PROGRAMS_PER_SM * 132
    assert parts == -(-30_000 // chunk) and parts <= ragged_triton.MAX_PARTS
    chunk, parts = split_size(total_rows=8_000_000, max_capacity=1_000_000, multiprocessors=132)
    assert parts <= ragged_triton.MAX_PARTS and chunk * parts >= 1_000_000


def test_auto_picks_triton_on_cuda_when_it_imports(monkeypatch):
    import kvpress.ragged_attention as ragged_attention

    set_ragged_backend("auto")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ragged_attention.ragged_backend(cpu) == "reference"
    monkeypatch.setattr(ragged_attention, "triton_importable", lambda: True)
    assert ragged_attention.ragged_backend(cuda) == "triton"
    monkeypatch.setattr(ragged_attention, "triton_importable", lambda: False)
    assert ragged_attention.ragged_backend(cuda) == "flex"  # every CUDA build of torch has FlexAttention
    set_ragged_backend("flex")
    assert ragged_attention.ragged_backend(cuda) == "flex"  # a backend asked for by name is kept


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = RaggedLayer(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), torch.ones(1, 1, 4, dtype=torch.bool), 1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # a CPU query without the interpreter
        triton_ragged_attention(layer, torch.randn(1, 2, 1, 8))


def test_triton_backend_decodes_like_the_reference_backend():
    """A model's decoding steps over a ragged cache (AdaKV(SnapKV), batch 2): the same logits with either backend.
    On a GPU machine a copy of the shared model runs on the GPU (the triton backend refuses a CPU query there)."""
    model = get_model("llama") if DEVICE.type == "cpu" else copy.deepcopy(get_model("llama")).to(DEVICE)
    ids = random_input_ids(2, 40).to(DEVICE)
    logits = {}
    for backend in ("reference", "triton"):
        set_ragged_backend(backend)
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), AdaKVPress(SnapKVPress(0.5, window_size=2))(model):
            model(ids, **cache_kwargs(model, cache))
        ragged = RaggedCache.from_cache(cache, model, extra_tokens=4)
        try:
            steps = []
            with torch.no_grad():
                for step in range(3):
                    token = torch.tensor([[5 + step], [9 + step]], device=DEVICE)
                    position = torch.full((2, 1), 40 + step, device=DEVICE)
                    out = model(input_ids=token, position_ids=position, **cache_kwargs(model, ragged))
                    steps.append(out.logits)
        finally:
            RaggedCache.detach(model)
        logits[backend] = torch.cat(steps, dim=1)
    torch.testing.assert_close(logits["triton"], logits["reference"], **TOLERANCE)


def test_triton_combines_many_parts(monkeypatch):
    """Segments of over a thousand rows in chunks of 64: pass 2 combines more partials than it reads at once."""
    monkeypatch.setattr(ragged_triton, "PROGRAMS_PER_SM", 1000)  # the smallest chunk, 64 rows
    layer = _layer(bsz=1, seq_len=1500, head_dim=16, empty_head=False, seed=3)
    query = torch.randn(1, layer.num_kv_heads * 2, 1, 16, device=DEVICE)
    got = triton_ragged_attention(layer, query)
    assert layer.plans[("triton", 1, 2)].parts > ragged_triton.PARTS_BLOCK
    torch.testing.assert_close(got, reference_ragged_attention(layer, query), **TOLERANCE)


def test_bad_masks_are_refused_by_every_path():
    layer = _layer(bsz=1, empty_head=False, seed=4)
    query = torch.randn(1, layer.num_kv_heads, 1, layer.keys.shape[-1], device=DEVICE)
    short = torch.zeros(1, 1, 1, layer.logical_length - 1, device=DEVICE)
    flat = torch.zeros(1, layer.logical_length, device=DEVICE)
    for attend in (triton_ragged_attention, reference_ragged_attention):
        with pytest.raises(ValueError, match="covers 149 positions but the ragged layer holds 150"):
            attend(layer, query, short)
        with pytest.raises(ValueError, match=r"takes a \(batch, 1, .*, keys\) attention mask, got \(1, 150\)"):
            attend(layer, query, flat)
