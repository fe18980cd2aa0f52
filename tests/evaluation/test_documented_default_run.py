# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The evaluation README, the main README and the shipped config describe the default run as it is: the documented
comparison table is what `python evaluation/evaluate.py` prints (the reference model, 20 synthetic rows, four runs of
under 10 s of CPU time each), and the explanation under it quotes the same numbers."""

import re
from pathlib import Path

import pytest
import yaml

import evaluation.evaluate as evaluate_module
from evaluation.evaluate import DEFAULT_CONFIG_FILE
from evaluation.evaluate_registry import PRESS_REGISTRY

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "evaluation" / "README.md"
MAIN_README = ROOT / "README.md"
# How the evaluation README's explanation names each press's kept rows, out of 20.
KEPT_ROWS = {
    "no_press": r"with the full cache the reference model finds it in all (\d+) rows",
    "streaming_llm": r"StreamingLLM keeps it in (\d+)",
    "snapkv": r"SnapKV in (\d+)",
    "expected_attention": r"question-agnostic ExpectedAttention in (\d+)",
}


def documented_table() -> list[str]:
    """The lines of the evaluation README's example output (the block after the one with the bare command)."""
    match = re.search(r"```bash\npython evaluation/evaluate.py\n```.*?```\n(.*?)```", README.read_text(), re.S)
    assert match, "the README lost its example of the default run"
    return match.group(1).strip().splitlines()


def documented_number(pattern: str) -> str:
    match = re.search(pattern, README.read_text().replace("\n", " "))
    assert match, f"the README no longer says {pattern!r}"
    return match.group(1)


def scores(table_lines: list[str]) -> dict:
    """`{press: score}` of a comparison table."""
    found = {}
    for line in table_lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in KEPT_ROWS:
            found[cells[0]] = float(cells[2])
    return found


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> tuple[list[str], Path]:
    """What the default command prints, with the results under a temporary directory."""
    output_dir = tmp_path_factory.mktemp("default_run")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluate_module.main(output_dir=str(output_dir), progress=False)
    return buffer.getvalue().strip().splitlines(), output_dir


def test_the_readme_shows_the_comparison_the_default_run_prints(printed):
    lines, output_dir = printed
    expected = [line.replace("results: results/", f"results: {output_dir}/") for line in documented_table()]
    assert lines[-len(expected) :] == expected


def test_the_explanation_quotes_the_table(printed):
    table = scores(documented_table())
    assert list(table) == ["no_press", "streaming_llm", "snapkv", "expected_attention"]
    for press, pattern in KEPT_ROWS.items():
        assert int(documented_number(pattern)) == pytest.approx(table[press] * 20 / 100), press


def test_the_main_readme_quotes_the_same_table(printed):
    text = MAIN_README.read_text().split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```\n(\| press .*?)```", text, re.S)
    assert match, "README.md's Evaluation section lost the default run's table"
    assert scores(match.group(1).splitlines()) == scores(printed[0])
    table_lines = [line for line in printed[0] if line.startswith("|")][-6:]
    assert match.group(1).strip().splitlines() == table_lines


def test_the_config_comment_and_the_readme_name_the_presses_the_default_run_builds():
    shipped = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
    assert shipped["press_name"] == ["no_press", "streaming_llm", "snapkv", "expected_attention"]
    assert PRESS_REGISTRY["no_press"] is None
    classes = {
        "streaming_llm": [type(PRESS_REGISTRY["streaming_llm"]).__name__],
        "snapkv": [type(PRESS_REGISTRY["snapkv"]).__name__],
        "expected_attention": [
            type(PRESS_REGISTRY["expected_attention"]).__name__,
            type(PRESS_REGISTRY["expected_attention"].press).__name__,  # the wrapper and the press inside it
        ],
    }
    assert classes == {
        "streaming_llm": ["StreamingLLMPress"],
        "snapkv": ["SnapKVPress"],
        "expected_attention": ["AdaKVPress", "ExpectedAttentionPress"],
    }
    assert PRESS_REGISTRY["snapkv"].window_size == 64 and PRESS_REGISTRY["streaming_llm"].n_sink == 4
    comment = " ".join(line for line in DEFAULT_CONFIG_FILE.read_text().splitlines() if line.startswith("#"))
    introduction = README.read_text().split("```bash\npython evaluation/evaluate.py\n```")[1].split("```")[0]
    for text in (comment, introduction):
        assert "no_press" in text and "0.5" in text
        for name, names in classes.items():
            assert f"`{name}`" in text and all(cls in text for cls in names), name
        assert "last 64 queries" in text and "first 4 tokens" in text
        assert "KnormPress" not in text
