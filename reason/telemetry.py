# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Per-sample telemetry: the press's timing counters (`kvpress/timing.py`), wall-clock time and CUDA memory.

The one idea: the press measures its own hook time (`press.latency`); around it, one sample's wall-clock time and
the CUDA caching allocator's statistics since the sample started (the fork's memory keys, without the two pinned
ones whose statistics do not exist and were always 0).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

MEMORY_KEYS = (
    "allocated_current",
    "allocated_peak",
    "reserved_current",
    "reserved_peak",
    "fragmentation",
    "inactive_split_bytes",
    "segments",
    "allocations",
    "num_alloc_retries",
    "num_ooms",
)


def _cuda(device) -> Optional[torch.device]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return device


class SampleTelemetry:
    """`start()` before a sample, `stop()` after: a dict of wall time, the press's timing metrics and CUDA memory."""

    def __init__(self, press, device, latency: bool = True):
        self.press = press
        self.device = _cuda(device)
        self.latency = latency
        self.started = 0.0
        if press is not None:
            press.latency = latency

    def start(self) -> None:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.press is not None:
            self.press.reset_timing()
        self.started = time.perf_counter()

    def stop(self, output_tokens: int) -> dict:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self.started
        record = {
            "execution_time": elapsed,
            "end_to_end_tokens_per_second": output_tokens / elapsed if elapsed > 0 else 0.0,
        }
        if self.press is not None and self.latency:
            record.update(self.press.get_timing_metrics())
        record.update(memory_stats(self.device))
        return record


def memory_stats(device: Optional[torch.device]) -> dict:
    """The CUDA allocator's statistics of `device` (bytes and counts); {} without CUDA."""
    if device is None:
        return {}
    stats = torch.cuda.memory_stats(device)
    reserved = stats.get("reserved_bytes.all.current", 0)
    allocated = stats.get("allocated_bytes.all.current", 0)
    return {
        "allocated_current": allocated,
        "allocated_peak": stats.get("allocated_bytes.all.peak", 0),
        "reserved_current": reserved,
        "reserved_peak": stats.get("reserved_bytes.all.peak", 0),
        "fragmentation": (reserved - allocated) / max(1, reserved),
        "inactive_split_bytes": stats.get("inactive_split_bytes.all.current", 0),
        "segments": stats.get("segment.all.current", 0),
        "allocations": stats.get("allocation.all.current", 0),
        "num_alloc_retries": stats.get("num_alloc_retries", 0),
        "num_ooms": stats.get("num_ooms", 0),
    }
