# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""One greedy decoding step captured in a CUDA graph over an `InPlaceCache`, replayed for every token.

A decode step of a transformers model at batch 1 is hundreds of small kernels launched from Python; on a fast GPU
the launches, not the bytes, set its time. The in-place cache keeps every shape fixed and every write and mask on
device tensors, so the whole step can be recorded once (`torch.cuda.CUDAGraph`) and replayed with new token and
position ids: one launch per token. The graph reads the token and positions from static input buffers and leaves
the logits in a static output buffer (read it before the next step).

With `compile_mode` (a `torch.compile` mode without its own CUDA graphs, e.g. `"default"` or
`"max-autotune-no-cudagraphs"`), the step is first compiled, so that the few hundred small elementwise kernels of a
step (norms, rotary embedding, residual adds, activation, mask) are fused, then captured: replaying a graph removes
the launch cost of each kernel but not its run time, and at batch 1 the small kernels add up to as much as the
weight reads.

Not for head-wise presses (their fake-key search is a data-dependent loop) nor for presses that act during decoding;
`graphable` says whether a model and cache qualify.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvpress.inplace_cache import InPlaceCache
from kvpress.transformers_adapter import CannotCompressError, cache_kwargs

# `torch.compile` modes that leave CUDA graphs to us (reduce-overhead would capture its own graphs inside ours)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def graphable(model: torch.nn.Module, cache: InPlaceCache) -> bool:
    """Whether a decoding step of `model` over `cache` can be captured: CUDA, and no head-wise masks to apply."""
    if not cache.layers or cache.layers[0].keys.device.type != "cuda":  # type: ignore[union-attr]
        return False
    return all(getattr(module, "masked_key_indices", None) is None for module in model.modules())


class GraphedDecodeStep:
    """`step(token, position_ids) -> logits (B, 1, vocab)`: one decoding forward, replayed from a CUDA graph."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: InPlaceCache,
        batch_size: int = 1,
        warmup: int = 2,
        compile_mode: Optional[str] = None,
    ):
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be None or one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        if not graphable(model, cache):
            raise CannotCompressError(
                "A CUDA-graph decoding step needs an in-place cache on a CUDA device and no head-wise masks "
                "(AdaKV-style presses search fake keys step by step); decode without the graph instead."
            )
        self.model, self.cache = model, cache
        device = cache.layers[0].keys.device  # type: ignore[union-attr]
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        lengths = cache.lengths()
        if min(layer.capacity - length for layer, length in zip(cache.layers, lengths)) < warmup:  # type: ignore
            raise CannotCompressError("The in-place cache has no room for the warm-up steps of the CUDA graph.")
        self.compile_mode = compile_mode
        self._cache_kwargs = cache_kwargs(model, cache)
        forward = self._forward
        if compile_mode is not None:
            # the host lengths are the same on every call (rolled back after each warm-up step), so the compiled
            # code is specialised once and never recompiled; the graph then replays it without running Python
            forward = torch.compile(self._forward, mode=compile_mode, dynamic=False)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(warmup):  # kernels choose their algorithms and allocate their workspaces outside capture
                forward()
                cache.rollback(lengths)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = forward()
        cache.rollback(lengths)  # capture ran the Python side only: put the host lengths back

    def _forward(self) -> torch.Tensor:
        return self.model(
            input_ids=self.token, position_ids=self.position_ids, logits_to_keep=1, **self._cache_kwargs
        ).logits

    def __call__(self, token: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        for layer in self.cache.layers:
            if layer.length + 1 > layer.capacity:  # type: ignore[attr-defined]
                capacity = layer.capacity  # type: ignore[attr-defined]
                raise CannotCompressError(
                    f"The in-place decoding cache holds {capacity} tokens per layer and is full: build it with a "
                    "larger `extra_tokens` (question + answer tokens)."
                )
        self.token.copy_(token)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        for layer in self.cache.layers:
            layer.length += 1  # type: ignore[attr-defined]  # the host mirror of the position the graph advanced
        return self.logits
