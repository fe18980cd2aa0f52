# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Layer-by-layer compaction during the prefill (`kvpress.ragged_prefill`): the cache equals the one
`RaggedCache.from_cache` builds after the prefill (segments, offsets, values; logits and greedy tokens after), for
every head-wise press it serves, batch 2 with left padding and the pipeline; and the prefill never holds every
layer's dense cache (bytes measured after each layer, on CPU)."""

import gc
import logging
import weakref

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpress.ragged_cache as ragged_cache_module
import kvpress.ragged_prefill as ragged_prefill_module
from kvpress import (
    AdaKVPress,
    CriticalAdaKVPress,
    DecodingPress,
    DMSPress,
    ExpectedAttentionPress,
    KnormPress,
    KVPressTextGenerationPipeline,
    KVzipPress,
    RandomPress,
    SnapKVPress,
)
from kvpress.headwise_masks import clear_masks, get_masks, masks_as_bool
from kvpress.ragged_attention import set_ragged_backend
from kvpress.ragged_cache import RaggedCache, RaggedLayer
from kvpress.ragged_prefill import compacts_during_prefill, prefill_compaction_problem, ragged_prefill
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import HEAD_DIM, _common, attention_modules, get_model, load_tokenizer, random_input_ids
from tests.presses.test_headwise_matrix import FACTORIES, MockDuoAttentionPress

SPARE = 6


@pytest.fixture(autouse=True)
def _reference_backend():
    set_ragged_backend("reference")
    yield
    set_ragged_backend("auto")


def count_ragged_layers_built(monkeypatch) -> list:
    """Record every dense-to-ragged layer conversion: "prefill" (during the prefill, `ragged_prefill`) or "after"
    (`RaggedCache.from_cache`)."""
    built: list = []
    original = ragged_cache_module.ragged_layer_from

    def converter(route):
        def convert(*args, **kwargs):
            built.append(route)
            return original(*args, **kwargs)

        return convert

    monkeypatch.setattr(ragged_prefill_module, "ragged_layer_from", converter("prefill"))
    monkeypatch.setattr(ragged_cache_module, "ragged_layer_from", converter("after"))
    return built


# every head-wise press whose masks of a layer are written in that layer's forward hook
COMPACTED = {
    "adakv_snapkv": FACTORIES["adakv_snapkv"],
    "adakv_knorm": FACTORIES["adakv_knorm"],
    "adakv_expected_attention": lambda r, tmp: AdaKVPress(ExpectedAttentionPress(r, n_future_positions=8)),
    "critical_adakv": FACTORIES["critical_adakv"],
    "critical_adakv_expected_attention": lambda r, tmp: CriticalAdaKVPress(ExpectedAttentionPress(r)),
    "lukv": FACTORIES["lukv"],
    "duo_attention": lambda r, tmp: MockDuoAttentionPress(head_compression_ratio=r),
    "dms": lambda r, tmp: DMSPress(RandomPress(seed=0), threshold=r, sliding_window_size=4),
}


def _decode(model, cache, first, steps, attention_mask=None):
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


def _assert_same_layers(compacted: RaggedCache, reference: RaggedCache) -> None:
    assert len(compacted.layers) == len(reference.layers)
    for ours, theirs in zip(compacted.layers, reference.layers):
        assert type(ours) is type(theirs)
        if not isinstance(ours, RaggedLayer):  # a sliding-window layer, left dense on both routes
            assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
            continue
        for name in ("keys", "values", "positions", "offsets", "lengths", "capacities"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        assert ours.logical_length == theirs.logical_length


def _both_routes(model, press, ids, attention_mask=None):
    """The cache compacted during the prefill, and the one from_cache builds after the same prefill."""
    extra = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.no_grad(), press(model), ragged_prefill(model, SPARE) as compacted:
        model(ids, **cache_kwargs(model, compacted), **extra)
    assert all(type(layer) is not ragged_cache_module.DynamicLayer for layer in compacted.layers)
    RaggedCache.detach(model)
    dense = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, dense), **extra)
    reference = RaggedCache.from_cache(dense, model, extra_tokens=SPARE)
    RaggedCache.detach(model)
    return compacted, reference


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("name", sorted(COMPACTED))
def test_compacted_cache_is_the_one_from_cache_builds(arch, name, tmp_path):
    model = get_model(arch)
    ids = random_input_ids(2, 40)
    compacted, reference = _both_routes(model, COMPACTED[name](0.5, tmp_path), ids)
    assert sum(layer.used_rows() for layer in reference.ragged_layers()) < sum(
        layer.num_segments * layer.logical_length for layer in reference.ragged_layers()
    ), "the press kept everything: the test would prove nothing"
    _assert_same_layers(compacted, reference)
    question = random_input_ids(2, 3, seed=1)
    logits = []
    for cache in (compacted, reference):
        cache.attach(model)
        try:
            logits.append(_decode(model, cache, question, steps=4))
        finally:
            RaggedCache.detach(model)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))


@pytest.mark.parametrize("press", [AdaKVPress(SnapKVPress(0.5, window_size=2)), AdaKVPress(KnormPress(0.6))])
def test_batch_of_two_with_left_padding(press):
    model = get_model("llama", "eager")
    ids = random_input_ids(2, 30)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :7] = 0
    compacted, reference = _both_routes(model, press, ids, attention_mask)
    _assert_same_layers(compacted, reference)
    question = random_input_ids(2, 2, seed=3)
    logits = []
    for cache in (compacted, reference):
        cache.attach(model)
        try:
            logits.append(_decode(model, cache, question, steps=4, attention_mask=attention_mask))
        finally:
            RaggedCache.detach(model)
    assert torch.equal(logits[0], logits[1])
    # and the masking path gives the same tokens
    dense = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, attention_mask=attention_mask, **cache_kwargs(model, dense))
    masked = _decode(model, dense, question, steps=4, attention_mask=attention_mask)
    torch.testing.assert_close(logits[0], masked, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits[0].argmax(-1), masked.argmax(-1))


@pytest.mark.parametrize("name", ["adakv_expected_attention", "duo_attention", "dms", "lukv"])
def test_pipeline_compacts_during_the_prefill_and_answers_as_the_masking_path(name, tmp_path, monkeypatch):
    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(), device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 6
    questions = ["Who jumps?", "What is lazy?", "Which fox?"]
    built = count_ragged_layers_built(monkeypatch)
    ragged = pipe(
        context, questions=questions, press=COMPACTED[name](0.5, tmp_path), max_new_tokens=6, ragged_cache=True
    )
    assert built == ["prefill"] * pipe.model.config.num_hidden_layers  # one cache for the questions (rolled back)
    masked = pipe(context, questions=questions, press=COMPACTED[name](0.5, tmp_path), max_new_tokens=6)
    assert ragged == masked
    assert all(module.__dict__.get("_kvpress_ragged_layer") is None for module in attention_modules(pipe.model))


def test_presses_with_passes_of_their_own_convert_after_the_prefill(caplog):
    kvzip = KVzipPress(0.5, tokenizer=load_tokenizer())
    assert "context manager of its own" in prefill_compaction_problem(kvzip)
    assert "decoding state of its own" in prefill_compaction_problem(DecodingPress(AdaKVPress(KnormPress())))
    assert prefill_compaction_problem(AdaKVPress(SnapKVPress(0.5))) is None and prefill_compaction_problem(None) is None
    with pytest.raises(TypeError, match="BasePress or None"):
        prefill_compaction_problem("snapkv")
    with caplog.at_level(logging.INFO, logger="kvpress.ragged_cache"):
        assert not compacts_during_prefill(kvzip, None, None, 100)
        assert not compacts_during_prefill(AdaKVPress(KnormPress(0.5)), None, 32, 100)  # chunked
        assert not compacts_during_prefill(AdaKVPress(KnormPress(0.5)), None, None, 100, own_cache=False)
    assert "converting after the prefill" in caplog.text and "in chunks" in caplog.text
    assert compacts_during_prefill(AdaKVPress(KnormPress(0.5)), None, 128, 100)  # one chunk holds the context
    assert not compacts_during_prefill(KnormPress(cache_budget=8), KnormPress(cache_budget=8), None, 100)


def test_ragged_prefill_refuses_bad_arguments():
    model = get_model("llama")
    with pytest.raises(ValueError, match="extra_tokens"):
        with ragged_prefill(model, -1):
            pass
    with pytest.raises(TypeError, match="must be a RaggedCache"):
        with ragged_prefill(model, 2, DynamicCache()):
            pass
    with ragged_prefill(model, 2) as cache, torch.no_grad():
        model(random_input_ids(1, 8), **cache_kwargs(model, cache))
    try:
        with pytest.raises(ValueError, match="needs an empty cache"):
            with ragged_prefill(model, 2, cache):
                pass
    finally:
        RaggedCache.detach(model)


def _deep_model(n_layers: int = 6):
    config = LlamaConfig(**_common(head_dim=HEAD_DIM, num_hidden_layers=n_layers))
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def _held_bytes(cache, modules) -> tuple[int, int]:
    """(bytes held by the cache's dense layers, ragged storage with its metadata, and the head-wise masks recorded
    on the attention modules; the dense layers holding keys)."""
    held, dense_layers = 0, 0
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            tensors = [layer.keys, layer.values, layer.positions, layer.offsets, layer.lengths, layer.capacities]
            held += sum(t.numel() * t.element_size() for t in tensors)
        elif isinstance(getattr(layer, "keys", None), torch.Tensor):
            held += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
            dense_layers += 1
    for module in modules:
        masks = get_masks(module)
        held += sum(t.numel() * t.element_size() for t in masks) if masks is not None else 0
    return held, dense_layers


def _kept_per_layer(model, press, ids) -> list[int]:
    """The entries each layer keeps, from an ordinary prefill (the masks the press recorded), independently of the
    compaction under test."""
    dense = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, dense))
    modules = attention_modules(model)
    kept = [int((~masks_as_bool(m, tuple(dense.layers[i].keys.shape[:3]))).sum()) for i, m in enumerate(modules)]
    for module in modules:
        clear_masks(module)  # the measured prefill starts from modules without masks
    return kept


def _measure_prefill(model, press, ids, compact: bool):
    """Run the prefill, recording after each layer's attention (its dense KV written, before the press compresses
    it: the largest point of the layer) and at the start of each attention: the bytes held, the dense layers, and
    the bound: kept entries of the layers compacted so far (with their spare rows and metadata) + one layer's full
    KV + one layer's masks (three int64 per entry at most)."""
    modules = attention_modules(model)
    kept = _kept_per_layer(model, press, ids)
    bsz, seq_len = ids.shape
    segments = bsz * model.config.num_key_value_heads
    row = 2 * HEAD_DIM * 4  # a key and a value row, float32
    full_layer = segments * seq_len * row
    records = []
    cache = RaggedCache(config=model.config) if compact else DynamicCache(config=model.config)

    def bound() -> int:
        total = full_layer + segments * seq_len * 3 * 8
        for layer_idx, layer in enumerate(cache.layers):
            if isinstance(layer, RaggedLayer):
                rows = kept[layer_idx] + SPARE * segments
                total += rows * (row + 4) + 3 * (segments + 1) * 4
        return total

    def record(*_):
        records.append((*_held_bytes(cache, modules), bound()))

    with torch.no_grad(), press(model):
        handles = [m.register_forward_hook(record, prepend=True) for m in modules]  # before the press's hook
        handles += [m.register_forward_pre_hook(record) for m in modules]
        try:
            if compact:
                with ragged_prefill(model, SPARE, cache, keep_masks=False):
                    model(ids, **cache_kwargs(model, cache))
            else:
                model(ids, **cache_kwargs(model, cache))
        finally:
            for handle in handles:
                handle.remove()
            RaggedCache.detach(model)
    record()
    return records, full_layer


@pytest.mark.parametrize(
    "press", [AdaKVPress(SnapKVPress(0.8, window_size=2)), AdaKVPress(ExpectedAttentionPress(0.8))], ids=repr
)
def test_the_dense_caches_of_all_layers_never_coexist(press):
    model = _deep_model(6)
    ids = random_input_ids(2, 96)
    records, full_layer = _measure_prefill(model, press, ids, compact=True)
    assert len(records) == 2 * 6 + 1
    for held, dense_layers, limit in records:
        assert dense_layers <= 1
        assert held <= limit
    # at 0.8 the whole prefill held far less than the dense cache of every layer would
    assert max(held for held, _, _ in records) < 6 * full_layer / 2
    # the same measurement without compaction: every layer's KV (and masks) resident at the end, over the bound
    dense_records, _ = _measure_prefill(model, press, ids, compact=False)
    held, dense_layers, _ = dense_records[-1]
    assert dense_layers == 6 and held >= 6 * full_layer
    assert held > records[-1][2]


def test_masks_are_dropped_once_applied_unless_kept(tmp_path):
    model = get_model("llama")
    ids = random_input_ids(2, 40)
    press = AdaKVPress(SnapKVPress(0.5, window_size=2))
    caches = []
    for keep in (True, False):
        with torch.no_grad(), press(model), ragged_prefill(model, SPARE, keep_masks=keep) as cache:
            model(ids, **cache_kwargs(model, cache))
        RaggedCache.detach(model)
        caches.append(cache)
        assert all((get_masks(m) is not None) == keep for m in attention_modules(model))
    _assert_same_layers(caches[1], caches[0])
    with pytest.raises(TypeError, match="keep_masks"):
        with ragged_prefill(model, SPARE, keep_masks=1):
            pass


def test_dense_tensors_are_freed_before_the_next_layer_runs():
    model = _deep_model(4)
    modules = attention_modules(model)
    press = AdaKVPress(SnapKVPress(0.5, window_size=2))
    dense_keys: dict = {}
    alive_at_next_layer = []

    def remember(module, args, kwargs, output):
        layer = cache.layers[module.layer_idx]
        dense_keys[module.layer_idx] = (weakref.ref(layer.keys), weakref.ref(layer.values))

    def check_previous(module, args):
        previous = module.layer_idx - 1
        if previous in dense_keys:
            gc.collect()
            alive_at_next_layer.append(any(ref() is not None for ref in dense_keys[previous]))

    with torch.no_grad(), press(model), ragged_prefill(model, SPARE) as cache:
        handles = [m.register_forward_hook(remember, prepend=True, with_kwargs=True) for m in modules]
        handles += [m.register_forward_pre_hook(check_previous) for m in modules]
        try:
            model(random_input_ids(1, 64), **cache_kwargs(model, cache))
        finally:
            for handle in handles:
                handle.remove()
            RaggedCache.detach(model)
    assert alive_at_next_layer == [False, False, False]


@pytest.mark.parametrize("name", ["adakv_snapkv", "critical_adakv", "duo_attention"])
def test_generate_inside_ragged_prefill_gives_the_masking_path_tokens(name, tmp_path):
    """`model.generate` with the yielded cache: prefill compacted layer by layer, then decoding in place."""
    model = get_model("llama")
    ids = random_input_ids(2, 40)
    options = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad(), COMPACTED[name](0.5, tmp_path)(model):
        masked = model.generate(ids, **options)
    built = []
    with torch.no_grad(), COMPACTED[name](0.5, tmp_path)(model), ragged_prefill(model, 8, keep_masks=False) as cache:
        ragged = model.generate(ids, **cache_kwargs(model, cache), **options)
        built = [type(layer).__name__ for layer in cache.layers]
    RaggedCache.detach(model)
    assert built == ["RaggedLayer"] * model.config.num_hidden_layers
    assert cache.get_seq_length() == 40 + 5  # the context, then the new tokens appended in place (all but the last)
    assert torch.equal(ragged.sequences, masked.sequences)
    torch.testing.assert_close(torch.stack(ragged.scores), torch.stack(masked.scores), atol=1e-5, rtol=1e-5)
