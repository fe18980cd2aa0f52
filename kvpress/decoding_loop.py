# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""`greedy_generate`: compress a prompt with a press, then decode greedily into the in-place cache.

For `model.generate` users who want the pipeline's fast decoding: the prompt is prefilled inside `press(model)`
(so the press compresses it), the compressed cache is copied once into preallocated buffers (`InPlaceCache`), and
each new token is written in place, optionally as one CUDA-graph replay per token (`cuda_graph=True`). Presses that
act during decoding (a `cache_budget`, DecodingPress, ...) and caches the in-place path cannot hold keep the
copying loop, as in the pipeline. Returns the prompt followed by the new tokens, like `generate`.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from kvpress.chunked_prefill import chunked_prefill
from kvpress.graphed_decoding import GraphedDecodeStep, graphable
from kvpress.inplace_cache import InPlaceCache, can_decode_in_place
from kvpress.presses.base_press import BasePress
from kvpress.transformers_adapter import cache_kwargs


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    press: Optional[BasePress] = None,
    max_new_tokens: int = 32,
    eos_token_id: Optional[int | Sequence[int]] = None,
    inplace: bool = True,
    cuda_graph: bool = False,
    compile_mode: Optional[str] = None,
    prefill_chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Greedy decoding of `max_new_tokens` after `input_ids` `(B, T)` (no padding), the prompt compressed by `press`.

    New tokens continue at the prompt's logical positions T, T + 1, ... (the cache length for presses that re-rotate
    their kept keys). Stops early once every row produced an `eos_token_id` (later tokens of a finished row repeat
    its EOS). `cuda_graph` replays each step from a CUDA graph (CUDA, no head-wise masks); `compile_mode` (`"default"`
    or `"max-autotune-no-cudagraphs"`) compiles that step with `torch.compile` first. `prefill_chunk_size` prefills
    the prompt that many tokens at a time, compressing after each chunk (`kvpress.chunked_prefill`)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}.")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    batch, length = input_ids.shape
    cache: object = DynamicCache(config=model.config)
    # one forward (or chunks of `prefill_chunk_size`, compressed after each), only the last position's logits
    logits = chunked_prefill(model, input_ids, cache, press=press, chunk_size=prefill_chunk_size)  # type: ignore
    token = logits[:, -1:].argmax(-1)  # type: ignore[index]
    start = cache.get_seq_length() if press is not None and press.rerotates_kept_keys else length  # type: ignore
    decoding = press is not None and press.acts_during_decoding
    step = None
    if inplace and can_decode_in_place(model, cache):  # type: ignore[arg-type]
        # a press acting during decoding evicts inside the same buffers (InPlaceLayer.replace); it cannot be graphed
        cache = InPlaceCache.from_cache(cache, extra_tokens=max_new_tokens + 2, model=model)  # type: ignore
        if cuda_graph and not decoding and graphable(model, cache):  # type: ignore[arg-type]
            step = GraphedDecodeStep(
                model, cache, batch_size=batch, compile_mode=compile_mode  # type: ignore[arg-type]
            )
    generated = [token]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    try:
        with press(model) if decoding else contextlib.nullcontext():
            for index in range(max_new_tokens - 1):
                if eos:
                    finished |= torch.isin(token[:, 0], torch.tensor(sorted(eos), device=token.device))
                    if bool(finished.all()):
                        break
                positions = torch.full((batch, 1), start + index, device=input_ids.device)
                next_token = next_greedy_token(model, cache, token, positions, step)
                token = torch.where(finished[:, None], token, next_token) if eos else next_token
                generated.append(token)
    finally:
        InPlaceCache.detach(model)
    return torch.cat([input_ids, *generated], dim=1)


def next_greedy_token(
    model: PreTrainedModel,
    cache,
    token: torch.Tensor,
    positions: torch.Tensor,
    graphed: Optional[GraphedDecodeStep] = None,
) -> torch.Tensor:
    """One decoding step: the greedy next token `(batch, 1)` after `token` at `positions`, from the CUDA-graph step
    `graphed` when given, else from one forward of `model` on `cache` (last position's logits only)."""
    if graphed is not None:
        logits = graphed(token, positions)
    else:
        logits = model(input_ids=token, position_ids=positions, logits_to_keep=1, **cache_kwargs(model, cache)).logits
    return logits[:, -1:].argmax(-1)
