# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Float32 grouped-query attention through transformers' sdpa path in memory linear in the length.

The one idea: without a mask, transformers asks SDPA for `enable_gqa`, and in float32 only SDPA's math kernel serves
that, which materialises every layer's `heads x length x length` scores. Repeating the KV heads instead (what
transformers does when it does not use `enable_gqa`) lets the memory-efficient kernel run. Used by every float32
evaluation on CUDA: `reference/` (the quality workers, the held-out check) and the benchmark's needle mode.
"""

from __future__ import annotations


def repeat_kv_heads_in_float32() -> bool:
    """Make transformers' sdpa attention repeat the KV heads of a float32 grouped-query model instead of asking SDPA
    for `enable_gqa`, and say whether it could (idempotent; the process keeps it).

    Without a mask, transformers passes `enable_gqa=True` to SDPA, and only SDPA's math kernel serves that in float32
    (flash attention has no float32): every layer then materialises its float32 scores, `heads x length x length`, 16
    GiB per layer of the 32k checkpoint at 32768 tokens and 43 GiB per process at the peak (measured on an H100,
    2026-12-07). With the KV heads repeated, the memory-efficient kernel serves float32 in memory linear in the
    length. Same attention, up to rounding; other dtypes keep transformers' choice."""
    import torch

    try:
        from transformers.integrations import sdpa_attention
    except ImportError:  # pragma: no cover - every supported transformers has it
        return False
    original = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if original is None:
        return False
    if getattr(original, "_repeats_float32", False):
        return True

    def use_gqa_in_sdpa(attention_mask, key, *args, **kwargs) -> bool:
        if key.dtype == torch.float32:
            return False
        return original(attention_mask, key, *args, **kwargs)

    use_gqa_in_sdpa._repeats_float32 = True  # type: ignore[attr-defined]
    sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa
    return True
