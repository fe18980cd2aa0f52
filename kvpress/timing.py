# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Timing telemetry for every press, and the per-step eviction log (CSV) of the decoding presses.

The one idea: telemetry lives here, around the hook that `BasePress.__call__` registers, so that every press (plain
scorers, wrappers, presses with their own `forward_hook`) is measured the same way and no press carries timing code.
The API is the reasoning fork's ("Hold Onto That Thought", https://arxiv.org/abs/2512.12008): `press.latency = True`,
`press.get_timing_metrics()`, `press.reset_timing()`.

What is measured, when `latency` is on:

- `prefill_time` / `decoding_time`: seconds spent inside the press's hooks (compression work, summed over layers),
  split by phase. On CUDA the device is synchronised before and after each hook, so the time is the press's own.
- `total_prefill_tokens` / `total_decoding_tokens`: tokens that went through the model in each phase, counted once
  per forward on the first hooked layer (batch size x new tokens).
- `output_tokens_per_second`: `total_decoding_tokens / decoding_time`, the fork's definition (decoding tokens per
  second of press time; 0.0 when no decoding time was measured).
- `peak_memory_bytes`: `torch.cuda.max_memory_allocated` on the devices the hooks ran on, since the last
  `reset_timing()` (0 without CUDA).

With `latency` off (the default) the hooks run unwrapped apart from one attribute lookup, and every metric is 0.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

TIMING_METRIC_KEYS = (
    "prefill_time",
    "decoding_time",
    "total_time",
    "total_prefill_tokens",
    "total_decoding_tokens",
    "output_tokens_per_second",
    "peak_memory_bytes",
)

# Columns of the per-step eviction log, in the fork's order (spec/reasoning_fork.md, section 1.4).
EVICTION_LOG_COLUMNS = (
    "prune_step",
    "layer_idx",
    "head_idx",
    "kv_len_pre",
    "attn_len",
    "diff_indices",
    "attn_pre",
    "attn_post",
    "evicted_positions",
)

_TELEMETRY_ATTRIBUTE = "_kvpress_telemetry"


@dataclass
class PressTelemetry:
    """Counters of one press. Created lazily on the press, never a dataclass field of it."""

    enabled: bool = False
    prefill_time: float = 0.0
    decoding_time: float = 0.0
    total_prefill_tokens: int = 0
    total_decoding_tokens: int = 0
    peak_memory_bytes: int = 0
    cuda_devices: set = field(default_factory=set)

    def reset(self) -> None:
        self.prefill_time = self.decoding_time = 0.0
        self.total_prefill_tokens = self.total_decoding_tokens = 0
        self.peak_memory_bytes = 0
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for device in self.cuda_devices or {torch.cuda.current_device()}:
                torch.cuda.reset_peak_memory_stats(device)

    def observe_peak_memory(self) -> None:
        for device in self.cuda_devices:
            self.peak_memory_bytes = max(self.peak_memory_bytes, int(torch.cuda.max_memory_allocated(device)))

    def metrics(self) -> dict:
        if self.enabled:
            self.observe_peak_memory()
        total_time = self.prefill_time + self.decoding_time
        throughput = self.total_decoding_tokens / self.decoding_time if self.decoding_time > 0 else 0.0
        return {
            "prefill_time": self.prefill_time,
            "decoding_time": self.decoding_time,
            "total_time": total_time,
            "total_prefill_tokens": self.total_prefill_tokens,
            "total_decoding_tokens": self.total_decoding_tokens,
            "output_tokens_per_second": throughput,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def telemetry_of(press: object) -> PressTelemetry:
    """The telemetry counters of `press`, created on first use."""
    telemetry = press.__dict__.get(_TELEMETRY_ATTRIBUTE)
    if telemetry is None:
        telemetry = PressTelemetry()
        press.__dict__[_TELEMETRY_ATTRIBUTE] = telemetry
    return telemetry


# classify(module, args, kwargs) -> (is_prefill, n_tokens, device), or None when the forward has no cache.
HookPhase = Callable[..., Optional[tuple]]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_hook(press: object, hook: Callable, counting_layer_idx: Optional[int], classify: HookPhase) -> Callable:
    """Wrap a forward hook of `press` so that, while `press.latency` is on, its time and tokens are recorded.

    Tokens are counted on the layer `counting_layer_idx` only (the first hooked layer), once per forward.
    """

    def wrapper(module, args, kwargs, output):
        telemetry = press.__dict__.get(_TELEMETRY_ATTRIBUTE)
        if telemetry is None or not telemetry.enabled:
            return hook(module, args, kwargs, output)
        phase = classify(module, args, kwargs)
        if phase is None:
            return hook(module, args, kwargs, output)
        is_prefill, n_tokens, device = phase
        _synchronize(device)
        start = time.perf_counter()
        result = hook(module, args, kwargs, output)
        _synchronize(device)
        elapsed = time.perf_counter() - start
        counting = module.layer_idx == counting_layer_idx
        if is_prefill:
            telemetry.prefill_time += elapsed
            if counting:
                telemetry.total_prefill_tokens += n_tokens
        else:
            telemetry.decoding_time += elapsed
            if counting:
                telemetry.total_decoding_tokens += n_tokens
        if device.type == "cuda":
            telemetry.cuda_devices.add(device)
            telemetry.observe_peak_memory()
        if counting:
            _report_progress(press, telemetry, is_prefill)
        return result

    return wrapper


def _report_progress(press: object, telemetry: PressTelemetry, is_prefill: bool) -> None:
    """Call the fork's optional `press.progress_update(prefill_tokens, decoding_tokens, phase=..., label=...)`."""
    callback = getattr(press, "progress_update", None)
    if callable(callback):
        callback(
            telemetry.total_prefill_tokens,
            telemetry.total_decoding_tokens,
            phase="prefill" if is_prefill else "decoding",
            label=getattr(press, "progress_label", "PROGRESS"),
        )


def attention_loss_rows(
    prune_step: int,
    layer_idx: int,
    observation: torch.Tensor,
    evicted: torch.Tensor,
    kv_len_pre: int,
    n_kept: int,
    positions: Optional[torch.Tensor] = None,
) -> list[list]:
    """Rows of the eviction log for one pruning of one layer (first batch element), one row per query head.

    `observation` `(H, rows, C)`: attention of the observation queries (the press's own: the current step's queries
    for H2O, the observation window for R-KV) over the C candidate entries. `evicted` `(H_kv, C)`: which candidates
    this pruning removes. `positions` `(H_kv, C)`: their token positions, written to `evicted_positions`.

    Columns: `kv_len_pre` = cache entries before pruning, `attn_len` = entries kept, `diff_indices` = entries
    evicted, `attn_pre` = attention mass of the head's observation queries on the candidates (summed over the
    rows), `attn_post` = the part of that mass that fell on evicted entries (the attention lost by this pruning).
    """
    num_heads = observation.shape[0]
    groups = num_heads // evicted.shape[0]
    mass = observation.double().sum(dim=1)  # (H, C)
    rows = []
    for head_idx in range(num_heads):
        head_evicted = evicted[head_idx // groups]
        attn_pre = float(mass[head_idx].sum())
        attn_post = float(mass[head_idx][head_evicted].sum())
        if positions is not None:
            evicted_positions = " ".join(str(int(p)) for p in positions[head_idx // groups][head_evicted].tolist())
        else:
            evicted_positions = ""
        rows.append(
            [
                prune_step,
                layer_idx,
                head_idx,
                kv_len_pre,
                n_kept,
                kv_len_pre - n_kept,
                f"{attn_pre:.6f}",
                f"{attn_post:.6f}",
                evicted_positions,
            ]
        )
    return rows


def write_eviction_rows(csv_path: str | Path, rows: Iterable[Sequence]) -> None:
    """Append `rows` to the CSV at `csv_path` (parents created; the header is written when the file is new)."""
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    is_new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if is_new:
            writer.writerow(EVICTION_LOG_COLUMNS)
        writer.writerows(rows)
