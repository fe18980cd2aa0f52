# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""`benchmarks/longest_context.py`: the longest context that fits, from benchmark rows, against arithmetic by hand."""

import json

import pytest

from tests.benchmark_scripts import load_benchmark_script

GIB = 1 << 30


def longest_context():
    return load_benchmark_script("longest_context")


def _row(length, ratio, transient, per_token=128 * 1024, weights=15 * GIB, chunk=4096, press="knorm"):
    kv = int((1 - ratio) * per_token * length)
    return {
        "press": f"{press}:{ratio}",
        "context_length": length,
        "batch_size": 1,
        "prefill_chunk_size": chunk,
        "achieved_ratio": ratio,
        "kv_bytes": kv,
        "kv_bytes_after_decode": kv + 16 * per_token,
        "weights_bytes": weights,
        "peak_prefill_bytes": weights + kv + transient,
        "peak_decode_bytes": weights + kv + transient // 2,
    }


def _write(tmp_path, rows):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_constant_transient_gives_the_hand_computed_length(tmp_path):
    path = _write(tmp_path, [_row(131072, 0.8, 2 * GIB), _row(1 << 20, 0.8, 2 * GIB), _row(131072, 0.5, 2 * GIB)])
    result = longest_context().main([path, "--prefill_chunk_size", "4096", "--ratios", "0.9", "--memory_gib", "74.5"])
    assert result["transient_gib_at_0"] == pytest.approx(2.0)
    assert result["transient_bytes_per_token"] == pytest.approx(0.0, abs=1e-6)
    # 74.5 GiB - 15 GiB weights - 2 GiB transient, at 0.1 x 128 KiB per token, rounded down to 1024 tokens
    expected = int((74.5 - 15 - 2) * GIB / (0.1 * 128 * 1024)) // 1024 * 1024
    assert result["longest"] == [{"ratio": 0.9, "memory_gib": 74.5, "longest_tokens": expected}]
    for check in result["checks"]:
        assert check["predicted_peak_gib"] == pytest.approx(check["measured_peak_gib"], rel=1e-6)


def test_a_transient_growing_with_the_context_is_fitted_and_shortens_the_answer(tmp_path):
    rows = [_row(length, 0.8, GIB + 4096 * length) for length in (131072, 524288, 1 << 20)]
    result = longest_context().main([_write(tmp_path, rows), "--prefill_chunk_size", "4096", "--ratios", "0.8"])
    assert result["transient_bytes_per_token"] == pytest.approx(4096, rel=1e-6)
    per_length = 0.2 * 128 * 1024 + 4096
    expected = int((139 - 15 - 1) * GIB / per_length) // 1024 * 1024
    assert [entry["longest_tokens"] for entry in result["longest"] if entry["memory_gib"] == 139] == [expected]


def test_rows_of_other_presses_chunks_or_errors_are_not_used(tmp_path):
    rows = [
        _row(131072, 0.8, 2 * GIB),
        _row(131072, 0.8, 9 * GIB, chunk=None),
        _row(131072, 0.8, 9 * GIB, press="snapkv"),
        {**_row(131072, 0.8, 9 * GIB), "error": "out of memory"},
    ]
    result = longest_context().main([_write(tmp_path, rows), "--prefill_chunk_size", "4096"])
    assert len(result["checks"]) == 1
    assert result["transient_gib_at_0"] == pytest.approx(2.0)
    with pytest.raises(SystemExit, match="no measured row"):
        longest_context().main([_write(tmp_path, rows), "--press", "tova", "--prefill_chunk_size", "4096"])


def test_rows_of_one_decode_loop_and_the_measured_fits(tmp_path):
    rows = [
        {**_row(131072, 0.8, 2 * GIB, chunk=None, press="adakv_snapkv"), "decode_loop": "ragged"},
        {**_row(262144, 0.8, 2 * GIB, chunk=None, press="adakv_snapkv"), "decode_loop": "ragged"},
        {**_row(131072, 0.0, 9 * GIB, chunk=None, press="adakv_snapkv"), "decode_loop": "dynamic"},
        {
            "press": "adakv_snapkv:0.8",
            "context_length": 1 << 20,
            "prefill_chunk_size": None,
            "decode_loop": "ragged",
            "error": "out of memory: CUDA out of memory",
        },
    ]
    path = _write(tmp_path, rows)
    result = longest_context().main([path, "--press", "adakv_snapkv", "--decode_loop", "ragged", "--ratios", "0.8"])
    assert [check["context_length"] for check in result["checks"]] == [131072, 262144]
    assert result["transient_gib_at_0"] == pytest.approx(2.0)
    assert result["measured"] == {"fit": [131072, 262144], "out_of_memory": [1 << 20], "longest_measured_fit": 262144}
    every_loop = longest_context().main([path, "--press", "adakv_snapkv", "--ratios", "0.8"])
    assert len(every_loop["checks"]) == 3
    with pytest.raises(SystemExit, match="decode loop 'inplace'"):
        longest_context().main([path, "--press", "adakv_snapkv", "--decode_loop", "inplace"])
