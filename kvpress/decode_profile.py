# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Where the time of a few decoding steps goes, for the benchmark's `--profile_steps` (`torch.profiler`).

A step that takes much longer than its kernels is bound by the host (launching many small kernels, Python,
synchronizations); a step whose kernels fill its time is bound by the GPU, and the top kernels say by which work.
`profile_steps(step, n, device)` runs `step()` `n` times under the profiler, after the timed decoding (the profiler's
own overhead is in none of the benchmark's timings), and summarizes them per step:

- `wall_ms_per_step`: host wall time per step, profiler included;
- `kernel_ms_per_step`, `kernels_per_step`: the GPU kernels' summed time and their count (CUDA only, else None);
- `top`: the largest kernels (CUDA) or host operators by self time (CPU), each with its time and calls per step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

TOP_ENTRIES = 8
NAME_CHARS = 90  # kernel names of templated code run to hundreds of characters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> dict:
    """Run `step()` `steps` times under `torch.profiler` and return the per-step summary described above."""
    if steps < 1:
        raise ValueError(f"profile_steps needs at least one step, got {steps}")
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - start
    total_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    kernel_us = 0.0
    kernels = 0
    for event in prof.events():
        if cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            elapsed = float(event.time_range.elapsed_us())
            kernel_us += elapsed
            kernels += 1
        else:
            if event.device_type != DeviceType.CPU:
                continue
            elapsed = float(event.self_cpu_time_total)
        name = event.name[:NAME_CHARS]
        total_us[name] += elapsed
        calls[name] += 1
    ranked = sorted(total_us, key=total_us.__getitem__, reverse=True)[:TOP_ENTRIES]
    kernel_ms: Optional[float] = kernel_us / 1000 / steps if cuda else None
    return {
        "steps": steps,
        "wall_ms_per_step": 1000 * wall / steps,
        "kernel_ms_per_step": kernel_ms,
        "kernels_per_step": kernels / steps if cuda else None,
        "top": [
            {"name": name, "ms_per_step": total_us[name] / 1000 / steps, "calls_per_step": calls[name] / steps}
            for name in ranked
        ],
    }
