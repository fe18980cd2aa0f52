# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The shipped reference model (reference/model/): it loads offline, retrieves from held-out synthetic rows with the
full cache, and compression visibly changes its accuracy (RULER-style tasks, https://arxiv.org/abs/2404.06654).

Held-out rows: `generate_rows` seeds rows "eval|<seed>|...", the training script "train|<seed>|..." (disjoint).
These tests take about three minutes of CPU (about 80 rows of 1024 tokens through the pipeline).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, pipeline

import kvpress  # noqa: F401  (registers the pipeline)
from harness.reference_model import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from harness.synthetic.tasks import TASK_NAMES, generate_rows
from kvpress.presses.random_press import RandomPress
from kvpress.presses.snapkv_press import SnapKVPress
from reference.evaluate import accuracy, predict

ROWS_PER_TASK = 6
SEED = 1
NIAH_SINGLE = ("niah_single_noise", "niah_single_essay", "niah_single_uuid")


@pytest.fixture(scope="module", autouse=True)
def offline():
    previous = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def pipe():
    return pipeline("kv-press-text-generation", model=str(REFERENCE_MODEL_DIR), device="cpu")


@pytest.fixture(scope="module")
def rows(pipe):
    return {
        task: generate_rows(task, ROWS_PER_TASK, TRAINED_CONTEXT_LENGTH, pipe.tokenizer, seed=SEED)
        for task in TASK_NAMES
    }


@pytest.fixture(scope="module")
def full_cache(pipe, rows):
    """Accuracy per task with the full cache (no press)."""
    all_rows = [row for task in TASK_NAMES for row in rows[task]]
    return accuracy(all_rows, predict(pipe, all_rows))


def test_loads_offline_as_a_small_gqa_llama():
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    config = model.config
    assert config.num_attention_heads > config.num_key_value_heads >= 2 and config.head_dim == 64
    assert config.vocab_size >= len(tokenizer) and tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


def test_pipeline_answers_a_needle_question(pipe):
    assert pipe.model.dtype == torch.float32
    row = generate_rows("niah_single_noise", 1, 512, pipe.tokenizer, seed=99)[0]
    answer = pipe(row["context"], question=row["question"], answer_prefix=row["answer_prefix"], max_new_tokens=24)
    key = row["question"].split(" for ")[1].split(" mentioned")[0]
    # the model restates the key as in the needle, then copies its value (reference/README.md)
    assert answer["answer"].strip() == f"{key} is: {row['answer'][0]}."


def test_full_cache_needle_in_a_haystack_single(full_cache):
    pooled = sum(full_cache[task] for task in NIAH_SINGLE) / len(NIAH_SINGLE)
    assert pooled >= 95.0, {task: full_cache[task] for task in NIAH_SINGLE}


@pytest.mark.parametrize(
    "task",
    ["niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words", "frequent_words"],
)
def test_full_cache_other_families(full_cache, task):
    # the issue asks 95% on multi-key and 80% on every other family
    assert full_cache[task] >= (95.0 if task == "niah_multikey" else 80.0), full_cache


def _accuracy(pipe, rows, press, question_aware=False) -> float:
    return accuracy(rows, predict(pipe, rows, press=press, question_aware=question_aware))["all"]


def test_random_press_at_ratio_0_9_loses_the_needle(pipe, rows, full_cache):
    essay = rows["niah_single_essay"]
    assert full_cache["niah_single_essay"] == 100.0
    assert _accuracy(pipe, essay, RandomPress(compression_ratio=0.9, seed=0)) <= 20.0


def test_question_aware_snapkv_keeps_variable_tracking_better_than_random_at_ratio_0_9(pipe, rows, full_cache):
    # Measured (reference/results/quality.json, 10 other rows): at 0.9 question-aware SnapKV keeps 48% of the
    # assignment chains of variable tracking where RandomPress keeps 8%. On the needle tasks neither keeps the value at
    # 0.9 (0 to 10%), so the claim is tested where it holds, and the needles are tested with KeyDiff below.
    # The margin asserted is half the measured one (40 points), for the sampling noise of 6 rows.
    chains = rows["variable_tracking"]
    assert full_cache["variable_tracking"] >= 95.0
    snapkv = _accuracy(pipe, chains, SnapKVPress(compression_ratio=0.9), question_aware=True)
    random = _accuracy(pipe, chains, RandomPress(compression_ratio=0.9, seed=0), question_aware=True)
    assert snapkv >= random + 20.0, (snapkv, random)


def test_key_outlier_press_keeps_the_needle_at_ratio_0_9(pipe, rows):
    # What holds for needles at 0.9 (reference/results/quality.json): in the essay haystack the needle's keys are
    # outliers, and KeyDiff (keys least similar to the mean key) keeps the needle (90% question-agnostic) while
    # RandomPress loses it (0%). In the noise haystack this checkpoint's KeyDiff loses it too (0%).
    from kvpress.presses.keydiff_press import KeyDiffPress

    essay = rows["niah_single_essay"]
    keydiff = _accuracy(pipe, essay, KeyDiffPress(compression_ratio=0.9))
    random = _accuracy(pipe, essay, RandomPress(compression_ratio=0.9, seed=0))
    assert keydiff >= random + 50.0, (keydiff, random)


def test_training_batches_mask_exactly_the_answer_and_the_context():
    from reference.train import make_batch, parse_args

    args = parse_args(
        [
            "--output_dir",
            "unused",
            "--tokens_per_batch",
            "1200",
            "--context_length",
            "256",
            "--start_context_length",
            "200",
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    batch = make_batch(7, args, tokenizer)
    again = make_batch(7, args, tokenizer)
    assert all(torch.equal(batch[key], again[key]) for key in batch)  # a function of (seed, index) only
    ids, answer_mask, context_mask = batch["input_ids"], batch["answer_mask"], batch["context_mask"]
    assert ids.shape[0] >= 2 and answer_mask.shape == context_mask.shape == (ids.shape[0], ids.shape[1] - 1)
    for i in range(ids.shape[0]):
        targets = ids[i, 1:]
        answer = tokenizer.decode(targets[answer_mask[i]])
        assert answer.endswith("</s>") and answer.count("</s>") == 1
        context = tokenizer.decode(ids[i, : int(context_mask[i].sum()) + 1])
        assert context.startswith("<s>") and context.endswith("\n")  # bos + the whole context, nothing more
        prompt = tokenizer.decode(ids[i, int(context_mask[i].sum()) + 1 : int(answer_mask[i].nonzero()[0]) + 1])
        assert prompt.startswith(("What", "Which")) and "\n" in prompt  # question + "\n" + answer_prefix
        assert not (answer_mask[i] & context_mask[i]).any()


def test_early_mixture_and_the_multikey_drill():
    from reference.train import DENSE_NEEDLES, TRAINING_TASKS, make_batch, parse_args

    dense = "niah_multikey_dense"
    args = parse_args(
        ["--output_dir", "unused", "--tokens_per_batch", "3000", "--context_length", "512", "--start_context_length"]
        + ["512", "--early_steps", "5"]
        + ["--early_task_weights", ",".join(f"{t}={int(t == dense)}" for t in TRAINING_TASKS)]
        + ["--task_weights", ",".join(f"{t}={1 if t == 'frequent_words' else 0}" for t in TRAINING_TASKS)]
    )
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    early = make_batch(4, args, tokenizer)
    assert {TRAINING_TASKS[int(t)] for t in early["task"]} == {"niah_multikey_dense"}
    for i in range(early["input_ids"].shape[0]):
        text = tokenizer.decode(early["input_ids"][i])
        assert 2 <= text.count("One special magic number for ") <= DENSE_NEEDLES
        answer = tokenizer.decode(early["input_ids"][i, 1:][early["answer_mask"][i]])
        key = text.split("What is the special magic number for ")[1].split(" mentioned")[0]
        value = answer.split(" is: ")[1].rstrip(".</s>")
        assert answer.startswith(f" {key} is: ") and f"for {key} is: {value}." in text  # the asked key's value
    late = make_batch(5, args, tokenizer)
    assert {TRAINING_TASKS[int(t)] for t in late["task"]} == {"frequent_words"}


def test_the_keyed_multiquery_drill_trains_every_asked_key_in_question_order():
    import re

    from reference.train import DENSE_NEEDLES, TRAINING_TASKS, make_batch, parse_args

    weights = ",".join(f"{t}={int(t == 'niah_multiquery_keyed')}" for t in TRAINING_TASKS)
    args = parse_args(
        ["--output_dir", "unused", "--tokens_per_batch", "3000", "--context_length", "512"]
        + ["--start_context_length", "512", "--early_steps", "0", "--task_weights", weights]
    )
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    batch = make_batch(3, args, tokenizer)
    assert {TRAINING_TASKS[int(t)] for t in batch["task"]} == {"niah_multiquery_keyed"}
    for i in range(batch["input_ids"].shape[0]):
        text = tokenizer.decode(batch["input_ids"][i])
        needles = dict(re.findall(r"One special magic number for (\S+) is: (\d+)\.", text))
        assert 2 <= len(needles) <= DENSE_NEEDLES
        asked = text.split("What are all the special magic numbers for ")[1].split(" mentioned")[0]
        asked_keys = asked.replace(" and ", ", ").split(", ")
        answer = tokenizer.decode(batch["input_ids"][i, 1:][batch["answer_mask"][i]])
        pairs = re.findall(r" (\S+) is: (\d+)[,.]", answer)
        assert [k for k, _ in pairs] == asked_keys and sorted(asked_keys) == sorted(needles)
        assert all(needles[key] == value for key, value in pairs)  # each value after its own key


def test_bad_task_weights_are_refused():
    from reference.train import parse_args

    for text, message in (
        ("nope=1", "unknown task"),
        ("common_words=x", "must be a number"),
        ("common_words=-1", ">= 0"),
    ):
        with pytest.raises(SystemExit):
            parse_args(["--output_dir", "unused", "--task_weights", text])


def tiny_cpu_run(steps: int) -> list[str]:
    """train.py arguments of a tiny model trained for `steps` steps on the CPU, without held-out evaluation."""
    return f"--device cpu --tiny --max_steps {steps} --workers 0 --eval_rows 0 --eval_rows_long 0".split()


def test_a_missed_milestone_stops_the_run_and_a_met_one_does_not(tmp_path):
    from reference.train import main

    common = tiny_cpu_run(15) + ["--early_steps", "0"]
    # an untrained tiny model answers no frequent-words row exactly: a milestone of 0.5 at step 5 is missed
    missed = ["--milestone", "frequent_words=0.5@5", "--retries", "0"]
    with pytest.raises(SystemExit) as stopped:
        main(["--output_dir", str(tmp_path / "missed")] + missed + common)
    assert stopped.value.code == 3
    summary = json.loads((tmp_path / "missed" / "train_summary.json").read_text())
    assert summary["steps"] == 5 and not summary["complete"] and summary["held_out_accuracy"] == {}
    assert summary["missed_milestone"].startswith("frequent_words at 0.000 < 0.5 by step 5")
    assert (tmp_path / "missed" / "resume" / "optimizer.pt").exists()  # it can still be resumed or inspected
    main(["--output_dir", str(tmp_path / "met"), "--milestone", "frequent_words=0@5"] + common)
    summary = json.loads((tmp_path / "met" / "train_summary.json").read_text())
    assert summary["steps"] == 15 and summary["complete"] and summary["missed_milestone"] is None


def test_a_missed_milestone_starts_again_with_the_next_seed_as_many_times_as_retries_allow(tmp_path):
    from reference.train import main

    args = tiny_cpu_run(6) + ["--early_steps", "0", "--milestone", "frequent_words=0.5@5", "--retries", "1"]
    with pytest.raises(SystemExit) as stopped:
        main(["--output_dir", str(tmp_path)] + args)
    assert stopped.value.code == 3  # both attempts missed it
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert [attempt["seed"] for attempt in summary["attempts"]] == [0, 1]
    assert all(attempt["missed_milestone"] and attempt["steps"] == 5 for attempt in summary["attempts"])
    assert summary["seconds_all_attempts"] > 0
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(record["seed"], record["step"]) for record in records] == [(0, 5), (1, 5)]  # the curve of each attempt


def test_the_default_recipe_abandons_a_run_without_key_matching_and_none_turns_that_off():
    from reference.train import DEFAULT_MILESTONES, parse_args

    default = parse_args(["--output_dir", "x"])
    assert default.milestone == DEFAULT_MILESTONES == [("niah_multikey", 0.9, 6000)] and default.retries == 2
    # the shipped recipe leaves the keyed drill out (it cost common words), in both mixtures
    assert default.early_task_weights["niah_multiquery_keyed"] == default.task_weights["niah_multiquery_keyed"] == 0
    assert parse_args(["--output_dir", "x", "--milestone", "none"]).milestone == []
    assert parse_args(["--output_dir", "x", "--tiny"]).milestone == []
    given = parse_args(["--output_dir", "x", "--milestone", "variable_tracking=0.5@100"]).milestone
    assert given == [("variable_tracking", 0.5, 100)]  # a milestone given replaces the default one


def test_negative_retries_are_refused(capsys):
    from reference.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--output_dir", "x", "--retries", "-1"])
    assert "--retries must be >= 0, got -1" in capsys.readouterr().err


def test_cudnn_attention_is_left_alone_without_cuda():
    from reference import avoid_cudnn_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    assert avoid_cudnn_attention() is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.parametrize(
    "text, message",
    [
        ("nope=0.5@10", "unknown task"),
        ("niah_multikey=high@10", "TASK=ACCURACY@STEP"),
        ("niah_multikey=0.5", "TASK=ACCURACY@STEP"),
        ("niah_multikey=1.5@10", "in [0, 1]"),
        ("niah_multikey=0.5@0", "step >= 1"),
    ],
)
def test_bad_milestones_are_refused(text, message, capsys):
    from reference.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--output_dir", "unused", "--milestone", text])
    assert message in capsys.readouterr().err


def test_a_run_in_two_parts_equals_one_run(tmp_path):
    # --stop_after_steps then --resume continues exactly (optimizer state included): same weights as one run
    from reference.train import load_resume, parse_args, train

    common = tiny_cpu_run(6)
    train(parse_args(["--output_dir", str(tmp_path / "one")] + common))
    train(parse_args(["--output_dir", str(tmp_path / "two")] + common + ["--stop_after_steps", "3"]))
    summary = train(
        parse_args(["--output_dir", str(tmp_path / "two"), "--resume", str(tmp_path / "two" / "resume")] + common)
    )
    assert summary["complete"] and summary["steps"] == 6
    one, two = load_resume(str(tmp_path / "one" / "resume")), load_resume(str(tmp_path / "two" / "resume"))
    assert one["step"] == two["step"] == 6
    for name, weight in one["model"].items():
        assert torch.allclose(weight, two["model"][name], atol=1e-6, rtol=0), name  # fp32 weights
    log = [line for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines() if line]
    assert log, "the training curve is written"


def test_a_fixed_step_count_runs_to_its_end_whatever_the_time_budget(tmp_path):
    # --time_budget_s only sizes --max_steps auto: a run of a fixed step count is never cut short by it
    from reference.train import parse_args, train

    argv = ["--output_dir", str(tmp_path)] + tiny_cpu_run(6) + ["--time_budget_s", "1", "--eval_reserve_s", "0"]
    summary = train(parse_args(argv))
    assert summary["complete"] and summary["steps"] == 6
    record = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[0])
    assert record["step"] == 5 and record["step_ms"] > 0 and 0 <= record["data_wait_ms"] <= record["step_ms"]


def test_training_benchmark_times_the_loader_and_the_step(tmp_path, capsys):
    from reference.bench_train import main

    output = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--tiny", "--lengths", "200", "--steps", "1", "--workers", "0"]
    result = main(argv + ["--loader_seconds", "0.5", "--no_compile", "--new_shapes", "2", "--output", str(output)])
    assert json.loads(output.read_text()) == result
    assert result["loader"][0]["batches_per_s"] > 0 and result["steps"][0]["step_s"] > 0
    assert result["steps"][0]["new_shape_step_s"] > 0 and result["cudnn_attention"] is False
    assert 0 < result["steps"][0]["host_s"] <= result["steps"][0]["step_s"]
    assert result["steps"][0]["speedup_vs_eager"] == 1.0 and "| data workers |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="at least 160"):
        main(["--lengths", "64", "--output", str(output)])


def test_the_multikey_probe_finds_the_retrieval_heads_of_the_shipped_model(tmp_path):
    # The shipped model retrieves: some head at the answer attends to the asked needle's value and not the others,
    # and one early head looks back from the space before a value to the key, in the needles and in the answer alike.
    from reference.probe_multikey import main

    result = main(["--rows", "3", "--length", "300", "--output", str(tmp_path / "probe.json")])
    heads = json.loads((tmp_path / "probe.json").read_text())["heads"]
    assert heads == result["heads"] and len(heads) == 6 * 4
    assert max(h["asked_value"] - h["other_value"] for h in heads.values()) > 0.8
    assert max(min(h["needle_to_own_key"], h["answer_to_restated_key"]) for h in heads.values()) > 0.8
    with pytest.raises(SystemExit):
        main(["--rows", "0"])


def test_evaluate_cli_writes_the_accuracy_per_task(tmp_path):
    from reference.evaluate import main

    output = tmp_path / "accuracy.json"
    report = main(
        ["--rows", "2", "--seeds", "5", "--context_length", "512"]
        + ["--tasks", "niah_single_noise,variable_tracking", "--device", "cpu", "--output", str(output)]
    )
    assert json.loads(output.read_text()) == report
    assert report["rows_per_task"] == 2 and set(report["accuracy"]) == {"niah_single_noise", "variable_tracking", "all"}
    assert report["accuracy"]["niah_single_noise"] == 100.0  # the shipped model retrieves a single needle
    with pytest.raises(SystemExit):
        main(["--tasks", "no_such_task"])
    with pytest.raises(SystemExit):
        main(["--rows", "0"])


def test_answer_loss_per_token_or_per_row():
    from reference.train import mean_answer_loss, parse_args

    losses = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False, False, False, False]])
    # token: (1 + 1 + 1 + 4) / 4 answer tokens; row: mean of the rows with an answer, (1 + 4) / 2
    assert mean_answer_loss(losses, mask, "token").item() == pytest.approx(7 / 4)
    assert mean_answer_loss(losses, mask, "row").item() == pytest.approx(5 / 2)
    assert mean_answer_loss(losses, torch.zeros_like(mask), "row").item() == 0.0
    with pytest.raises(ValueError, match="'token' or 'row'"):
        mean_answer_loss(losses, mask, "sequence")
    assert parse_args(["--output_dir", "x"]).answer_loss == "token"
    with pytest.raises(SystemExit):
        parse_args(["--output_dir", "x", "--answer_loss", "sequence"])


def test_bench_decode_times_both_attention_settings(tmp_path):
    from reference.bench_decode import main

    output = tmp_path / "decode.json"
    before = torch.backends.cuda.cudnn_sdp_enabled()
    report = main(
        ["--device", "cpu", "--dtype", "float32", "--rows", "1", "--new_tokens", "2", "--context_length", "256"]
        + ["--output", str(output)]
    )
    assert json.loads(output.read_text()) == report
    assert [row["cudnn_sdp"] for row in report["results"]] == [True, False]
    assert all(row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0 for row in report["results"])
    on, off = (row["decode_ms_per_token"] for row in report["results"])
    assert report["decode_ratio_cudnn_on_over_off"] == pytest.approx(on / off)
    assert 256 < report["input_tokens"][0] <= 320 and torch.backends.cuda.cudnn_sdp_enabled() == before
    with pytest.raises(SystemExit):
        main(["--new_tokens", "0"])
