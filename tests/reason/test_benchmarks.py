# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Each dataset module on its tiny local fixture (tests/reason/fixtures/<name>.jsonl, the Hub columns)."""

from pathlib import Path

import pandas as pd
import pytest

from reason.benchmarks import BENCHMARK_NAMES, get_benchmark
from reason.loading import load_rows, select_rows

FIXTURES = Path(__file__).parent / "fixtures"

# name -> (gold of the fixture rows, a right response to row 0, a wrong response to row 0)
EXPECTED = {
    "gsm8k": (["10", "1000"], r"3*4=12, 12-2=10. The answer is \boxed{10}.", r"\boxed{12}"),
    "math500": ([r"\frac{1}{2}", "7"], r"$\frac14+\frac14=\boxed{\dfrac{1}{2}}$", r"\boxed{\frac{1}{4}}"),
    "aime24": (["24", "200"], r"So \boxed{024}", r"\boxed{2024}"),
    "aime25": (["70", "243"], "The final answer is 70.", r"\boxed{16}"),
    "folio": (["true", "uncertain"], r"Rex is a dog, so \boxed{\text{True}}", r"\boxed{Uncertain}"),
    "strategyqa": (["false", "true"], r"Too far to swim. \boxed{false}", r"\boxed{True}"),
    "logiqa": (["2", "3"], r"\boxed{2}", r"\boxed{1}"),
    "reclor": (["2", "1"], "The answer is 2.", r"\boxed{4}"),
    "openbookqa": (["D", "B"], r"\boxed{\text{D}}", r"\boxed{A}"),
    "commonsenseqa": (["A", "A"], "Answer: A", r"\boxed{C}"),
    "drop": ([["24"], ["France", "Spain"]], r"14 + 10 = 24, so \boxed{24}", r"\boxed{4}"),
}


def test_every_dataset_has_a_fixture():
    assert set(EXPECTED) == set(BENCHMARK_NAMES) - {"synthetic"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_module_on_fixture(name):
    benchmark = get_benchmark(name)
    rows, source = load_rows(benchmark, data_path=str(FIXTURES / f"{name}.jsonl"))
    assert source.endswith(f"{name}.jsonl") and len(rows) == 2
    golds, right, wrong = EXPECTED[name]
    assert [benchmark.gold_answer(row) for row in rows] == golds
    for row in rows:
        prompt = benchmark.format_prompt(row)
        assert "\\boxed{}" in prompt and "{{" not in prompt and "\\F" not in prompt and "\\Q" not in prompt
    gold = benchmark.gold_answer(rows[0])
    assert benchmark.score(benchmark.extract(right), gold)["correct"] == 1.0
    assert benchmark.score(benchmark.extract(wrong), gold)["correct"] == 0.0
    assert benchmark.hub_id and benchmark.split in ("test", "validation")


def test_prompts_carry_the_row():
    rows, _ = load_rows(get_benchmark("strategyqa"), data_path=str(FIXTURES / "strategyqa.jsonl"))
    prompt = get_benchmark("strategyqa").format_prompt(rows[0])
    assert "Facts:\nLions can swim" in prompt and "Question:\nCould a lion" in prompt
    rows, _ = load_rows(get_benchmark("logiqa"), data_path=str(FIXTURES / "logiqa.jsonl"))
    assert "1. Anna failed.\n2. Anna passed." in get_benchmark("logiqa").format_prompt(rows[0])
    rows, _ = load_rows(get_benchmark("reclor"), data_path=str(FIXTURES / "reclor.jsonl"))
    prompt = get_benchmark("reclor").format_prompt(rows[0])
    assert f"Question:\n{rows[0]['question'].strip()}\nOptions:\n1. {rows[0]['answers'][0].strip()}\n" in prompt
    rows, _ = load_rows(get_benchmark("openbookqa"), data_path=str(FIXTURES / "openbookqa.jsonl"))
    assert "A. puppies learning new tricks\nB. children" in get_benchmark("openbookqa").format_prompt(rows[0])


def test_drop_f1_is_reported():
    benchmark = get_benchmark("drop")
    rows, _ = load_rows(benchmark, data_path=str(FIXTURES / "drop.jsonl"))
    assert benchmark.score(benchmark.extract(r"\boxed{France}"), benchmark.gold_answer(rows[1])) == {
        "correct": 0.0,
        "f1": 0.5,
    }


def test_parquet_and_saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    benchmark = get_benchmark("openbookqa")
    rows, _ = load_rows(benchmark, data_path=str(FIXTURES / "openbookqa.jsonl"))
    pd.DataFrame(rows).to_parquet(tmp_path / "obqa.parquet")
    from_parquet, _ = load_rows(benchmark, data_path=str(tmp_path / "obqa.parquet"))
    assert from_parquet == rows  # nested choices come back as plain dicts of lists
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows)}).save_to_disk(
        tmp_path / "saved"
    )
    from_disk, _ = load_rows(benchmark, data_path=str(tmp_path / "saved"))
    assert from_disk == rows
    only_train, _ = load_rows(benchmark, data_path=str(tmp_path / "saved"), data_split="train")
    assert only_train == rows[:1]
    with pytest.raises(ValueError, match="splits"):
        load_rows(benchmark, data_path=str(tmp_path / "saved"), data_split="validation")


def test_missing_column_and_bad_path(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="answer"):
        load_rows(get_benchmark("gsm8k"), data_path=str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_rows(get_benchmark("gsm8k"), data_path=str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="valid datasets"):
        get_benchmark("gsm9k")


def test_bad_gold_raises():
    with pytest.raises(ValueError, match="####"):
        get_benchmark("gsm8k").gold_answer({"question": "q", "answer": "42"})
    with pytest.raises(ValueError, match="True, False or Uncertain"):
        get_benchmark("folio").gold_answer({"label": "maybe"})
    with pytest.raises(ValueError, match="correct_option 4 is outside the 4 options"):
        get_benchmark("logiqa").gold_answer({"options": ["a", "b", "c", "d"], "correct_option": 4})
    with pytest.raises(ValueError, match="label -1 is outside the 2 options"):
        get_benchmark("reclor").gold_answer({"answers": ["a", "b"], "label": -1})


def test_select_rows():
    rows = [{"i": i} for i in range(10)]
    assert [index for index, _ in select_rows(rows)] == list(range(10))
    picked = [index for index, _ in select_rows(rows, num_samples=4, seed=1)]
    assert len(set(picked)) == 4 and picked == [index for index, _ in select_rows(rows, num_samples=4, seed=1)]
    assert picked != [index for index, _ in select_rows(rows, num_samples=4, seed=2)]
    assert len(select_rows(rows, fraction=0.3)) == 3
    with pytest.raises(ValueError, match="not both"):
        select_rows(rows, num_samples=2, fraction=0.5)
    with pytest.raises(ValueError, match="more than"):
        select_rows(rows, num_samples=11)


def test_synthetic_rows_are_generated():
    benchmark = get_benchmark("synthetic")
    rows, source = load_rows(benchmark, num_generated=2, seed=3)
    assert source == "generated synthetic" and len(rows) == 2
    gold = benchmark.gold_answer(rows[0])
    assert benchmark.score(" " + " ".join(gold) + ".", gold)["correct"] == 1.0
    assert benchmark.score(" ".join(gold[:-1]), gold)["correct"] == 0.0
