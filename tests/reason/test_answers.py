# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Extractors and scorers of reason/answers.py on hand-written model outputs."""

import pytest

from reason.answers import (
    answer_after_flag,
    boxed_contents,
    drop_scores,
    extract_answer,
    extract_boolean,
    extract_label,
    last_boxed,
    math_equal,
    normalize_math,
    parse_number,
    unwrap_text,
)


def test_boxed_nested_braces_and_multiple_boxes():
    text = r"First \boxed{3} then, correcting, \boxed{\frac{1}{\sqrt{2}}} is final."
    assert boxed_contents(text) == ["3", r"\frac{1}{\sqrt{2}}"]
    assert last_boxed(text) == r"\frac{1}{\sqrt{2}}"
    assert extract_answer(text) == r"\frac{1}{\sqrt{2}}"


def test_boxed_text_is_unwrapped():
    # the fork's unwrap raised NameError (no `re` import) and returned "\text{B}"
    assert extract_answer(r"So the answer is \boxed{\text{B}}.") == "B"
    assert unwrap_text(r"\textbf{\text{True}}") == "True"
    assert last_boxed(r"\boxed{ \text{(C) } }") == "(C)"


def test_box_without_braces_and_unclosed_box():
    assert boxed_contents(r"$\boxed 7$") == ["7"]
    assert boxed_contents(r"\boxed{12") == []
    assert extract_answer(r"\boxed{12") == ""


def test_answer_phrase_keeps_decimals():
    assert extract_answer("The answer is 42.") == "42"
    assert extract_answer("So the final answer is 3.5.") == "3.5"  # the fork cut at the first ".": "3"
    assert extract_answer("Reasoning...\nAnswer: $1,250$") == "1,250"
    assert answer_after_flag("nothing here") is None
    assert extract_answer("I cannot tell.") == ""
    assert extract_answer("  17 ") == "17"


def test_last_answer_phrase_wins():
    assert extract_answer("I first thought the answer is 4. Then I saw the answer is 5.") == "5"


@pytest.mark.parametrize(
    "prediction, gold",
    [
        (r"\dfrac{1}{2}", "0.5"),
        (r"\frac12", r"\frac{1}{2}"),
        ("1/2", r"\tfrac{1}{2}"),
        ("42.0", "42"),
        ("$1,000$", "1000"),
        (r"10\text{ inches}", "10 inches"),
        (r"90^\circ", "90"),
        (r"x = 5", "5"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        ("50\\%", "50"),
        ("024", "24"),
    ],
)
def test_math_equal(prediction, gold):
    assert math_equal(prediction, gold)


@pytest.mark.parametrize(
    "prediction, gold", [("0.49", r"\frac{1}{2}"), ("", "0"), (r"\frac{2}{3}", r"\frac{3}{2}"), ("7", "-7")]
)
def test_math_unequal(prediction, gold):
    assert not math_equal(prediction, gold)


def test_parse_number_and_normalize():
    assert parse_number(r"-\dfrac{3}{4}") == -0.75
    assert parse_number("abc") is None
    assert parse_number("1/0") is None
    assert normalize_math(r"$\dfrac{3}{4}$") == "0.75"
    assert normalize_math(r"\sqrt{2}") == r"\sqrt{2}"


@pytest.mark.parametrize(
    "response, label",
    [
        (r"... so \boxed{\text{B}}", "B"),
        (r"\boxed{(C) Paris}", "C"),
        ("The correct answer is D.", "D"),
        (r"\boxed{b}", "B"),
        ("E", "E"),
        (r"\boxed{F}", ""),
        ("I think it is none of these.", ""),
    ],
)
def test_extract_letter(response, label):
    assert extract_label(response, ("A", "B", "C", "D", "E")) == label


def test_extract_number_option():
    labels = ("1", "2", "3", "4")
    assert extract_label(r"Option 2 is right: \boxed{Option 3}", labels) == "3"
    assert extract_label(r"\boxed{2.}", labels) == "2"
    assert extract_label(r"\boxed{7}", labels) == ""


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"\boxed{\text{True}}", "true"),
        ("Therefore the answer is: False.", "false"),
        (r"\boxed{Uncertain}", "uncertain"),
        ("yes", "true"),
        (r"\boxed{No}", "false"),
        ("It is true that cats are false friends.", ""),
    ],
)
def test_extract_boolean(response, expected):
    assert extract_boolean(response, ("true", "false", "uncertain")) == expected


def test_boolean_refuses_uncertain_when_not_allowed():
    assert extract_boolean(r"\boxed{uncertain}", ("true", "false")) == ""


def test_drop_single_span_number_and_text():
    assert drop_scores("24", ["24"]) == {"exact_match": 1.0, "f1": 1.0}
    assert drop_scores("24.0 points", ["24"])["f1"] == pytest.approx(2 / 3)
    assert drop_scores("25", ["24"]) == {"exact_match": 0.0, "f1": 0.0}
    assert drop_scores("The Bears", ["bears"])["exact_match"] == 1.0
    # the fork's scorer compared the prediction with single characters of "['24']": "4" counted as right
    assert drop_scores("4", ["24"])["exact_match"] == 0.0


def test_drop_multi_span():
    assert drop_scores("France and Spain", ["France", "Spain"]) == {"exact_match": 1.0, "f1": 1.0}
    assert drop_scores("Spain, France", ["France", "Spain"])["exact_match"] == 1.0
    half = drop_scores("France", ["France", "Spain"])
    assert half["exact_match"] == 0.0 and half["f1"] == pytest.approx(0.5)
    extra = drop_scores("France, Spain, Italy", ["France", "Spain"])
    assert extra["exact_match"] == 0.0 and extra["f1"] == pytest.approx(2 / 3)
    # a single gold span with "and" in it is not split
    assert drop_scores("salt and pepper", ["salt and pepper"])["exact_match"] == 1.0


def test_extract_answer_type_check():
    with pytest.raises(TypeError):
        extract_answer(None)
