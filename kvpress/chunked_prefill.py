# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Chunked prefill that compresses as it goes: long contexts without the prefill's peak memory.

The context is run through the model `chunk_size` tokens at a time. After each chunk, a press that supports it
(`press.chunked_prefill` is "exact" or "approximate") compresses every layer's cache, so that the cache never holds
more than the press's budget plus one chunk (the InfiniPot / chunked-SnapKV idea), and the activations of a forward
(attention, MLP) cover one chunk instead of the whole context. Without a press the cache is not compressed but the
activation transient is still that of one chunk, and no logits are computed for context tokens (only, when asked
for, for the last position).

How a ratio becomes a per-chunk budget. A press with `compression_ratio = r` keeps `n(T) = int(T * (1 - r))` tokens
of a context of `T` tokens (`ScorerPress.n_kept`). After the chunk that ends at logical position `L` (the first `L`
context tokens seen), the cache holds exactly `n(L)` tokens: the chunk's forward runs with the ratio that turns the
`n(L_previous) + chunk` cached tokens into `n(L)`. So the final cache has `n(T)` tokens, exactly the unchunked size,
and in between it never exceeds `n(L) + chunk_size`. A press with a `cache_budget` prunes each chunk to its budget with
its own decoding machinery (the first chunk is its prefill, later chunks are multi-token forwards).

Positions stay the logical ones: each chunk gets `position_ids` `start .. start + chunk - 1` (RoPE), while the
attention covers the (compressed) cache the chunk attends to. On sdpa models whose layers are all full causal
attention, the chunks run through `kvpress.chunk_attention` (lower-right causal on SDPA's flash kernel, no mask and no
repeated keys); other models keep transformers' mask.

With `chunk_size` None, or at least the context length, the prefill is exactly today's single forward.

For `generate` users: `chunked_prefill(model, input_ids, cache, press=press, chunk_size=4096)` fills `cache` and
returns the last position's logits; continue decoding at position `input_ids.shape[1]`, or let
`generate_with_chunked_prefill(model, input_ids, press, chunk_size, max_new_tokens)` do both (see the README's "Long
contexts").
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from contextlib import contextmanager
from typing import Generator, Optional, Sequence

import torch
from transformers import Cache, PreTrainedModel

from kvpress.chunk_attention import lower_right_causal_prefill
from kvpress.presses.base_press import CHUNKED_PREFILL_SUPPORT, PREFILL_CHUNK, BasePress, compression_ratio_set_to
from kvpress.transformers_adapter import cache_kwargs

logger = logging.getLogger(__name__)


def check_chunk_size(chunk_size: object, name: str = "prefill_chunk_size") -> Optional[int]:
    """`chunk_size` as an int >= 1, or None (no chunking); anything else raises."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"{name} must be a positive integer (tokens per prefill chunk) or None, got {chunk_size!r}.")
    return int(chunk_size)


def chunked_prefill_support(press: BasePress) -> str:
    """The press's declared behaviour under chunked prefill, one of CHUNKED_PREFILL_SUPPORT."""
    support = getattr(type(press), "chunked_prefill", "unsupported")
    if support not in CHUNKED_PREFILL_SUPPORT:
        raise ValueError(
            f"{type(press).__name__}.chunked_prefill is {support!r}; it must be one of {CHUNKED_PREFILL_SUPPORT}."
        )
    return support


def presses_supporting_chunked_prefill() -> dict[str, list[str]]:
    """Names of the exported presses by their support ("exact", "approximate"), for error messages and docs."""
    import kvpress

    found: dict[str, list[str]] = {"exact": [], "approximate": []}
    for name in kvpress.__all__:
        cls = getattr(kvpress, name, None)
        if isinstance(cls, type) and issubclass(cls, BasePress):
            support = getattr(cls, "chunked_prefill", "unsupported")
            if support in found:
                found[support].append(name)
    return found


def require_chunked_prefill_support(press: BasePress) -> str:
    """Raise a ValueError naming the alternatives when `press` cannot compress chunk by chunk; return its support."""
    support = chunked_prefill_support(press)
    if support != "unsupported":
        return support
    found = presses_supporting_chunked_prefill()
    raise ValueError(
        f"{type(press).__name__} does not support chunked prefill: it needs the whole context at once (the hidden "
        "states of every cached token, or a pass over the full context). Either prefill unchunked "
        "(prefill_chunk_size=None) or use a press that compresses chunk by chunk: exactly "
        f"{', '.join(found['exact']) or 'none'}; approximately (scores from the kept cache and the current chunk) "
        f"{', '.join(found['approximate']) or 'none'}."
    )


def kept_tokens(press: BasePress, length: int) -> int:
    """Tokens the press keeps of a context of `length` tokens (its compression ratio), as unchunked."""
    n_kept = getattr(press, "n_kept", None)
    if callable(n_kept) and not getattr(press, "cache_budget", None):
        return int(n_kept(length))
    return int(length * (1 - float(getattr(press, "compression_ratio", 0.0))))


def chunk_ratio(cached: int, target: int) -> float:
    """The compression ratio that turns `cached` tokens into `target` ones under `int(cached * (1 - ratio))`.

    Half a token of margin keeps `int` from landing one below `target` through rounding."""
    if not 0 <= target <= cached or cached < 1:
        raise ValueError(f"cannot compress {cached} cached tokens to {target}.")
    if target == cached:
        return 0.0
    return 1.0 - (target + 0.5) / cached


def chunk_bounds(length: int, chunk_size: Optional[int]) -> list[tuple[int, int]]:
    """`(start, end)` of each chunk of a `length`-token context (one chunk when `chunk_size` is None or larger)."""
    if chunk_size is None or chunk_size >= length:
        return [(0, length)]
    return [(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]


@contextmanager
def _prefill_chunk() -> Generator:
    token = PREFILL_CHUNK.set(True)
    try:
        yield
    finally:
        PREFILL_CHUNK.reset(token)


@torch.no_grad()
def chunked_prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache,
    press: Optional[BasePress] = None,
    chunk_size: Optional[int] = None,
    return_logits: bool = True,
) -> Optional[torch.Tensor]:
    """Prefill `input_ids` `(B, T)` into `cache` (empty), `chunk_size` tokens at a time, compressing with `press`.

    Returns the logits of the last context position `(B, 1, vocab)` (None with `return_logits=False`: the decoder
    alone runs, as in the pipeline). The next token continues at logical position `T`. Raises a ValueError when the
    press does not support chunked prefill (and the context is longer than one chunk), naming the alternatives."""
    chunk_size = check_chunk_size(chunk_size, "chunk_size")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor with length >= 1, got {shape}.")
    if press is not None and not isinstance(press, BasePress):
        raise TypeError(f"press must be a kvpress BasePress instance or None, got {type(press).__name__}.")
    if cache.get_seq_length() > 0:
        raise ValueError(
            f"The cache already holds {cache.get_seq_length()} tokens: chunked prefill fills an empty cache "
            "(pass a fresh DynamicCache)."
        )
    length = input_ids.shape[1]
    bounds = chunk_bounds(length, chunk_size)
    decoder = model.model
    if len(bounds) == 1:
        # One chunk: exactly the unchunked prefill.
        with press(model) if press is not None else contextlib.nullcontext():
            if return_logits:
                return model(input_ids=input_ids, logits_to_keep=1, **cache_kwargs(model, cache)).logits
            decoder(input_ids=input_ids, **cache_kwargs(decoder, cache))
        return None

    budgeted = press is not None and bool(getattr(press, "cache_budget", None))
    if press is not None:
        require_chunked_prefill_support(press)
    batch = input_ids.shape[0]
    logits = None
    kept = 0
    with press(model) if press is not None else contextlib.nullcontext(), lower_right_causal_prefill(model):
        for index, (start, end) in enumerate(bounds):
            chunk = input_ids[:, start:end]
            positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0).expand(batch, -1)
            last = index == len(bounds) - 1
            with contextlib.ExitStack() as stack:
                if press is not None and not budgeted:
                    target = kept_tokens(press, end)
                    stack.enter_context(compression_ratio_set_to(press, chunk_ratio(kept + end - start, target)))
                    stack.enter_context(_prefill_chunk())
                    kept = target
                if last and return_logits:
                    logits = model(
                        input_ids=chunk, position_ids=positions, logits_to_keep=1, **cache_kwargs(model, cache)
                    ).logits
                else:
                    decoder(input_ids=chunk, position_ids=positions, **cache_kwargs(decoder, cache))
            logger.debug("prefill chunk %d-%d: cache %d tokens", start, end, cache.get_seq_length())
    return logits


@torch.no_grad()
def generate_with_chunked_prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    press: Optional[BasePress] = None,
    chunk_size: Optional[int] = None,
    max_new_tokens: int = 32,
    eos_token_id: Optional[int | Sequence[int]] = None,
) -> torch.Tensor:
    """Greedy decoding after a chunked prefill, for `generate` users: the prompt `input_ids` `(B, T)` is prefilled
    `chunk_size` tokens at a time (compressed by `press` after each chunk), then `max_new_tokens` are decoded at
    logical positions T, T + 1, ... (inside the press for presses that act during decoding). Returns the prompt
    followed by the new tokens, like `generate`; stops once every row produced an `eos_token_id`."""
    from kvpress.decoding_loop import greedy_generate  # the decoding loop itself prefills through this module

    if isinstance(max_new_tokens, bool):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    return greedy_generate(
        model,
        input_ids,
        press=press,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        inplace=False,
        prefill_chunk_size=chunk_size,
    )
