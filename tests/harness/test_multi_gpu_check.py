# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""benchmarks/multi_gpu_check.py on its CPU path (device_map={"": "cpu"}): every case runs, its tokens are those of
a direct run, the table and the JSON say so, and bad arguments are refused."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.reference_model import REFERENCE_MODEL_DIR
from kvpress import KnormPress

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "multi_gpu_check.py"
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def check():
    return runpy.run_path(str(SCRIPT), run_name="multi_gpu_check")


@pytest.fixture(scope="module")
def result(check, tmp_path_factory):
    output = tmp_path_factory.mktemp("check") / "check.json"
    args = ["--device_map", '{"": "cpu"}', "--reference_device", "cpu", "--max_new_tokens", str(NEW_TOKENS)]
    status = check["main"](args + ["--output", str(output)])
    return status, json.loads(output.read_text())


def test_every_case_runs_and_matches_on_cpu(check, result):
    status, data = result
    assert status == 0
    assert data["split_devices"] == ["cpu"] and data["device_map"] == {"": "cpu"}
    rows = data["rows"]
    eos = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR).eos_token_id
    assert {row["case"] for row in rows} == set(check["CASES"])
    assert {row["family"] for row in rows} >= {"scorer", "wrapper", "head-wise", "decoding budget", "repeat pass"}
    for row in rows:
        assert "error" not in row, row
        assert row["identical"] and row["reference_tokens"] == row["split_tokens"]
        tokens = row["reference_tokens"]
        if row["path"] == "generate":  # greedy generation: NEW_TOKENS tokens, unless the end token came first
            assert len(tokens) == NEW_TOKENS or tokens[-1] == eos, row
        else:  # the pipeline's answer, re-encoded from its text
            assert tokens, f"the pipeline answered nothing: {row}"


def test_the_generate_tokens_are_those_of_a_direct_run(check, result):
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32).eval()
    ids = tokenizer(check["CONTEXT"] * 3 + check["QUESTION"], return_tensors="pt").input_ids
    with torch.inference_mode(), KnormPress(compression_ratio=0.5)(model):
        direct = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    (row,) = [r for r in result[1]["rows"] if r["case"] == "knorm" and r["path"] == "generate"]
    assert row["reference_tokens"] == direct[0, ids.shape[1] :].tolist()


def test_the_table_reports_differences_and_errors(check):
    rows = [
        {"case": "knorm", "family": "scorer", "path": "generate", "reference_tokens": [1, 2, 3], "identical": False,
         "first_difference": check["first_difference"]([1, 2, 3], [1, 5, 3])},
        {"case": "kvzip", "family": "repeat pass", "path": "pipeline", "identical": False, "error": "RuntimeError: x"},
    ]  # fmt: skip
    text = check["table"](rows)
    assert "first difference at token 1" in text and "RuntimeError: x" in text
    assert check["first_difference"]([1, 2], [1, 2]) is None
    assert check["first_difference"]([1, 2], [1, 2, 3]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device_map", "everywhere"], "neither auto"),
        (["--device_map", "[1, 2]"], "JSON object"),
        (["--cases", "knorm,nope"], "unknown --cases"),
        (["--max_new_tokens", "0"], "positive integer"),
    ],
)
def test_bad_arguments_are_refused(check, args, message):
    with pytest.raises(ValueError, match=message):
        check["main"](args)
