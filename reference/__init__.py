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
    """`kvpress.float32_attention.repeat_kv_heads_in_float32` (imported when called: training never loads kvpress)."""
    from kvpress.float32_attention import repeat_kv_heads_in_float32 as repeat

    return repeat()


def cuda_evaluation_attention() -> None:
    """The attention settings of every evaluation on CUDA (`reference/evaluate.py`, the quality workers): no cuDNN
    (new shapes at every prompt and decoding step) and repeated KV heads for float32 (linear memory)."""
    avoid_cudnn_attention()
    repeat_kv_heads_in_float32()


def write_report(path, report: dict) -> dict:
    """Write a script's JSON report to `path` (a str or Path; parent folders are created; None writes nothing) and
    return the report. The file is replaced atomically: a run killed while writing (the GPU runs' `timeout`) leaves
    the previous version, never a truncated one that a resumed run could not read."""
    import json

    from harness.results import atomic_write_text

    if path is None:
        return report
    atomic_write_text(Path(path), json.dumps(report, indent=1) + "\n")
    return report


__all__ = ["avoid_cudnn_attention", "cuda_evaluation_attention", "repeat_kv_heads_in_float32", "write_report"]
