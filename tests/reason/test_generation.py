# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Prompt ids (chat template, middle cut) and the repeated-n-gram stop of reason/generation.py."""

import pytest
import torch

from reason.generation import RepeatedNGramStop, eos_token_ids, prompt_ids
from reason.shared import REFERENCE_MODEL_DIR

USER_TURNS = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
TEMPLATE = USER_TURNS + "{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)


def test_raw_prompt_without_template(tokenizer):
    assert tokenizer.chat_template is None
    raw = tokenizer("What is 2+2?", add_special_tokens=True)["input_ids"]
    assert prompt_ids(tokenizer, "What is 2+2?") == raw
    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(tokenizer, "What is 2+2?", chat_template=True)


def test_chat_template_is_applied_unless_disabled(tokenizer):
    tokenizer.chat_template = TEMPLATE
    templated = prompt_ids(tokenizer, "What is 2+2?")
    assert tokenizer.decode(templated) == "<|user|>What is 2+2?<|assistant|>"
    assert prompt_ids(tokenizer, "What is 2+2?", chat_template=True) == templated
    assert prompt_ids(tokenizer, "What is 2+2?", chat_template=False) == tokenizer("What is 2+2?")["input_ids"]
    with pytest.raises(ValueError, match="chat_template"):
        prompt_ids(tokenizer, "x", chat_template="yes")


def test_max_context_length_cuts_the_middle(tokenizer):
    full = prompt_ids(tokenizer, "alpha " * 30 + "Put the answer in a box.")
    cut = prompt_ids(tokenizer, "alpha " * 30 + "Put the answer in a box.", max_context_length=10)
    assert len(cut) == 10 and cut[:5] == full[:5] and cut[5:] == full[-5:]
    with pytest.raises(ValueError, match="max_context_length"):
        prompt_ids(tokenizer, "x", max_context_length=1)


def test_every_eos_id(tokenizer):
    class Model:
        class generation_config:
            eos_token_id = [7, tokenizer.eos_token_id]

    assert eos_token_ids(Model(), tokenizer) == [7, tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "tokens, stops",
    [
        ([1, 2] * 5, True),
        ([1, 2] * 4 + [1], False),
        ([9, 9, 9] + [4, 5, 6] * 5, True),
        ([7] * 9, False),
        ([7] * 10, True),
        (list(range(40)), False),
        ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 5, True),  # a 10-gram five times
        ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 8] * 5, False),  # an 11-gram is longer than the fork's n = 2..10
    ],
)
def test_repeated_ngram_stop(tokens, stops):
    criterion = RepeatedNGramStop(prompt_length=2)
    ids = torch.tensor([[0, 0] + tokens, [0, 0] + list(range(100, 100 + len(tokens)))])
    assert criterion(ids, None).tolist() == [stops, False]
    assert (0 in criterion.stopped) == stops
