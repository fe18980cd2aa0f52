# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The dataset scripts upstream ships and that need the network at run time, checked offline: their help, their
argument checks, a clear failure without the network, and the conversion of tiny local data into the harness's
columns (scored by the benchmark's own metric)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from evaluation.benchmarks.longbench import create_huggingface_dataset as longbench_script
from evaluation.benchmarks.longbench.calculate_metrics import calculate_metrics, calculate_metrics_e

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE = REPO_ROOT / "evaluation" / "benchmarks" / "ruler" / "generate.sh"
LONGBENCH_SCRIPT = REPO_ROOT / "evaluation" / "benchmarks" / "longbench" / "create_huggingface_dataset.py"

# Templates in LongBench's configuration format (written for this test): a QA task with a query, a summary task
# without one, and a code task whose template holds braces of its own.
TEMPLATES = {
    "hotpotqa": "Answer the question from the passages.\n\n{context}\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report.\n\nReport:\n{context}\n\nNow, write a one-page summary.\n\nSummary:",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
}
MAX_LENGTHS = {"hotpotqa": 32, "gov_report": 512, "lcc": 64}
RECORDS = [
    {"context": "Passage 1: Paris is in France.", "input": "Where is Paris?", "answers": ["France"], "length": 5,
     "all_classes": None},
    {"context": "Passage 1: Oslo is in Norway.", "input": "Where is Oslo?", "answers": ["Norway"], "length": 5000,
     "all_classes": None},
]  # fmt: skip


@pytest.fixture
def config_dir(tmp_path):
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "dataset2prompt.json").write_text(json.dumps(TEMPLATES))
    (directory / "dataset2maxlen.json").write_text(json.dumps(MAX_LENGTHS))
    return directory


def run_script(*args, env=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(list(args), capture_output=True, text=True, env=environment, timeout=120)


# -- LongBench ---------------------------------------------------------------------------------------------------
def test_longbench_rows_split_the_template_around_the_context(config_dir):
    templates, lengths = longbench_script.read_config(config_dir)
    df = longbench_script.build_dataframe(RECORDS, "hotpotqa", templates, lengths)
    row = df.iloc[0]
    assert row["context"] == "Answer the question from the passages.\n\nPassage 1: Paris is in France."
    assert row["question"] == "\n\nQuestion: Where is Paris?\n"
    assert row["answer_prefix"] == "Answer:"
    # The three parts are the filled template again.
    filled = TEMPLATES["hotpotqa"].replace("{context}", RECORDS[0]["context"]).replace("{input}", RECORDS[0]["input"])
    assert row["context"] + row["question"] + row["answer_prefix"] == filled
    assert list(df["max_new_tokens"]) == [32, 32] and list(df["task"]) == ["hotpotqa"] * 2
    assert list(df["answers"].iloc[1]) == ["Norway"] and list(df["length"]) == [5, 5000]


def test_longbench_rows_without_a_query_and_with_braces(config_dir):
    templates, lengths = longbench_script.read_config(config_dir)
    summary = longbench_script.build_dataframe(RECORDS[:1], "gov_report", templates, lengths).iloc[0]
    assert summary["question"] == "\n\nNow, write a one-page summary.\n\n" and summary["answer_prefix"] == "Summary:"
    code = [{"context": "def f(x):\n    return {'a': x}\n", "input": "", "answers": ["f(1)"], "length": 9}]
    row = longbench_script.build_dataframe(code, "lcc", templates, lengths).iloc[0]
    assert row["context"].endswith("return {'a': x}\n")
    assert row["answer_prefix"] == "Next line of code:"


def test_longbench_rows_are_scored_by_the_longbench_metrics(config_dir):
    templates, lengths = longbench_script.read_config(config_dir)
    df = longbench_script.build_dataframe(RECORDS, "hotpotqa", templates, lengths)
    df["predicted_answer"] = ["France", "Sweden"]
    assert calculate_metrics(df) == 50.0
    df_e = longbench_script.build_dataframe(RECORDS, "hotpotqa", templates, lengths, longbench_e=True)
    df_e["predicted_answer"] = ["France", "Sweden"]
    assert set(df_e["task"]) == {"hotpotqa-e"}
    assert calculate_metrics_e(df_e) == {"0-4k": 100.0, "4-8k": 0.0}


def test_longbench_main_writes_a_file_the_harness_reads(tmp_path, config_dir):
    output = tmp_path / "hotpotqa.parquet"

    def loader(source, subset, split):
        assert (source, subset, split) == ("THUDM/LongBench", "hotpotqa", "test")
        return RECORDS

    assert (
        longbench_script.main(["--task", "hotpotqa", "--config_dir", str(config_dir), "--output", str(output)], loader)
        == 0
    )
    from harness.data import load_local_dataset

    df = load_local_dataset(str(output))
    assert list(df["question"]) == ["\n\nQuestion: Where is Paris?\n", "\n\nQuestion: Where is Oslo?\n"]


def test_longbench_script_help_and_argument_checks(tmp_path, config_dir):
    shown = run_script(sys.executable, str(LONGBENCH_SCRIPT), "--help")
    assert shown.returncode == 0 and "--config_dir" in shown.stdout and "--longbench_e" in shown.stdout
    for args, message in [
        (["--task", "nope", "--config_dir", "x", "--output", "o.parquet"], "unknown task 'nope'"),
        (["--task", "lsht", "--longbench_e", "--config_dir", "x", "--output", "o.parquet"], "unknown task 'lsht'"),
        (["--task", "hotpotqa", "--config_dir", "x"], "nothing to do"),
        (["--task", "hotpotqa", "--config_dir", "x", "--output", "o.csv"], "must end with .parquet or .jsonl"),
        (["--task", "hotpotqa"], "--config_dir"),
    ]:
        result = run_script(sys.executable, str(LONGBENCH_SCRIPT), *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    missing = run_script(
        sys.executable,
        str(LONGBENCH_SCRIPT),
        "--task",
        "hotpotqa",
        "--config_dir",
        str(tmp_path),
        "--output",
        "o.parquet",
    )
    assert missing.returncode == 1 and "does not hold LongBench's dataset2prompt.json" in missing.stderr


def test_longbench_script_fails_in_one_line_offline(tmp_path, config_dir):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'THUDM/LongBench' on the Hub (LocalEntryNotFoundError)\nmore lines")

    with pytest.raises(RuntimeError, match=r"^Could not load THUDM/LongBench \(hotpotqa_e\) .*needs the network"):
        longbench_script.load_records("hotpotqa", True, offline)
    output = tmp_path / "o.parquet"
    assert longbench_script.main(["--task", "hotpotqa", "--config_dir", str(config_dir), "--output", str(output)],
                                 offline) == 1  # fmt: skip
    assert not output.exists()


# -- RULER generate.sh -------------------------------------------------------------------------------------------
def test_generate_sh_help_and_argument_checks(tmp_path):
    shown = run_script("bash", str(GENERATE), "--help")
    assert shown.returncode == 0 and "--lengths" in shown.stdout and "meta-llama/Meta-Llama-3.1-8B" in shown.stdout
    for args, message in [
        (["--lengths", "4k"], "--lengths must be positive integers"),
        (["--num_samples", "0"], "--num_samples must be a positive integer"),
        (["--tasks", "niah_single_9"], "unknown RULER task 'niah_single_9'"),
        (["--bogus"], "unknown option '--bogus'"),
        (["--lengths"], "--lengths needs a value"),
    ]:
        result = run_script("bash", str(GENERATE), "--output_dir", str(tmp_path), *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not any(tmp_path.iterdir())


def test_generate_sh_dry_run_uses_the_published_settings(tmp_path):
    result = run_script("bash", str(GENERATE), "--dry_run", "--lengths", "4096 8192", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    prepares = [line for line in result.stdout.splitlines() if "prepare.py" in line]
    assert len(prepares) == 2 * 13
    for line in prepares:
        assert "--tokenizer_path meta-llama/Meta-Llama-3.1-8B" in line and "--model_template_type base" in line
        assert "--num_samples 500" in line and "--benchmark synthetic" in line
    tasks = {line.split("--task ")[1].split()[0] for line in prepares}
    assert tasks == {*(f"niah_single_{i}" for i in (1, 2, 3)), *(f"niah_multikey_{i}" for i in (1, 2, 3)),
                     "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"}  # fmt: skip
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_generate_sh_fails_clearly_without_the_network(tmp_path):
    result = run_script(
        "bash", str(GENERATE), "--output_dir", str(tmp_path), env={"RULER_REPO": str(tmp_path / "none")}
    )
    assert result.returncode == 2
    assert "could not clone RULER" in result.stderr and "pass --ruler_dir" in result.stderr


def test_generate_sh_runs_rulers_prepare_and_converts_its_output(tmp_path):
    """A stand-in RULER checkout whose prepare.py writes one niah prompt: generate.sh must produce the parquet file
    the harness evaluates, with the prompt split into context, question and answer prefix."""
    ruler = tmp_path / "RULER"
    (ruler / "scripts" / "data").mkdir(parents=True)
    (ruler / "scripts" / "data" / "prepare.py").write_text(
        "import argparse, json, os\n"
        "p = argparse.ArgumentParser()\n"
        "for a in ('save_dir', 'benchmark', 'task', 'tokenizer_path', 'tokenizer_type', 'max_seq_length',\n"
        "          'model_template_type', 'num_samples'):\n"
        "    p.add_argument('--' + a)\n"
        "a = p.parse_args()\n"
        "os.makedirs(os.path.join(a.save_dir, a.task), exist_ok=True)\n"
        "prompt = 'Some text. One of the special magic numbers for x is: 7. What is the special magic number for x?'\n"
        "prompt += ' The special magic number for x is'\n"
        "with open(os.path.join(a.save_dir, a.task, 'validation.jsonl'), 'w') as f:\n"
        "    f.write(json.dumps({'input': prompt, 'outputs': ['7'], 'length': int(a.max_seq_length)}) + '\\n')\n"
    )
    output_dir = tmp_path / "out"
    result = run_script(
        "bash", str(GENERATE), "--ruler_dir", str(ruler), "--output_dir", str(output_dir), "--lengths", "512",
        "--tasks", "niah_single_1 niah_multikey_2", env={"PYTHON": sys.executable},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(output_dir / "ruler_512.parquet")
    assert list(df["task"]) == ["niah_single_1", "niah_multikey_2"]
    assert df["context"].iloc[0] == "Some text. One of the special magic numbers for x is: 7. "
    assert df["question"].iloc[0] == "What is the special magic number for x? "
    assert df["answer_prefix"].iloc[0] == "The special magic number for x is"
    assert list(df["max_new_tokens"]) == [128, 128]
