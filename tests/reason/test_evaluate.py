# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""End to end on the shipped reference model, on CPU: one press of each family, resume after a kill, reruns."""

import json
from pathlib import Path

import pytest
import yaml

from reason import generation
from reason.evaluate import evaluate
from reason.shared import REFERENCE_MODEL_DIR, synthetic_rows

BUDGET = 64
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """Synthetic variable-tracking rows with 128-token contexts (prompts of ~170 tokens, more than BUDGET)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    path = tmp_path_factory.mktemp("data") / "vt128.jsonl"
    rows = synthetic_rows("variable_tracking", 4, 128, tokenizer=tokenizer, seed=5)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(data_path, output_dir, **overrides):
    settings = dict(
        dataset="synthetic",
        data_path=str(data_path),
        press_name="knorm",
        cache_budget=BUDGET,
        max_new_tokens=NEW_TOKENS,
        num_samples=2,
        output_dir=str(output_dir),
        progress=False,
    )
    settings.update(overrides)
    return evaluate(**settings)


def predictions(run_dir):
    lines = Path(run_dir, "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("press_name", ["knorm", "h2o", "streaming_llm", "snapkv_d", "rkv", "full"])
def test_press_families_end_to_end(press_name, data_path, tmp_path):
    result = run(data_path, tmp_path, press_name=press_name)
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == tmp_path and f"__{press_name}__budget{BUDGET}__" in run_dir.name
    rows = predictions(run_dir)
    assert sorted(r["sample_id"] for r in rows) == [0, 1]
    for row in rows:
        assert row["input_token_count"] > BUDGET and 1 <= row["output_token_count"] <= NEW_TOKENS
        uncompressed = row["input_token_count"] + row["output_token_count"] - 1
        if press_name == "full":
            assert row["kept_cache_max"] == row["kept_cache_mean"] == uncompressed
        elif press_name == "rkv":  # prunes every compress_interval steps: the budget plus the steps since
            assert row["kept_cache_max"] == min(uncompressed, BUDGET + row["output_token_count"] - 1)
        else:  # scorers evict one entry per step once the budget is reached
            assert row["kept_cache_max"] == row["kept_cache_mean"] == BUDGET
        assert row["compression_ratio"] == pytest.approx(row["kept_cache_mean"] / uncompressed)
        assert row["stop_reason"] in ("eos", "repetition", "max_new_tokens")
        assert row["total_prefill_tokens"] == row["input_token_count"]  # press telemetry (kvpress/timing.py)
        assert row["execution_time"] > 0 and row["prefill_time"] >= 0
        assert row["correct"] == float(set(row["gold_answer"]) <= set(row["response"].replace(".", " ").split()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_samples"] == 2
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 2)
    assert metrics["mean_kept_cache_mean"] == pytest.approx(sum(r["kept_cache_mean"] for r in rows) / 2)
    assert metrics["mean_output_token_count"] == pytest.approx(sum(r["output_token_count"] for r in rows) / 2)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["press_name"] == press_name and config["cache_budget"] == BUDGET
    assert config["data_fingerprint"] == metrics["data_fingerprint"]
    assert not list(run_dir.glob(".lock*"))
    if press_name == "full":
        assert metrics["accuracy"] == 1.0  # the reference model follows these chains uncompressed


def test_kill_and_resume(data_path, tmp_path, monkeypatch):
    reference = run(data_path, tmp_path / "whole", num_samples=4)
    real = generation.generate_response
    calls = []

    def dies_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_response", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(data_path, tmp_path / "killed", num_samples=4)
    run_dir = next((tmp_path / "killed").iterdir())
    assert [r["sample_id"] for r in predictions(run_dir)] == [0, 1]
    assert not (run_dir / "metrics.json").exists() and not list(run_dir.glob(".lock*"))
    with open(run_dir / "predictions.jsonl", "a") as handle:
        handle.write('{"sample_id": 2, "response": "half a li')  # killed in the middle of a write
    monkeypatch.setattr(generation, "generate_response", real)
    resumed = run(data_path, tmp_path / "killed", num_samples=4)
    rows = predictions(run_dir)
    assert [r["sample_id"] for r in rows] == [0, 1, 2, 3]
    whole = predictions(reference["run_dir"])
    assert [r["response"] for r in rows] == [r["response"] for r in whole]
    assert resumed["metrics"]["accuracy"] == reference["metrics"]["accuracy"]


def test_finished_run_is_skipped_and_fresh_start_keeps_old_predictions(data_path, tmp_path, monkeypatch):
    first = run(data_path, tmp_path, num_samples=1)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was generated again")

    monkeypatch.setattr(generation, "generate_response", must_not_run)
    again = run(data_path, tmp_path, num_samples=1)
    assert again["metrics"] == first["metrics"]
    with pytest.raises(AssertionError, match="generated again"):
        run(data_path, tmp_path, num_samples=1, skip_existing=False, resume=False)
    run_dir = Path(first["run_dir"])
    assert (run_dir / "predictions.old0.jsonl").exists()


def test_other_data_in_the_same_run_folder_is_refused(data_path, tmp_path):
    first = run(data_path, tmp_path, num_samples=1)
    Path(first["run_dir"], "metrics.json").unlink()
    config = Path(first["run_dir"], "config.yaml")
    config.write_text(config.read_text().replace("data_fingerprint:", "data_fingerprint: x"))
    with pytest.raises(ValueError, match="other data"):
        run(data_path, tmp_path, num_samples=1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(press_name="nope"), "valid press names"),
        (dict(cache_budget=-1), "cache_budget"),
        (dict(num_samples=2, fraction=0.5), "not both"),
        (dict(batch_size=2), "padding"),
        (dict(model="a", model_name="b"), "disagree"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(dataset="gsm9k"), "valid datasets"),
        (dict(chat_template=True), "no chat template"),
    ],
)
def test_bad_settings(overrides, message, data_path, tmp_path):
    with pytest.raises(ValueError, match=message):
        run(data_path, tmp_path, **overrides)


def test_batches_with_full_press_match_single_rows(data_path, tmp_path):
    single = run(data_path, tmp_path / "one", press_name="full", num_samples=3)
    batched = run(data_path, tmp_path / "three", press_name="full", num_samples=3, batch_size=3)
    one, three = predictions(single["run_dir"]), predictions(batched["run_dir"])
    assert [r["response"] for r in one] == [r["response"] for r in three]
    assert [r["kept_cache_mean"] for r in one] == [r["kept_cache_mean"] for r in three]


def test_data_parallel_shards_merge(data_path, tmp_path, monkeypatch):
    """Two processes of a data-parallel run, run one after the other: each answers every other sample into its own
    file; the main process waits for all of them, then merges them into predictions.jsonl in sample order."""
    import reason.evaluate as harness
    from reason.shared import ProcessGroup

    reference = run(data_path, tmp_path / "one", num_samples=4)
    monkeypatch.setattr(harness, "ProcessGroup", _group_of(ProcessGroup, 0, 2))
    with pytest.raises(RuntimeError, match="2 of 4 samples have no prediction"):  # rank 1 has not run yet
        run(data_path, tmp_path / "two", num_samples=4)
    run_dir = next((tmp_path / "two").iterdir())
    assert [r["sample_id"] for r in predictions_of(run_dir / "predictions.rank0.jsonl")] == [0, 2]
    monkeypatch.setattr(harness, "ProcessGroup", _group_of(ProcessGroup, 1, 2))
    assert run(data_path, tmp_path / "two", num_samples=4) is None
    assert [r["sample_id"] for r in predictions_of(run_dir / "predictions.rank1.jsonl")] == [1, 3]
    monkeypatch.setattr(harness, "ProcessGroup", _group_of(ProcessGroup, 0, 2))
    result = run(data_path, tmp_path / "two", num_samples=4)
    assert not list(run_dir.glob("predictions.rank*.jsonl"))
    merged = predictions(run_dir)
    assert [r["sample_id"] for r in merged] == [0, 1, 2, 3]
    assert [r["response"] for r in merged] == [r["response"] for r in predictions(reference["run_dir"])]
    assert result["metrics"]["accuracy"] == reference["metrics"]["accuracy"]


def _group_of(process_group, rank, world_size):
    class Group(process_group):
        @classmethod
        def from_environment(cls):
            return process_group(rank=rank, world_size=world_size, local_rank=rank, barrier=None)

    return Group


def predictions_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
