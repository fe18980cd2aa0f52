# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The in-place decoding cache gives the answers and logits of the copying loop, for every press family, on layers of
different lengths, across questions; it never grows, and presses that evict compact it in place."""

import functools

import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    AdaKVPress,
    CannotCompressError,
    DecodingPress,
    H2OPress,
    KeyRerotationPress,
    KnormPress,
    KVPressTextGenerationPipeline,
    KVzipPress,
    PyramidKVPress,
    RKVPress,
    SnapKVPress,
    StreamingLLMPress,
)
from kvpress.inplace_cache import InPlaceCache, bucketed_capacity, can_decode_in_place
from kvpress.transformers_adapter import cache_kwargs
from kvpress.utils import extract_keys_and_values, write_keys_and_values
from tests.fixtures import get_model, load_tokenizer, prefill, random_input_ids

pytestmark = pytest.mark.core

CONTEXT = "The quick brown fox jumps over the lazy dog. " * 4
QUESTIONS = ["Who jumps?", "What colour is the fox?", "Is the dog lazy?"]

PRESSES = {
    "none": lambda: None,
    "knorm": lambda: KnormPress(0.5),
    "streaming_llm": lambda: StreamingLLMPress(0.6, n_sink=2),
    "pyramidkv": lambda: PyramidKVPress(0.5, window_size=4),  # layers of different lengths
    "adakv_snapkv": lambda: AdaKVPress(SnapKVPress(0.5, window_size=4)),  # head-wise masks
    "rerotation": lambda: KeyRerotationPress(KnormPress(0.5)),
}


def make_pipeline(arch: str = "llama", attn_implementation: str = "sdpa") -> KVPressTextGenerationPipeline:
    model = get_model(arch, attn_implementation)
    return KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(False), device="cpu")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(PRESSES))
def test_same_answers_as_the_copying_loop(name, attn_implementation):
    pipe = make_pipeline("llama", attn_implementation)
    answers = {}
    caches = {}
    for inplace in (True, False):
        cache = DynamicCache(config=pipe.model.config)
        answers[inplace] = pipe(
            CONTEXT, questions=QUESTIONS, press=PRESSES[name](), max_new_tokens=8, cache=cache, inplace_decoding=inplace
        )["answers"]
        caches[inplace] = cache
    assert answers[True] == answers[False]
    # the user's cache holds the compressed context either way
    for layer, ref_layer in zip(caches[True].layers, caches[False].layers):
        assert torch.equal(layer.keys, ref_layer.keys)


@pytest.mark.parametrize("name", ["none", "knorm", "pyramidkv"])
def test_logits_equal_the_copying_loop(name):
    """Step by step, the in-place cache's logits equal the dynamic cache's (float32, CPU)."""
    model = get_model("llama")
    ids = random_input_ids(1, 48, seed=3)
    press = PRESSES[name]()
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad(), press(model) if press is not None else torch.no_grad():
        model(ids, **cache_kwargs(model, dynamic))
    inplace = InPlaceCache.from_cache(dynamic, extra_tokens=8, bucket=16, model=model)
    assert inplace.lengths() == [layer.keys.shape[2] for layer in dynamic.layers]
    buffers = [layer.keys.data_ptr() for layer in inplace.layers]
    try:
        token = torch.tensor([[7]])
        for step in range(6):
            position = torch.tensor([[48 + step]])
            with torch.no_grad():
                expected = model(input_ids=token, position_ids=position, **cache_kwargs(model, dynamic)).logits
                got = model(input_ids=token, position_ids=position, **cache_kwargs(model, inplace)).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            token = expected[:, -1:].argmax(-1)
    finally:
        InPlaceCache.detach(model)
    # written in place: same buffers, lengths advanced per layer
    assert [layer.keys.data_ptr() for layer in inplace.layers] == buffers
    assert inplace.lengths() == [layer.keys.shape[2] for layer in dynamic.layers]


def test_capacity_is_bucketed_and_never_exceeded():
    assert bucketed_capacity(1, 1024) == 1024 and bucketed_capacity(1025, 1024) == 2048
    with pytest.raises(ValueError, match="bucket must be a positive"):
        bucketed_capacity(10, 0)
    model = get_model("llama")
    cache = prefill(model, random_input_ids(1, 10))
    inplace = InPlaceCache.from_cache(cache, extra_tokens=2, bucket=12, model=model)
    try:
        assert [layer.capacity for layer in inplace.layers] == [12, 12]
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6]]), **cache_kwargs(model, inplace))
            with pytest.raises(CannotCompressError, match="holds 12 tokens per layer.*bring it to 13"):
                model(input_ids=torch.tensor([[5]]), **cache_kwargs(model, inplace))
    finally:
        InPlaceCache.detach(model)


def test_presses_compact_an_inplace_layer_in_place():
    """A press writing kept entries into an in-place layer (decoding-time eviction) compacts it into the start of its
    own buffers: same storage, the kept entries, the new length; more than the capacity is refused."""
    model = get_model("llama")
    cache = prefill(model, random_input_ids(1, 10))
    inplace = InPlaceCache.from_cache(cache, extra_tokens=4, bucket=16)
    layer = inplace.layers[0]
    pointer = layer.keys.data_ptr()
    kept = torch.tensor([0, 3, 4, 9])
    keys, values = extract_keys_and_values(inplace, 0)
    assert keys.shape[2] == 10 and torch.equal(keys, cache.layers[0].keys)
    write_keys_and_values(inplace, 0, keys[:, :, kept], values[:, :, kept])
    assert layer.keys.data_ptr() == pointer and layer.length == 4 and int(layer.position) == 4
    assert torch.equal(layer.valid_keys, cache.layers[0].keys[:, :, kept])
    assert torch.equal(layer.valid_values, cache.layers[0].values[:, :, kept])
    # a prefix view of the buffers themselves is copied safely
    write_keys_and_values(inplace, 0, layer.valid_keys[:, :, 1:], layer.valid_values[:, :, 1:])
    assert torch.equal(layer.valid_keys, cache.layers[0].keys[:, :, kept[1:]])
    too_many = torch.zeros(1, layer.keys.shape[1], 17, layer.keys.shape[-1])
    with pytest.raises(CannotCompressError, match="holds 16 tokens per layer; a press wrote 17"):
        write_keys_and_values(inplace, 0, too_many, too_many)
    with pytest.raises(ValueError, match="do not fit this in-place layer"):
        write_keys_and_values(inplace, 0, too_many[:, :1, :3], too_many[:, :1, :3])


def test_where_the_inplace_path_applies():
    model = get_model("llama")
    cache = DynamicCache(config=model.config)
    assert not can_decode_in_place(model, cache)  # empty
    with torch.no_grad():
        model(random_input_ids(1, 10), **cache_kwargs(model, cache))
    assert can_decode_in_place(model, cache)
    gemma = get_model("gemma3_text")
    gemma_cache = DynamicCache(config=gemma.config)
    with torch.no_grad():
        gemma(random_input_ids(1, 10), **cache_kwargs(gemma, gemma_cache))
    assert not can_decode_in_place(gemma, gemma_cache)  # sliding-window layers keep the dynamic cache
    with pytest.raises(TypeError, match="inplace_decoding must be True or False"):
        make_pipeline()(CONTEXT, question="Who?", inplace_decoding="yes")


REFERENCE_PRESSES = {
    "none": lambda: None,
    "scorer": lambda: KnormPress(0.5),
    "wrapper_headwise": lambda: AdaKVPress(SnapKVPress(0.5)),
    "uneven_layers": lambda: PyramidKVPress(0.5),
    "rerotation": lambda: KeyRerotationPress(StreamingLLMPress(0.5)),
    "repeat_pass_headwise": lambda: KVzipPress(0.5),
    "decoding_budget": lambda: KnormPress(cache_budget=256),  # keeps the copying loop: same call either way
}


@pytest.mark.parametrize("family", sorted(REFERENCE_PRESSES))
def test_reference_model_greedy_tokens_equal_the_copying_loop(family):
    """On the shipped reference model, with a task it solves, the in-place loop answers token for token as the
    copying loop, for one press of each family."""
    from harness.reference_model import REFERENCE_MODEL_DIR
    from harness.synthetic.tasks import generate_rows

    pipe = reference_pipeline(str(REFERENCE_MODEL_DIR))
    rows = generate_rows("niah_single_noise", 2, 512, pipe.tokenizer, seed=5) + generate_rows(
        "variable_tracking", 1, 512, pipe.tokenizer, seed=5
    )
    for row in rows:
        answers = [
            pipe(
                row["context"],
                question=row["question"],
                answer_prefix=row.get("answer_prefix", ""),
                press=REFERENCE_PRESSES[family](),
                max_new_tokens=16,
                inplace_decoding=inplace,
            )["answer"]
            for inplace in (True, False)
        ]
        assert answers[0] == answers[1]


@functools.lru_cache(maxsize=None)
def reference_pipeline(path: str):
    from transformers import pipeline

    return pipeline("kv-press-text-generation", model=path, device="cpu")


DECODING_PRESSES = {
    "knorm_budget": lambda: KnormPress(cache_budget=24),
    "streaming_budget": lambda: StreamingLLMPress(cache_budget=24, n_sink=2),
    "h2o": lambda: H2OPress(cache_budget=24),
    "rkv": lambda: RKVPress(cache_budget=24, compress_interval=4),
    "decoding_knorm": lambda: DecodingPress(base_press=KnormPress(), compression_interval=4, target_size=24),
    "decoding_adakv": lambda: DecodingPress(
        base_press=AdaKVPress(SnapKVPress(window_size=4)), compression_interval=4, target_size=24
    ),
}


@pytest.mark.parametrize("name", sorted(DECODING_PRESSES))
def test_decoding_presses_evict_inside_the_buffers(name):
    """A press acting during decoding evicts inside the in-place buffers: the same greedy tokens as the copying loop,
    the same buffers throughout (no new allocation), and the layer length held at the budget."""
    from kvpress import greedy_generate

    model = get_model("llama")
    ids = random_input_ids(1, 40, seed=1)
    make = DECODING_PRESSES[name]
    copying = greedy_generate(model, ids, make(), max_new_tokens=20, inplace=False)
    assert torch.equal(greedy_generate(model, ids, make(), max_new_tokens=20, inplace=True), copying)

    press = make()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        logits = model(ids, **cache_kwargs(model, cache)).logits
    inplace = InPlaceCache.from_cache(cache, extra_tokens=24, bucket=64, model=model)
    buffers = [layer.keys.data_ptr() for layer in inplace.layers]
    token, longest = logits[:, -1:].argmax(-1), 0
    try:
        with torch.no_grad(), press(model):
            for step in range(19):
                position = torch.tensor([[40 + step]])
                logits = model(input_ids=token, position_ids=position, **cache_kwargs(model, inplace)).logits
                token = logits[:, -1:].argmax(-1)
                longest = max(longest, *inplace.lengths())
    finally:
        InPlaceCache.detach(model)
    assert [layer.keys.data_ptr() for layer in inplace.layers] == buffers
    if name == "decoding_adakv":
        # head-wise: entries are masked per head, not evicted, so the layer keeps every token (the ragged cache
        # is what frees them)
        assert longest == 40 + 19
    else:
        assert longest <= 24 + 4  # the budget, plus at most one compression interval between evictions
    assert torch.equal(torch.cat([ids, token], dim=1)[:, -1], copying[:, 40 + 19])


@pytest.mark.parametrize("name", ["knorm_budget", "decoding_knorm"])
def test_pipeline_decoding_press_in_place_answers_equal_the_copying_loop(name):
    pipe = make_pipeline()
    answers, caches = {}, {}
    for inplace in (True, False):
        cache = DynamicCache(config=pipe.model.config)
        press = DECODING_PRESSES[name]()
        answers[inplace] = pipe(
            CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=8, cache=cache, inplace_decoding=inplace
        )["answers"]
        caches[inplace] = cache
    assert answers[True] == answers[False]
    # the user's cache is left as decoding compressed it after the last question, either way (the keys of the
    # generated tokens come from attention computed over the buffers, equal up to float rounding)
    for layer, ref_layer in zip(caches[True].layers, caches[False].layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-5)
