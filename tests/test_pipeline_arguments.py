# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The pipeline's argument checks that upstream does not make (README, "Differences from upstream", the pipeline):
`questions=[]` and `max_new_tokens < 1` raise, unknown keyword arguments are logged (upstream ignores all three
silently), and a budget press answers several questions (upstream refuses them with a message about DecodingPress)."""

import logging

import numpy as np
import pytest

from kvpress import H2OPress, KnormPress, KVPressTextGenerationPipeline
from tests.fixtures import get_model, load_tokenizer

CONTEXT = "The quick brown fox jumps over the lazy dog. Seven geese fly north at dawn. " * 3


def make_pipeline() -> KVPressTextGenerationPipeline:
    return KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(False), device="cpu")


def test_an_empty_question_list_is_refused():
    # Upstream turns [] into [""] and answers a question nobody asked ({"answers": [one answer]}).
    with pytest.raises(ValueError, match="questions must be a non-empty list of strings"):
        make_pipeline()(CONTEXT, questions=[])


def test_a_question_list_given_as_one_string_is_refused():
    # Upstream would iterate the string's characters as questions.
    with pytest.raises(ValueError, match="questions must be a non-empty list of strings"):
        make_pipeline()(CONTEXT, questions="Who jumps?")


@pytest.mark.parametrize("max_new_tokens", [0, -1, 2.0, True])
def test_max_new_tokens_must_be_a_positive_integer(max_new_tokens):
    # Upstream generates one token for max_new_tokens=0 (the first token is always produced).
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        make_pipeline()(CONTEXT, question="Who?", max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("max_context_length", [0, -5, 1.5, True])
def test_max_context_length_must_be_a_positive_integer_or_none(max_context_length):
    with pytest.raises(ValueError, match="max_context_length must be a positive integer or None"):
        make_pipeline()(CONTEXT, question="Who?", max_context_length=max_context_length)


def test_unknown_keyword_arguments_are_logged_and_ignored(caplog):
    pipe = make_pipeline()
    expected = pipe(CONTEXT, question="Who?", max_new_tokens=4)["answer"]
    with caplog.at_level(logging.WARNING, logger="kvpress.pipeline"):
        answer = pipe(CONTEXT, question="Who?", max_new_tokens=4, temperature=0.7, num_beams=2)["answer"]
    assert answer == expected  # greedy decoding: the ignored arguments change nothing
    warnings = [record.getMessage() for record in caplog.records if record.name == "kvpress.pipeline"]
    assert warnings == [
        "Ignoring unknown arguments of the kv-press-text-generation pipeline: ['num_beams', 'temperature']"
    ]


@pytest.mark.parametrize("make_press", [lambda: H2OPress(cache_budget=40), lambda: KnormPress(cache_budget=40)])
def test_a_budget_press_answers_several_questions_each_from_the_compressed_context(make_press):
    """No "DecodingPress is not compatible with multiple questions" error for H2O or any budget press: each answer
    is the one the question gets alone."""
    pipe = make_pipeline()
    questions = ["Who jumps?", "How many geese?", "When do they fly?"]
    together = pipe(CONTEXT, questions=questions, press=make_press(), max_new_tokens=6)["answers"]
    alone = [pipe(CONTEXT, question=q, press=make_press(), max_new_tokens=6)["answer"] for q in questions]
    assert together == alone


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(question=3), "question must be a string, got int 3"),
        (dict(questions=["Who?", 3]), r"questions\[1\] must be a string, got int 3"),
        (dict(question="Who?", answer_prefix=5), "answer_prefix must be a string, got int 5"),
        (dict(question="Who?", enable_thinking="yes"), "enable_thinking must be True or False, got 'yes'"),
    ],
)
def test_texts_and_flags_of_the_wrong_type_are_refused(arguments, message):
    # Upstream fails inside string concatenation ("unsupported operand type(s) for +") or takes "yes" as True.
    with pytest.raises(TypeError, match=message):
        make_pipeline()(CONTEXT, **arguments)


def test_a_context_that_is_no_string_says_so():
    with pytest.raises(TypeError, match="The context must be a string, got int 3"):
        make_pipeline()(3, question="Who?")


def test_numpy_integers_are_token_counts():
    pipe = make_pipeline()
    expected = pipe(CONTEXT, question="Who?", max_new_tokens=3, max_context_length=40)["answer"]
    answer = pipe(CONTEXT, question="Who?", max_new_tokens=np.int64(3), max_context_length=np.int32(40))["answer"]
    assert answer == expected
