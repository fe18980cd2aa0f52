# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Data: local files and saved datasets, column checks, sampling, query-aware rows, RULER splitting, needles."""

import json

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from evaluation.benchmarks.needle_in_haystack.utils import insert_needle_in_haystack
from evaluation.benchmarks.ruler.create_huggingface_dataset import get_dataframe, split_prompt
from evaluation.data import load_synthetic
from evaluation.evaluate import EvaluationConfig, EvaluationRunner
from harness.data import load_local_dataset
from tests.fixtures import load_tokenizer

ROWS = [
    {
        "context": f"context {i}",
        "question": f"question {i}?",
        "answer_prefix": "Answer:",
        "answer": [str(i), "x"],
        "task": "niah_single_1",
        "max_new_tokens": 4,
    }
    for i in range(6)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved", "saved_dict", "folder"])
def test_local_formats_give_the_same_rows(tmp_path, kind):
    expected = pd.DataFrame(ROWS)
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    elif kind == "parquet":
        path = tmp_path / "rows.parquet"
        expected.to_parquet(path)
    elif kind == "saved":
        path = tmp_path / "saved"
        Dataset.from_pandas(expected).save_to_disk(str(path))
    elif kind == "saved_dict":
        path = tmp_path / "saved_dict"
        DatasetDict({"train": Dataset.from_list(ROWS[:1]), "test": Dataset.from_pandas(expected)}).save_to_disk(
            str(path)
        )
    else:
        path = tmp_path / "folder"
        path.mkdir()
        write_jsonl(path / "a.jsonl", ROWS[:3])
        pd.DataFrame(ROWS[3:]).to_parquet(path / "b.parquet")
    df = load_local_dataset(path)
    assert df[list(expected.columns)].to_dict("records") == ROWS  # list cells come back as lists, not arrays


def test_local_errors_name_the_path_and_the_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist\. Pass a dataset directory saved"):
        load_local_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"Unsupported data file .*rows\.csv"):
        load_local_dataset(tmp_path / "rows.csv")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_local_dataset(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without a saved dataset or .parquet/.jsonl files"):
        load_local_dataset(tmp_path / "empty")


def prepared(tmp_path, rows, **options):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = EvaluationConfig(dataset="ruler", data_path=str(path), output_dir=str(tmp_path), **options)
    return EvaluationRunner(config)._load_and_prepare_dataset()


def test_a_missing_column_is_named_with_its_file(tmp_path):
    rows = [{key: value for key, value in row.items() if key != "answer"} for row in ROWS]
    with pytest.raises(ValueError, match=r"Column 'answer' is missing from .*rows\.jsonl\. Dataset 'ruler' needs"):
        prepared(tmp_path, rows)
    rows = [{key: value for key, value in row.items() if key != "max_new_tokens"} for row in ROWS]
    with pytest.raises(ValueError, match=r"Column 'max_new_tokens' is missing from .*rows\.jsonl"):
        prepared(tmp_path, rows)
    assert len(prepared(tmp_path, rows, max_new_tokens=3)) == 6  # the flag replaces the column


def test_fraction_and_max_samples_keep_stable_row_ids(tmp_path):
    first = prepared(tmp_path, ROWS, fraction=0.5, seed=3)
    again = prepared(tmp_path, ROWS, fraction=0.5, seed=3)
    assert len(first) == 3 and list(first["row_id"]) == list(again["row_id"])
    assert all(first["context"] == [f"context {i}" for i in first["row_id"]])  # row_id = the row's original index
    assert len(prepared(tmp_path, ROWS, max_samples=2)) == 2


def test_query_aware_moves_the_question_into_the_context(tmp_path):
    rows = [dict(ROWS[0])]
    rows[0].pop("answer_prefix")
    df = prepared(tmp_path, rows, query_aware=True)
    assert df.loc[0, "context"] == "context 0question 0?"
    assert df.loc[0, "question"] == "" and df.loc[0, "answer_prefix"] == ""


def test_ruler_prompts_split_at_the_last_question():
    prompt = (
        "Some text. What is the special magic number for a? decoy. Text again. "
        "What is the special magic number for b mentioned in the provided text? The special magic number for b is"
    )
    context, question, prefix = split_prompt(prompt, "niah_single_1")
    assert context == "Some text. What is the special magic number for a? decoy. Text again. "
    assert question == "What is the special magic number for b mentioned in the provided text? "
    assert prefix == "The special magic number for b is"
    with pytest.raises(ValueError, match="Unknown RULER task"):
        split_prompt(prompt, "xyz_1")


def test_ruler_dataframe_from_a_generated_file(tmp_path):
    folder = tmp_path / "vt"
    folder.mkdir()
    prompt = "VAR X = 1. Question: Find all variables that are assigned the value 1 in the text. Answer: They are"
    (folder / "validation.jsonl").write_text(json.dumps({"input": prompt, "outputs": ["X"]}) + "\n")
    df = get_dataframe(folder / "validation.jsonl")
    assert df.to_dict("records") == [
        {
            "context": "VAR X = 1. ",
            "question": "Question: Find all variables that are assigned the value 1 in the text. ",
            "answer_prefix": "Answer: They are",
            "answer": ["X"],
            "task": "vt",
            "max_new_tokens": 30,
        }
    ]


def test_needles_are_inserted_at_the_requested_depth():
    tokenizer = load_tokenizer(False)  # byte-level: one token per character
    haystack = "abcdefghij" * 50
    df = pd.DataFrame(
        [{"context": haystack, "needle": " NEEDLE ", "question": "Q?", "answer_prefix": "A:", "max_new_tokens": 5}]
    )
    rows = insert_needle_in_haystack(df, tokenizer, max_context_length=300, needle_depth=[0, 50, 100])
    budget = 300 - len(" NEEDLE ") - 150  # the haystack is cut to 142 characters
    cut = haystack[:budget]
    for depth, context in zip([0, 50, 100], rows["context"]):
        position = int(budget * depth / 100)
        assert context == f"This is a very long story book: <book> {cut[:position]} NEEDLE {cut[position:]} </book>."
    assert list(rows["needle_depth"]) == [0, 50, 100] and set(rows["max_new_tokens"]) == {5}
    with pytest.raises(ValueError, match="leaves no room for the haystack"):
        insert_needle_in_haystack(df, tokenizer, max_context_length=100, needle_depth=10)
    with pytest.raises(ValueError, match=r"percentages in \[0, 100\]"):
        insert_needle_in_haystack(df, tokenizer, max_context_length=300, needle_depth=150)


def test_synthetic_rows_are_generated_in_the_model_tokens():
    tokenizer = load_tokenizer(False)
    df = load_synthetic("niah_single_noise,variable_tracking", 2, [300], tokenizer, seed=5)
    assert list(df["task"]) == ["niah_single_noise"] * 2 + ["variable_tracking"] * 2
    for context, answers in zip(df["context"], df["answer"]):
        assert len(tokenizer.encode(context, add_special_tokens=False)) <= 300
        assert all(answer in context for answer in answers)  # the answers are really in the context
    again = load_synthetic("niah_single_noise,variable_tracking", 2, [300], tokenizer, seed=5)
    assert df.equals(again)
    with pytest.raises(ValueError, match="Unknown synthetic task 'nope'; valid tasks: niah_single_noise"):
        load_synthetic("nope", 1, [300], tokenizer, seed=0)


def test_hub_datasets_are_loaded_with_the_data_dir_and_test_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(hub_id, data_dir=None, split=None):
        calls.append((hub_id, data_dir, split))
        if data_dir == "offline":
            raise ConnectionError("no network")
        return Dataset.from_list(ROWS[:2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = EvaluationConfig(dataset="ruler", max_new_tokens=2)
    df = EvaluationRunner(config)._load_and_prepare_dataset()
    assert calls == [("simonjegou/ruler", "4096", "test")] and list(df["row_id"]) == [0, 1]
    with pytest.raises(RuntimeError, match=r"simonjegou/ruler \(data_dir='offline'\).*no network.*--data_path"):
        EvaluationRunner(EvaluationConfig(dataset="ruler", data_dir="offline"))._load_and_prepare_dataset()
