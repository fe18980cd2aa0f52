# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""No lost or stale results (issue 22): --force validates before it replaces, paths stay in --output_dir, finished
runs are keyed on their rows, run folders are locked, bad rows and unreachable models fail early with one clear line.
"""

import json
import os
import re
import socket
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from datasets import Dataset

import evaluation.evaluate as evaluate_module
import kvpress  # noqa: F401  (registers the pipeline)
from evaluation.evaluate import EvaluationConfig, EvaluationRunner
from tests.evaluation.test_end_to_end import CountingRunner
from tests.fixtures import saved_model_dir

# Three contexts, one question each: 3 rows, 3 pipeline calls.
ROWS = [
    {"context": "The magic number of the red door is 4821. " * 3, "question": "Red door number?", "answer": ["4821"]},
    {"context": "Alice keeps the key under the blue stone. " * 3, "question": "Where is the key?", "answer": ["blue"]},
    {"context": "The train to Oslo leaves at 7 in the morning. " * 3, "question": "When?", "answer": ["7"]},
]
for row in ROWS:
    row.update(answer_prefix="Answer:", task="niah_single_1", max_new_tokens=3)


@pytest.fixture(scope="module")
def model_dir():
    return saved_model_dir("llama")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_config(output_dir, data_file, model_dir, **options) -> EvaluationConfig:
    options.setdefault("dataset", "ruler")
    options.setdefault("press_name", "knorm")
    options.setdefault("model_kwargs", {"dtype": "float32"})
    return EvaluationConfig(data_path=str(data_file), model=model_dir, output_dir=str(output_dir), **options)


def snapshot(directory) -> dict:
    """Every file under `directory` (relative path -> bytes)."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def no_model(self):
    raise AssertionError("the model must not be loaded")


# -- 1. --force validates everything before it replaces anything --------------------------------------------------
def test_force_with_model_kwargs_that_fail_to_load_keeps_the_finished_results(tmp_path, model_dir):
    data_file = write_rows(tmp_path / "rows.jsonl", ROWS)
    CountingRunner(make_config(tmp_path / "out", data_file, model_dir)).run_evaluation()
    results_dir = make_config(tmp_path / "out", data_file, model_dir).get_results_dir()
    before = snapshot(results_dir)
    assert sorted(before) == ["config.yaml", "metrics.json", "predictions.csv"]

    bad_kwargs = {"dtype": "float32", "attn_implementation": "no_such_attention"}
    forced = CountingRunner(make_config(tmp_path / "out", data_file, model_dir, force=True, model_kwargs=bad_kwargs))
    with pytest.raises(ValueError, match="no_such_attention|Could not load model"):
        forced.run_evaluation()
    assert forced.calls == 0
    assert snapshot(results_dir) == before  # nothing deleted, nothing half-written, no lock left behind


def test_force_with_an_unknown_task_fails_before_the_model_and_keeps_the_results(tmp_path, model_dir, monkeypatch):
    rows = [{**row, "answers": row["answer"], "task": "narrativeqa"} for row in ROWS]
    data_file = write_rows(tmp_path / "rows.jsonl", rows)
    CountingRunner(make_config(tmp_path / "out", data_file, model_dir, dataset="longbench")).run_evaluation()
    results_dir = make_config(tmp_path / "out", data_file, model_dir, dataset="longbench").get_results_dir()
    before = snapshot(results_dir)

    write_rows(data_file, [{**row, "task": "no_such_task"} for row in rows])
    monkeypatch.setattr(EvaluationRunner, "_setup_model_pipeline", no_model)
    forced = CountingRunner(make_config(tmp_path / "out", data_file, model_dir, dataset="longbench", force=True))
    with pytest.raises(ValueError, match=r"'longbench' metric cannot score these rows: Unknown LongBench task"):
        forced.run_evaluation()
    assert snapshot(results_dir) == before


def test_an_interrupted_forced_run_keeps_the_earlier_results_until_it_has_its_own(tmp_path, model_dir):
    data_file = write_rows(tmp_path / "rows.jsonl", ROWS)
    config = make_config(tmp_path / "out", data_file, model_dir)
    first_metrics = CountingRunner(config).run_evaluation()
    results_dir = config.get_results_dir()
    finished = {name: (results_dir / name).read_bytes() for name in ("config.yaml", "metrics.json", "predictions.csv")}

    interrupted = CountingRunner(make_config(tmp_path / "out", data_file, model_dir, force=True))
    interrupted.interrupt_at = 2
    with pytest.raises(KeyboardInterrupt):
        interrupted.run_evaluation()
    assert {name: (results_dir / name).read_bytes() for name in finished} == finished
    assert not list(results_dir.glob(".lock*"))  # released on the way out

    again = CountingRunner(config)  # without --force: the earlier, complete results are still the run's results
    assert again.run_evaluation() == first_metrics and again.calls == 0

    forced = CountingRunner(make_config(tmp_path / "out", data_file, model_dir, force=True))
    assert forced.run_evaluation() == first_metrics and forced.calls == 3  # starts over, no resumed rows
    assert sorted(p.name for p in results_dir.iterdir()) == ["config.yaml", "metrics.json", "predictions.csv"]


# -- 2. every path stays inside --output_dir ----------------------------------------------------------------------
def test_data_dir_cannot_lead_outside_the_output_dir(tmp_path, model_dir, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, data_dir=None, split=None: Dataset.from_list(ROWS))
    output_dir = tmp_path / "out"
    (output_dir / "ruler__x").mkdir(parents=True)  # so that out/ruler__x/../.. exists
    config = EvaluationConfig(
        dataset="ruler",
        data_dir="x/../../victim",
        model=model_dir,
        output_dir=str(output_dir),
        model_kwargs={"dtype": "float32"},
        force=True,
    )
    # Where `x/../../victim` used to lead: a folder next to the output directory, with files someone cares about.
    victim = tmp_path / f"victim__{config.model_tag()}__knorm__0.50"
    victim.mkdir()
    for name in ("predictions.csv", "metrics.json"):
        (victim / name).write_text("precious")

    CountingRunner(config).run_evaluation()
    assert [(victim / name).read_text() for name in ("predictions.csv", "metrics.json")] == ["precious"] * 2
    results_dir = config.get_results_dir()
    assert results_dir.parent == output_dir and results_dir.name.startswith("ruler__x_.._.._victim__")
    assert (results_dir / "metrics.json").exists()


def test_results_dir_names_are_sanitised_and_must_resolve_inside_the_output_dir(tmp_path):
    config = EvaluationConfig(dataset="ruler", model="org/m", data_dir="a/../b c\\d")
    assert config.get_results_dir(tmp_path) == tmp_path / "ruler__a_.._b_c_d__org--m__knorm__0.50"

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    linked = EvaluationConfig(dataset="ruler", model="org/m", output_dir=str(output_dir))
    (output_dir / "ruler__4096__org--m__knorm__0.50").symlink_to(outside)
    with pytest.raises(ValueError, match=r"resolves to .*elsewhere, outside the output directory .*out"):
        linked.get_results_dir()


# -- 3. finished runs are keyed on the rows they evaluated ----------------------------------------------------------
def test_a_finished_run_is_evaluated_again_when_its_rows_changed(tmp_path, model_dir, capsys):
    data_file = write_rows(tmp_path / "x.jsonl", ROWS)
    config = make_config(tmp_path / "out", data_file, model_dir)
    CountingRunner(config).run_evaluation()
    results_dir = config.get_results_dir()
    first_fingerprint = yaml.safe_load((results_dir / "config.yaml").read_text())["data_fingerprint"]
    unchanged = CountingRunner(config)
    unchanged.run_evaluation()
    assert unchanged.calls == 0  # the same rows: the finished run is reused

    new_rows = [dict(row, answer=[f"new answer {i}"]) for i, row in enumerate(ROWS)]
    new_rows[0]["context"] = "The magic number of the green door is 1234. " * 3
    write_rows(data_file, new_rows)
    capsys.readouterr()
    rerun = CountingRunner(config)
    metrics = rerun.run_evaluation()
    assert rerun.calls == 3
    saved = pd.read_csv(results_dir / "predictions.csv", keep_default_na=False)
    assert list(saved["answer"]) == [str([f"new answer {i}"]) for i in range(3)]  # the new rows' table
    assert metrics == {"niah_single_1": {"string_match": 0.0}}  # nobody answers "new answer i"
    assert yaml.safe_load((results_dir / "config.yaml").read_text())["data_fingerprint"] != first_fingerprint
    assert "| niah_single_1.string_match | 0.00" in capsys.readouterr().out


# -- 4. a run folder is locked ---------------------------------------------------------------------------------------
def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, model_dir):
    data_file = write_rows(tmp_path / "rows.jsonl", ROWS)
    config = make_config(tmp_path / "out", data_file, model_dir)
    seen = {}

    class FirstRun(CountingRunner):
        def answer_group(self, rows):
            if self.calls == 1:  # the first row is saved; an identical run starts now, into the same folder
                second = CountingRunner(make_config(tmp_path / "out", data_file, model_dir))
                try:
                    second.run_evaluation()
                except Exception as error:  # noqa: BLE001 - recorded, asserted below
                    seen["error"] = error
                seen["calls"] = second.calls
            return super().answer_group(rows)

    first = FirstRun(config)
    first.run_evaluation()
    assert seen["calls"] == 0  # it neither resumed the live run's rows nor answered any
    message = str(seen.get("error"))
    assert re.search(rf"Another run \(pid {os.getpid()} on {re.escape(socket.gethostname())}, started .*\) is", message)
    assert "holds its lock" in message and "Wait for it to finish" in message
    assert first.calls == 3
    assert sorted(p.name for p in config.get_results_dir().iterdir()) == [
        "config.yaml",
        "metrics.json",
        "predictions.csv",
    ]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, model_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    data_file = write_rows(tmp_path / "rows.jsonl", ROWS)
    config = make_config(tmp_path / "out", data_file, model_dir)
    results_dir = config.get_results_dir()
    results_dir.mkdir(parents=True)
    lock_file = results_dir / ".lock.rank0"
    owner = {"pid": dead.pid, "host": socket.gethostname(), "token": "old", "started": "earlier"}
    lock_file.write_text(json.dumps(owner))
    runner = CountingRunner(config)
    runner.run_evaluation()
    assert runner.calls == 3 and not lock_file.exists()


def test_run_lock_respects_live_and_foreign_owners(tmp_path):
    from harness.results import RunLock, RunLockedError

    path = tmp_path / ".lock.rank0"
    with RunLock(path):
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} .*holds its lock"):
            RunLock(path).acquire()
    assert not path.exists()
    path.write_text(json.dumps({"pid": 1, "host": "another-host", "token": "t", "started": "then"}))
    with pytest.raises(RunLockedError, match=r"pid 1 on another-host"):
        RunLock(path).acquire()  # a lock of another machine cannot be checked: it is respected
    assert json.loads(path.read_text())["token"] == "t"


def test_the_cli_says_in_one_line_that_the_folder_is_in_use(tmp_path, model_dir, capsys):
    from harness.results import RunLock

    data_file = write_rows(tmp_path / "rows.jsonl", ROWS)
    options = dict(dataset="ruler", data_path=str(data_file), model=model_dir, output_dir=str(tmp_path / "out"))
    results_dir = EvaluationConfig(press_name="knorm", **options).get_results_dir()
    with RunLock(results_dir / ".lock.rank0"):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_module.main(press_name="knorm", progress=False, **options)
    assert exit_info.value.code == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert line.startswith(f"Error: Another run (pid {os.getpid()}") and str(results_dir) in line


# -- 5. rows are checked up front -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "row, change, message",
    [
        (
            2,
            {"max_new_tokens": None},
            r"Row 2 of .*rows\.jsonl has no value in column 'max_new_tokens' .*--max_new_tokens",
        ),
        (1, {"answer": None}, r"Row 1 of .*rows\.jsonl has no value in column 'answer'"),
        (0, {"context": None}, r"Row 0 of .*rows\.jsonl has no value in column 'context'"),
        (2, {"max_new_tokens": "many"}, r"Row 2 of .*'many' in column 'max_new_tokens', which must be a positive int"),
        (1, {"max_new_tokens": 2.5}, r"Row 1 of .*2\.5 in column 'max_new_tokens', which must be a positive integer"),
    ],
)
def test_a_row_with_a_missing_or_bad_value_is_named_before_the_model_loads(
    tmp_path, model_dir, monkeypatch, row, change, message
):
    rows = [dict(r) for r in ROWS]
    rows[row].update(change)
    rows[row] = {key: value for key, value in rows[row].items() if value is not None}  # a missing field
    data_file = write_rows(tmp_path / "rows.jsonl", rows)
    config = make_config(tmp_path / "out", data_file, model_dir)
    monkeypatch.setattr(EvaluationRunner, "_setup_model_pipeline", no_model)
    with pytest.raises(ValueError, match=message):
        EvaluationRunner(config).run_evaluation()
    assert not config.get_results_dir().exists()  # nothing created for a run that could not start


# -- 6. an unreachable Hub model is one line ---------------------------------------------------------------------------
def test_an_unreachable_hub_model_is_one_line_with_the_way_out(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests, whatever the env
    with pytest.raises(SystemExit) as exit_info:
        evaluate_module.main(model="nobody-here/no-such-model", output_dir=str(tmp_path / "out"), progress=False)
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "Error: The model 'nobody-here/no-such-model' is neither a local directory nor reachable on the Hugging Face "
        "Hub"
    )
    assert "--model" in lines[0] and "hf download nobody-here/no-such-model --local-dir DIR" in lines[0]
    assert not (tmp_path / "out").exists()
