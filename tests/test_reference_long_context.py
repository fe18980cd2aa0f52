# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The long-context recipe of reference/train.py (`--recipe long32k`, issue 26) and its tooling, on CPU: continuing a
checkpoint with YaRN, the length curriculum at constant tokens per step, the time calibration, resumable checkpoints
split into parts under the device's file limit, the export of a resume checkpoint as a model, the held-out
evaluation at several lengths and the long-context quality table. The tests of the 32k checkpoint itself
(reference/model-32k/) skip while it is not there."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from harness.reference_model import (
    LONG_CONTEXT_LENGTH,
    REFERENCE_MODEL_32K_DIR,
    REFERENCE_MODEL_DIR,
    TRAINED_CONTEXT_LENGTH,
    long_context_model_dir,
)

HAS_32K = (REFERENCE_MODEL_32K_DIR / "config.json").is_file()
needs_32k = pytest.mark.skipif(
    not HAS_32K,
    reason=f"{REFERENCE_MODEL_32K_DIR} is not there yet: it comes from `reference/train.py --recipe long32k` on a GPU "
    "(reference/README.md)",
)


def tiny(steps: int) -> list[str]:
    return f"--device cpu --tiny --max_steps {steps} --workers 0 --eval_rows 0 --eval_rows_long 0".split()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model trained for 4 steps at 256 tokens and saved as a model directory (what --init_from reads)."""
    from reference.train import parse_args, train

    out = tmp_path_factory.mktemp("tiny")
    train(parse_args(["--output_dir", str(out)] + tiny(4)))
    return out / "model"


def test_the_long_recipe_fills_the_options_not_given():
    from reference.train import LONG_RECIPE, parse_args

    args = parse_args(["--recipe", "long32k", "--output_dir", "x"])
    assert args.init_from == str(REFERENCE_MODEL_DIR) and args.context_length == LONG_CONTEXT_LENGTH == 32768
    assert args.yarn_factor == 32 and args.yarn_original_length == TRAINED_CONTEXT_LENGTH
    assert args.max_steps == "auto" and args.compile is False and args.optimizer_dtype == "bfloat16"
    assert args.eval_lengths == [4096, 8192, 16384, 32768] and args.milestone == []  # key matching is learned
    assert {name: getattr(args, name) for name in LONG_RECIPE} == LONG_RECIPE
    # a given option wins, even when it equals the scratch default
    given = parse_args(["--recipe", "long32k", "--output_dir", "x", "--context_length", "1024", "--lr", "1e-3"])
    assert given.context_length == 1024 and given.lr == 1e-3 and given.tokens_per_batch == 65536
    # the scratch recipe is unchanged
    scratch = parse_args(["--output_dir", "x"])
    assert scratch.context_length == 1024 and scratch.max_steps == 23000 and scratch.init_from is None
    assert scratch.rope_theta is None and scratch.yarn_factor is None and scratch.min_context_length == 160


def test_tiny_leaves_the_given_options_alone():
    from reference.train import parse_args

    args = parse_args(["--output_dir", "x", "--tiny", "--context_length", "1024", "--start_context_length", "256"])
    assert (args.context_length, args.start_context_length, args.layers, args.hidden) == (1024, 256, 2, 64)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--yarn_factor", "0.5"], "--yarn_factor must be >= 1"),
        (["--min_context_length", "0"], "must be >= 1"),
        (["--tokens_per_batch", "0"], "--tokens_per_batch must be >= 1"),
        (["--eval_lengths", "4096,x"], "comma-separated integers"),
    ],
)
def test_bad_long_context_options_are_refused(argv, message, capsys):
    from reference.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--output_dir", "x"] + argv)
    assert message in capsys.readouterr().err


def test_export_needs_a_resume_checkpoint_and_training_needs_an_output_dir(capsys):
    from reference.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--export_to", "x"])
    assert "--export_to needs --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([])
    assert "--output_dir is required" in capsys.readouterr().err


def test_yarn_keeps_the_fast_frequencies_and_divides_the_slow_ones_by_the_factor():
    # the recipe's RoPE, checked against the frequencies of plain RoPE computed here
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from reference.train import parse_args, rope_parameters

    args = parse_args(["--recipe", "long32k", "--output_dir", "x"])
    parameters = rope_parameters(args, {"rope_type": "default", "rope_theta": 100000.0})
    assert parameters == {
        "rope_type": "yarn",
        "rope_theta": 100000.0,
        "factor": 32.0,
        "original_max_position_embeddings": 1024,
    }
    config = LlamaConfig(
        hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=32768, rope_parameters=parameters
    )
    inv_freq, scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    plain = 1.0 / 100000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ratio = inv_freq.double() / plain
    periods = 2 * math.pi / plain
    assert scale == pytest.approx(0.1 * math.log(32) + 1)  # YaRN's own sharpening (cos and sin scaled)
    assert torch.allclose(ratio[periods < 1024 / 32], torch.ones(1, dtype=torch.float64))  # local heads unchanged
    assert torch.allclose(ratio[periods > 1024], torch.full((1,), 1 / 32, dtype=torch.float64))  # slow ones / 32
    # without a RoPE option a continued checkpoint keeps its own; --yarn_factor 1 is plain RoPE; --rope_theta sets it
    kept = parse_args(["--output_dir", "x"])
    assert rope_parameters(kept, parameters) == parameters
    plain_args = parse_args(["--output_dir", "x", "--yarn_factor", "1", "--rope_theta", "500000"])
    assert rope_parameters(plain_args, parameters) == {"rope_type": "default", "rope_theta": 500000.0}
    rotation = parse_args(["--output_dir", "x", "--yarn_factor", "32", "--yarn_attention_factor", "1"])
    assert rope_parameters(rotation, None)["attention_factor"] == 1.0


def test_batches_hold_the_same_tokens_at_every_length_and_follow_the_curriculum(tokenizer):
    from reference.train import batch_length, curriculum_max_length, make_batch, parse_args, resolve_fractions

    argv = ["--output_dir", "x", "--context_length", "4096", "--start_context_length", "1024"]
    argv += ["--min_context_length", "512", "--tokens_per_batch", "16384", "--curriculum_steps", "0.5"]
    args = parse_args(argv)
    resolve_fractions(args, 100)
    assert [curriculum_max_length(step, args) for step in (0, 25, 50, 99)] == [1024, 2560, 4096, 4096]
    late = [batch_length(index, args) for index in range(50, 450)]
    assert min(late) >= 512 and max(late) <= 4096
    top_quarter = sum(length >= 3072 for length in late) / len(late)
    assert 0.55 <= top_quarter <= 0.75  # half the batches by construction, plus the uniform draws that land there
    for index in (0, 60, 61):
        batch = make_batch(index, args, tokenizer)
        rows, width = batch["input_ids"].shape
        length = batch_length(index, args)
        assert rows == max(1, 16384 // (length + 64))  # constant tokens per step
        assert length <= curriculum_max_length(index, args)
        contexts = batch["context_mask"].sum(dim=1) + 1  # bos included
        assert int(contexts.max()) <= length + 1 and int(contexts.min()) >= length - 16  # rows fill their length
        assert width - 1 >= int(contexts.max())


def test_the_step_time_model_and_the_predicted_schedule():
    from reference.train import parse_args, probe_lengths, schedule_seconds, step_time_model

    assert step_time_model({1000: 0.02 + 1e-6 * 1000, 4000: 0.02 + 4e-6, 8000: 0.02 + 8e-6 * 1000 / 1000}) != (0, 0)
    a, b = step_time_model({1024: 0.03, 8192: 0.06, 16384: 0.09, 32768: 0.15})
    assert a == pytest.approx(0.0260, abs=2e-3) and b == pytest.approx(3.9e-6, rel=0.05)
    assert step_time_model({2048: 0.05}) == (0.05, 0.0)
    assert step_time_model({1024: 0.05, 2048: 0.04}) == (pytest.approx(0.045), 0.0)  # never a negative slope
    args = parse_args(["--recipe", "long32k", "--output_dir", "x"])
    assert probe_lengths(args) == [1024, 8192, 16384, 32768]
    constant = schedule_seconds(1000, args, (0.1, 0.0))
    assert constant == pytest.approx(100.0)
    longer = [schedule_seconds(n, args, (0.02, 4e-6)) for n in (500, 1000, 2000)]
    assert longer[0] < longer[1] < longer[2]
    # the mean step is between the shortest and the longest batch's, and most of the time goes to long contexts
    assert 0.02 + 4e-6 * 1024 < longer[2] / 2000 < 0.02 + 4e-6 * 32768
    assert schedule_seconds(2000, args, (0.02, 4e-6), start=2000) == 0.0


def test_continuing_a_checkpoint_with_yarn_in_two_parts_under_a_time_budget(tmp_path, tiny_checkpoint, monkeypatch):
    import reference.train as train_module
    from reference.train import load_optimizer, load_resume, parse_args, train

    monkeypatch.setattr(train_module, "RESUME_PART_BYTES", 200_000)  # the tiny model's parts, like the 32k ones'
    argv = ["--output_dir", str(tmp_path), "--init_from", str(tiny_checkpoint), "--yarn_factor", "2"]
    argv += ["--yarn_original_length", "256", "--context_length", "512", "--start_context_length", "256"]
    argv += ["--min_context_length", "128", "--tokens_per_batch", "1024", "--optimizer_dtype", "bfloat16"]
    argv += ["--device", "cpu", "--workers", "0", "--eval_rows", "0", "--log_every", "2", "--max_steps", "auto"]
    argv += ["--time_budget_s", "600", "--eval_reserve_s", "0"]
    first = train(parse_args(argv + ["--stop_after_steps", "3"]))
    assert first["steps"] == 3 and not first["complete"] and first["max_steps"] > 3
    assert first["rope_parameters"]["rope_type"] == "yarn" and first["rope_parameters"]["factor"] == 2.0
    resume = tmp_path / "resume"
    parts = sorted(p.name for p in resume.iterdir())
    assert "part1" in parts and "optimizer_part1" in parts and "optimizer.pt" not in parts  # split
    assert all(p.stat().st_size <= 200_000 for p in resume.iterdir())
    state = load_resume(str(resume))
    config = json.loads(state["config"])
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["max_position_embeddings"] == 512
    saved = load_optimizer(str(resume))
    moments = [entry["exp_avg_sq"] for entry in saved["optimizer"]["state"].values()]
    assert saved["step"] == 3 and saved["dtype"] == "bfloat16" and all(m.dtype == torch.bfloat16 for m in moments)
    # the continued weights started from the checkpoint's: one step of AdamW at a warm-up rate moves them little
    initial = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).state_dict()
    moved = max((state["model"][name] - initial[name]).abs().max().item() for name in initial)
    assert 0 < moved < 0.05
    # the second part continues the schedule of the first (the same fitted step count) from its checkpoint
    second = train(parse_args(argv + ["--resume", str(resume), "--stop_after_steps", "2"]))
    assert second["steps"] == 5 and second["max_steps"] == first["max_steps"]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [2, 4]
    assert all(record["context_max"] <= 512 and record["mean_width"] > 128 for record in log)


def test_a_fitted_schedule_that_runs_out_of_time_is_still_evaluated(tmp_path, tiny_checkpoint, monkeypatch):
    import reference.train as train_module
    from reference.train import parse_args, train

    monkeypatch.setattr(train_module, "evaluate_held_out", lambda model, tokenizer, args: {"256": {"all": 1.0}})
    # a deadline already passed at the first step (the whole budget reserved for the evaluation: the deadline is the
    # start, whatever the machine's speed): the calibration fits one step, the loop stops before it
    argv = ["--output_dir", str(tmp_path), "--init_from", str(tiny_checkpoint), "--max_steps", "auto"]
    argv += ["--time_budget_s", "1", "--eval_reserve_s", "1", "--device", "cpu", "--tiny", "--workers", "0"]
    summary = train(parse_args(argv))
    assert summary["stopped_by_time_budget"] and not summary["complete"]
    assert summary["held_out_accuracy"] == {"256": {"all": 1.0}}
    assert (tmp_path / "resume" / "part0").exists()


def test_export_writes_the_resume_weights_as_a_model(tmp_path, tiny_checkpoint):
    from reference.train import load_resume, main, parse_args, train

    argv = ["--output_dir", str(tmp_path / "run"), "--init_from", str(tiny_checkpoint), "--yarn_factor", "4"]
    train(parse_args(argv + tiny(2)))
    main(["--resume", str(tmp_path / "run" / "resume"), "--export_to", str(tmp_path / "model")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.dtype == torch.float32 and model.config.rope_parameters["rope_type"] == "yarn"
    assert (tmp_path / "model" / "tokenizer.json").exists()
    weights = load_resume(str(tmp_path / "run" / "resume"))["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name].half().float()), name  # fp16 on disk, loaded as float32
    with pytest.raises(ValueError, match="no saved config"):
        from reference.train import export_resume, save_resume

        bare = tmp_path / "bare"
        save_resume(torch.nn.Linear(2, 2), 1, 1, parse_args(["--output_dir", str(bare)]))
        export_resume(str(bare / "resume"), str(tmp_path / "x"), str(REFERENCE_MODEL_DIR))


def test_the_held_out_evaluation_takes_its_lengths(tokenizer, monkeypatch):
    import reference.evaluate as evaluate_module
    from reference.train import eval_plan, evaluate_held_out, parse_args

    assert eval_plan(parse_args(["--output_dir", "x"])) == [(1024, 40), (2048, 10)]
    args = parse_args(["--output_dir", "x", "--eval_lengths", "300,600", "--eval_rows", "1"])
    assert eval_plan(args) == [(300, 1), (600, 1)]
    seen = []

    def fake_evaluate(pipe, rows, press=None, question_aware=False):
        lengths = {row["context_length"] for row in rows} if "context_length" in rows[0] else set()
        seen.append((len(rows), lengths))
        if len(seen) == 2:
            raise RuntimeError("CUDA out of memory")
        return {"all": 50.0}, ["" for _ in rows]

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR)
    results = evaluate_held_out(model, tokenizer, args)
    assert results["300"] == {"all": 50.0}
    assert results["600"] == {"error": "RuntimeError: CUDA out of memory"}  # recorded, the other length kept
    assert [count for count, _ in seen] == [9, 9]  # one row per task


def test_the_long_quality_table_puts_lengths_side_by_side(tmp_path):
    from reference.quality import LONG_PRESSES, cell_key, long_table, main, parse_args, result_names

    assert result_names(1024) == ("quality.json", "quality.png")
    assert result_names(32768) == ("quality_32768.json", "quality_32768.png")
    assert parse_args(["--presses", "long"]).press_names == list(LONG_PRESSES)
    assert "duo_attention" in LONG_PRESSES and "kvzip" in LONG_PRESSES and "pyramidkv" in LONG_PRESSES
    assert parse_args(["--model_dir", str(REFERENCE_MODEL_32K_DIR)]).output_dir.endswith("model-32k")
    with pytest.raises(SystemExit):
        parse_args(["--model_dir", str(tmp_path)])  # another model needs --output_dir

    def table(base: float, snap: float) -> dict:
        cells = {cell_key("no_press", 0.0, mode): {"accuracy": {"all": base}} for mode in ("agnostic", "aware")}
        cells[cell_key("snapkv", 0.5, "aware")] = {"accuracy": {"all": snap}}
        cells[cell_key("snapkv", 0.9, "agnostic")] = {"error": "boom"}
        return {"presses": ["no_press", "snapkv"], "cells": cells}

    text = long_table({32768: table(90.0, 40.0), 8192: table(95.0, 60.0)}, (0.5, 0.9))
    lines = text.splitlines()
    assert lines[0].split(" | ")[1:3] == ["8k q-agn. 0.5", "8k q-agn. 0.9"] and "32k q-aware 0.9" in lines[0]
    assert lines[2].startswith("| full cache | 95.0 | 95.0 | 95.0 | 95.0 | 90.0 |")
    assert lines[3] == "| `snapkv` |  | fails | 60.0 |  |  | fails | 40.0 |  |"
    for length, data in ((8192, table(95.0, 60.0)), (32768, table(90.0, 40.0))):
        (tmp_path / result_names(length)[0]).write_text(json.dumps(data))
    printed = main(["--output_dir", str(tmp_path), "--long_table", "8192,32768", "--ratios", "0.5,0.9"])
    assert printed["long_table"] == text
    with pytest.raises(FileNotFoundError, match="--context_length 4096"):
        main(["--output_dir", str(tmp_path), "--long_table", "4096"])


def test_a_rerun_retries_the_failed_cells_and_a_press_that_fails_waits(tmp_path, monkeypatch):
    from reference import quality

    calls = []

    def fake_run_cell(cell):  # snapkv runs out of memory at 0.5, tova fails for good; the rest succeed
        calls.append(cell)
        name, ratio, mode = cell
        if name == "snapkv" and ratio == 0.5 and len(calls) < 20:
            return {"press": name, "ratio": ratio, "mode": mode, "error": "OutOfMemoryError: CUDA out of memory."}
        if name == "tova" and len(calls) < 20:
            return {"press": name, "ratio": ratio, "mode": mode, "error": "ValueError: bad layout"}
        return {"press": name, "ratio": ratio, "mode": mode, "accuracy": {"all": 10.0 * ratio}}

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    argv = ["--model_dir", str(REFERENCE_MODEL_DIR), "--output_dir", str(tmp_path), "--presses", "snapkv,tova"]
    argv += ["--ratios", "0.5,0.9", "--context_length", "300", "--rows_per_task", "1", "--device", "cpu"]
    quality.main(argv)
    cells = json.loads((tmp_path / "quality_300.json").read_text())["cells"]
    # out of memory: recorded, and the press's other cells still ran; a real failure: its other cells wait
    assert "error" in cells["snapkv|0.5|agnostic"] and cells["snapkv|0.9|agnostic"]["accuracy"]["all"] == 9.0
    assert "error" in cells["tova|0.5|agnostic"] and "tova|0.9|agnostic" not in cells
    first = len(calls)
    calls.extend([None] * 20)  # the presses work now
    quality.main(argv)
    retried = set(calls[first + 20 :])
    assert ("snapkv", 0.5, "agnostic") in retried and ("tova", 0.9, "agnostic") in retried
    assert ("snapkv", 0.9, "agnostic") not in retried  # done cells are not run again
    cells = json.loads((tmp_path / "quality_300.json").read_text())["cells"]
    assert not [key for key, cell in cells.items() if "error" in cell] and len(cells) == 2 + 2 * 2 * 2


def test_a_run_killed_while_writing_the_table_keeps_every_finished_cell(tmp_path, monkeypatch):
    """The table is the run's resume state: a kill in the middle of rewriting it (the GPU runs end under `timeout`)
    must leave the previous version, not a truncated file that the next run cannot read."""
    import os

    from reference import quality

    def fake_run_cell(cell):
        name, ratio, mode = cell
        return {"press": name, "ratio": ratio, "mode": mode, "accuracy": {"all": 10.0 * ratio}}

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    argv = ["--model_dir", str(REFERENCE_MODEL_DIR), "--output_dir", str(tmp_path), "--presses", "snapkv"]
    argv += ["--context_length", "300", "--rows_per_task", "1", "--device", "cpu"]
    quality.main(argv + ["--ratios", "0.5"])
    table = tmp_path / "quality_300.json"
    before = table.read_text()
    assert len(json.loads(before)["cells"]) == 2 + 2  # the full cache and snapkv at 0.5, both modes

    def killed(fd):  # the signal lands once part of the new table is written
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        quality.main(argv + ["--ratios", "0.5,0.9"])
    assert table.read_text() == before
    assert sorted(path.name for path in tmp_path.iterdir() if path.suffix != ".png") == ["quality_300.json"]


def test_a_quality_cell_records_its_accuracy_and_the_device_it_ran_on(tokenizer):
    """A real cell on CPU (the 1k model, two rows of one task): a table's cells may come from several devices, so
    each says which."""
    from harness.synthetic.tasks import generate_rows
    from reference import quality

    rows = generate_rows("niah_single_essay", 2, 600, tokenizer, seed=5)
    threads = torch.get_num_threads()  # a worker runs one thread
    quality._init_worker(str(REFERENCE_MODEL_DIR), "cpu", rows)
    try:
        cell = quality.run_cell(("no_press", 0.0, "agnostic"))
        pressed = quality.run_cell(("knorm", 0.5, "aware"))
    finally:
        quality._WORKER.clear()
        torch.set_num_threads(threads)
    assert cell["device"] == "cpu" and "peak_gpu_gib" not in cell and "error" not in cell
    assert cell["accuracy"]["niah_single_essay"] == 100.0  # the 1k model finds single needles at 600 tokens
    assert (pressed["press"], pressed["ratio"], pressed["mode"], pressed["device"]) == ("knorm", 0.5, "aware", "cpu")
    assert 0.0 <= pressed["accuracy"]["all"] <= 100.0


def test_the_plot_keeps_a_press_colour_in_both_panels_and_names_every_press(tmp_path, monkeypatch):
    """A press missing from one panel (a table still filling) neither shifts the others' colours nor drops out of the
    legend; presses outside the table's required set are dashed."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from reference import quality

    cells = {quality.cell_key("no_press", 0.0, mode): {"accuracy": {"all": 90.0}} for mode in quality.MODES}
    cells[quality.cell_key("pyramidkv", 0.5, "agnostic")] = {"accuracy": {"all": 40.0}}  # the agnostic panel only
    for mode in quality.MODES:
        cells[quality.cell_key("snapkv", 0.5, mode)] = {"accuracy": {"all": 30.0}}
    results = {"meta": {"context_length": 32768}, "presses": ["no_press", "pyramidkv", "snapkv"], "cells": cells}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert quality.plot(results, tmp_path / "plot.png", ratios=(0.5,), required=("snapkv",))
    assert (tmp_path / "plot.png").stat().st_size > 0
    agnostic, aware = figures[0].axes[:2]
    lines = {mode: {line.get_label(): line for line in ax.get_lines()} for mode, ax in (("a", agnostic), ("w", aware))}
    assert set(lines["a"]) == {"pyramidkv", "snapkv"} and set(lines["w"]) == {"snapkv"}
    assert lines["a"]["snapkv"].get_color() == lines["w"]["snapkv"].get_color()
    assert lines["a"]["pyramidkv"].get_color() != lines["a"]["snapkv"].get_color()
    assert lines["a"]["pyramidkv"].get_linestyle() == "--" and lines["a"]["snapkv"].get_linestyle() == "-"
    assert [text.get_text() for text in aware.get_legend().get_texts()] == ["pyramidkv", "snapkv"]
    figures[0].clf()  # the patched close kept the figure


def test_quality_workers_are_capped_by_the_gpu_memory_they_need():
    from reference.quality import is_out_of_memory, worker_bytes, worker_limit

    gib = 2**30
    assert worker_bytes(32768) == 3 * gib and worker_bytes(8192) < worker_bytes(32768)
    assert worker_limit(12, 32768, 79 * gib) == 12 and worker_limit(3, 32768, 79 * gib) == 3  # an H100
    assert worker_limit(12, 32768, 10 * gib) == 3
    assert worker_limit(12, 2**20, 10 * gib) == 1  # never fewer than one: its cells say out of memory
    assert is_out_of_memory("OutOfMemoryError: CUDA out of memory. Tried to allocate 16.00 GiB")
    assert not is_out_of_memory("ValueError: bad layout")


def test_float32_gqa_attention_repeats_the_kv_heads_and_keeps_the_result(monkeypatch):
    """The quality workers' fix for SDPA's math kernel: float32 GQA goes through repeated KV heads (the memory-efficient
    kernel on CUDA), other dtypes keep transformers' choice, and the model computes the same logits."""
    from transformers.integrations import sdpa_attention

    from reference import repeat_kv_heads_in_float32
    from tests.fixtures import get_model, random_input_ids

    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", sdpa_attention.use_gqa_in_sdpa)  # undone after the test
    model = get_model("llama")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = random_input_ids(seq_len=40)
    key = torch.zeros(1, 2, 40, 16)
    # (mask, key) in older releases, then (mask, key, value)
    arity = len(inspect.signature(sdpa_attention.use_gqa_in_sdpa).parameters)

    def uses_gqa(key: torch.Tensor) -> bool:
        return sdpa_attention.use_gqa_in_sdpa(None, *[key] * (arity - 1))

    assert uses_gqa(key)  # transformers' own choice: enable_gqa without a mask
    with torch.no_grad():
        before = model(ids).logits
    assert repeat_kv_heads_in_float32() and repeat_kv_heads_in_float32()  # idempotent
    assert not uses_gqa(key) and uses_gqa(key.bfloat16())
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_the_duo_attention_style_press_ranks_the_reference_heads_offline():
    from reference.quality import build_press

    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR).eval()
    press = build_press("duo_attention", 0.5)
    press.post_init_from_model(model)  # no Hub access: the heads are scored on synthetic haystacks
    assert press.streaming_mask.shape == (6, 2) and int(press.streaming_mask.sum()) == 6
    assert (press.sink_size, press.recent_size) == (128, 256)
    # the registry's offline entry, which the benchmark's needle mode also takes: the same heads, scored on the
    # contexts of 4 essay-haystack rows of 1024 reference-tokenizer tokens
    from harness.press_registry import PRESS_REGISTRY
    from harness.synthetic.tasks import generate_rows, load_reference_tokenizer
    from kvpress.presses.duo_attention_press import duo_attention_on_the_fly

    registry_press = PRESS_REGISTRY["duo_attention_synthetic"]
    texts = [row["context"] for row in generate_rows("niah_single_essay", 4, 1024, load_reference_tokenizer(), seed=77)]
    assert registry_press.on_the_fly_dataset == tuple(texts)
    registry_press.head_compression_ratio = 0.5
    registry_press.post_init_from_model(model)
    assert torch.equal(registry_press.streaming_mask, press.streaming_mask)
    scores = torch.as_tensor(duo_attention_on_the_fly(model, dataset=texts))
    assert torch.equal(press.streaming_mask.flatten(), torch.isin(torch.arange(12), scores.flatten().argsort()[:6]))


def test_the_32k_model_constant_names_a_directory_that_may_not_exist_yet():
    assert REFERENCE_MODEL_32K_DIR == REFERENCE_MODEL_DIR.parent / "model-32k"
    if HAS_32K:
        assert long_context_model_dir() == REFERENCE_MODEL_32K_DIR
    else:
        with pytest.raises(FileNotFoundError, match="--recipe long32k"):
            long_context_model_dir()


@needs_32k
def test_the_32k_model_is_the_reference_architecture_with_yarn():
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_32K_DIR)
    reference = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert (
        model.config.rope_parameters["factor"] * model.config.rope_parameters["original_max_position_embeddings"]
        >= LONG_CONTEXT_LENGTH
    )
    assert model.num_parameters() == reference.num_parameters()
    assert sum(p.stat().st_size for p in REFERENCE_MODEL_32K_DIR.iterdir()) < 40 * 10**6  # ships (issue 26)


@needs_32k
def test_the_32k_model_finds_single_needles_at_8k_tokens():
    from transformers import pipeline

    from harness.synthetic.tasks import generate_rows
    from kvpress.pipeline import KVPressTextGenerationPipeline  # noqa: F401  (registers the pipeline)
    from reference.evaluate import accuracy, predict

    pipe = pipeline("kv-press-text-generation", model=str(REFERENCE_MODEL_32K_DIR), device="cpu")
    rows = [
        row
        for task in ("niah_single_noise", "niah_single_essay", "niah_single_uuid")
        for row in generate_rows(task, 2, 8192, pipe.tokenizer, seed=3)
    ]
    assert accuracy(rows, predict(pipe, rows))["all"] >= 80  # 5 of 6 rows at least


def test_kvpress_recomputes_the_keys_of_a_yarn_model_with_its_attention_factor():
    # presses re-apply RoPE through the model's rotary embedding: with YaRN's cos/sin scale they must get the keys
    # the model cached, not keys scaled twice or not at all
    from transformers import DynamicCache, LlamaForCausalLM

    from kvpress.transformers_adapter import forward_kwargs
    from kvpress.utils import apply_rope, get_prerope_key_states, rope_cos_sin

    parameters = {"rope_type": "yarn", "rope_theta": 1e5, "factor": 8.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(
        vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=512, rope_parameters=parameters,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(8) + 1)
    input_ids = torch.randint(0, 50, (1, 40))
    cache = DynamicCache()
    with torch.no_grad():
        hidden = model.model.embed_tokens(input_ids)
        model(**forward_kwargs(model, input_ids, cache=cache))
        layer = model.model.layers[0]
        module = layer.self_attn
        object.__setattr__(module, "rotary_emb", model.model.rotary_emb)
        keys = get_prerope_key_states(module, layer.input_layernorm(hidden))
        cos, sin = rope_cos_sin(module, keys, torch.arange(40)[None])
        recomputed = apply_rope(keys, cos, sin)
    torch.testing.assert_close(recomputed, cache.layers[0].keys, rtol=1e-5, atol=1e-5)


def test_kvzip_cells_start_first_and_every_cell_stays():
    from reference.quality import slow_cells_first

    cells = [("no_press", 0.0, "agnostic"), ("snapkv", 0.5, "aware"), ("kvzip", 0.5, "agnostic")]
    cells += [("tova", 0.9, "agnostic"), ("kvzip", 0.9, "aware")]
    ordered = slow_cells_first(cells)
    assert ordered[:2] == [("kvzip", 0.5, "agnostic"), ("kvzip", 0.9, "aware")]
    assert ordered[2:] == [cell for cell in cells if cell[0] != "kvzip"] and sorted(ordered) == sorted(cells)
