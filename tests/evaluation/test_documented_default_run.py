# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The evaluation README and the shipped config describe the default run as it is: the documented table is what
`python evaluation/evaluate.py` prints (the reference model, 20 synthetic rows, about 20 s of CPU time)."""

import re
from pathlib import Path

import pytest
import yaml

import evaluation.evaluate as evaluate_module
from evaluation.evaluate import DEFAULT_CONFIG_FILE
from evaluation.evaluate_registry import PRESS_REGISTRY

README = Path(__file__).resolve().parents[2] / "evaluation" / "README.md"


def documented_table() -> list[str]:
    """The lines of the README's example output (the block after the one with the bare command)."""
    text = README.read_text()
    match = re.search(r"```bash\npython evaluation/evaluate.py\n```.*?```\n(.*?)```", text, re.S)
    assert match, "the README lost its example of the default run"
    return match.group(1).strip().splitlines()


def documented_number(pattern: str) -> str:
    match = re.search(pattern, README.read_text().replace("\n", " "))
    assert match, f"the README no longer says {pattern!r}"
    return match.group(1)


def run_default(tmp_path, capsys, **flags) -> list[str]:
    capsys.readouterr()
    evaluate_module.main(output_dir=str(tmp_path), progress=False, **flags)
    return capsys.readouterr().out.strip().splitlines()


def test_the_readme_shows_what_the_default_run_prints(tmp_path, capsys):
    printed = run_default(tmp_path, capsys)
    expected = documented_table()
    assert printed[:-1] == expected[:-1]
    assert printed[-1] == expected[-1].replace("results: results/", f"results: {tmp_path}/")
    # The explanation under the table quotes the same score, as rows kept out of the 20.
    score = float(documented_number(r"\((\d+(?:\.\d+)?): question-agnostic ExpectedAttention"))
    kept = int(documented_number(r"keeps the needle's value in (\d+) of these 20 rows"))
    assert f"| score (headline)               | {score:.2f} |" in printed
    assert kept == pytest.approx(score * 20 / 100)


def test_the_readme_no_press_score_is_what_the_same_rows_give(tmp_path, capsys):
    score = float(documented_number(r"with `--press_name no_press` the same rows score (\d+(?:\.\d+)?)"))
    printed = run_default(tmp_path, capsys, press_name="no_press")
    assert any(re.fullmatch(rf"\| score \(headline\) +\| {score:.2f} +\|", line) for line in printed), printed


def test_the_config_comment_and_the_readme_name_the_press_the_default_run_builds():
    shipped = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
    press = PRESS_REGISTRY[shipped["press_name"]]
    names = [type(press).__name__, type(press.press).__name__]  # the wrapper and the press inside it
    assert names == ["AdaKVPress", "ExpectedAttentionPress"]
    comment = " ".join(line for line in DEFAULT_CONFIG_FILE.read_text().splitlines() if line.startswith("#"))
    introduction = README.read_text().split("```bash\npython evaluation/evaluate.py\n```")[1].split("```")[0]
    for text in (comment, introduction):
        assert f"`{shipped['press_name']}`" in text
        assert all(name in text for name in names)
        assert "KnormPress" not in text
