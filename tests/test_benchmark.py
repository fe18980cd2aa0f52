# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The speed and memory benchmark on CPU with the tiny shape: rows, achieved ratios, resume, errors, bad input."""

import json

import pytest
import torch

from kvpress import benchmark
from kvpress.benchmark import PressRequest, main


def run(tmp_path, *extra):
    return main(
        [
            "--model",
            "tiny",
            "--context_lengths",
            "96,128",
            "--max_new_tokens",
            "4",
            "--output_dir",
            str(tmp_path),
            *extra,
        ]
    )


def test_rows_measure_what_the_press_kept(tmp_path, capsys):
    presses = "none,generate,knorm:0.5,h2o:budget=32,adakv_snapkv:0.5,KnormPress:0.75"
    rows = run(tmp_path, "--presses", presses, "--decode_loops", "dynamic")
    assert len(rows) == 12 and not any(row.get("error") for row in rows)
    by_key = {(row["press"], row["context_length"]): row for row in rows}
    for length in (96, 128):
        none = by_key[("none", length)]
        # tiny shape: 2 layers, 2 KV heads, head_dim 16, float32 keys and values
        assert none["kv_bytes"] == 2 * 2 * 2 * 16 * 4 * length and none["achieved_ratio"] == 0
        assert by_key[("knorm:0.5", length)]["kv_bytes"] == none["kv_bytes"] // 2
        assert by_key[("knorm:0.5", length)]["achieved_ratio"] == pytest.approx(0.5)
        assert by_key[("KnormPress:0.75", length)]["achieved_ratio"] == pytest.approx(0.75)
        assert by_key[("h2o:budget=32", length)]["kv_bytes"] == none["kv_bytes"] * 32 // length
        # head-wise masking frees nothing: resident bytes unchanged, half of the entries masked
        adakv = by_key[("adakv_snapkv:0.5", length)]
        assert adakv["achieved_ratio"] == 0 and adakv["effective_ratio"] == pytest.approx(0.5, abs=0.02)
        assert by_key[("generate", length)]["achieved_ratio"] == pytest.approx(0.0)
        for row in (none, adakv):
            assert row["decode_ms_per_token"] > 0 and row["tokens_per_s"] > 0 and row["prefill_s"] > 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["press"] for line in lines] == [row["press"] for row in rows]
    assert "knorm:0.5" in (tmp_path / "table.txt").read_text() and "decode ms/tok" in capsys.readouterr().out


def test_finished_runs_are_skipped_and_a_truncated_line_is_ignored(tmp_path, monkeypatch):
    run(tmp_path, "--presses", "none", "--decode_loops", "dynamic")
    with (tmp_path / "results.jsonl").open("a") as handle:
        handle.write('{"model": "tiny", "press"')  # a run killed while writing
    calls = []
    monkeypatch.setattr(benchmark, "run_press", lambda *a, **k: calls.append(a) or pytest.fail("must not rerun"))
    rows = run(tmp_path, "--presses", "none", "--decode_loops", "dynamic")
    assert len(rows) == 2 and not calls


def test_out_of_memory_is_a_row(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(benchmark, "run_press", out_of_memory)
    rows = run(tmp_path, "--presses", "knorm:0.5", "--decode_loops", "dynamic")
    assert [row["error"] for row in rows] == ["out of memory: CUDA out of memory. Tried to allocate 80 GiB"] * 2


@pytest.mark.parametrize(
    "presses, message",
    [("nope:0.5", "Unknown press 'nope'"), ("knorm:x", "neither a ratio"), ("knorm:1.5", "compression_ratio")],
)
def test_bad_presses_are_refused_before_anything_runs(tmp_path, presses, message, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--presses", presses)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()


def test_press_request_parsing():
    request = PressRequest.parse("h2o:budget=256:n_recent=8")
    assert (request.name, request.ratio, request.fields) == ("h2o", None, (("budget", 256), ("n_recent", 8)))
    press = request.build()
    assert press.cache_budget == 256 and press.n_recent == 8
    assert PressRequest.parse("none").build() is None
    with pytest.raises(ValueError, match="takes no settings"):
        PressRequest.parse("none:0.5")


def test_decode_loops_side_by_side(tmp_path):
    """The in-place loop keeps what the press kept (resident buffers: the bucketed capacity); the CUDA-graph loop is
    a 'not applicable' row without CUDA; a press acting during decoding evicts inside the in-place buffers (its
    cache stays at the budget) but is not graphed."""
    rows = run(tmp_path, "--presses", "knorm:0.5,h2o:budget=32", "--decode_loops", "dynamic,inplace,graph")
    by_key = {(row["press"], row["decode_loop"], row["context_length"]): row for row in rows}
    for length in (96, 128):
        dynamic, inplace = by_key[("knorm:0.5", "dynamic", length)], by_key[("knorm:0.5", "inplace", length)]
        assert inplace["kv_bytes"] == dynamic["kv_bytes"] and inplace["achieved_ratio"] == pytest.approx(0.5)
        assert inplace["kv_bytes_after_decode"] == 2 * 2 * 2 * 16 * 4 * 1024  # one bucket of 1024 slots
        assert inplace["decode_ms_per_token"] > 0
        assert by_key[("knorm:0.5", "graph", length)]["error"].startswith("not applicable")
        h2o_inplace, h2o_dynamic = (
            by_key[("h2o:budget=32", "inplace", length)],
            by_key[("h2o:budget=32", "dynamic", length)],
        )
        assert not h2o_inplace.get("error") and not h2o_dynamic.get("error")
        assert h2o_inplace["kv_entries"] == h2o_dynamic["kv_entries"]  # the budget after prefill, either way
        assert by_key[("h2o:budget=32", "graph", length)]["error"].startswith("not applicable")


def test_needle_mode_scores_each_press_at_each_depth(tmp_path, capsys):
    """`--needle` answers the synthetic needle at each depth through the pipeline, with and without a press, on a
    model that can do it (the shipped reference model): the full cache finds every needle; keeping only the last
    tenth of the context (StreamingLLM at 0.9, 4 sinks) loses the needles placed early. Rows resume."""
    from harness.reference_model import REFERENCE_MODEL_DIR

    argv = [
        "--model",
        str(REFERENCE_MODEL_DIR),
        "--needle",
        "--presses",
        "none,streaming_llm:0.9",
        "--context_lengths",
        "256",
        "--needle_depths",
        "0.05,0.95",
        "--needle_samples",
        "2",
        "--output_dir",
        str(tmp_path),
    ]
    rows = main(argv)
    accuracy = {(row["press"], row["depth"]): row["accuracy"] for row in rows}
    assert accuracy[("none", 0.05)] == 100.0 and accuracy[("none", 0.95)] == 100.0
    assert accuracy[("streaming_llm:0.9", 0.05)] == 0.0
    assert len((tmp_path / "needle.jsonl").read_text().splitlines()) == 4
    assert "256 @ 5%" in (tmp_path / "needle.txt").read_text()
    assert main(argv) == rows  # finished rows are read back, not measured again
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--needle", "--output_dir", str(tmp_path)])
    assert "needs a model that can find a needle" in capsys.readouterr().err


def test_profiled_steps_come_after_the_measurement_and_summarize_each_step(tmp_path, capsys):
    """`--profile_steps`: every loop's row gains a per-step profile of extra steps (on CPU: host operators, no kernel
    time), and what the row measured is what an unprofiled run measures (the cache after the timed steps)."""
    presses = "knorm:0.5,h2o:budget=32,adakv_snapkv:0.5"
    plain = run(tmp_path / "plain", "--presses", presses, "--decode_loops", "dynamic,inplace,ragged")
    profiled = run(
        tmp_path / "profiled", "--presses", presses, "--decode_loops", "dynamic,inplace,ragged", "--profile_steps", "3"
    )
    key = lambda row: (row["press"], row["decode_loop"], row["context_length"])  # noqa: E731
    plain_rows = {key(row): row for row in plain}
    measured = [row for row in profiled if not row.get("error")]
    assert len(measured) >= 14  # every loop of every press, but the ragged loop of h2o (it evicts while decoding)
    for row in measured:
        profile = row["decode_profile"]
        assert profile["steps"] == 3 and profile["wall_ms_per_step"] > 0
        assert profile["kernel_ms_per_step"] is None and profile["kernels_per_step"] is None  # no GPU
        names = [entry["name"] for entry in profile["top"]]
        assert 0 < len(names) <= 8 and all(name.startswith("aten::") for name in names)
        assert all(entry["ms_per_step"] >= 0 and entry["calls_per_step"] > 0 for entry in profile["top"])
        reference = plain_rows[key(row)]
        assert "decode_profile" not in reference
        for field in ("kv_bytes", "kv_entries", "kv_bytes_after_decode"):
            assert row[field] == reference[field], (key(row), field)
    assert "kernel ms/tok" in capsys.readouterr().out


def test_profile_steps_runs_the_step_and_refuses_no_steps():
    from kvpress.decode_profile import profile_steps

    calls = []
    matrix = torch.randn(64, 64)
    summary = profile_steps(lambda: calls.append(matrix @ matrix), 4, torch.device("cpu"))
    assert len(calls) == 4 and summary["steps"] == 4
    top = {entry["name"]: entry for entry in summary["top"]}
    assert top["aten::mm"]["calls_per_step"] == 1
    with pytest.raises(ValueError, match="at least one step"):
        profile_steps(lambda: None, 0, torch.device("cpu"))


def test_negative_profile_steps_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--presses", "none", "--profile_steps", "-1")
    assert "--profile_steps must be 0" in capsys.readouterr().err


def test_timed_steps_runs_every_step_and_times_it_in_blocks():
    from kvpress.benchmark import DECODE_BLOCK_STEPS, timed_steps

    calls = []
    steps = 2 * DECODE_BLOCK_STEPS + 3
    seconds, blocks = timed_steps(lambda: calls.append(1), steps, torch.device("cpu"))
    assert len(calls) == steps and seconds >= 0
    assert len(blocks) == 3 and all(value >= 0 for value in blocks)  # two full blocks, then the 3 last steps
    assert timed_steps(lambda: None, 0, torch.device("cpu"))[1] == []


def test_every_decode_row_has_its_block_times_and_compile_count(tmp_path):
    """The rows say whether a slow decode was slow throughout or in one block, and whether anything compiled while
    it was timed (the ragged loop's FlexAttention compiles only in its untimed warm-up steps)."""
    rows = run(tmp_path, "--presses", "knorm:0.5,adakv_snapkv:0.5", "--decode_loops", "dynamic,ragged")
    measured = [row for row in rows if not row.get("error")]
    assert len(measured) == 8
    for row in measured:
        blocks = row["decode_block_ms_per_token"]
        assert len(blocks) == 1 and blocks[0] > 0  # 3 timed steps: one block
        assert row["decode_median_block_ms_per_token"] == pytest.approx(blocks[0], rel=1e-3)
        assert row["compiles_during_decode"] == 0


def test_the_ragged_warm_up_runs_until_a_step_compiles_nothing(monkeypatch):
    from kvpress import benchmark as bench

    count = {"graphs": 0, "steps": 0}

    def step():  # steps 1 to 3 compile a graph each, later steps nothing
        count["steps"] += 1
        count["graphs"] += count["steps"] <= 3

    monkeypatch.setattr(bench, "compile_count", lambda: count["graphs"])
    assert bench.ragged_warmup(step) == 4 and count["graphs"] == 3
    calls = []
    monkeypatch.setattr(bench, "compile_count", lambda: len(calls))  # every step compiles: stopped at the maximum
    assert bench.ragged_warmup(lambda: calls.append(1)) == bench.RAGGED_MAX_WARMUP_STEPS
    monkeypatch.setattr(bench, "compile_count", lambda: None)  # no counter: the minimum
    assert bench.ragged_warmup(lambda: None) == bench.RAGGED_WARMUP_STEPS


def test_a_refused_loop_leaves_no_cache_attached_to_the_model():
    """The graph loop is refused off CUDA after the in-place conversion: its buffers must not stay attached to the
    model (they would stay resident through the next row and count in its peaks)."""
    from kvpress.inplace_cache import InPlaceCache
    from kvpress.transformers_adapter import cache_kwargs
    from tests.fixtures import get_model

    model = get_model("llama")
    ids = torch.randint(3, 100, (1, 48))
    attached = {"_kvpress_inplace_layer", "_kvpress_ragged_layer"}
    with pytest.raises(benchmark.NotApplicable, match="graph loop needs CUDA"):
        benchmark.run_press(model, PressRequest.parse("knorm:0.5"), ids, 4, loop="graph")
    assert not [name for name, module in model.named_modules() if attached & set(module.__dict__)]
    # the attribute the check looks for is the one a conversion sets
    cache = benchmark.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    InPlaceCache.from_cache(cache, extra_tokens=2, model=model)
    try:
        assert [name for name, module in model.named_modules() if attached & set(module.__dict__)]
    finally:
        InPlaceCache.detach(model)
