# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ComposedPress: apply several presses one after the other on each layer's cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

from kvpress.presses.base_press import BasePress, FieldCheck, get_hook_inputs
from kvpress.utils import cache_layer_length

logger = logging.getLogger(__name__)


def _composition_problem(press: BasePress) -> Optional[str]:
    """Why `press` cannot go inside a ComposedPress (it declares `composable = False`), or None when it can."""
    if press.composable:
        return None
    return (
        f"{type(press).__name__} cannot be composed: it either masks cache entries head by head (the masks would "
        "point at the wrong entries once another press removes tokens) or needs its own context manager"
    )


def _check_presses(press: Any, name: str, value: Any) -> list[BasePress]:
    """A non-empty list (or tuple) of presses that can be chained, stored as a list."""
    if isinstance(value, BasePress) or not isinstance(value, (list, tuple)):
        raise TypeError(f"ComposedPress takes a list of presses, got {type(value).__name__}.")
    if len(value) == 0:
        raise ValueError(
            "ComposedPress takes a non-empty list of presses, got an empty one: it would compress nothing. Pass at "
            "least one press (or use the press alone)."
        )
    for position, inner in enumerate(value):
        if not isinstance(inner, BasePress):
            raise TypeError(
                f"ComposedPress takes a list of presses; presses[{position}] is a {type(inner).__name__}, not a "
                "kvpress press (a BasePress instance)."
            )
        problem = _composition_problem(inner)
        if problem is not None:
            raise ValueError(f"ComposedPress cannot contain presses[{position}]: {problem}.")
    return list(value)


@dataclass
class ComposedPress(BasePress):
    """Chain presses: each one compresses the cache left by the previous one, layer by layer.

    Every press receives the layer's original hidden states. The eager attention weights go to each press as long
    as they still cover the cache; once a press has removed tokens they describe keys that are gone, so the next
    presses receive `attentions=None`, as every press does under sdpa or flash attention (SnapKV, for instance,
    recomputes its window's attention over the kept keys). A press that needs the attention weights of the whole
    context (`needs_attention_weights`, e.g. ObservedAttentionPress) must come before any press that removes
    tokens; placed after one, it raises an error. `compression_ratio` is `1 - prod(1 - r_i)` over the inner presses.
    """

    presses: list[BasePress]

    field_checks: ClassVar[Mapping[str, FieldCheck]] = {"presses": _check_presses}

    @property
    def compression_ratio(self) -> Optional[float]:
        """`1 - prod(1 - r_i)`, read from the inner presses now; None when one of them has no ratio (yet)."""
        retained = 1.0
        for press in self.presses:
            try:
                ratio = press.compression_ratio  # type: ignore[attr-defined]
            except (AttributeError, ValueError, AssertionError):
                # e.g. presses whose ratio is only known after a forward pass, or decoding presses (no ratio)
                return None
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                return None
            retained *= 1 - ratio
        return 1 - retained

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        raise AttributeError(
            "ComposedPress.compression_ratio is computed from the inner presses (1 - prod(1 - r_i)); set the "
            "compression_ratio of each press in `presses` instead."
        )

    @property
    def acts_during_decoding(self) -> bool:
        """True when one of the inner presses compresses while the model generates (e.g. one with a budget)."""
        return any(press.acts_during_decoding for press in self.presses)

    def post_init_from_model(self, model):
        for press in self.presses:
            press.post_init_from_model(model)

    def on_exit(self) -> None:
        for press in self.presses:
            press.on_exit()

    def forward_hook(self, module, input, kwargs, output):
        _, cache = get_hook_inputs(module, input, kwargs)
        length_before = None if cache is None else cache_layer_length(cache, module.layer_idx)
        for position, press in enumerate(self.presses):
            seen = output
            if position > 0 and cache is not None and cache_layer_length(cache, module.layer_idx) != length_before:
                seen = self._without_attentions(press, position, module, length_before, cache, output)
            returned = press.forward_hook(module, input, kwargs, seen)
            if returned is not seen:  # a press that changed the layer's output (none of upstream's does)
                output = returned
        return output

    @staticmethod
    def _without_attentions(press: BasePress, position: int, module, length_before: int, cache, output):
        """`output` without its attention weights, for a press that runs after earlier presses removed entries from
        the layer's cache (the weights describe keys that are gone)."""
        if press.needs_attention_weights:
            raise ValueError(
                f"ComposedPress: presses[{position}] ({type(press).__name__}) scores with the attention weights of "
                f"the whole context, but the presses before it changed layer {module.layer_idx}'s cache from "
                f"{length_before} to {cache_layer_length(cache, module.layer_idx)} entries, so those weights no "
                f"longer match it. Put {type(press).__name__} first in the list."
            )
        if not isinstance(output, (tuple, list)) or len(output) < 2 or output[1] is None:
            return output
        return type(output)((output[0], None, *output[2:]))
