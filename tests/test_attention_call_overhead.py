# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""`benchmarks/attention_call_overhead.py`: the ragged layer and the dense cache hold the same entries (the two calls
compute the same attention, checked before timing), and the table and JSON hold one row per call and length."""

import json

import pytest
import torch

from tests.benchmark_scripts import load_benchmark_script

script = load_benchmark_script("attention_call_overhead")


def test_the_ragged_layer_and_the_dense_cache_hold_the_same_entries():
    layer, dense_keys, dense_values, kept = script.make_layer(40, 0.25, torch.device("cpu"), torch.float32, 2, 8)
    assert kept == 30 and dense_keys.shape == (1, 2, 30, 8)
    for head in range(2):
        rows = layer.segment_rows(head)
        assert torch.equal(layer.keys[rows], dense_keys[0, head]) and torch.equal(
            layer.values[rows], dense_values[0, head]
        )


def test_rows_table_and_json(tmp_path, capsys):
    rows = script.main(
        ["--context_lengths", "64,128", "--calls", "2", "--compile", "off", "--output_dir", str(tmp_path)]
    )
    calls = ["ragged (FlexAttention)", "ragged (Triton)", "dense (SDPA)"]  # Triton under its interpreter on CPU
    assert script.triton_runs(torch.device("cpu")) == (torch.cuda.is_available() is False)
    if not script.triton_runs(torch.device("cpu")):
        calls.remove("ragged (Triton)")
    assert [(row["call"], row["context_length"]) for row in rows] == [(call, 64) for call in calls] + [
        (call, 128) for call in calls
    ]
    assert rows[0]["entries_per_kv_head"] == 32 and all(row["wall_us_per_call"] > 0 for row in rows)
    saved = json.loads((tmp_path / "attention_call_overhead.json").read_text())
    assert saved["rows"] == rows and saved["environment"]["device"] == "cpu"
    assert "ragged (FlexAttention) | 128 | 0.5 | False" in capsys.readouterr().out


def test_different_work_is_refused(monkeypatch):
    from kvpress import ragged_attention

    monkeypatch.setattr(ragged_attention, "flex_ragged_attention", lambda layer, query: torch.zeros(1, 1, 32, 128))
    with pytest.raises(AssertionError, match="the timings would compare different work"):
        script.measure(64, 0.5, torch.device("cpu"), torch.float32, False, 2)


@pytest.mark.parametrize("argv, message", [(["--ratio", "1"], "--ratio"), (["--context_lengths", "x"], "integers")])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        script.main(argv)
    assert message in capsys.readouterr().err
