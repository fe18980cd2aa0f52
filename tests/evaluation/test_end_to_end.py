# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""End to end on a tiny local model: files, summary table, skip, resume after an interrupt, data-parallel shards."""

import json
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from transformers import pipeline

import evaluation.evaluate as evaluate_module
import kvpress  # noqa: F401  (registers the pipeline)
from evaluation.benchmarks.ruler.calculate_metrics import calculate_metrics as ruler_metrics
from evaluation.evaluate import EvaluationConfig, EvaluationRunner, ProcessGroup
from kvpress.presses.knorm_press import KnormPress
from tests.fixtures import saved_model_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
# Three contexts, the first one with two questions: 4 rows, 3 pipeline calls.
ROWS = [
    {"context": "The magic number of the red door is 4821. " * 3, "question": "Red door number?", "answer": ["4821"]},
    {"context": "The magic number of the red door is 4821. " * 3, "question": "Which door?", "answer": ["red"]},
    {"context": "Alice keeps the key under the blue stone. " * 3, "question": "Where is the key?", "answer": ["blue"]},
    {"context": "The train to Oslo leaves at 7 in the morning. " * 3, "question": "When?", "answer": ["7"]},
]
for row in ROWS:
    row.update(answer_prefix="Answer:", task="niah_single_1", max_new_tokens=3)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


@pytest.fixture(scope="module")
def model_dir():
    return saved_model_dir("llama")


def make_config(output_dir, data_file, model_dir, **options) -> EvaluationConfig:
    options.setdefault("press_name", "knorm")
    options.setdefault("compression_ratio", 0.5)
    return EvaluationConfig(
        dataset="ruler",
        data_path=str(data_file),
        model=model_dir,
        output_dir=str(output_dir),
        model_kwargs={"dtype": "float32"},
        **options,
    )


class CountingRunner(EvaluationRunner):
    """Counts pipeline calls; optionally interrupts the run on the n-th call."""

    interrupt_at = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def answer_group(self, rows):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return super().answer_group(rows)


def read_predictions(results_dir) -> dict:
    df = pd.read_csv(results_dir / "predictions.csv", keep_default_na=False)
    return dict(zip(df["row_id"], df["predicted_answer"]))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_file, model_dir):
    """One uninterrupted single-process run, shared by the tests that compare against it."""
    output_dir = tmp_path_factory.mktemp("reference_run")
    runner = CountingRunner(make_config(output_dir, data_file, model_dir))
    metrics = runner.run_evaluation()
    return runner, metrics, runner.config.get_results_dir()


def test_run_writes_predictions_metrics_and_config(reference_run, model_dir, capsys):
    runner, metrics, results_dir = reference_run
    assert runner.calls == 3  # the two questions of the first context share one compression
    assert sorted(p.name for p in results_dir.iterdir()) == ["config.yaml", "metrics.json", "predictions.csv"]

    df = pd.read_csv(results_dir / "predictions.csv", keep_default_na=False)
    assert len(df) == 4 and sorted(df["row_id"]) == [0, 1, 2, 3]
    assert "context" not in df.columns and set(df["compression_ratio"]) == {0.5}

    # The same answers as calling the pipeline directly with the same press.
    pipe = pipeline("kv-press-text-generation", model=model_dir, device="cpu")
    direct = pipe(
        ROWS[0]["context"],
        questions=[ROWS[0]["question"], ROWS[1]["question"]],
        answer_prefix="Answer:",
        press=KnormPress(0.5),
        max_new_tokens=3,
    )["answers"]
    assert read_predictions(results_dir)[0] == direct[0] and read_predictions(results_dir)[1] == direct[1]

    # metrics.json is the RULER metric of the saved predictions.
    df["answer"] = [row["answer"] for row in ROWS]
    assert json.loads((results_dir / "metrics.json").read_text()) == ruler_metrics(df) == metrics
    saved = yaml.safe_load((results_dir / "config.yaml").read_text())
    assert saved["press_init_command"] == repr(KnormPress(compression_ratio=0.5))
    assert saved["dataset"] == "ruler" and saved["compression_ratio"] == 0.5


def test_summary_table_and_running_score(tmp_path, data_file, model_dir, capsys):
    CountingRunner(make_config(tmp_path, data_file, model_dir, press_name="streaming_llm")).run_evaluation()
    captured = capsys.readouterr()
    assert "| niah_single_1.string_match |" in captured.out and "| score (headline)" in captured.out
    assert "press streaming_llm at 0.5, 4 rows" in captured.out
    assert "score=" in captured.err  # the progress bar shows the running score


def test_a_finished_run_is_skipped_unless_forced(reference_run, capsys, monkeypatch):
    runner, metrics, results_dir = reference_run
    modified = (results_dir / "metrics.json").stat().st_mtime_ns

    def no_model(self):
        raise AssertionError("a finished run must not load the model")

    monkeypatch.setattr(EvaluationRunner, "_setup_model_pipeline", no_model)
    again = CountingRunner(runner.config)
    assert again.run_evaluation() == metrics and again.calls == 0
    assert (results_dir / "metrics.json").stat().st_mtime_ns == modified
    assert "| score (headline)" in capsys.readouterr().out

    changed = EvaluationConfig(**{**runner.config.to_dict(), "model_kwargs": {"dtype": "bfloat16"}})
    with pytest.raises(ValueError, match="different configuration .*model_kwargs.*--force"):
        CountingRunner(changed).run_evaluation()


def test_force_reruns(tmp_path, data_file, model_dir):
    CountingRunner(make_config(tmp_path, data_file, model_dir, press_name="tova")).run_evaluation()
    forced = CountingRunner(make_config(tmp_path, data_file, model_dir, press_name="tova", force=True))
    forced.run_evaluation()
    assert forced.calls == 3


def test_an_interrupted_run_resumes_without_duplicates_or_loss(tmp_path, reference_run, data_file, model_dir):
    config = make_config(tmp_path, data_file, model_dir)
    results_dir = config.get_results_dir()
    interrupted = CountingRunner(config)
    interrupted.interrupt_at = 3  # dies while answering the third context
    with pytest.raises(KeyboardInterrupt):
        interrupted.run_evaluation()
    assert not (results_dir / "predictions.csv").exists() and not (results_dir / "metrics.json").exists()
    saved_lines = (results_dir / "partial" / "rank0.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["row_id"] for line in saved_lines) == [0, 1, 2]  # the finished rows

    resumed = CountingRunner(make_config(tmp_path, data_file, model_dir))
    resumed.run_evaluation()
    assert resumed.calls == 1  # only the unfinished context
    assert not (results_dir / "partial").exists()
    assert read_predictions(results_dir) == read_predictions(reference_run[2])  # nothing lost, nothing duplicated


def test_data_parallel_shards_merge_into_the_single_process_result(tmp_path, reference_run, data_file, model_dir):
    results_dir = make_config(tmp_path, data_file, model_dir).get_results_dir()
    second = CountingRunner(make_config(tmp_path, data_file, model_dir), ProcessGroup(rank=1, world_size=2))
    assert second.run_evaluation() is None  # only the main process merges
    assert second.calls == 1  # groups 0, 1, 2 -> rank 1 answers group 1
    assert [
        json.loads(line)["row_id"] for line in (results_dir / "partial" / "rank1.jsonl").read_text().splitlines()
    ] == [2]
    assert not (results_dir / "predictions.csv").exists()

    main = CountingRunner(make_config(tmp_path, data_file, model_dir), ProcessGroup(rank=0, world_size=2))
    metrics = main.run_evaluation()
    assert main.calls == 2  # groups 0 and 2
    assert read_predictions(results_dir) == read_predictions(reference_run[2])
    assert metrics == reference_run[1]


def test_quantized_cache_is_passed_to_the_pipeline(tmp_path, data_file, model_dir, monkeypatch):
    import transformers

    created = []

    class RecordingCache(transformers.DynamicCache):
        def __init__(self, backend, config, **kwargs):
            created.append((backend, kwargs))
            super().__init__(config=config)

    monkeypatch.setattr(transformers, "QuantizedCache", RecordingCache)
    config = make_config(tmp_path, data_file, model_dir, kv_cache="quantized", kv_cache_backend="hqq", kv_cache_nbits=4)
    CountingRunner(config).run_evaluation()
    assert created == [("hqq", {"nbits": 4})] * 3  # a fresh cache per compressed context
    assert config.get_results_dir().name.endswith("__kv_hqq4")


def test_synthetic_rows_from_a_jsonl(tmp_path, model_dir):
    rows = [dict(row, task="niah_single_noise") for row in ROWS[2:]]
    path = tmp_path / "synthetic.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = EvaluationConfig(dataset="synthetic", data_path=str(path), model=model_dir, output_dir=str(tmp_path))
    metrics = CountingRunner(config).run_evaluation()
    assert set(metrics) == {"niah_single_noise", "all"}


def test_the_default_run_generates_synthetic_rows_for_the_reference_model(tmp_path, model_dir, monkeypatch, capsys):
    # The main job with the shipped YAML (synthetic task, model "reference"); the tiny model stands in for the
    # reference checkpoint, with a "trained length" of 300 tokens.
    monkeypatch.setattr(evaluate_module, "reference_model", lambda: (Path(model_dir), 300))
    evaluate_module.main(output_dir=str(tmp_path), num_samples=2, max_new_tokens=2)
    folders = sorted(path.name for path in tmp_path.iterdir())
    expected = [
        f"synthetic__niah_single_noise__reference__{press}__{ratio}__ctx300__n2__max_new_tokens2"
        for press, ratio in (("expected_attention", "0.50"), ("no_press", "0.00"), ("snapkv", "0.50"),
                             ("streaming_llm", "0.50"))
    ]  # fmt: skip
    assert folders == expected  # one run (and folder) per press of the shipped list
    results_dir = tmp_path / expected[0]
    df = pd.read_csv(results_dir / "predictions.csv")
    assert len(df) == 2 and set(df["task"]) == {"niah_single_noise"}
    saved = yaml.safe_load((results_dir / "config.yaml").read_text())
    assert saved["model"] == "reference" and saved["context_length"] == 300
    out = capsys.readouterr().out
    assert "| all.string_match" in out
    assert "headline score by press" in out and "| expected_attention | 0.50 " in out


def test_a_missing_reference_model_says_how_to_create_it(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "reference_model", lambda: (tmp_path / "model", 1024))
    runner = EvaluationRunner(EvaluationConfig(dataset="ruler", output_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"reference model, expected in .*model, which has no checkpoint"):
        runner._resolve_model()
    missing_dir = EvaluationRunner(EvaluationConfig(dataset="ruler", model=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match=r"The model directory .*nope does not exist"):
        missing_dir._resolve_model()


def test_the_command_line_runs_from_any_directory(tmp_path, data_file, model_dir, monkeypatch, capsys):
    config_file = tmp_path / "my_config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {"dataset": "ruler", "data_path": str(data_file), "model": model_dir, "press_name": "random", "seed": 1}
        )
    )
    # `python evaluation/evaluate.py ...` from another folder, run in this process (no new interpreter to start).
    script = REPO_ROOT / "evaluation" / "evaluate.py"
    argv = [str(script), "--config_file", str(config_file), "--max_samples", "1", "--output_dir", "out"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    assert "| score (headline)" in capsys.readouterr().out
    runs = list((tmp_path / "out").iterdir())
    model_tag = "--".join(Path(model_dir).parts[-2:])
    assert [run.name for run in runs] == [f"ruler__rows__{model_tag}__random__0.50__max_samples1__seed1"]
    assert len(pd.read_csv(runs[0] / "predictions.csv")) == 1

    monkeypatch.setattr(sys, "argv", [str(script), "--press_name", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 1 and "Error: Unknown press 'nope'" in capsys.readouterr().err
