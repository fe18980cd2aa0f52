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

Not for head-wise presses on the in-place cache (their fake-key search is a data-dependent loop) nor for presses
that act during decoding; `graphable` says whether a model and cache qualify.

Over a `RaggedCache` (head-wise presses, their kept entries only), the step is captured the same way: a ragged
layer appends a decoding token at device-held segment ends and positions, and its attention plan reads device
tensors that the append changes in place, so a replay advances everything on the device; the host mirrors (logical
length, free rows) are advanced after each replay. Batch 1 only (a padding mask would be captured at one width),
with the compiled FlexAttention or the Triton backend, and no growth after capture: reserve the rows first
(`RaggedLayer.reserve`). Warm-up and capture run with the model's attention named `"kvpress_ragged"`, so that
transformers builds no mask (`without_mask_building`); `tests/test_graphed_decoding.py` checks the tokens on a GPU.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Generator, Optional, Union

import torch

from kvpress.inplace_cache import InPlaceCache
from kvpress.ragged_attention import FAST_BACKENDS, RAGGED_ATTENTION, effective_backend, register_ragged_attention
from kvpress.ragged_cache import RaggedCache, RaggedLayer
from kvpress.resources import text_config
from kvpress.transformers_adapter import CannotCompressError, cache_kwargs

# `torch.compile` modes that leave CUDA graphs to us (reduce-overhead would capture its own graphs inside ours)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def graphable(model: torch.nn.Module, cache: Union[InPlaceCache, RaggedCache]) -> bool:
    """Whether a decoding step of `model` over `cache` can be captured: CUDA, and no head-wise masks to apply; a
    ragged cache also needs every layer ragged (no concatenating layer) and the flex or triton backend."""
    if not cache.layers or cache.layers[0].keys.device.type != "cuda":  # type: ignore[union-attr]
        return False
    if isinstance(cache, RaggedCache):
        if not all(isinstance(layer, RaggedLayer) for layer in cache.layers):
            return False
        if effective_backend(cache.layers[0].keys.device) not in FAST_BACKENDS:  # type: ignore[union-attr]
            return False
    return all(getattr(module, "masked_key_indices", None) is None for module in model.modules())


@contextmanager
def without_mask_building(model: torch.nn.Module) -> Generator[None, None, None]:
    """Run `model`'s attention as `"kvpress_ragged"` inside the block, so that transformers builds no attention mask
    (it builds none for an attention function it has no mask function for); restored on exit, exception or not.

    For capturing a step over a cache of ragged layers only, at batch 1: ragged attention applies causality itself,
    and without padding it needs no mask. Under stream capture transformers would otherwise materialise a mask of
    the capture's width (it never skips the mask while tracing), which a replay would keep at that width."""
    register_ragged_attention()
    config = text_config(model)
    previous = config._attn_implementation
    config._attn_implementation = RAGGED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


class GraphedDecodeStep:
    """`step(token, position_ids) -> logits (B, 1, vocab)`: one decoding forward, replayed from a CUDA graph."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: Union[InPlaceCache, RaggedCache],
        batch_size: int = 1,
        warmup: int = 2,
        compile_mode: Optional[str] = None,
    ):
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be None or one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        self.ragged = isinstance(cache, RaggedCache)
        if not graphable(model, cache):
            raise CannotCompressError(
                "A CUDA-graph decoding step needs an in-place cache on a CUDA device and no head-wise masks "
                "(AdaKV-style presses search fake keys step by step), or a ragged cache of ragged layers only on a "
                "CUDA device with the flex or triton ragged backend; decode without the graph instead."
            )
        if self.ragged and (batch_size != 1 or compile_mode is not None):
            raise CannotCompressError(
                "A CUDA-graph step over a ragged cache serves batch 1 (a padding mask would be captured at one "
                "width) without compile_mode (its attention kernel is compiled already)."
            )
        self.model, self.cache = model, cache
        device = cache.layers[0].keys.device  # type: ignore[union-attr]
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        lengths = cache.state() if isinstance(cache, RaggedCache) else cache.lengths()
        if self._room() < warmup:
            raise CannotCompressError(
                f"The {'ragged' if self.ragged else 'in-place'} cache has no room for the warm-up and capture steps "
                "of the CUDA graph: reserve more rows first."
            )
        # a ragged layer whose buffers are replaced (growth) after capture would leave the graph reading old ones
        self._versions = [getattr(layer, "version", None) for layer in cache.layers]
        self.compile_mode = compile_mode
        self._cache_kwargs = cache_kwargs(model, cache)
        forward = self._forward
        if compile_mode is not None:
            # the host lengths are the same on every call (rolled back after each warm-up step), so the compiled
            # code is specialised once and never recompiled; the graph then replays it without running Python
            forward = torch.compile(self._forward, mode=compile_mode, dynamic=False)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        self.graph = torch.cuda.CUDAGraph()
        with without_mask_building(model) if self.ragged else nullcontext(), torch.no_grad():
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # kernels choose their algorithms and allocate workspaces outside capture
                    forward()
                    cache.rollback(lengths)
            torch.cuda.current_stream(device).wait_stream(stream)
            with torch.cuda.graph(self.graph):
                self.logits = forward()
        if self.ragged:
            self._check_ragged_capture()
            cache.rollback(lengths, release=True)  # type: ignore[call-arg]
        else:
            cache.rollback(lengths)  # capture ran the Python side only: put the host lengths back

    def _room(self) -> int:
        """Decoding steps every layer can still take without growing."""
        if self.ragged:
            return min(layer.min_free_rows for layer in self.cache.layers)  # type: ignore[union-attr]
        return min(layer.capacity - layer.length for layer in self.cache.layers)  # type: ignore[union-attr]

    def _check_ragged_capture(self) -> None:
        """What a replay could not follow: a padding mask copied into a plan, or a layer grown while capturing."""
        for layer, version in zip(self.cache.layers, self._versions):
            if layer.version != version:  # type: ignore[union-attr]
                raise CannotCompressError("A ragged layer grew while the CUDA graph was captured: reserve rows first.")
            if any(plan.padded for plan in layer.plans.values()):  # type: ignore[union-attr]
                raise CannotCompressError(
                    "The captured step copied a padding mask into the ragged attention: a replay would keep it at "
                    "one width. Decode padded batches without the graph."
                )

    def _forward(self) -> torch.Tensor:
        return self.model(
            input_ids=self.token, position_ids=self.position_ids, logits_to_keep=1, **self._cache_kwargs
        ).logits

    def __call__(self, token: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.ragged and [layer.version for layer in self.cache.layers] != self._versions:  # type: ignore[union-attr]
            raise CannotCompressError(
                "A ragged layer's buffers were replaced (grown or restored) after the CUDA graph was captured: "
                "capture a new step."
            )
        if self._room() < 1:
            if self.ragged:
                raise CannotCompressError(
                    "A ragged layer has no spare row left for the CUDA-graph step: reserve rows before capturing "
                    "(`RaggedLayer.reserve`)."
                )
            capacity = min(layer.capacity for layer in self.cache.layers)  # type: ignore[union-attr]
            raise CannotCompressError(
                f"The in-place decoding cache holds {capacity} tokens per layer and is full: build it with a larger "
                "`extra_tokens` (question + answer tokens)."
            )
        self.token.copy_(token)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        for layer in self.cache.layers:  # the host mirrors of what the graph advanced on the device
            if self.ragged:
                layer.logical_length += 1  # type: ignore[union-attr]
                layer.min_free_rows -= 1  # type: ignore[union-attr]
            else:
                layer.length += 1  # type: ignore[union-attr]
        return self.logits
