# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The decoder layers' MLPs over a long sequence, a slice of tokens at a time: the same output, a bounded transient.

An MLP acts on each token alone, so running it over slices of the sequence and writing each slice's output into one
preallocated tensor gives the unsliced output (up to the float rounding of smaller matrix products). What it saves is
the intermediate activations: a gated MLP holds about three `(T, intermediate)` tensors at once, 86 KB per token on
the Llama-3.1-8B shape (intermediate 14336, bf16), the largest part of an unchunked prefill's transient (about
14 GiB at 128k). With slices of 4096 tokens that is 0.3 GiB whatever the context.

`mlp_in_slices(model, slice_tokens)` wraps every decoder layer's `mlp` inside the block. The ragged prefill uses it
(`kvpress.ragged_prefill`): a head-wise press cannot prefill in chunks, so an unchunked prefill whose cache is
compacted layer by layer is left with the activations as its peak, and this bounds them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Generator

import torch

from kvpress.utils import get_language_model

DEFAULT_SLICE_TOKENS = 4096


def _sliced(forward: Callable, slice_tokens: int) -> Callable:
    def run(hidden_states, *args, **kwargs):
        if (
            args
            or kwargs
            or not isinstance(hidden_states, torch.Tensor)
            or hidden_states.dim() != 3
            or hidden_states.shape[1] <= slice_tokens
        ):
            return forward(hidden_states, *args, **kwargs)
        length = hidden_states.shape[1]
        first = forward(hidden_states[:, :slice_tokens])
        if not isinstance(first, torch.Tensor) or first.shape[:2] != hidden_states[:, :slice_tokens].shape[:2]:
            return forward(hidden_states)  # not a token-wise MLP of one tensor (e.g. a mixture with router logits)
        output = first.new_empty((first.shape[0], length, *first.shape[2:]))
        output[:, :slice_tokens] = first
        del first
        for start in range(slice_tokens, length, slice_tokens):
            output[:, start : start + slice_tokens] = forward(hidden_states[:, start : start + slice_tokens])
        return output

    return run


@contextmanager
def mlp_in_slices(model: torch.nn.Module, slice_tokens: int = DEFAULT_SLICE_TOKENS) -> Generator[int, None, None]:
    """Inside the block, each decoder layer's `mlp` runs over at most `slice_tokens` tokens at a time (see the module
    docstring); yields how many MLPs were wrapped. Their `forward` is restored on exit, exception or not, including a
    `forward` set on the instance before (e.g. by accelerate's device hooks)."""
    if isinstance(slice_tokens, bool) or not isinstance(slice_tokens, int) or slice_tokens < 1:
        raise ValueError(f"slice_tokens must be a positive integer (tokens per MLP slice), got {slice_tokens!r}")
    wrapped = []
    for layer in get_language_model(model).layers:
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, torch.nn.Module):
            continue
        own = mlp.__dict__.get("forward")  # an instance-level forward (accelerate hooks), or None
        mlp.forward = _sliced(mlp.forward, slice_tokens)
        wrapped.append((mlp, own))
    try:
        yield len(wrapped)
    finally:
        for mlp, own in wrapped:
            if own is None:
                del mlp.forward
            else:
                mlp.forward = own
