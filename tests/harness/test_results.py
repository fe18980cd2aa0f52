# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Result files: atomic writes, append-only partial results that survive torn lines, sharding and merging."""

import os

import pandas as pd
import pytest

import harness.results as results
from harness.results import PartialResults, atomic_write_text, merge_predictions, shard


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary file left behind


def test_partial_results_survive_a_torn_line(tmp_path):
    partial = PartialResults(tmp_path)
    assert not partial.exists() and partial.read() == {}
    partial.append(0, [{"row_id": 0, "predicted_answer": "a"}, {"row_id": 1, "predicted_answer": "b"}])
    with open(partial.path(0), "a") as file:  # a run killed in the middle of a write
        file.write('{"row_id": 2, "predicted_ans')
    assert sorted(partial.read()) == [0, 1]
    partial.append(0, [{"row_id": 2, "predicted_answer": "c"}])
    partial.append(1, [{"row_id": 3, "predicted_answer": "d"}, {"row_id": 1, "predicted_answer": "b2"}])
    records = partial.read()
    assert {row_id: record["predicted_answer"] for row_id, record in records.items()} == {
        0: "a",
        1: "b2",  # rank1.jsonl is read after rank0.jsonl: the later record wins
        2: "c",
        3: "d",
    }
    partial.clear()
    assert not partial.exists()


def test_shards_are_disjoint_and_cover_everything():
    items = list(range(7))
    shards = [shard(items, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == items
    assert shard(items, 0, 1) == items
    with pytest.raises(ValueError, match="rank must be in"):
        shard(items, 3, 3)


def test_merge_needs_every_row():
    df = pd.DataFrame({"row_id": [4, 7], "question": ["a", "b"]})
    merged = merge_predictions(
        df, {7: {"predicted_answer": "y"}, 4: {"predicted_answer": "x", "compression_ratio": 0.5}}
    )
    assert list(merged["predicted_answer"]) == ["x", "y"] and list(merged["compression_ratio"])[0] == 0.5
    with pytest.raises(RuntimeError, match=r"1 of 2 rows have no prediction \(first row ids: \[7\]\)"):
        merge_predictions(df, {4: {"predicted_answer": "x"}})
