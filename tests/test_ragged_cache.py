# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The ragged cache (`kvpress.ragged_cache`) and its attention (`kvpress.ragged_attention`): storage, in-place
appends and eviction, exact attention against an independent dense reference, and equality with the masking path
for every head-wise press (prefill, questions, decoding-time eviction, batch 2 with padding, the pipeline)."""

import logging

import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    AdaKVPress,
    DMSPress,
    KnormPress,
    KVPressTextGenerationPipeline,
    RandomPress,
    RestoreKVPress,
    SnapKVPress,
    attention_patch,
)
from kvpress.headwise_masks import add_masks, get_masks, masks_as_bool, set_masks
from kvpress.ragged_attention import (
    flex_ragged_attention,
    reference_ragged_attention,
    set_ragged_backend,
)
from kvpress.ragged_cache import RaggedCache, RaggedLayer, ragged_cache_for
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import (
    attention_modules,
    compressed_layers,
    get_model,
    load_saved_model,
    load_tokenizer,
    random_input_ids,
    saved_model_dir,
)
from tests.presses.test_headwise_matrix import FACTORIES, MockDuoAttentionPress
from tests.presses.test_restorekv import needs_compatible_peft, restore_resources
from tests.test_ragged_prefill import count_ragged_layers_built

SPARE = 8


@pytest.fixture(autouse=True)
def _reference_backend():
    set_ragged_backend("reference")
    yield
    set_ragged_backend("auto")


def _random_layer(bsz=2, heads=3, seq_len=10, dim=4, spare=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(bsz, heads, seq_len, dim, generator=generator)
    values = torch.randn(bsz, heads, seq_len, dim, generator=generator)
    kept = torch.rand(bsz, heads, seq_len, generator=generator) > 0.4
    kept[0, 0] = False  # an empty segment
    kept[1, 2] = True  # a full one
    return keys, values, kept, RaggedLayer(keys, values, kept, spare)


def _segment(layer: RaggedLayer, segment: int):
    rows = layer.segment_rows(segment)
    return layer.keys[rows], layer.values[rows], layer.positions[rows]


def test_layer_stores_only_the_kept_entries_in_order():
    keys, values, kept, layer = _random_layer()
    bsz, heads, seq_len, dim = keys.shape
    assert layer.offsets.dtype == torch.int32 and layer.lengths.dtype == torch.int32
    assert layer.keys.shape == (int(kept.sum()) + 2 * bsz * heads, dim)  # kept entries plus the spare rows
    assert layer.kv_bytes() == 2 * layer.keys.shape[0] * dim * 4
    for b in range(bsz):
        for h in range(heads):
            seg_keys, seg_values, positions = _segment(layer, b * heads + h)
            expected = kept[b, h].nonzero().squeeze(-1)
            assert positions.tolist() == expected.tolist()
            assert torch.equal(seg_keys, keys[b, h, expected]) and torch.equal(seg_values, values[b, h, expected])
    assert layer.get_seq_length() == seq_len


def test_update_appends_in_place_then_grows_and_rolls_back():
    keys, values, kept, layer = _random_layer(spare=2)
    bsz, heads, seq_len, dim = keys.shape
    state = layer.state()
    pointer = layer.keys.data_ptr()
    new_k, new_v = torch.randn(bsz, heads, 2, dim), torch.randn(bsz, heads, 2, dim)
    out_k, out_v = layer.update(new_k, new_v)
    assert layer.keys.data_ptr() == pointer and out_k.shape == (1, 1, *layer.keys.shape)  # written in place
    seg_keys, _, positions = _segment(layer, 4)
    assert torch.equal(seg_keys[-2:], new_k[1, 1]) and positions[-2:].tolist() == [seq_len, seq_len + 1]
    more_k, more_v = torch.randn(bsz, heads, 1, dim), torch.randn(bsz, heads, 1, dim)
    layer.update(more_k, more_v)  # no spare row left: the layer grows and keeps every entry
    for segment in range(bsz * heads):
        b, h = divmod(segment, heads)
        seg_keys, seg_values, positions = _segment(layer, segment)
        expected = torch.cat([keys[b, h, kept[b, h]], new_k[b, h], more_k[b, h]])
        assert torch.equal(seg_keys, expected)
        assert positions.tolist() == kept[b, h].nonzero().squeeze(-1).tolist() + [seq_len, seq_len + 1, seq_len + 2]
    layer.rollback(state)
    assert layer.get_seq_length() == seq_len and layer.used_rows() == int(kept.sum())
    with pytest.raises(ValueError, match="batch 2 x 3"):
        layer.update(torch.randn(1, heads, 1, dim), torch.randn(1, heads, 1, dim))


def test_a_one_token_append_builds_no_index_tensors():
    """A decoding step's append is three copies into the buffers and three small in-place adds, as few launches as
    the in-place cache's (the host launches bound the eager loop): no arange, repeat or dtype conversion."""
    from torch.profiler import ProfilerActivity, profile

    keys, values, kept, layer = _random_layer(spare=4)
    bsz, heads, seq_len, dim = keys.shape
    new_k, new_v = torch.randn(bsz, heads, 1, dim), torch.randn(bsz, heads, 1, dim)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer.update(new_k, new_v)
    names = [event.name for event in prof.events() if event.cpu_parent is None]
    assert names.count("aten::index_copy_") == 3
    assert not {"aten::arange", "aten::repeat", "aten::_to_copy"} & set(names), names
    for segment in range(bsz * heads):  # and it wrote what a longer append writes
        b, h = divmod(segment, heads)
        seg_keys, _, positions = _segment(layer, segment)
        assert torch.equal(seg_keys[-1], new_k[b, h, 0]) and positions[-1].item() == seq_len


def test_reserve_grows_only_when_a_segment_lacks_the_rows_and_keeps_every_entry():
    keys, values, kept, layer = _random_layer(spare=3)
    bsz, heads, _, dim = keys.shape
    before = [_segment(layer, segment) for segment in range(bsz * heads)]
    pointer, version = layer.keys.data_ptr(), layer.version
    assert not layer.reserve(3) and layer.keys.data_ptr() == pointer and layer.version == version  # room already
    assert layer.reserve(5) and layer.version == version + 1 and layer.min_free_rows >= 5
    for segment, (seg_keys, seg_values, positions) in enumerate(before):
        now = _segment(layer, segment)
        assert torch.equal(now[0], seg_keys) and torch.equal(now[1], seg_values) and torch.equal(now[2], positions)
    pointer = layer.keys.data_ptr()
    for _ in range(5):  # the reserved rows take the next appends without another copy
        layer.update(torch.randn(bsz, heads, 1, dim), torch.randn(bsz, heads, 1, dim))
    assert layer.keys.data_ptr() == pointer
    with pytest.raises(ValueError, match="non-negative number of rows"):
        layer.reserve(-1)


def test_evict_frees_rows_in_place_and_keeps_order():
    keys, values, kept, layer = _random_layer()
    pointer, before = layer.keys.data_ptr(), layer.used_rows()
    positions = _segment(layer, 3)[2]  # batch 1, head 0
    victims = positions[[0, -1]]
    dropped = layer.evict(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 0]), torch.cat([victims, torch.tensor([5])]))
    assert dropped == 2  # (batch 0, head 0) holds nothing: ignored
    assert layer.used_rows() == before - 2 and layer.keys.data_ptr() == pointer
    seg_keys, _, remaining = _segment(layer, 3)
    assert remaining.tolist() == positions[1:-1].tolist()
    assert torch.equal(seg_keys, keys[1, 0, remaining.long()])
    assert layer.evict(torch.tensor([1]), torch.tensor([0]), victims[:1]) == 0  # already gone


def _dense_reference(keys, values, kept, query, q_positions, scale):
    """Independent reference: the dense keys with every query head's own KV head, dropped and future entries
    hidden by a mask, softmax in float64."""
    bsz, heads, seq_len, _ = keys.shape
    groups = query.shape[1] // heads
    k = keys.repeat_interleave(groups, dim=1).double()
    v = values.repeat_interleave(groups, dim=1).double()
    logits = query.double() @ k.transpose(-1, -2) * scale
    visible = kept.repeat_interleave(groups, dim=1)[:, :, None, :] & (
        torch.arange(seq_len)[None, :] <= q_positions[:, None]
    )
    logits = logits.masked_fill(~visible, float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_attention_matches_an_independent_dense_reference(backend):
    keys, values, kept, _ = _random_layer(seq_len=12, dim=8)
    kept[0, 0, :3] = True  # no empty segment: every query sees something
    bsz, heads, seq_len, dim = keys.shape
    q_len = 3  # the last three entries are the new tokens
    kept[..., -q_len:] = True
    layer = RaggedLayer(keys[..., :-q_len, :], values[..., :-q_len, :], kept[..., :-q_len], spare=4)
    layer.update(keys[..., -q_len:, :], values[..., -q_len:, :])
    query = torch.randn(bsz, 2 * heads, q_len, dim)
    attention = flex_ragged_attention if backend == "flex" else reference_ragged_attention
    out = attention(layer, query, None, scaling=0.3)
    expected = _dense_reference(keys, values, kept, query, torch.arange(seq_len - q_len, seq_len), 0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # a padding mask (batch 1 cannot see its first 4 positions) is read at each entry's logical position
    padding = torch.ones(bsz, 1, q_len, seq_len, dtype=torch.bool)
    padding[1, ..., :4] = False
    out = attention(layer, query, padding, scaling=0.3)
    hidden = kept.clone()
    hidden[1, :, :4] = False
    expected = _dense_reference(keys, values, hidden, query, torch.arange(seq_len - q_len, seq_len), 0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def _decode(model, cache, first, steps, attention_mask=None):
    """Greedy decoding after `first` (a few question tokens): the logits of every step."""
    tokens, logits = first, []
    for _ in range(steps):
        extra = {}
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(tokens.shape)], dim=-1)
            extra["attention_mask"] = attention_mask
        with torch.no_grad():
            out = model(input_ids=tokens, **cache_kwargs(model, cache), **extra)
        logits.append(out.logits[:, -1])
        tokens = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits)


PRESSES = {
    **FACTORIES,
    "dms": lambda r, tmp: DMSPress(RandomPress(), threshold=r, sliding_window_size=4),
    "duo_attention": lambda r, tmp: MockDuoAttentionPress(head_compression_ratio=r),
}


def _check_resident(model, cache, ragged):
    """KV rows resident = the entries each head kept (plus the spare rows), layer by layer."""
    modules = attention_modules(model)
    for layer_idx, layer in enumerate(ragged.layers):
        if not isinstance(layer, RaggedLayer):
            assert layer_idx not in compressed_layers(model) or getattr(layer, "is_sliding", False)
            continue
        dense = cache.layers[layer_idx].keys
        n_kept = int((~masks_as_bool(modules[layer_idx], tuple(dense.shape[:3]))).sum())
        assert layer.used_rows() == n_kept
        assert layer.keys.shape == (n_kept + SPARE * layer.num_segments, dense.shape[-1])
        assert layer.kv_bytes() == 2 * layer.keys.shape[0] * dense.shape[-1] * dense.element_size()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("name", sorted(PRESSES))
def test_ragged_decoding_matches_the_masking_path(arch, name, tmp_path, monkeypatch):
    model = get_model(arch)
    press = PRESSES[name](0.5, tmp_path)
    ids = random_input_ids(2, 40)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
    masks = [get_masks(m) for m in attention_modules(model)]
    assert any(m is not None for m in masks), "the press masked nothing: the test would prove nothing"
    question = random_input_ids(2, 3, seed=1)
    ragged = RaggedCache.from_cache(cache, model, extra_tokens=SPARE)
    _check_resident(model, cache, ragged)
    try:
        ragged_logits = _decode(model, ragged, question, steps=5)
    finally:
        RaggedCache.detach(model)
    # The reference is the masking path's exact mode, an explicit per-head mask: its fake keys hide an entry only up to
    # the perceptron's margin, which for some random masks (DMS over RandomPress) leaves a visible weight.
    monkeypatch.setattr(attention_patch, "apply_masked_key_indices", _no_fake_key)
    masked_logits = _decode(model, cache, question, steps=5)
    torch.testing.assert_close(ragged_logits, masked_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(ragged_logits.argmax(-1), masked_logits.argmax(-1))


def _no_fake_key(*args, **kwargs):
    raise ValueError("no fake key: the test asks for the explicit per-head mask")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_batch_of_two_with_padding(attn_implementation):
    model = get_model("llama", attn_implementation)
    ids = random_input_ids(2, 30)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :6] = 0  # left padding
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), AdaKVPress(KnormPress(0.5))(model):
        model(ids, attention_mask=attention_mask, **cache_kwargs(model, cache))
    ragged = RaggedCache.from_cache(cache, model, extra_tokens=SPARE)
    question = random_input_ids(2, 2, seed=3)
    try:
        ragged_logits = _decode(model, ragged, question, steps=4, attention_mask=attention_mask)
    finally:
        RaggedCache.detach(model)
    masked_logits = _decode(model, cache, question, steps=4, attention_mask=attention_mask)
    torch.testing.assert_close(ragged_logits, masked_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(ragged_logits.argmax(-1), masked_logits.argmax(-1))


def test_decoding_time_masks_are_evicted_in_place():
    """Masks added while decoding (as DMS and DecodingPress over AdaKV do) drop entries from the segments in place
    and give the logits the masking path gives with the same masks."""
    model = get_model("llama")
    ids = random_input_ids(2, 40)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), AdaKVPress(SnapKVPress(0.5, window_size=2))(model):
        model(ids, **cache_kwargs(model, cache))
    modules = attention_modules(model)
    prefill_masks = [get_masks(m) for m in modules]
    question = random_input_ids(2, 2, seed=4)

    def run(target):
        logits = [_decode(model, target, question, steps=2)]
        for module in modules:  # evict a context entry and the first question token of some heads
            add_masks(module, torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]), torch.tensor([39, 40, 38]))
        logits.append(_decode(model, target, logits[-1][-1:].argmax(-1).T, steps=3))
        return torch.cat(logits)

    ragged = RaggedCache.from_cache(cache, model, extra_tokens=SPARE)
    pointers = [layer.keys.data_ptr() for layer in ragged.ragged_layers()]
    used = [layer.used_rows() for layer in ragged.ragged_layers()]
    try:
        ragged_logits = run(ragged)
    finally:
        RaggedCache.detach(model)
    added = 2 + 1 + 3  # per segment: 2 question tokens + 1 generated before the masks, 3 steps after
    for layer, pointer, before, masks in zip(ragged.ragged_layers(), pointers, used, prefill_masks):
        assert layer.keys.data_ptr() == pointer  # appended and evicted in place: no copy of the cache
        pruned = torch.zeros(2, 2, 41, dtype=torch.bool)
        pruned[masks] = True
        held = [not bool(pruned[b, h, p]) for b, h, p in ((0, 1, 39), (1, 0, 40), (1, 1, 38))]
        assert layer.used_rows() == before + added * layer.num_segments - sum(held)
    for module, masks in zip(modules, prefill_masks):
        set_masks(module, masks)
    masked_logits = run(cache)
    torch.testing.assert_close(ragged_logits, masked_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(ragged_logits.argmax(-1), masked_logits.argmax(-1))


@pytest.mark.parametrize("name", ["adakv_snapkv", "kvzip_global", "critical_adakv"])
def test_pipeline_questions_match_the_masking_path(name, tmp_path, monkeypatch):
    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(), device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 6
    questions = ["Who jumps?", "What is lazy?", "Which fox?"]
    built = count_ragged_layers_built(monkeypatch)
    ragged = pipe(context, questions=questions, press=PRESSES[name](0.5, tmp_path), max_new_tokens=6, ragged_cache=True)
    # one ragged cache serves every question (rolled back in between): each layer converted once, during the
    # prefill for presses that mask a layer in its forward hook, after it for KVzip (a second pass over the context)
    assert len(built) == pipe.model.config.num_hidden_layers
    assert set(built) == {"after" if name == "kvzip_global" else "prefill"}
    masked = pipe(context, questions=questions, press=PRESSES[name](0.5, tmp_path), max_new_tokens=6)
    assert ragged == masked


def test_pipeline_refuses_a_ragged_cache_flag_that_is_not_a_bool():
    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(), device="cpu")
    with pytest.raises(TypeError, match="ragged_cache must be True or False"):
        pipe("Some context", question="Why?", ragged_cache="yes")


def test_caches_it_cannot_copy_keep_the_masking_path(caplog):
    model = get_model("llama")
    with caplog.at_level(logging.INFO, logger="kvpress.ragged_cache"):
        assert ragged_cache_for(model, DynamicCache(), False, 4) is None
    assert "not applicable" in caplog.text
    with pytest.raises(ValueError, match="extra_tokens"):
        RaggedCache.from_cache(DynamicCache(), model, extra_tokens=-1)
    with pytest.raises(ValueError, match="spare"):
        RaggedLayer(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, dtype=torch.bool), -1)
    with pytest.raises(ValueError, match="unknown ragged attention backend"):
        set_ragged_backend("cuda")


def test_flex_backend_matches_the_masking_path_end_to_end():
    """The CUDA path's block mask and mask_mod (FlexAttention, unfused on CPU) give the masking path's logits."""
    set_ragged_backend("flex")
    model = get_model("qwen3")
    ids = random_input_ids(2, 40)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), AdaKVPress(SnapKVPress(0.5, window_size=2))(model):
        model(ids, **cache_kwargs(model, cache))
    ragged = RaggedCache.from_cache(cache, model, extra_tokens=SPARE)
    question = random_input_ids(2, 3, seed=5)
    try:
        ragged_logits = _decode(model, ragged, question, steps=4)
    finally:
        RaggedCache.detach(model)
    masked_logits = _decode(model, cache, question, steps=4)
    torch.testing.assert_close(ragged_logits, masked_logits, atol=1e-5, rtol=1e-5)


def test_benchmark_ragged_loop_holds_only_the_kept_entries(tmp_path):
    from kvpress.benchmark import main

    args = ["--model", "tiny", "--context_lengths", "128", "--max_new_tokens", "4", "--output_dir", str(tmp_path)]
    rows = main([*args, "--presses", "adakv_snapkv:0.5,knorm:0.5", "--decode_loops", "inplace,ragged"])
    by_key = {(row["press"], row["decode_loop"]): row for row in rows}
    ragged, masked = by_key[("adakv_snapkv:0.5", "ragged")], by_key[("adakv_snapkv:0.5", "inplace")]
    # tiny shape: 2 layers x 2 KV heads x head_dim 16, float32; 64 kept entries + 8 spare rows per segment (4 new
    # tokens, 2 warm-up steps, 2 more)
    assert ragged["kv_bytes"] == 2 * 2 * 2 * 16 * 4 * (64 + 8)
    assert masked["kv_bytes"] == 2 * 2 * 2 * 16 * 4 * 128  # the masking path keeps every entry
    assert ragged["kv_bytes_dense_prefill"] == masked["kv_bytes"]
    assert by_key[("knorm:0.5", "ragged")]["kv_bytes"] == ragged["kv_bytes"]  # the same kept size
    assert ragged["decode_ms_per_token"] > 0
    assert ragged["ragged_backend"] == "reference"
    assert ragged["ragged_prefill"] == "per_layer"  # compacted layer by layer during the prefill


@needs_compatible_peft
def test_restorekv_pipeline_matches_the_masking_path():
    """RestoreKV appends its restore tokens after the context: the questions continue after them on both paths."""
    model = load_saved_model(saved_model_dir("llama", with_chat_template=True))
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(True), device="cpu")
    context, questions = "The quick brown fox jumps over the lazy dog. " * 2, ["Who?", "Why?"]
    answers = []
    for ragged in (True, False):
        press = RestoreKVPress(0.4, restore_repo_or_dir=restore_resources("llama", zero_embeddings=False))
        answers.append(pipe(context, questions=questions, press=press, max_new_tokens=4, ragged_cache=ragged))
    assert answers[0] == answers[1]


def test_pipeline_leaves_a_cache_the_user_passed_as_compressed_context():
    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(), device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 4
    cache = DynamicCache()
    press = AdaKVPress(KnormPress(0.5))
    answer = pipe(context, question="Who?", press=press, max_new_tokens=4, cache=cache, ragged_cache=True)
    length = cache.get_seq_length()
    assert length > 0 and all(layer.keys.shape[2] == length for layer in cache.layers)  # kept, dense, untouched
    assert answer == pipe(context, question="Who?", press=AdaKVPress(KnormPress(0.5)), max_new_tokens=4)
