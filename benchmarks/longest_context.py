# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The longest context that fits a memory size, at several compression ratios, from measured benchmark rows.

With chunked prefill the peak memory of a run is `weights + kept KV + transient`, where the kept KV is
`(1 - ratio) x bytes per token x T` exactly and the transient (one chunk's activations, the compression's own
buffers, the decode loop's spare rows) is measured. This script reads `python -m kvpress.benchmark` rows
(`results.jsonl`), takes each row's transient (its peak, prefill or decode, minus weights and kept KV), fits it as
`a + b x T` over the rows' context lengths (a constant when there is one length), and solves, for each ratio and
memory size, the longest `T` whose predicted peak fits. The fit is checked against every row (the predicted and the
measured peak are both printed), so a prediction is only as good as the longest measured row says it is.

    python benchmarks/longest_context.py run/long.jsonl run/c128.jsonl --press knorm --prefill_chunk_size 8192 \\
        --ratios 0.5,0.8,0.9 --memory_gib 74.5,139 --output longest_context.json

`--decode_loop` keeps the rows of one decode loop (e.g. `ragged`, whose prefill compacts each layer); the rows that
ran out of memory are listed with those that fit (`measured`), the measured answer beside the predicted one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

GIB = float(1 << 30)


def read_rows(
    paths: list[str], press: str, chunk: Optional[int], loop: Optional[str] = None, with_errors: bool = False
) -> list[dict]:
    """The rows of `press` with `prefill_chunk_size` `chunk` (and decode loop `loop`, any when None); rows that
    failed (out of memory) only `with_errors`."""
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if (row.get("error") and not with_errors) or row.get("prefill_chunk_size") != chunk:
                continue
            if row["press"].split(":")[0] != press or (loop is not None and row.get("decode_loop") != loop):
                continue
            rows.append(row)
    if not rows and not with_errors:
        where = f" and decode loop {loop!r}" if loop is not None else ""
        raise SystemExit(f"no measured row of press {press!r} with prefill_chunk_size {chunk}{where} in {paths}")
    return rows


def measured_fits(rows: list[dict]) -> dict:
    """The measured lengths that fit (no error) and those that did not (out of memory), and the longest that fit."""
    fit = sorted({row["context_length"] for row in rows if not row.get("error")})
    failed = sorted({row["context_length"] for row in rows if "out of memory" in str(row.get("error") or "")})
    return {"fit": fit, "out_of_memory": failed, "longest_measured_fit": fit[-1] if fit else None}


def bytes_per_token(row: dict) -> float:
    """Bytes of the full (uncompressed) KV cache per context token, from the row's kept bytes and ratio."""
    kept = 1.0 - row["achieved_ratio"]
    return row["kv_bytes"] / (kept * row["context_length"] * row["batch_size"])


def transient_bytes(row: dict) -> float:
    """What the row's peak held beyond the weights and the kept cache (prefill or decode, whichever is larger)."""
    prefill = row["peak_prefill_bytes"] - row["weights_bytes"] - row["kv_bytes"]
    decode = row["peak_decode_bytes"] - row["weights_bytes"] - row["kv_bytes_after_decode"]
    return max(prefill, decode)


def fit_transient(rows: list[dict]) -> tuple[float, float]:
    """`(a, b)` of `transient = a + b x T` by least squares over the rows (b = 0 for a single length)."""
    points = [(float(row["context_length"]), transient_bytes(row)) for row in rows]
    lengths = {t for t, _ in points}
    if len(lengths) == 1:
        return max(v for _, v in points), 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / sum((t - mean_t) ** 2 for t, _ in points)
    return mean_v - slope * mean_t, max(slope, 0.0)


def predicted_peak(length: float, ratio: float, per_token: float, weights: float, fit: tuple[float, float]) -> float:
    return weights + (1 - ratio) * per_token * length + fit[0] + fit[1] * length


def longest(ratio: float, memory: float, per_token: float, weights: float, fit: tuple[float, float]) -> int:
    """The largest T (tokens, rounded down to 1024) with predicted_peak(T) <= memory."""
    per_length = (1 - ratio) * per_token + fit[1]
    room = memory - weights - fit[0]
    return max(int(room / per_length) // 1024 * 1024, 0) if room > 0 else 0


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.jsonl files of python -m kvpress.benchmark")
    parser.add_argument("--press", default="knorm", help="the press name of the rows to use (e.g. knorm)")
    parser.add_argument("--prefill_chunk_size", type=int, default=None)
    parser.add_argument("--decode_loop", default=None, help="only rows of this decode loop (e.g. ragged; default any)")
    parser.add_argument("--ratios", default="0.5,0.8,0.9")
    parser.add_argument("--memory_gib", default="74.5,139", help="memory sizes; 80 GB is 74.5 GiB")
    parser.add_argument("--output", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    ratios = [float(value) for value in args.ratios.split(",")]
    memories = [float(value) for value in args.memory_gib.split(",")]
    if not all(0 <= ratio < 1 for ratio in ratios) or not all(memory > 0 for memory in memories):
        parser.error("--ratios must be in [0, 1) and --memory_gib positive")
    rows = read_rows(args.results, args.press, args.prefill_chunk_size, args.decode_loop)
    measured = measured_fits(read_rows(args.results, args.press, args.prefill_chunk_size, args.decode_loop, True))
    per_token = bytes_per_token(rows[0])
    weights = float(rows[0]["weights_bytes"])
    fit = fit_transient(rows)
    checks = [
        {
            "press": row["press"],
            "context_length": row["context_length"],
            "measured_peak_gib": (transient_bytes(row) + row["weights_bytes"] + row["kv_bytes"]) / GIB,
            "predicted_peak_gib": predicted_peak(row["context_length"], row["achieved_ratio"], per_token, weights, fit)
            / GIB,
        }
        for row in rows
    ]
    table = [
        {"ratio": ratio, "memory_gib": memory, "longest_tokens": longest(ratio, memory * GIB, per_token, weights, fit)}
        for ratio in ratios
        for memory in memories
    ]
    result = {
        "press": args.press,
        "prefill_chunk_size": args.prefill_chunk_size,
        "decode_loop": args.decode_loop,
        "measured": measured,
        "weights_gib": weights / GIB,
        "kv_bytes_per_token": per_token,
        "transient_gib_at_0": fit[0] / GIB,
        "transient_bytes_per_token": fit[1],
        "checks": checks,
        "longest": table,
        "gpu": rows[0].get("gpu"),
    }
    print(
        f"{args.press}, chunk {args.prefill_chunk_size}: weights {weights / GIB:.2f} GiB, KV {per_token / 1024:.0f} "
        f"KiB/token, transient {fit[0] / GIB:.2f} GiB + {fit[1]:.0f} B/token"
    )
    print("measured rows: press | tokens | measured peak GiB | predicted peak GiB")
    for check in checks:
        print(
            f"{check['press']} | {check['context_length']} | {check['measured_peak_gib']:.2f} | "
            f"{check['predicted_peak_gib']:.2f}"
        )
    print(f"measured: fit at {measured['fit']}, out of memory at {measured['out_of_memory']}")
    print("ratio | memory GiB | longest context (tokens)")
    for entry in table:
        print(f"{entry['ratio']} | {entry['memory_gib']} | {entry['longest_tokens']}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
