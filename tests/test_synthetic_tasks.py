# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Synthetic long-context tasks (RULER-style, https://arxiv.org/abs/2404.06654): determinism, sizes, answers that are
really in the context (recomputed by an independent parser), needle depths, the metric and the dataset CLI."""

from __future__ import annotations

import json
import re
from collections import Counter

import pandas as pd
import pytest

from evaluation.benchmarks.synthetic import create_dataset
from evaluation.benchmarks.synthetic.calculate_metrics import calculate_metrics, row_score
from harness.reference_model import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from harness.synthetic.tasks import (
    SWEEP_TASK,
    TASK_NAMES,
    build_row,
    generate_rows,
    load_reference_tokenizer,
    needle_sweep_rows,
)
from tests.fixtures import load_tokenizer

COLUMNS = {"context", "question", "answer_prefix", "answer", "max_new_tokens", "task"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_reference_tokenizer()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


# --- an independent reading of each task's context ---------------------------------------------------------------


def expected_answer(row: dict) -> list[str]:
    """Recompute the answer of a row from its context and question only."""
    task, context, question = row["task"], row["context"], row["question"]
    if task.startswith("niah") or task == SWEEP_TASK:
        needles = re.findall(r"One special magic (?:number|uuid) for ([a-z]+-[a-z]+) is: ([0-9a-f-]+)\.", context)
        values: dict[str, list[str]] = {}
        for key, value in needles:
            values.setdefault(key, []).append(value)
        asked = re.search(r"for (.+) mentioned in the text above\?$", question).group(1)
        keys = re.split(r", | and ", asked)
        return [value for key in keys for value in values[key]]
    if task == "variable_tracking":
        assignments = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", context)
        value = re.search(r"assigned the value (\d+)", question).group(1)
        resolved: dict[str, str] = {}
        for name, source in assignments:  # in text order: a variable is assigned after its source
            resolved[name] = resolved[source[4:]] if source.startswith("VAR ") else source
        return [name for name, _ in assignments if resolved[name] == value]
    if task == "common_words":
        items = re.findall(r"(\d+)\. ([a-z]+)", context.split("\n", 1)[1])
        assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
        counts = Counter(word for _, word in items).most_common()
        assert counts[9][1] > counts[10][1], "the 10 common words must be unambiguous"
        top = {word for word, _ in counts[:10]}
        first_seen: list[str] = []
        for _, word in items:
            if word in top and word not in first_seen:
                first_seen.append(word)
        return first_seen  # in order of first appearance
    if task == "frequent_words":
        counts = Counter(context.split("\n", 1)[1].split()).most_common()
        assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]
        return [word for word, _ in counts[:3]]
    raise AssertionError(task)


# --- generators -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_rows_have_the_harness_columns_and_the_answer_is_in_the_context(task, tokenizer):
    rows = generate_rows(task, 4, 512, tokenizer, seed=3)
    assert len(rows) == 4
    for row in rows:
        assert set(row) == COLUMNS
        assert row["task"] == task
        assert isinstance(row["answer"], list) and all(isinstance(a, str) and a for a in row["answer"])
        assert row["answer"] == expected_answer(row)
        for answer in row["answer"]:
            assert answer in row["context"]
        assert isinstance(row["max_new_tokens"], int)
        # Room for every expected string, plus separators and the end of sequence.
        assert n_tokens(tokenizer, " " + " ".join(row["answer"])) + 2 <= row["max_new_tokens"] <= 64
        assert row["context"].endswith("\n") and not row["question"].startswith(" ")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_rows_are_deterministic_and_seeds_differ(task, tokenizer):
    first = generate_rows(task, 3, 400, tokenizer, seed=11)
    assert first == generate_rows(task, 3, 400, tokenizer, seed=11)
    other = generate_rows(task, 3, 400, tokenizer, seed=12)
    assert [r["context"] for r in first] != [r["context"] for r in other]
    assert len({r["context"] for r in first}) == 3  # rows of one call differ too


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("length", [300, 1024, 3000])
def test_contexts_fill_the_requested_number_of_tokens(task, length, tokenizer):
    for row in generate_rows(task, 2, length, tokenizer, seed=5):
        tokens = n_tokens(tokenizer, row["context"])
        # At most the requested length, short of it by less than one haystack unit (a sentence or a list item).
        assert length - 24 <= tokens <= length, tokens


@pytest.mark.parametrize("task", ["niah_single_essay", "niah_multivalue", "variable_tracking", "common_words"])
def test_lengths_are_counted_in_the_given_tokenizer(task):
    byte_tokenizer = load_tokenizer(False)  # one token per byte
    for row in generate_rows(task, 2, 700, byte_tokenizer, seed=1):
        assert 700 - 120 <= len(row["context"].encode()) <= 700
        assert row["answer"] == expected_answer(row)


def test_training_rows_and_evaluation_rows_come_from_different_seeds(tokenizer):
    evaluation = generate_rows("niah_single_noise", 5, 256, tokenizer, seed=0)
    training = [build_row("niah_single_noise", 256, tokenizer, row_seed=f"train|0|0|{j}") for j in range(5)]
    assert {r["context"] for r in evaluation}.isdisjoint(r["context"] for r in training)
    # the trained answer restates the key in the words of its needle, then the value
    for row in training:
        key = row["question"].split(" for ")[1].split(" mentioned")[0]
        assert row["target"] == f" {key} is: {row['answer'][0]}."
        assert f"for {key} is: {row['answer'][0]}." in row["context"]


def test_training_targets_are_answers_the_metric_accepts(tokenizer):
    for task in TASK_NAMES:
        for i in range(3):
            row = build_row(task, 400, tokenizer, row_seed=f"train|0|1|{i}")
            assert all(value in row["target"] for value in row["answer"]), (task, row["target"], row["answer"])
            assert row["max_new_tokens"] >= len(tokenizer.encode(row["target"], add_special_tokens=False))


@pytest.mark.parametrize("count", [2, 7, 12])
def test_multikey_drill_rows_have_the_requested_needles(tokenizer, count):
    row = build_row("niah_multikey", 600, tokenizer, row_seed="drill", num_needles=count)
    assert row["context"].count("One special magic number for ") == count
    key = row["question"].split(" for ")[1].split(" mentioned")[0]
    assert f"for {key} is: {row['answer'][0]}." in row["context"] and len(row["answer"]) == 1
    # the default is the evaluation's four needles, and the rows are unchanged by the option's existence
    assert build_row("niah_multikey", 600, tokenizer, row_seed="drill")["context"].count("magic number for ") == 4
    assert build_row("niah_multikey", 600, tokenizer, row_seed="drill", num_needles=4) == build_row(
        "niah_multikey", 600, tokenizer, row_seed="drill"
    )


@pytest.mark.parametrize(
    "task, count, message", [("niah_single_noise", 3, "applies to"), ("niah_multikey", 1, "at least 2")]
)
def test_num_needles_bad_input(tokenizer, task, count, message):
    with pytest.raises(ValueError, match=message):
        build_row(task, 600, tokenizer, num_needles=count)


def test_question_aware_context_tokenizes_like_the_two_parts(tokenizer):
    # A question-aware evaluation compresses context + question; the model was trained on the two parts apart.
    for task in TASK_NAMES:
        row = generate_rows(task, 1, 300, tokenizer, seed=2)[0]
        together = tokenizer.encode(row["context"] + row["question"], add_special_tokens=False)
        apart = tokenizer.encode(row["context"], add_special_tokens=False) + tokenizer.encode(
            row["question"], add_special_tokens=False
        )
        assert together == apart, task


def test_multi_needle_tasks_hide_several_needles(tokenizer):
    for task, n_needles, n_keys in [("niah_multikey", 4, 4), ("niah_multivalue", 4, 1), ("niah_multiquery", 4, 4)]:
        row = generate_rows(task, 1, 800, tokenizer, seed=4)[0]
        needles = re.findall(r"One special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.", row["context"])
        assert len(needles) == n_needles and len({k for k, _ in needles}) == n_keys
        assert len({v for _, v in needles}) == n_needles


def test_uuid_needles_hold_uuids(tokenizer):
    row = generate_rows("niah_single_uuid", 1, 400, tokenizer, seed=0)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", row["answer"][0])


def test_variable_tracking_chain_has_five_variables(tokenizer):
    row = generate_rows("variable_tracking", 1, 600, tokenizer, seed=0)[0]
    assert len(row["answer"]) == 5
    assert "5 variables" in row["answer_prefix"]


def test_unknown_task_and_bad_arguments_raise_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="niah_single_noise.*frequent_words"):
        generate_rows("niah_single_1", 1, 512, tokenizer)
    with pytest.raises(ValueError, match="context_length=40 is too small for task 'niah_multikey'.*at least"):
        generate_rows("niah_multikey", 1, 40, tokenizer)
    with pytest.raises(ValueError, match="context_length must be a positive"):
        generate_rows("common_words", 1, 0, tokenizer)
    with pytest.raises(ValueError, match="num_samples"):
        generate_rows("common_words", -1, 100, tokenizer)
    with pytest.raises(ValueError, match="depths are fractions"):
        needle_sweep_rows([512], depths=(50,), tokenizer=tokenizer)
    with pytest.raises(TypeError, match="encode"):
        generate_rows("niah_single_noise", 1, 256, tokenizer=object())


# --- needle sweep ---------------------------------------------------------------------------------------------------


def test_needle_sweep_places_the_needle_at_the_requested_depth(tokenizer):
    lengths, depths = [1024, 4096, 32768], (0.05, 0.5, 0.95)
    rows = needle_sweep_rows(lengths, depths=depths, num_samples=2, tokenizer=tokenizer, seed=0)
    assert len(rows) == len(lengths) * len(depths) * 2
    assert [(r["context_length"], r["depth"]) for r in rows[::2]] == [(L, d) for L in lengths for d in depths]
    for row in rows:
        assert set(row) == COLUMNS | {"depth", "context_length"} and row["task"] == SWEEP_TASK
        assert row["answer"] == expected_answer(row)
        tokens = n_tokens(tokenizer, row["context"])
        assert row["context_length"] - 24 <= tokens <= row["context_length"]
        intro, haystack = row["context"].split("\n", 1)
        needle_at = haystack.index("One special magic number")
        before = n_tokens(tokenizer, haystack[:needle_at])
        # The depth is a fraction of the haystack's tokens; a needle sits between sentences (< 20 tokens each).
        assert abs(before / n_tokens(tokenizer, haystack) - row["depth"]) <= 20 / row["context_length"] + 0.01


def test_needle_sweep_is_deterministic(tokenizer):
    assert needle_sweep_rows([600], tokenizer=tokenizer, seed=3) == needle_sweep_rows(
        [600], tokenizer=tokenizer, seed=3
    )


# --- metric ---------------------------------------------------------------------------------------------------------


def test_calculate_metrics_is_the_mean_fraction_of_answers_found():
    df = pd.DataFrame(
        {
            "task": ["a", "a", "b", "b"],
            "answer": [["123", "456"], ["789"], ["x"], ["Y", "z"]],
            "predicted_answer": [" 123 and 999", "789\n", "nothing", " y, Z."],
        }
    )
    result = calculate_metrics(df)
    assert result == {"a": {"string_match": 75.0}, "b": {"string_match": 50.0}, "all": {"string_match": 62.5}}
    assert row_score(None, ["1"]) == 0.0 and row_score("ab\x01c", ["abc"]) == 1.0


def test_calculate_metrics_scores_the_sweep_per_length_and_depth():
    df = pd.DataFrame(
        {
            "task": [SWEEP_TASK] * 4,
            "answer": [["1"], ["2"], ["3"], ["4"]],
            "predicted_answer": ["1", "0", "3", "4"],
            "context_length": [1024, 1024, 2048, 2048],
            "depth": [0.05, 0.5, 0.05, 0.5],
        }
    )
    result = calculate_metrics(df)
    assert result[SWEEP_TASK] == {"string_match": 75.0}
    assert result["by_context_length_and_depth"] == {
        "1024": {"0.05": 100.0, "0.5": 0.0},
        "2048": {"0.05": 100.0, "0.5": 100.0},
    }
    json.dumps(result)


def test_calculate_metrics_rejects_missing_columns():
    with pytest.raises(ValueError, match="missing: \\['predicted_answer'\\]"):
        calculate_metrics(pd.DataFrame({"task": ["a"], "answer": [["1"]]}))


# --- dataset CLI and the reference package --------------------------------------------------------------------------


def test_create_dataset_writes_jsonl_and_parquet(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    create_dataset.main(
        [
            "--output",
            str(jsonl),
            "--tasks",
            "niah_single_noise,common_words",
            "--num_samples",
            "2",
            "--context_lengths",
            "256,300",
        ]
    )
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 8 and {r["task"] for r in rows} == {"niah_single_noise", "common_words"}
    assert rows[0] == {**generate_rows("niah_single_noise", 2, 256, seed=0)[0], "context_length": 256}
    parquet = tmp_path / "sweep.parquet"
    create_dataset.main(
        ["--output", str(parquet), "--sweep", "--context_lengths", "512", "--depths", "0.1,0.9", "--num_samples", "1"]
    )
    df = pd.read_parquet(parquet)
    assert list(df["depth"]) == [0.1, 0.9] and set(df["task"]) == {SWEEP_TASK}
    with pytest.raises(SystemExit):
        create_dataset.main(["--output", str(tmp_path / "rows.csv")])
    with pytest.raises(SystemExit):
        create_dataset.main(["--output", str(jsonl), "--tasks", "nope"])


def test_reference_package_points_at_the_shipped_checkpoint():
    assert TRAINED_CONTEXT_LENGTH == 1024
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (REFERENCE_MODEL_DIR / name).is_file(), name
    size = sum(p.stat().st_size for p in REFERENCE_MODEL_DIR.iterdir())
    assert size <= 20 * 2**20, f"checkpoint is {size / 2**20:.1f} MiB"
