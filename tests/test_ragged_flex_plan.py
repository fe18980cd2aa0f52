# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The FlexAttention plan of a ragged layer (`kvpress.ragged_attention.FlexPlan`): its block mask is built once and
reused by every decoding step (appends and evictions change the tensors its mask_mod reads, in place), its blocks
cover each segment's rows, its mask_mod gives the visibility an independent computation gives, and FlexAttention
(unfused on CPU) with it gives the reference path's output after appends, evictions, growth and rollbacks. Every
test runs with both layouts: packed (what a decoding step uses) and per segment (longer forwards)."""

import os

import pytest
import torch
from transformers import DynamicCache

from kvpress import AdaKVPress, DecodingPress, SnapKVPress, ragged_attention
from kvpress.ragged_attention import (
    _FLEX_BLOCK,
    FlexPlan,
    flex_plan,
    flex_ragged_attention,
    reference_ragged_attention,
    segment_block_mask,
    set_ragged_backend,
)
from kvpress.ragged_cache import RaggedCache, RaggedLayer
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import get_model, random_input_ids


@pytest.fixture(autouse=True, params=["packed", "per_segment"])
def layout(request, monkeypatch):
    """Every plan of the test in one layout: packed for any number of query rows, or always per segment."""
    monkeypatch.setattr(ragged_attention, "_PACKED_MAX_ROWS", 10**9 if request.param == "packed" else 0)
    return request.param


def _layer(bsz=2, heads=2, seq_len=150, dim=8, spare=3, seed=0):
    """Segments of different lengths (one empty), spanning several 128-row blocks."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(bsz, heads, seq_len, dim, generator=generator)
    values = torch.randn(bsz, heads, seq_len, dim, generator=generator)
    kept = torch.rand(bsz, heads, seq_len, generator=generator) > 0.3
    kept[0, 1] = False
    return RaggedLayer(keys, values, kept, spare)


def _expected_visibility(layer: RaggedLayer, q_len: int, groups: int, padding=None) -> torch.Tensor:
    """(segments, groups * q_len, rows): row r is visible to query row i of segment s when r is a row of s in use,
    its entry's position is not after the query's, and the padding (B, logical) allows that position."""
    n_rows = layer.keys.shape[0]
    visible = torch.zeros(layer.num_segments, groups * q_len, n_rows, dtype=torch.bool)
    for segment in range(layer.num_segments):
        for row in layer.segment_rows(segment).tolist():
            position = int(layer.positions[row])
            if padding is not None and not bool(padding[segment // layer.num_kv_heads, position]):
                continue
            for i in range(groups * q_len):
                query_position = layer.logical_length - q_len + i % q_len
                visible[segment, i, row] = position <= query_position
    return visible


def _mask_mod_grid(layer: RaggedLayer, q_len: int, groups: int) -> torch.Tensor:
    """The plan's mask_mod over every (segment, query row, key row), `(segments, groups * q_len, rows)`."""
    plan = flex_plan(layer, q_len, groups)
    zero = torch.zeros((), dtype=torch.long)
    rows = torch.arange(layer.keys.shape[0])
    if plan.packed:  # one query head: the segments' rows one after the other
        queries = torch.arange(layer.num_segments * groups * q_len)[:, None]
        return plan.mask_mod(zero, zero, queries, rows[None, :]).reshape(layer.num_segments, groups * q_len, -1)
    heads = torch.arange(layer.num_segments)[:, None, None]
    return plan.mask_mod(zero, heads, torch.arange(groups * q_len)[None, :, None], rows[None, None, :])


def _blocks_cover_every_segment(layer: RaggedLayer, q_len: int, groups: int) -> None:
    plan = flex_plan(layer, q_len, groups)
    counts, indices = plan.block_mask.kv_num_blocks[0, :, 0], plan.block_mask.kv_indices[0, :, 0]
    for segment in range(layer.num_segments):
        head = 0 if plan.packed else segment
        visited = indices[head, : int(counts[head])].tolist()
        assert len(visited) == len(set(visited))  # no block twice
        assert {int(row) // _FLEX_BLOCK for row in layer.segment_rows(segment)} <= set(visited)


def test_mask_mod_follows_appends_evictions_and_rollbacks_without_a_new_block_mask():
    layer = _layer()
    state = layer.state()
    block_mask = segment_block_mask(layer, 1, 2)
    assert torch.equal(_mask_mod_grid(layer, 1, 2), _expected_visibility(layer, 1, 2))
    _blocks_cover_every_segment(layer, 1, 2)
    for _ in range(2):  # appends within the spare rows
        layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
        assert segment_block_mask(layer, 1, 2) is block_mask
        assert torch.equal(_mask_mod_grid(layer, 1, 2), _expected_visibility(layer, 1, 2))
    layer.evict(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0]), torch.tensor([3, 150, 0]))
    assert segment_block_mask(layer, 1, 2) is block_mask  # eviction moves rows inside their segments
    assert torch.equal(_mask_mod_grid(layer, 1, 2), _expected_visibility(layer, 1, 2))
    layer.rollback(state)  # the evicted rows come back from a copy: new buffers, so a new plan
    rebuilt = segment_block_mask(layer, 1, 2)
    assert rebuilt is not block_mask
    assert torch.equal(_mask_mod_grid(layer, 1, 2), _expected_visibility(layer, 1, 2))
    layer.update(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))  # beyond the spare rows: the layer grows
    assert segment_block_mask(layer, 5, 2) is not rebuilt
    assert torch.equal(_mask_mod_grid(layer, 5, 2), _expected_visibility(layer, 5, 2))
    _blocks_cover_every_segment(layer, 5, 2)


def test_padding_is_copied_into_the_plan_in_place():
    layer = _layer(seq_len=20)
    padding = torch.ones(2, 21, dtype=torch.bool)
    padding[1, :4] = False  # the second row's first 4 positions are left padding
    layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    additive = torch.zeros(2, 1, 1, 21).masked_fill(~padding[:, None, None, :], torch.finfo(torch.float32).min)
    block_mask = segment_block_mask(layer, 1, 2, additive)
    assert torch.equal(_mask_mod_grid(layer, 1, 2), _expected_visibility(layer, 1, 2, padding))
    assert segment_block_mask(layer, 1, 2, None) is block_mask  # without a mask: every row visible again
    assert torch.equal(_mask_mod_grid(layer, 1, 2), _expected_visibility(layer, 1, 2))
    with pytest.raises(ValueError, match="attention mask covers"):
        segment_block_mask(layer, 1, 2, additive[..., :10])


@pytest.mark.parametrize("q_len", [1, 3])
def test_flex_attention_with_the_plan_matches_the_reference_path(q_len):
    layer = _layer(seq_len=140)
    padding = torch.ones(2, 1, q_len, 140 + q_len, dtype=torch.bool)
    padding[1, ..., :6] = False
    generator = torch.Generator().manual_seed(3)
    for step in range(3):
        layer.update(torch.randn(2, 2, q_len, 8, generator=generator), torch.randn(2, 2, q_len, 8, generator=generator))
        if step == 1:
            layer.evict(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([141, 2]))
        width = layer.logical_length
        mask = torch.ones(2, 1, q_len, width, dtype=torch.bool)
        mask[1, ..., :6] = False
        query = torch.randn(2, 4, q_len, 8, generator=generator)
        flex = flex_ragged_attention(layer, query, mask, scaling=0.3)
        reference = reference_ragged_attention(layer, query, mask, scaling=0.3)
        torch.testing.assert_close(flex, reference, atol=1e-5, rtol=1e-5)


def test_fast_backends_with_decoding_eviction_match_the_reference_backend():
    """DecodingPress over AdaKV evicting while decoding: the flex and triton backends' logits are the reference
    backend's (triton under Triton's interpreter on CPU)."""
    model = get_model("qwen3")
    ids = random_input_ids(2, 40)
    question = random_input_ids(2, 2, seed=6)
    logits = {}
    for backend in ("reference", "flex", "triton"):
        set_ragged_backend(backend)
        press = DecodingPress(AdaKVPress(SnapKVPress(window_size=2)), compression_interval=2, target_size=24)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
        ragged = RaggedCache.from_cache(cache, model, extra_tokens=8)
        tokens, steps = question, []
        try:
            with torch.no_grad(), press(model):
                for _ in range(6):
                    out = model(input_ids=tokens, **cache_kwargs(model, ragged))
                    steps.append(out.logits[:, -1])
                    tokens = out.logits[:, -1:].argmax(-1)
        finally:
            RaggedCache.detach(model)
            set_ragged_backend("auto")
        assert min(layer.used_rows() for layer in ragged.ragged_layers()) < 2 * 2 * 47  # it evicted
        logits[backend] = torch.stack(steps)
    torch.testing.assert_close(logits["flex"], logits["reference"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    os.environ.get("KVPRESS_COMPILED_FLEX_TESTS") != "1",
    reason="compiles FlexAttention with inductor on CPU (about 40 s); set KVPRESS_COMPILED_FLEX_TESTS=1",
)
def test_compiled_flex_attention_on_cpu_reuses_its_kernel_across_steps(monkeypatch):
    """The kernel CUDA runs, compiled here by inductor's CPU backend: the reference path's output at every step, and
    no compilation after the first step of each layer size (the plan's block mask and tensors are reused)."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from kvpress import ragged_attention

    compiled = torch.compile(flex_attention)
    monkeypatch.setattr(ragged_attention, "_flex_function", lambda device: compiled)
    torch._dynamo.reset()
    counters.clear()
    for seed, seq_len in ((0, 150), (1, 170)):  # two layer sizes: the second one recompiles with dynamic shapes
        layer = _layer(seq_len=seq_len, seed=seed)
        for step in range(3):
            layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
            query = torch.randn(2, 4, 1, 8)
            output = flex_ragged_attention(layer, query, None, scaling=0.3)
            torch.testing.assert_close(output, reference_ragged_attention(layer, query, None, scaling=0.3))
            if step == 0:
                compilations = sum(counters["frames"].values())
                assert compilations > 0  # it did compile
        assert sum(counters["frames"].values()) == compilations  # steps 2 and 3 ran the kernel compiled at step 1


@pytest.mark.parametrize("bsz, packed", [(1, True), (3, True), (4, False)])
def test_a_decoding_step_packs_its_query_rows_while_they_fit_the_decoding_kernel(monkeypatch, bsz, packed):
    """The 8B shape (8 KV heads, 4 query heads each): a step of one token has 32 query rows per batch row, packed
    into one head (FlexAttention's decoding kernel, which splits the keys over the GPU) below 128 rows in all."""
    monkeypatch.setattr(ragged_attention, "_PACKED_MAX_ROWS", 128)  # the shipped threshold, whatever the fixture
    layer = _layer(bsz=bsz, heads=8, seq_len=300)
    plan = FlexPlan(layer, q_len=1, groups=4)
    assert plan.packed is packed
    counts, indices = plan.block_mask.kv_num_blocks, plan.block_mask.kv_indices
    if packed:  # one head visits every block of the buffer once
        blocks = -(-layer.keys.shape[0] // _FLEX_BLOCK)
        assert counts.shape == (1, 1, 1) and int(counts) == blocks
        assert indices[0, 0, 0, :blocks].tolist() == list(range(blocks))
    else:
        assert counts.shape == (1, layer.num_segments, 1)
    assert not FlexPlan(layer, q_len=40, groups=4).packed  # a question's forward: per segment
