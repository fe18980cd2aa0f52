# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The one place that knows transformers' argument names.

Every read of what transformers hands an attention hook (hidden states, the cache under any of its names, RoPE
position embeddings, position ids, the attention mask, cache positions, input ids at the decoder) and every write of
modified inputs goes through this module; so does every call that passes a cache to a model, and every read of the
cache a model returns. A release that renames one of them breaks this file, loudly, instead of every press silently.

transformers 5.24 renamed the cache keyword of attention modules, decoders and model outputs from
`past_key_values` to `cache` (the old name is accepted with a deprecation until 5.40). A hook that looked only for
`past_key_values` found nothing and returned: no press compressed anything. Here the cache is looked up under every
name transformers has used, a `Cache` handed over under an unknown name raises `CannotCompressError`, and
`CacheWatch` raises when a model forward produced a cache that none of the press's hooks could find.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Optional

import torch
import transformers
from packaging import version
from transformers import Cache

logger = logging.getLogger(__name__)

# The releases the whole test suite runs on (CI: the oldest and the newest that pip resolves).
OLDEST_TESTED_TRANSFORMERS = "5.2.0"
NEWEST_TESTED_TRANSFORMERS = "5.25.0"

# Names under which transformers has passed the cache, newest first: `cache` (5.24+), `past_key_values` (5.0-5.23,
# and still accepted by 5.24+ until 5.40), `past_key_value` (4.x attention modules).
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")
_FIRST_KEYWORD_RELEASE = {"cache": "5.24.0"}


class CannotCompressError(RuntimeError):
    """A press was asked to act but cannot (no cache found, an unknown layer layout, a cache it cannot resize).

    Raised instead of returning the cache unchanged: a press that silently compresses nothing produces numbers for a
    compression that never happened."""


def installed_transformers() -> str:
    return str(transformers.__version__)


def _tested_range_hint() -> str:
    return (
        f"kvpress is tested with transformers {OLDEST_TESTED_TRANSFORMERS} to {NEWEST_TESTED_TRANSFORMERS} "
        f"(installed: {installed_transformers()}); install a tested release, e.g. "
        f"pip install 'transformers=={NEWEST_TESTED_TRANSFORMERS}', or report the new argument names."
    )


def warn_if_untested_release() -> None:
    """Log once, at import, when the installed transformers is newer than the newest tested release."""
    if version.parse(installed_transformers()) > version.parse(NEWEST_TESTED_TRANSFORMERS):
        logger.warning(
            "transformers %s is newer than the newest release kvpress was tested with (%s). If it renamed what "
            "attention layers receive, presses raise CannotCompressError instead of compressing nothing.",
            installed_transformers(),
            NEWEST_TESTED_TRANSFORMERS,
        )


# ----------------------------------------------------------------------------------------------------------------
# Reading what an attention hook receives
# ----------------------------------------------------------------------------------------------------------------


def find_cache(kwargs: dict) -> Optional[Cache]:
    """The cache a forward received, under whichever name transformers used; None when it ran without one.

    Raises CannotCompressError when a `Cache` arrived under a name this module does not know."""
    for name in CACHE_KEYWORDS:
        value = kwargs.get(name)
        if value is not None:
            return value
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            raise CannotCompressError(
                f"The attention layer received its cache under the keyword {name!r}, which kvpress does not read "
                f"(it knows {', '.join(CACHE_KEYWORDS)}). Nothing can be compressed. {_tested_range_hint()}"
            )
    return None


def hook_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Optional[Cache]]:
    """`(hidden_states, cache)` of an attention forward; the cache is None when the forward ran without one."""
    return hidden_states_of(args, kwargs), find_cache(kwargs)


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input of an attention layer `(B, q_len, hidden)`, passed by name or as the first positional argument."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    raise CannotCompressError(
        f"The attention layer received no hidden states (keywords: {sorted(kwargs)}, {len(args)} positional "
        f"arguments). {_tested_range_hint()}"
    )


def position_embeddings_of(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE `(cos, sin)` of this forward's tokens, each `(B, q_len, d)`."""
    position_embeddings = kwargs.get("position_embeddings")
    if not isinstance(position_embeddings, (tuple, list)) or len(position_embeddings) != 2:
        raise CannotCompressError(
            "This press needs the rotary position embeddings `(cos, sin)` that transformers passes to attention "
            f"layers as `position_embeddings`; got {type(position_embeddings).__name__} (keywords received: "
            f"{sorted(kwargs)}). {_tested_range_hint()}"
        )
    cos, sin = position_embeddings
    return cos, sin


def optional_position_embeddings(kwargs: dict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """`(cos, sin)` when the forward received them, else None (for code that can do without)."""
    position_embeddings = kwargs.get("position_embeddings")
    if isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2:
        return position_embeddings[0], position_embeddings[1]
    return None


def position_ids_of(kwargs: dict) -> Optional[torch.Tensor]:
    """The position ids of this forward's tokens, `(B or 1, q_len)`, when transformers passed them."""
    value = kwargs.get("position_ids")
    return value if isinstance(value, torch.Tensor) else None


def attention_mask_of(kwargs: dict) -> Any:
    """The attention mask (a 4-D tensor, a block mask, or None)."""
    return kwargs.get("attention_mask")


def cache_position_of(kwargs: dict) -> Optional[torch.Tensor]:
    """`cache_position` where transformers still passes it (5.2); None from 5.3 on."""
    value = kwargs.get("cache_position")
    return value if isinstance(value, torch.Tensor) else None


def input_tokens_of(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """At the decoder: `input_ids` (by name or first positional argument), else `inputs_embeds`."""
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return None


def input_ids_of(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """At the decoder: the token ids of the forward (by name or first positional argument), None for embeddings."""
    value = kwargs.get("input_ids")
    if isinstance(value, torch.Tensor):
        return value
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        return args[0]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Writing modified inputs back
# ----------------------------------------------------------------------------------------------------------------

# Logical names a press may change, and the keyword transformers reads them under.
_WRITABLE = {
    "hidden_states": "hidden_states",
    "position_embeddings": "position_embeddings",
    "position_ids": "position_ids",
    "attention_mask": "attention_mask",
    "cache_position": "cache_position",
    "input_ids": "input_ids",
}


def attention_options(kwargs: dict) -> tuple[Optional[float], Optional[float], float]:
    """`(scaling, softcap, dropout)` of a call to an attention function (None, None, 0.0 when not passed)."""
    return kwargs.get("scaling"), kwargs.get("softcap"), float(kwargs.get("dropout") or 0.0)


def fit_varlen_key_length(kwargs: dict, key_length: int) -> None:
    """flash-attn varlen calls carry cumulative key lengths (`cu_seq_lens_k`): make the last one `key_length`, the
    (possibly compressed) cache length, in place."""
    lengths = kwargs.get("cu_seq_lens_k")
    if lengths is not None:
        lengths[-1] = key_length


def drop_causal_flag(kwargs: dict) -> None:
    """Remove an attention call's `is_causal` flag (an explicit mask then decides), in place."""
    kwargs.pop("is_causal", None)


def hidden_states_by_keyword(kwargs: dict) -> bool:
    """Whether the forward received its hidden states as a keyword (so a copy of `kwargs` must carry new ones)."""
    return "hidden_states" in kwargs


def replace_inputs(kwargs: dict, **changes: Any) -> dict:
    """A copy of a forward's keyword arguments with `changes` applied (logical names; `cache=` is written under the
    keyword the forward used, or the installed transformers' keyword when it had no cache). Unknown names raise a
    TypeError."""
    updated = dict(kwargs)
    for name, value in changes.items():
        if name == "cache":
            keyword = next((k for k in CACHE_KEYWORDS if kwargs.get(k) is not None), default_cache_keyword())
            updated[keyword] = value
        elif name in _WRITABLE:
            updated[_WRITABLE[name]] = value
        else:
            raise TypeError(f"replace_inputs cannot set {name!r}; allowed: cache, {', '.join(_WRITABLE)}.")
    return updated


# Attention inputs laid out along the query/token axis (dim 1 for (B, T, ...) tensors, dim 0 for cache_position).
_TOKEN_AXIS_KWARGS = ("hidden_states", "position_ids")


def chunk_kwargs(kwargs: dict, start: int, end: int, q_len: int) -> dict:
    """A shallow copy of the attention `kwargs` whose per-token entries cover only tokens `[start, end)`."""
    sliced = dict(kwargs)
    for name in _TOKEN_AXIS_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == q_len:
            sliced[name] = value[:, start:end]
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.dim() == 1 and cache_position.shape[0] == q_len:
        sliced["cache_position"] = cache_position[start:end]
    position_embeddings = kwargs.get("position_embeddings")
    if isinstance(position_embeddings, (tuple, list)) and all(
        isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == q_len for t in position_embeddings
    ):
        sliced["position_embeddings"] = tuple(t[:, start:end] for t in position_embeddings)
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-2] == q_len:
        sliced["attention_mask"] = attention_mask[..., start:end, start:end]
    return sliced


def gather_kwargs(kwargs: dict, hidden_states: torch.Tensor, positions: torch.Tensor, q_len: int) -> dict:
    """A shallow copy of the attention `kwargs` whose per-token entries are taken at `positions` `(B, n)`.

    Covers `hidden_states` (replaced by the given ones), `position_ids`, `position_embeddings` (cos, sin),
    `cache_position` (from the first batch item) and a 4-D `attention_mask` (rows and columns).
    """
    gathered = dict(kwargs)
    if "hidden_states" in kwargs:
        gathered["hidden_states"] = hidden_states
    bsz, n = positions.shape
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[1] == q_len:
        gathered["position_ids"] = position_ids.expand(bsz, -1).gather(1, positions.to(position_ids.device))
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.dim() == 1 and cache_position.shape[0] == q_len:
        gathered["cache_position"] = cache_position[positions[0].to(cache_position.device)]
    position_embeddings = kwargs.get("position_embeddings")
    if isinstance(position_embeddings, (tuple, list)) and all(
        isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] == q_len for t in position_embeddings
    ):
        gathered["position_embeddings"] = tuple(
            t.expand(bsz, -1, -1).gather(1, positions.to(t.device).unsqueeze(-1).expand(-1, -1, t.shape[-1]))
            for t in position_embeddings
        )
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2] == q_len and mask.shape[-1] == q_len:
        mask = mask.expand(bsz, -1, -1, -1)
        index = positions.to(mask.device)[:, None, :, None]
        mask = mask.gather(2, index.expand(-1, mask.shape[1], -1, q_len))
        gathered["attention_mask"] = mask.gather(3, index.transpose(2, 3).expand(-1, mask.shape[1], n, -1))
    return gathered


def row_kwargs(kwargs: dict, row: int, start: int, q_len: int) -> dict:
    """A shallow copy of the attention `kwargs` of one batch row alone, without its first `start` tokens (its left
    padding): `hidden_states`, `position_ids`, `position_embeddings` (cos, sin; a batch-shared one keeps its single
    row), a 4-D `attention_mask` (rows and columns) and `cache_position` (renumbered from 0), as the row gets them
    when it runs alone."""

    def one_row(value: torch.Tensor) -> torch.Tensor:
        index = row if value.shape[0] > 1 else 0
        return value[index : index + 1, start:]

    sliced = dict(kwargs)
    for name in _TOKEN_AXIS_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == q_len:
            sliced[name] = one_row(value)
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.dim() == 1 and cache_position.shape[0] == q_len:
        sliced["cache_position"] = cache_position[start:] - start
    position_embeddings = kwargs.get("position_embeddings")
    if isinstance(position_embeddings, (tuple, list)) and all(
        isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == q_len for t in position_embeddings
    ):
        sliced["position_embeddings"] = tuple(one_row(t) for t in position_embeddings)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2] == q_len and mask.shape[-1] == q_len:
        index = row if mask.shape[0] > 1 else 0
        sliced["attention_mask"] = mask[index : index + 1, :, start:, start:]
    return sliced


def drop_decoder_tokens(args: tuple, kwargs: dict, keep: torch.Tensor) -> tuple[tuple, dict]:
    """The decoder's `(args, kwargs)` with only the tokens where `keep` `(T,)` is True: ids, 2-D attention mask,
    token types; position ids and cache positions become the first `keep.sum()` (contiguous positions)."""
    input_ids = input_ids_of(args, kwargs)
    length, n_kept = input_ids.shape[1], int(keep.sum())
    kwargs = dict(kwargs)
    if "input_ids" in kwargs:
        kwargs["input_ids"] = input_ids[:, keep]
    else:
        args = (input_ids[:, keep], *args[1:])
    for name in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == length:
            kwargs[name] = value[:, keep]
    position_ids = position_ids_of(kwargs)
    if position_ids is not None and position_ids.shape[-1] == length:
        kwargs["position_ids"] = position_ids[..., :n_kept]
    cache_position = cache_position_of(kwargs)
    if cache_position is not None and cache_position.dim() == 1 and cache_position.shape[0] == length:
        kwargs["cache_position"] = cache_position[:n_kept]
    return args, kwargs


def decoder_inputs_of(args: tuple, kwargs: dict) -> dict:
    """A decoder forward's keyword arguments, with positional token ids moved to `input_ids`."""
    inputs = dict(kwargs)
    if args and "input_ids" not in inputs:
        inputs["input_ids"] = args[0]
    return inputs


_PER_TOKEN_DECODER_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position")


def decoder_call(
    model: torch.nn.Module,
    inputs: dict,
    cache: Cache,
    tokens: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> dict:
    """Keyword arguments to call `model` (a decoder) again with `cache`: the non-token entries of a forward's
    `inputs`, then `tokens` (ids, or embeddings when floating point; the forward's own when None), positions, mask."""
    call = {k: v for k, v in inputs.items() if k not in _PER_TOKEN_DECODER_INPUTS and k not in CACHE_KEYWORDS}
    call["use_cache"] = True
    call.update(cache_kwargs(model, cache))
    if tokens is None:
        ids = inputs.get("input_ids")
        call.update({"input_ids": ids} if ids is not None else {"inputs_embeds": inputs.get("inputs_embeds")})
    elif tokens.is_floating_point():
        call["inputs_embeds"] = tokens
    else:
        call["input_ids"] = tokens
    if position_ids is not None:
        call["position_ids"] = position_ids
    if attention_mask is not None:
        call["attention_mask"] = attention_mask
    return call


# ----------------------------------------------------------------------------------------------------------------
# Calling a model with a cache, and reading the cache it returns
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cache_keyword_of_class(cls: type) -> str:
    parameters: Any
    try:
        parameters = inspect.signature(getattr(cls, "forward")).parameters
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - no forward, or no signature
        parameters = {}
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    return default_cache_keyword()


def default_cache_keyword() -> str:
    """The cache keyword of the installed transformers: `cache` from 5.24 on, else `past_key_values`."""
    for name, release in _FIRST_KEYWORD_RELEASE.items():
        if version.parse(installed_transformers()) >= version.parse(release):
            return name
    return "past_key_values"


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which `model.forward` takes its cache (`cache` on 5.24+, `past_key_values` before)."""
    return _cache_keyword_of_class(type(model))


def cache_kwargs(model: torch.nn.Module, cache: Optional[Cache]) -> dict:
    """`{keyword: cache}` for calling `model` (a causal LM or its decoder) with `cache`, without deprecation."""
    return {cache_keyword(model): cache}


def forward_kwargs(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    cache: Optional[Cache] = None,
    position_ids: Optional[torch.Tensor] = None,
    output_hidden_states: bool = False,
) -> dict:
    """Keyword arguments to call `model` on `tokens` (ids, or embeddings when floating point): writing into `cache`
    when given, else without any cache; with `position_ids` and every layer's hidden states when asked."""
    call: dict = {"inputs_embeds" if tokens.is_floating_point() else "input_ids": tokens}
    if cache is None:
        call["use_cache"] = False
    else:
        call["use_cache"] = True
        call.update(cache_kwargs(model, cache))
    if position_ids is not None:
        call["position_ids"] = position_ids
    if output_hidden_states:
        call["output_hidden_states"] = True
    return call


def output_cache(outputs: Any) -> Optional[Cache]:
    """The cache a model output carries (`outputs.cache` on 5.24+, `outputs.past_key_values` before), or None.

    Reads the fields directly, so no deprecation warning is raised on any release."""
    if outputs is None:
        return None
    if isinstance(outputs, dict):  # ModelOutput is an OrderedDict of its non-None fields
        for name in CACHE_KEYWORDS:
            if name in outputs.keys():
                value = dict.__getitem__(outputs, name)
                if isinstance(value, Cache):
                    return value
        return None
    if isinstance(outputs, (tuple, list)):
        return next((item for item in outputs if isinstance(item, Cache)), None)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Never a silent no-op: a forward that produced a cache its hooks could not find raises
# ----------------------------------------------------------------------------------------------------------------


class CacheWatch:
    """Counts, for each forward of a decoder, how many hooked attention layers ran and how many found a cache.

    `enter` / `leave` are the decoder's forward pre-hook and forward hook; `saw(kwargs)` is called from every
    attention hook. Forwards may nest (KVzip runs the model inside its hook), so counts live on a stack."""

    def __init__(self, press_name: str):
        self.press_name = press_name
        self._frames: list[dict] = []

    def enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._frames.append({"layers": 0, "found": 0, "keywords": None})

    def saw(self, kwargs: dict, found: bool) -> None:
        if not self._frames:
            return
        frame = self._frames[-1]
        frame["layers"] += 1
        frame["found"] += int(found)
        if not found and frame["keywords"] is None:
            frame["keywords"] = sorted(kwargs)

    def leave(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._frames:
            return
        frame = self._frames.pop()
        if frame["layers"] == 0 or frame["found"] == frame["layers"]:
            return
        if output_cache(output) is None:
            return  # the model ran without a cache (use_cache=False): there is nothing to compress
        raise CannotCompressError(
            f"{self.press_name} did not compress anything: the model returned a KV cache, but "
            f"{frame['layers'] - frame['found']} of {frame['layers']} hooked attention layers received none under the "
            f"names kvpress reads ({', '.join(CACHE_KEYWORDS)}); the first such layer received the keywords "
            f"{frame['keywords']}. {_tested_range_hint()}"
        )

    def abandon(self) -> None:
        """Forget every open frame (a forward raised before its decoder hook ran)."""
        self._frames.clear()
