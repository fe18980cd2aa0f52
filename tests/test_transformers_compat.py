# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Every press works on every tested transformers release and never fails silently.

The canaries fail when a compressing press leaves the cache at full length, through `generate` and through the
pipeline, on every architecture; the bypass tests show that a cache the adapter cannot find raises instead."""

import warnings

import pytest
import torch
from transformers import DynamicCache

import kvpress.presses.base_press as base_press
from kvpress import CannotCompressError, H2OPress, KnormPress, KVPressTextGenerationPipeline, SnapKVPress
from kvpress import transformers_adapter as adapter
from kvpress.transformers_adapter import cache_keyword, cache_kwargs, find_cache, output_cache
from kvpress.utils import cache_layer_length
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, load_tokenizer, random_input_ids

pytestmark = pytest.mark.core

CONTEXT = "The quick brown fox jumps over the lazy dog. " * 3


def make_pipeline(arch: str = "llama") -> KVPressTextGenerationPipeline:
    return KVPressTextGenerationPipeline(model=get_model(arch), tokenizer=load_tokenizer(False), device="cpu")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_canary_generate_compresses(arch):
    """KnormPress(0.5) through `model.generate`: every compressed layer holds half the prompt plus the new tokens."""
    model = get_model(arch)
    prompt, new_tokens = 40, 5
    with torch.no_grad(), KnormPress(0.5)(model):
        out = model.generate(
            random_input_ids(1, prompt, seed=1),
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
    cache = output_cache(out)
    assert cache is not None
    for layer_idx in compressed_layers(model):
        # the last generated token is never fed back, hence new_tokens - 1
        assert cache_layer_length(cache, layer_idx) == prompt // 2 + new_tokens - 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_canary_pipeline_compresses(arch):
    """Through the pipeline, with the cache the user passes: it holds the compressed context afterwards."""
    pipe = make_pipeline(arch)
    n_context = pipe.preprocess(CONTEXT, [""], "", 10_000)["context_ids"].shape[1]
    cache = DynamicCache(config=pipe.model.config)
    pipe(CONTEXT, question="Who?", press=KnormPress(0.5), max_new_tokens=3, cache=cache)
    for layer_idx in compressed_layers(pipe.model):
        assert cache_layer_length(cache, layer_idx) == int(n_context * 0.5)


def installed_keyword() -> str:
    """The keyword under which the installed transformers hands the cache to attention layers."""
    model = get_model("llama")
    seen = {}
    handle = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(random_input_ids(1, 4), use_cache=True)
    finally:
        handle.remove()
    return next(name for name in adapter.CACHE_KEYWORDS if seen.get(name) is not None)


def test_the_adapter_knows_the_installed_keyword():
    assert installed_keyword() == adapter.default_cache_keyword() == cache_keyword(get_model("llama"))
    assert cache_keyword(get_model("llama").model) == adapter.default_cache_keyword()


def test_an_unknown_cache_keyword_raises(monkeypatch):
    """If transformers renames the keyword again, the press raises instead of compressing nothing."""
    keyword = installed_keyword()
    monkeypatch.setattr(adapter, "CACHE_KEYWORDS", tuple(name for name in adapter.CACHE_KEYWORDS if name != keyword))
    model = get_model("llama")
    with pytest.raises(CannotCompressError, match=f"keyword '{keyword}'.*tested with transformers"):
        with torch.no_grad(), KnormPress(0.5)(model):
            model.generate(random_input_ids(1, 20), max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_cache_the_hooks_cannot_find_raises(monkeypatch, arch):
    """A forward whose model returned a cache while the hooks saw none (the 5.24 failure) raises, naming the
    transformers version and what the layer received; through generate and through the pipeline."""
    monkeypatch.setattr(base_press, "find_cache", lambda kwargs: None)
    model = get_model(arch)
    with pytest.raises(CannotCompressError, match="did not compress anything.*received the keywords"):
        with torch.no_grad(), KnormPress(0.5)(model):
            model.generate(random_input_ids(1, 20), max_new_tokens=2, do_sample=False)
    with pytest.raises(CannotCompressError, match=f"installed: {adapter.installed_transformers()}"):
        make_pipeline(arch)(CONTEXT, question="Who?", press=KnormPress(0.5), max_new_tokens=2)


def test_no_cache_is_not_an_error():
    """A forward without a cache (use_cache=False) has nothing to compress: it runs, as upstream."""
    model = get_model("llama")
    ids = random_input_ids(1, 12)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        with KnormPress(0.5)(model):
            out = model(ids, use_cache=False)
    assert output_cache(out) is None
    torch.testing.assert_close(out.logits, reference)


def test_a_static_cache_is_refused():
    model = get_model("llama")
    with pytest.raises(CannotCompressError, match="StaticLayer keeps a fixed length.*DynamicCache"):
        with torch.no_grad(), KnormPress(0.5)(model):
            model.generate(random_input_ids(1, 20), max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_no_future_warning_from_the_pipeline_or_generate():
    """`python -W error::FutureWarning` runs of the pipeline and of `with press(model): model.generate(...)`."""
    model = get_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        make_pipeline()(CONTEXT, questions=["Who?", "Why?"], press=KnormPress(0.5), max_new_tokens=3)
        make_pipeline()(CONTEXT, question="Who?", press=H2OPress(cache_budget=12), max_new_tokens=3)
        with torch.no_grad(), KnormPress(0.5)(model):
            model.generate(random_input_ids(1, 20), max_new_tokens=3, do_sample=False)
        with torch.no_grad():
            model(random_input_ids(1, 8), **cache_kwargs(model, DynamicCache(config=model.config)))


def test_find_cache_reads_every_name():
    cache = DynamicCache()
    for name in adapter.CACHE_KEYWORDS:
        assert find_cache({name: cache}) is cache
    assert find_cache({"hidden_states": torch.zeros(1)}) is None
    with pytest.raises(CannotCompressError, match="keyword 'kv_cache'"):
        find_cache({"kv_cache": cache})


def test_replace_inputs_writes_the_cache_where_the_forward_reads_it():
    """Under the keyword the forward used; with no cache in its kwargs, under the installed release's keyword (a cache
    written under a name the forward does not read would be swallowed by its **kwargs: nothing compressed)."""
    old, new = DynamicCache(), DynamicCache()
    for name in adapter.CACHE_KEYWORDS:
        updated = adapter.replace_inputs({name: old, "position_ids": None}, cache=new)
        assert updated[name] is new and find_cache(updated) is new
    updated = adapter.replace_inputs({"position_ids": None}, cache=new)
    assert list(updated) == ["position_ids", adapter.default_cache_keyword()]
    assert adapter.default_cache_keyword() == cache_keyword(get_model("llama"))


def test_context_as_a_keyword():
    """`pipe(context=..., question=..., press=...)`, as upstream's docstring and user scripts call it."""
    pipe = make_pipeline()
    positional = pipe(CONTEXT, question="Who?", press=KnormPress(0.5), max_new_tokens=4)
    keyword = pipe(context=CONTEXT, question="Who?", press=KnormPress(0.5), max_new_tokens=4)
    assert keyword == positional
    with pytest.raises(ValueError, match="Pass the context once"):
        pipe(CONTEXT, context=CONTEXT, question="Who?")
    with pytest.raises(ValueError, match="needs a context"):
        pipe(question="Who?")


DECODING_PRESSES = {
    "knorm_budget": lambda: KnormPress(cache_budget=12),
    "h2o_budget": lambda: H2OPress(cache_budget=12),
    "snapkv_budget": lambda: SnapKVPress(cache_budget=12, window_size=4),
}


@pytest.mark.parametrize("name", sorted(DECODING_PRESSES))
def test_decoding_press_leaves_the_users_cache_as_decoding_compressed_it(name):
    """After `pipe(context, question=q, press=<decoding press>, cache=cache)` the cache shows what decoding left: the
    last step's cache (within the budget), not the context. The same greedy loop by hand gives the same cache."""
    pipe = make_pipeline()
    press = DECODING_PRESSES[name]()
    cache = DynamicCache(config=pipe.model.config)
    answer = pipe(CONTEXT, question="Who?", press=press, max_new_tokens=6, cache=cache)["answer"]
    limit = 12 + press.budget_buffer
    lengths = [cache_layer_length(cache, i) for i in range(len(cache.layers))]
    assert all(0 < length <= limit for length in lengths)

    # by hand: prefill, question and greedy steps inside the press, at logical positions
    tensors = pipe.preprocess(CONTEXT, ["Who?"], "", 10_000)
    reference = DynamicCache(config=pipe.model.config)
    model = pipe.model
    press = DECODING_PRESSES[name]()
    with torch.no_grad():
        with press(model):
            model.model(input_ids=tensors["context_ids"], **cache_kwargs(model.model, reference))
        n = tensors["context_ids"].shape[1]
        question = tensors["questions_ids"][0]
        with press(model):
            positions = torch.arange(n, n + question.shape[1])[None]
            logits = model(input_ids=question, position_ids=positions, **cache_kwargs(model, reference)).logits
            tokens = [logits[0, -1].argmax()]
            for step in range(5):
                position = torch.tensor([[n + question.shape[1] + step]])
                logits = model(
                    input_ids=tokens[-1].view(1, 1), position_ids=position, **cache_kwargs(model, reference)
                ).logits
                tokens.append(logits[0, -1].argmax())
    assert pipe.tokenizer.decode(torch.stack(tokens), skip_special_tokens=True) == answer
    # the pipeline decodes in place (attention over its buffers): the same entries, equal up to float rounding
    for layer, ref_layer in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(DECODING_PRESSES))
def test_several_questions_with_a_decoding_press(name):
    """Each question is answered from the compressed context (cache and press state rolled back in between)."""
    pipe = make_pipeline()
    questions = ["Who jumps?", "What colour is the fox?", "Is the dog lazy?"]
    together = pipe(CONTEXT, questions=questions, press=DECODING_PRESSES[name](), max_new_tokens=6)["answers"]
    separate = [
        pipe(CONTEXT, question=q, press=DECODING_PRESSES[name](), max_new_tokens=6)["answer"] for q in questions
    ]
    assert together == separate
    # the same press object reused across the questions and calls gives the same answers too
    press = DECODING_PRESSES[name]()
    assert pipe(CONTEXT, questions=questions, press=press, max_new_tokens=6)["answers"] == separate
    assert pipe(CONTEXT, questions=questions, press=press, max_new_tokens=6)["answers"] == separate
