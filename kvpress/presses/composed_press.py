# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ComposedPress: apply several presses one after the other on each layer's cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

from kvpress.presses.base_press import BasePress, FieldCheck

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

    Every press receives the layer's original hidden states and attention weights, so a press that needs attention
    weights matching the cache (e.g. ObservedAttentionPress) only works first in the chain.
    `compression_ratio` is `1 - prod(1 - r_i)` over the inner presses.
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

    def post_init_from_model(self, model):
        for press in self.presses:
            press.post_init_from_model(model)

    def forward_hook(self, module, input, kwargs, output):
        for press in self.presses:
            output = press.forward_hook(module, input, kwargs, output)
        return output
