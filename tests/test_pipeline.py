# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
import logging

import pytest
import torch
from transformers import DynamicCache, StaticCache, pipeline

from kvpress import KeyRerotationPress, KnormPress, KVPressTextGenerationPipeline, RandomPress, StreamingLLMPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import get_model, load_tokenizer, saved_model_dir

pytestmark = pytest.mark.core

CONTEXT = "The quick brown fox jumps over the lazy dog. " * 3


def make_pipeline(arch: str = "llama", chat: bool = False) -> KVPressTextGenerationPipeline:
    return KVPressTextGenerationPipeline(model=get_model(arch), tokenizer=load_tokenizer(chat), device="cpu")


def compressed_context_cache(pipe, context_ids, press):
    cache = DynamicCache()
    with press(pipe.model):
        pipe.model.model(input_ids=context_ids, **cache_kwargs(pipe.model.model, cache))
    return cache


def test_pipeline_loads_from_local_path_through_transformers_pipeline():
    pipe = pipeline("kv-press-text-generation", model=saved_model_dir("llama", True), device="cpu")
    assert isinstance(pipe, KVPressTextGenerationPipeline)
    out = pipe(CONTEXT, question="Who jumps?", press=KnormPress(0.5), max_new_tokens=4)
    assert isinstance(out["answer"], str)
    # The saved model is the same network as the in-memory one: same greedy answer.
    reference = make_pipeline(chat=True)(CONTEXT, question="Who jumps?", press=KnormPress(0.5), max_new_tokens=4)
    assert out["answer"] == reference["answer"]


@pytest.mark.parametrize("question", [None, "", "Who jumps?"])
def test_single_or_no_question_returns_a_string(question):
    out = make_pipeline()(CONTEXT, question=question, press=KnormPress(0.3), max_new_tokens=3)
    assert set(out) == {"answer"}
    assert isinstance(out["answer"], str)


def test_no_press_equals_ratio_zero():
    pipe = make_pipeline()
    plain = pipe(CONTEXT, question="Who?", max_new_tokens=6)["answer"]
    zero = pipe(CONTEXT, question="Who?", press=KnormPress(0.0), max_new_tokens=6)["answer"]
    assert plain == zero


def test_several_questions_equal_separate_calls_and_cache_is_rolled_back():
    pipe = make_pipeline()
    questions = ["Who jumps?", "What colour is the fox?", "Is the dog lazy?"]
    press = KnormPress(0.5)
    cache = DynamicCache()
    out = pipe(CONTEXT, questions=questions, press=press, max_new_tokens=5, cache=cache)
    assert set(out) == {"answers"} and len(out["answers"]) == 3
    separate = [pipe(CONTEXT, question=q, press=press, max_new_tokens=5)["answer"] for q in questions]
    assert out["answers"] == separate

    # After all answers, the cache holds exactly the compressed context again.
    context_ids = pipe.preprocess(CONTEXT, [""], "", 10_000)["context_ids"]
    reference = compressed_context_cache(pipe, context_ids, press)
    n_kept = int(context_ids.shape[1] * 0.5)
    for layer, ref_layer in zip(cache.layers, reference.layers):
        assert layer.keys.shape[2] == n_kept
        assert torch.equal(layer.keys, ref_layer.keys)
        assert torch.equal(layer.values, ref_layer.values)


def test_cache_is_identical_before_and_after_each_answer():
    pipe = make_pipeline()
    context_ids = pipe.preprocess(CONTEXT, [""], "", 10_000)["context_ids"]
    cache = compressed_context_cache(pipe, context_ids, KnormPress(0.25))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    lengths = [cache.get_seq_length(i) for i in range(len(cache.layers))]
    question_ids = pipe.tokenizer.encode("Who?\n", return_tensors="pt", add_special_tokens=False)

    from kvpress.utils import restore_cache, snapshot_cache

    snapshot = snapshot_cache(cache)
    pipe.generate_answer(question_ids, cache, context_ids.shape[1], max_new_tokens=8)
    assert cache.get_seq_length() > lengths[0]  # the answer was appended ...
    restore_cache(cache, snapshot)  # ... and removed again
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == lengths
    for layer, (keys, values) in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_preprocess_without_chat_template():
    pipe = make_pipeline(chat=False)
    inputs = pipe.preprocess("ctx", ["q1", "q2"], "A:", 10_000)
    tokenizer = pipe.tokenizer
    assert tokenizer.decode(inputs["context_ids"][0]) == "<s>ctx"
    assert [tokenizer.decode(ids[0]) for ids in inputs["questions_ids"]] == ["q1\nA:", "q2\nA:"]


def test_preprocess_with_chat_template_splits_around_the_context():
    pipe = make_pipeline(chat=True)
    inputs = pipe.preprocess("ctx", ["q1"], "A:", 10_000)
    tokenizer = pipe.tokenizer
    assert tokenizer.decode(inputs["context_ids"][0]) == "<s><|user|>ctx"
    assert tokenizer.decode(inputs["questions_ids"][0][0]) == "q1<|end|><|assistant|>A:"


def test_answer_prefix_is_appended_after_the_question_suffix():
    pipe = make_pipeline()
    press = KnormPress(0.5)
    with_prefix = pipe(CONTEXT, question="Who?", answer_prefix="Answer: the", press=press, max_new_tokens=4)["answer"]
    # Reference: prefill the compressed context, then answer the literal text "Who?" + "\n" + "Answer: the".
    context_ids = pipe.preprocess(CONTEXT, [""], "", 10_000)["context_ids"]
    cache = compressed_context_cache(pipe, context_ids, press)
    question_ids = pipe.tokenizer.encode("Who?\nAnswer: the", return_tensors="pt", add_special_tokens=False)
    assert with_prefix == pipe.generate_answer(question_ids, cache, context_ids.shape[1], 4)


def test_truncation_warns_and_keeps_the_first_tokens(caplog):
    pipe = make_pipeline()
    cache = DynamicCache()
    with caplog.at_level(logging.WARNING, logger="kvpress.pipeline"):
        pipe(CONTEXT, question="Who?", max_context_length=10, max_new_tokens=2, cache=cache)
    full_length = pipe.preprocess(CONTEXT, [""], "", 10_000)["context_ids"].shape[1]
    assert f"Context length has been truncated from {full_length} to 10 tokens." in caplog.text
    assert cache.get_seq_length() == 10


def test_debug_logs_report_context_and_compressed_lengths(caplog):
    pipe = make_pipeline()
    n = pipe.preprocess(CONTEXT, [""], "", 10_000)["context_ids"].shape[1]
    with caplog.at_level(logging.DEBUG, logger="kvpress.pipeline"):
        pipe(CONTEXT, question="Who?", press=KnormPress(0.4), max_new_tokens=2)
    assert f"Context Length: {n}" in caplog.text
    assert f"Compressed Context Length: {int(n * 0.6)}" in caplog.text


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen3", "gemma3_text", "gemma3"])
def test_pipeline_runs_on_every_architecture(arch):
    pipe = make_pipeline(arch, chat=True)
    out = pipe(CONTEXT, questions=["Who?", "Why?"], press=RandomPress(0.5, seed=0), max_new_tokens=3)
    assert len(out["answers"]) == 2


def test_key_rerotation_continues_at_the_compressed_length(monkeypatch):
    pipe = make_pipeline()
    seen = []
    original = KVPressTextGenerationPipeline.generate_answer

    def spy(self, question_ids, cache, context_length, max_new_tokens):
        seen.append((context_length, cache.get_seq_length()))
        return original(self, question_ids, cache, context_length, max_new_tokens)

    monkeypatch.setattr(KVPressTextGenerationPipeline, "generate_answer", spy)
    pipe(CONTEXT, question="Who?", press=KeyRerotationPress(StreamingLLMPress(0.5)), max_new_tokens=2)
    pipe(CONTEXT, question="Who?", press=StreamingLLMPress(0.5), max_new_tokens=2)
    n = pipe.preprocess(CONTEXT, [""], "", 10_000)["context_ids"].shape[1]
    (rerotated_position, rerotated_cache), (plain_position, plain_cache) = seen
    assert rerotated_cache == plain_cache == int(n * 0.5)
    assert rerotated_position == int(n * 0.5)  # re-rotated keys: positions restart after the kept tokens
    assert plain_position == n  # other presses keep logical positions


def test_generation_stops_at_eos():
    pipe = make_pipeline()
    model = pipe.model
    # Report generated ids instead of text, so the test compares token ids exactly.
    pipe.tokenizer.decode = lambda ids, **kwargs: [int(i) for i in ids]
    question_ids = pipe.tokenizer.encode("Who?\n", return_tensors="pt", add_special_tokens=False)
    context_ids = pipe.preprocess(CONTEXT, [""], "", 10_000)["context_ids"]

    def answer(max_new_tokens):
        cache = DynamicCache()
        model.model(input_ids=context_ids, **cache_kwargs(model.model, cache))
        return pipe.generate_answer(question_ids, cache, context_ids.shape[1], max_new_tokens)

    first_tokens = answer(6)
    assert len(first_tokens) == 6
    original_eos = model.generation_config.eos_token_id
    try:
        # Declare the third generated token an EOS token: decoding must stop right after it.
        model.generation_config.eos_token_id = [first_tokens[2]]
        stopped = answer(20)
    finally:
        model.generation_config.eos_token_id = original_eos
    assert stopped == first_tokens[: first_tokens.index(first_tokens[2], 1) + 1]


def test_bad_pipeline_input_gives_clear_errors():
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="context is empty"):
        pipe("", question="Who?")
    with pytest.raises(ValueError, match="Either question or questions"):
        pipe(CONTEXT, question="a", questions=["b"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe(CONTEXT, question="a", max_new_tokens=0)
    with pytest.raises(TypeError, match="DynamicCache or a QuantizedCache"):
        pipe(CONTEXT, question="a", cache=StaticCache(config=pipe.model.config, max_cache_len=64))
    with pytest.raises(TypeError, match="BasePress"):
        pipe(CONTEXT, question="a", press="knorm")


def test_enable_thinking_is_passed_to_the_chat_template():
    pipe = make_pipeline(chat=True)
    pipe.tokenizer.chat_template = (
        "{{ bos_token }}{% for message in messages %}<|user|>{{ message['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% if not enable_thinking %}<think></think>{% endif %}{% endif %}"
    )
    thinking = pipe.preprocess("ctx", ["q"], "", 10_000, enable_thinking=True)["questions_ids"][0]
    no_thinking = pipe.preprocess("ctx", ["q"], "", 10_000, enable_thinking=False)["questions_ids"][0]
    assert pipe.tokenizer.decode(thinking[0]) == "q<|end|><|assistant|>"
    assert pipe.tokenizer.decode(no_thinking[0]) == "q<|end|><|assistant|><think></think>"
    out = pipe(CONTEXT, question="Who?", enable_thinking=True, max_new_tokens=2)
    assert isinstance(out["answer"], str)


def test_several_questions_with_a_decoding_press_each_see_the_compressed_context():
    from kvpress.presses.composed_press import ComposedPress
    from kvpress.presses.snapkv_press import SnapKVPress

    pipe = make_pipeline()
    for make in (lambda: KnormPress(cache_budget=8), lambda: ComposedPress([KnormPress(cache_budget=8)])):
        together = pipe(CONTEXT, questions=["Who?", "Why?"], press=make(), max_new_tokens=4)["answers"]
        separate = [pipe(CONTEXT, question=q, press=make(), max_new_tokens=4)["answer"] for q in ("Who?", "Why?")]
        assert together == separate
    # one question, or none, is fine
    assert isinstance(pipe(CONTEXT, question="Who?", press=KnormPress(cache_budget=8), max_new_tokens=2)["answer"], str)
    assert isinstance(pipe(CONTEXT, press=SnapKVPress(cache_budget=8, window_size=2), max_new_tokens=2)["answer"], str)
    # a list with a single question too
    assert len(pipe(CONTEXT, questions=["Who?"], press=KnormPress(cache_budget=8), max_new_tokens=2)["answers"]) == 1
