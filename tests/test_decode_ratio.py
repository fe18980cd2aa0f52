# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""`benchmarks/decode_ratio.py`: decode time against the baseline row of the same run, over repeated runs."""

import json
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark_script


def _row(press, loop, ms, block_ms=None, compiles=0):
    row = {"press": press, "decode_loop": loop, "context_length": 32768, "batch_size": 1, "decode_ms_per_token": ms}
    if block_ms is not None:
        row["decode_median_block_ms_per_token"] = block_ms
        row["compiles_during_decode"] = compiles
    return row


def _write_run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_each_row_is_paired_with_the_baseline_of_its_own_run_and_ratio(tmp_path, capsys):
    runs = [
        _write_run(
            tmp_path / "run1",
            [
                _row("knorm:0.5", "inplace", 50.0, 48.0),
                _row("adakv_snapkv:0.5", "ragged", 55.0, 50.0),
                _row("knorm:0.8", "inplace", 40.0, 40.0),
                _row("adakv_snapkv:0.8", "ragged", 60.0, 44.0, compiles=1),
                {"press": "adakv_snapkv:0.8", "decode_loop": "inplace", "error": "out of memory"},
            ],
        ),
        _write_run(
            tmp_path / "run2",
            [
                _row("knorm:0.5", "inplace", 100.0, 96.0),  # a slower host: the ratio is taken within the run
                _row("adakv_snapkv:0.5", "ragged", 130.0, 105.6),
                _row("knorm:0.8", "inplace", 40.0, 40.0),
                _row("adakv_snapkv:0.8", "ragged", 44.0, 44.0),
            ],
        ),
        _write_run(tmp_path / "run3", [_row("knorm:0.5", "inplace", 50.0), _row("adakv_snapkv:0.5", "ragged", 50.0)]),
    ]
    summary = load_benchmark_script("decode_ratio").main(["--runs", *map(str, runs)])
    entries = {(entry["press"], entry["decode_loop"]): entry for entry in summary}
    half = entries[("adakv_snapkv:0.5", "ragged")]
    assert half["ratios"] == [1.1, 1.3, 1.0] and half["median_ratio"] == 1.1 and half["meets_target"]
    assert half["block_ratios"] == [1.042, 1.1] and half["median_block_ratio"] == pytest.approx(1.071, abs=1e-3)
    most = entries[("adakv_snapkv:0.8", "ragged")]
    assert most["ratios"] == [1.5, 1.1] and most["median_ratio"] == 1.3 and not most["meets_target"]
    assert most["compiles_during_decode"] == 1
    assert entries[("knorm:0.5", "inplace")]["median_ratio"] == 1.0
    assert ("adakv_snapkv:0.8", "inplace") not in entries  # its only row is an error
    saved = json.loads((tmp_path / "decode_ratio.json").read_text())
    assert saved["target"] == 1.2 and len(saved["rows"]) == len(summary)
    assert "adakv_snapkv:0.8 | ragged | 32768 | 2 | 1.50, 1.10 | 1.300 | 1.100 | no | 1" in capsys.readouterr().out


def test_missing_folders_and_unpaired_rows_are_errors(tmp_path, capsys):
    script = load_benchmark_script("decode_ratio")
    with pytest.raises(FileNotFoundError, match="no results.jsonl"):
        script.main(["--runs", str(tmp_path / "absent")])
    run = _write_run(tmp_path / "run1", [_row("adakv_snapkv:0.5", "ragged", 55.0)])
    with pytest.raises(SystemExit):
        script.main(["--runs", str(run)])
    assert "no row could be paired with a knorm row" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--runs", str(run), "--target", "0"])
