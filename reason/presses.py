# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Press names of the reasoning benchmark, each a recipe that builds a fresh press with a cache budget.

The one idea: nothing is built or imported at import time (the fork built one press per name when its harness was
imported, shared by every run, and R-KV allocated a CUDA tensor then); `make_press(name, budget)` builds a new one.
Every name is a score-based press that can score during decoding, so it takes `cache_budget` (entries kept per
layer and KV head); `full` keeps everything (the baseline).
"""

from __future__ import annotations

from typing import Optional

from reason.shared import PressSpec

# name -> (module of kvpress.presses, class, extra arguments)
PRESSES: dict[str, tuple[str, str, dict]] = {
    "knorm": ("knorm_press", "KnormPress", {}),
    "h2o": ("h2o_press", "H2OPress", {}),
    "random": ("random_press", "RandomPress", {"seed": 0}),
    "streaming_llm": ("streaming_llm_press", "StreamingLLMPress", {}),
    "rkv": ("rkv_press", "RKVPress", {}),
    "rkv_lsh": ("rkv_lsh_press", "RKVLSHPress", {"seed": 0}),
    "snapkv_d": ("snapkv_press", "SnapKVPress", {}),
    "snapkv": ("snapkv_press", "SnapKVPress", {}),
    "pyramidkv": ("pyramidkv_press", "PyramidKVPress", {}),
    "tova": ("tova_press", "TOVAPress", {}),
    "expected_attention": ("expected_attention_press", "ExpectedAttentionPress", {}),
    "observed_attention": ("observed_attention_press", "ObservedAttentionPress", {}),
    "keydiff": ("keydiff_press", "KeyDiffPress", {}),
    "lagkv": ("lagkv_press", "LagKVPress", {}),
    "cur": ("cur_press", "CURPress", {}),
    "cap": ("cap_press", "CapPress", {}),
    "full": ("full_press", "FullPress", {}),
}
# Presses that need attention weights from the model (eager attention).
EAGER_PRESSES = ("observed_attention",)


def press_spec(name: str, cache_budget: int, seed: Optional[int] = None) -> PressSpec:
    """The recipe of press `name` with `cache_budget` (0: no budget, nothing is evicted; ignored by `full`)."""
    if name not in PRESSES:
        raise ValueError(f"Unknown press {name!r}; valid press names: {', '.join(PRESSES)}.")
    if not isinstance(cache_budget, int) or isinstance(cache_budget, bool) or cache_budget < 0:
        raise ValueError(f"cache_budget must be a non-negative integer (0: no budget), got {cache_budget!r}.")
    module, cls, kwargs = PRESSES[name]
    kwargs = dict(kwargs)
    if "seed" in kwargs and seed is not None:
        kwargs["seed"] = seed
    if name != "full" and cache_budget > 0:
        kwargs["cache_budget"] = cache_budget
    return PressSpec(module, cls, (), kwargs)


def make_press(name: str, cache_budget: int, seed: Optional[int] = None):
    """A new press `name` with `cache_budget`."""
    return press_spec(name, cache_budget, seed).build()


def compresses(name: str, cache_budget: int) -> bool:
    """Whether press `name` at `cache_budget` evicts anything."""
    return name != "full" and cache_budget > 0
