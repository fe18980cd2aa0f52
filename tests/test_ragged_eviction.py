# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Decoding-time head-wise eviction on the ragged cache: DMSPress(decoding=True) and DecodingPress over AdaKVPress
evict from the segments in place (through the mask writer of `kvpress.headwise_masks`), with the masking path's
greedy tokens and logits (float32), batch 2 with left padding and several questions through the pipeline; the rows
in use fall by the evicted count, and a rollback brings evicted entries back."""

import logging

import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    AdaKVPress,
    DecodingPress,
    DMSPress,
    KnormPress,
    KVPressTextGenerationPipeline,
    PrefillDecodingPress,
    SnapKVPress,
    attention_patch,
    ragged_cache,
)
from kvpress.headwise_masks import (
    add_masks,
    attach_mask_sink,
    detach_mask_sink,
    get_masks,
    merge_masks,
    remap_masks,
    set_masks,
)
from kvpress.press_state import restore_press_state, snapshot_press_state
from kvpress.ragged_attention import set_ragged_backend
from kvpress.ragged_cache import RaggedCache, RaggedLayer, decoding_eviction_problem
from kvpress.transformers_adapter import CannotCompressError, cache_kwargs
from kvpress.utils import extract_keys_and_values, write_keys_and_values
from tests.fixtures import attention_modules, get_model, load_tokenizer, random_input_ids
from tests.test_ragged_prefill import count_ragged_layers_built


@pytest.fixture(autouse=True)
def _reference_backend():
    set_ragged_backend("reference")
    yield
    set_ragged_backend("auto")


DECODING_PRESSES = {
    "dms_knorm": lambda: DMSPress(KnormPress(), threshold=-0.75, sliding_window_size=3, decoding=True),
    "decoding_adakv_snapkv": lambda: DecodingPress(
        AdaKVPress(SnapKVPress(window_size=2)), compression_interval=3, target_size=20, hidden_states_buffer_size=4
    ),
    "decoding_adakv_knorm": lambda: DecodingPress(AdaKVPress(KnormPress()), compression_interval=2, target_size=24),
}
# How the masking path hides masked entries in the comparison. Its fake keys are exact only when the perceptron's
# direction separates the queries by a wide margin (a logit of -1e5 x margin); with DMS on the padded batch below
# it does not, from step 10 on, and the masking path's own exact mode (an explicit per-head mask, its fallback when
# no fake key exists) is the reference. DecodingPress over AdaKV scores the keys of masked entries, which on the
# masking path are the fake keys written in place: that mode defines what it chooses, and the ragged dense view
# shows the same fake keys.
MASKING_MODE = {"dms_knorm": "explicit", "decoding_adakv_snapkv": "fake_keys", "decoding_adakv_knorm": "fake_keys"}


def _explicit_masks(monkeypatch):
    """Make the masking path hide masked entries with its exact per-head mask instead of fake keys."""

    def no_fake_key(*args, **kwargs):
        raise ValueError("no fake key (explicit per-head mask requested by the test)")

    monkeypatch.setattr(attention_patch, "apply_masked_key_indices", no_fake_key)


def _unique_masked(module) -> int:
    masks = get_masks(module)
    return 0 if masks is None else torch.unique(torch.stack(masks), dim=1).shape[1]


def _decode(model, cache, first, steps, attention_mask):
    """Greedy decoding after `first`, extending `attention_mask`: the logits of every step."""
    tokens, logits = first, []
    for _ in range(steps):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(tokens.shape)], dim=-1)
        with torch.no_grad():
            out = model(input_ids=tokens, attention_mask=attention_mask, **cache_kwargs(model, cache))
        logits.append(out.logits[:, -1])
        tokens = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits)


@pytest.mark.parametrize("name", sorted(DECODING_PRESSES))
def test_decoding_eviction_matches_the_masking_path_on_a_padded_batch(name, monkeypatch):
    """Batch 2, the second row left-padded: the context is compressed head-wise (AdaKV), then the decoding press
    evicts while 12 tokens are generated, on the ragged cache and on the masking path (same press state)."""
    model = get_model("llama")
    assert model.dtype == torch.float32
    ids = random_input_ids(2, 30)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), AdaKVPress(KnormPress(0.3))(model):
        model(ids, attention_mask=attention_mask, **cache_kwargs(model, cache))
    modules = attention_modules(model)
    masked_after_prefill = [_unique_masked(m) for m in modules]
    question = random_input_ids(2, 3, seed=1)
    press = DECODING_PRESSES[name]()
    with press(model):
        snapshot = snapshot_press_state(press, model)
        ragged = RaggedCache.from_cache(cache, model, extra_tokens=20)
        pointers = [layer.keys.data_ptr() for layer in ragged.ragged_layers()]
        try:
            ragged_logits = _decode(model, ragged, question, 12, attention_mask)
        finally:
            RaggedCache.detach(model)
        ragged_masked = [_unique_masked(m) for m in modules]
        restore_press_state(snapshot, model)
        if MASKING_MODE[name] == "explicit":
            _explicit_masks(monkeypatch)
        masked_logits = _decode(model, cache, question, 12, attention_mask)
        masking_path_masked = [_unique_masked(m) for m in modules]
    torch.testing.assert_close(ragged_logits, masked_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(ragged_logits.argmax(-1), masked_logits.argmax(-1))
    assert ragged_masked == masking_path_masked  # both paths evicted the same entries
    assert sum(ragged_masked) > sum(masked_after_prefill), "the press evicted nothing while decoding"
    for layer, pointer, n_masked in zip(ragged.ragged_layers(), pointers, ragged_masked):
        # the rows in use: every logical entry but the evicted ones, and no reallocation (the spare rows sufficed)
        assert layer.used_rows() == layer.num_segments * layer.logical_length - n_masked
        assert layer.keys.data_ptr() == pointer


def test_dense_view_shows_held_entries_at_their_positions():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 6, 4, generator=generator), torch.randn(2, 2, 6, 4, generator=generator)
    kept = torch.ones(2, 2, 6, dtype=torch.bool)
    kept[0, 1, [1, 4]] = False
    kept[1, 0, 0] = False
    layer = RaggedLayer(keys, values, kept, spare=2)
    layer.last_query = torch.randn(2, 4, 1, 4, generator=generator)  # 2 query heads per KV head
    dense_keys, dense_values = layer.dense_keys_and_values()
    assert dense_keys.shape == keys.shape
    torch.testing.assert_close(dense_keys[kept], keys[kept])
    torch.testing.assert_close(dense_values[kept], values[kept])
    assert bool((dense_values[~kept] == 0).all())
    # an evicted entry shows a fake key: every query of its head gives it a logit of -1e5 or less
    for b, h, t in (~kept).nonzero().tolist():
        logits = layer.last_query[b, 2 * h : 2 * h + 2, 0] @ dense_keys[b, h, t]
        assert bool((logits < -1e4).all())
    # a press writes the view back (its evictions went through the masks); anything else is refused
    cache = DynamicCache()
    cache.layers = [layer]
    viewed_keys, viewed_values = extract_keys_and_values(cache, 0)
    write_keys_and_values(cache, 0, viewed_keys, viewed_values)
    with pytest.raises(CannotCompressError, match="ragged cache"):
        write_keys_and_values(cache, 0, viewed_keys[:, :, :4], viewed_values[:, :, :4])


def test_rollback_brings_evicted_entries_back_and_release_stops_copying():
    generator = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 2, 8, 4, generator=generator), torch.randn(1, 2, 8, 4, generator=generator)
    layer = RaggedLayer(keys, values, torch.ones(1, 2, 8, dtype=torch.bool), spare=3)

    def held():  # per segment: the keys, values and positions of the rows in use
        rows = [layer.segment_rows(segment) for segment in range(layer.num_segments)]
        return [(layer.keys[r].clone(), layer.values[r].clone(), layer.positions[r].clone()) for r in rows]

    def same(first, second):
        return len(first) == len(second) and all(
            torch.equal(a, b) for one, other in zip(first, second) for a, b in zip(one, other)
        )

    original = held()
    state = layer.state()
    layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert layer.evict(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([2, 8])) == 2
    assert layer.lengths.tolist() == [8, 8]
    assert not same(held(), original)
    layer.rollback(state)
    assert layer.logical_length == 8 and layer.lengths.tolist() == [8, 8]
    assert same(held(), original)
    # a second question evicts again and comes back again (the copy is kept until released)
    layer.evict(torch.tensor([0]), torch.tensor([1]), torch.tensor([5]))
    layer.rollback(state, release=True)
    assert same(held(), original)
    assert state[2]["buffers"] is None and layer._protected is None
    layer.evict(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))  # after release: no copy is made
    assert state[2]["buffers"] is None


def test_evicting_positions_outside_the_sequence_drops_nothing():
    keys = torch.randn(1, 2, 4, 3)
    layer = RaggedLayer(keys, keys.clone(), torch.ones(1, 2, 4, dtype=torch.bool), spare=1)
    # (head 0, position 5) would alias (head 1, position 0) in a segment-major numbering
    assert layer.evict(torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1]), torch.tensor([5, -1, 4])) == 0
    assert layer.lengths.tolist() == [4, 4]


class _RecordingSink:
    """An eviction sink that records what the mask writer evicts."""

    def __init__(self):
        self.evicted: list[list[tuple[int, int, int]]] = []

    def evict(self, batch_idx, head_idx, positions):
        self.evicted.append(list(zip(batch_idx.tolist(), head_idx.tolist(), positions.tolist())))
        return len(self.evicted[-1])

    def refuses_remap(self):
        return "it is a test sink"


def test_the_mask_writer_evicts_what_it_newly_masks():
    module = torch.nn.Module()
    sink = _RecordingSink()
    attach_mask_sink(module, sink)
    set_masks(module, (torch.tensor([0]), torch.tensor([1]), torch.tensor([3])))
    add_masks(module, torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([5, 6]))
    assert sink.evicted == [[(0, 1, 3)], [(0, 0, 5), (0, 1, 6)]]  # only the added entries the second time
    assert get_masks(module)[2].tolist() == [3, 5, 6]  # still recorded: presses read them back
    previous = get_masks(module)
    set_masks(module, (torch.tensor([0]), torch.tensor([0]), torch.tensor([7])))
    merge_masks(module, previous)
    assert sink.evicted[-1] == [(0, 0, 7)]  # the merge evicts nothing more: both parts were evicted when set
    assert sorted(get_masks(module)[2].tolist()) == [3, 5, 6, 7]
    with pytest.raises(ValueError, match="test sink"):
        remap_masks(module, torch.tensor([[[0, 1], [0, 1]]]), 8)
    detach_mask_sink(module)
    add_masks(module, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
    assert len(sink.evicted) == 3  # detached: masks only


def test_which_decoding_presses_the_ragged_cache_serves():
    assert decoding_eviction_problem(None) is None
    assert decoding_eviction_problem(AdaKVPress(KnormPress(0.5))) is None  # acts on the context only
    for name in DECODING_PRESSES:
        assert decoding_eviction_problem(DECODING_PRESSES[name]()) is None
    adakv_decoding = DecodingPress(AdaKVPress(KnormPress()), target_size=8)
    assert decoding_eviction_problem(PrefillDecodingPress(KnormPress(0.5), adakv_decoding)) is None
    uniform = DecodingPress(KnormPress(), target_size=8)
    assert "DecodingPress resizes" in decoding_eviction_problem(uniform)
    assert "resizes" in decoding_eviction_problem(PrefillDecodingPress(AdaKVPress(KnormPress(0.5)), uniform))
    assert "KnormPress resizes" in decoding_eviction_problem(KnormPress(cache_budget=16))


CONTEXT = "The quick brown fox jumps over the lazy dog. " * 6
QUESTIONS = ["Who jumps?", "What is lazy?", "Which fox?"]
PIPELINE_PRESSES = {
    "dms_knorm": lambda: DMSPress(KnormPress(), threshold=-0.6, sliding_window_size=4, decoding=True),
    "decoding_adakv_snapkv": lambda: DecodingPress(
        AdaKVPress(SnapKVPress(window_size=2)), compression_interval=3, target_size=64, hidden_states_buffer_size=4
    ),
    "adakv_then_decoding_adakv_knorm": lambda: PrefillDecodingPress(
        AdaKVPress(KnormPress(0.5)), DecodingPress(AdaKVPress(KnormPress()), compression_interval=2, target_size=100)
    ),
}


@pytest.mark.parametrize("name", sorted(PIPELINE_PRESSES))
def test_pipeline_questions_with_decoding_eviction_match_the_masking_path(name, monkeypatch):
    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(), device="cpu")
    evicted = []
    original_evict = RaggedLayer.evict

    def evict(self, *args):
        evicted.append(original_evict(self, *args))
        return evicted[-1]

    built = count_ragged_layers_built(monkeypatch)
    monkeypatch.setattr(RaggedLayer, "evict", evict)
    ragged = pipe(CONTEXT, questions=QUESTIONS, press=PIPELINE_PRESSES[name](), max_new_tokens=12, ragged_cache=True)
    n_layers = pipe.model.config.num_hidden_layers
    assert len(built) == n_layers and sum(evicted) > 0  # one ragged cache (each layer once), evicting in place
    # DMS masks each layer in its forward hook: compacted during the prefill; the wrappers convert after it
    assert set(built) == {"prefill" if name == "dms_knorm" else "after"}
    masked = pipe(CONTEXT, questions=QUESTIONS, press=PIPELINE_PRESSES[name](), max_new_tokens=12)
    assert ragged == masked
    # each question is answered from the compressed context (evictions of the earlier ones rolled back)
    alone = pipe(CONTEXT, question=QUESTIONS[2], press=PIPELINE_PRESSES[name](), max_new_tokens=12, ragged_cache=True)
    assert alone["answer"] == ragged["answers"][2]


@pytest.mark.parametrize(
    "make",
    [
        lambda: DecodingPress(KnormPress(), compression_interval=2, target_size=40),
        lambda: KnormPress(cache_budget=48),
    ],
)
def test_pipeline_keeps_the_masking_path_for_presses_that_resize_while_decoding(make, caplog, monkeypatch):
    monkeypatch.setattr(ragged_cache, "_LOGGED", set())  # said once per process: forget earlier tests' messages
    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(), device="cpu")
    with caplog.at_level(logging.INFO, logger="kvpress.ragged_cache"):
        ragged = pipe(CONTEXT, question="Why?", press=make(), max_new_tokens=6, ragged_cache=True)
    assert "using the masking path" in caplog.text
    assert ragged == pipe(CONTEXT, question="Why?", press=make(), max_new_tokens=6)


def test_benchmark_ragged_loop_evicts_while_decoding(tmp_path):
    from kvpress.benchmark import main

    args = ["--model", "tiny", "--context_lengths", "128", "--max_new_tokens", "6", "--output_dir", str(tmp_path)]
    presses = "decoding_adakv_expected_attention_e2:target_size=64:compression_interval=2,knorm:budget=64"
    rows = main([*args, "--presses", presses, "--decode_loops", "ragged"])
    by_press = {row["press"]: row for row in rows}
    evicting = by_press["decoding_adakv_expected_attention_e2:target_size=64:compression_interval=2"]
    # 2 layers x 2 KV heads, 128 context tokens + 2 warm-up steps + 5 timed ones; DecodingPress keeps about 64 per
    # head (at most 64 + 2 - 1 between compressions): the rows in use fell by what it evicted
    assert 2 * 2 * 64 <= evicting["kv_entries_after_decode"] <= 2 * 2 * 65
    assert evicting["kv_entries"] == 2 * 2 * 128  # nothing was evicted before decoding
    assert "resizes the cache" in by_press["knorm:budget=64"]["error"]
