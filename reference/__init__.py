# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The project's own small reference model, trained from scratch on the synthetic long-context tasks.

The one idea: a tiny Llama that really retrieves from long contexts (RULER-style tasks,
https://arxiv.org/abs/2404.06654) ships with the repository, so press quality can be measured offline, on CPU.
The checkpoint is in `reference/model/`; its path and trained context length are constants of the shared package
(`harness.reference_model.REFERENCE_MODEL_DIR`, `TRAINED_CONTEXT_LENGTH`), so harnesses find it without importing
this package. `reference/train.py` reproduces it; this package holds the scripts and their two shared helpers.
"""

from __future__ import annotations

from pathlib import Path


def avoid_cudnn_attention() -> bool:
    """Turn off PyTorch's cuDNN backend of scaled_dot_product_attention when CUDA is in use, and say whether it did.

    The reference model's training batches and evaluation prompts change shape at almost every step, and on torch
    2.11 with an H100 the cuDNN backend (preferred there) builds a new execution plan for every new shape: about 10 ms
    of CPU per layer, forward and backward, which made a 6-layer training step host-bound at 150 ms instead of 30.
    Flash and memory-efficient attention have no per-shape setup. Results are unchanged up to rounding."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


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


def cuda_evaluation_attention() -> None:
    """The attention settings of every evaluation on CUDA (`reference/evaluate.py`, the quality workers): no cuDNN
    (new shapes at every prompt and decoding step) and repeated KV heads for float32 (linear memory)."""
    avoid_cudnn_attention()
    repeat_kv_heads_in_float32()


def write_report(path, report: dict) -> dict:
    """Write a script's JSON report to `path` (a str or Path; parent folders are created; None writes nothing) and
    return the report."""
    import json

    if path is None:
        return report
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report


__all__ = ["avoid_cudnn_attention", "cuda_evaluation_attention", "repeat_kv_heads_in_float32", "write_report"]
