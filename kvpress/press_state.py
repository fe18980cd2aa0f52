# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Roll a press's decoding state back, so that several questions can each be answered from the compressed context.

A press that acts during decoding (a `cache_budget`, DecodingPress, DMS, ...) keeps per-layer state that follows the
cache entries (positions, accumulated attention, hidden-state buffers), and head-wise presses leave masks on the
attention modules. `snapshot_press_state` copies all of it (the press, every press nested in it, and the masks of
the model's attention layers); `restore_press_state` puts a fresh copy back, so one snapshot serves many questions.
Telemetry is not rolled back: it counts every question's tokens.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from kvpress.headwise_masks import MASK_ATTRIBUTE
from kvpress.timing import _TELEMETRY_ATTRIBUTE

_MASK_ATTRIBUTE = MASK_ATTRIBUTE


def _copy_state(value: Any) -> Any:
    """A copy of `value` deep enough that decoding cannot change it: tensors are cloned and containers rebuilt;
    models, presses (snapshotted on their own) and other objects are kept by reference."""
    from kvpress.presses.base_press import BasePress

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (nn.Module, BasePress)):
        return value
    if isinstance(value, defaultdict):
        copied: dict = defaultdict(value.default_factory)
        copied.update((key, _copy_state(item)) for key, item in value.items())
        return copied
    if isinstance(value, dict):
        return type(value)((key, _copy_state(item)) for key, item in value.items())
    if isinstance(value, list):
        return [_copy_state(item) for item in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_copy_state(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        copied = copy.copy(value)
        for name, item in vars(value).items():
            object.__setattr__(copied, name, _copy_state(item))
        return copied
    return value


def _presses_in(press: Any) -> list:
    """`press` and every press nested in it (wrappers' `press`, ComposedPress's `presses`, ...), each once."""
    from kvpress.presses.base_press import BasePress

    found: list = []
    stack = [press]
    while stack:
        current = stack.pop()
        if not isinstance(current, BasePress) or any(current is seen for seen in found):
            continue
        found.append(current)
        for value in vars(current).values():
            if isinstance(value, BasePress):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                stack.extend(item for item in value if isinstance(item, BasePress))
    return found


def snapshot_press_state(press: Any, model: nn.Module) -> dict:
    """Copies of the state of `press` (nested presses included) and of the head-wise masks of `model`'s layers."""
    presses = [
        (item, {k: _copy_state(v) for k, v in vars(item).items() if k != _TELEMETRY_ATTRIBUTE})
        for item in _presses_in(press)
    ]
    masks = [
        (module, _copy_state(getattr(module, _MASK_ATTRIBUTE, None)))
        for module in model.modules()
        if hasattr(module, "layer_idx") and hasattr(module, _MASK_ATTRIBUTE)
    ]
    return {"presses": presses, "masks": masks}


def restore_press_state(snapshot: dict, model: nn.Module) -> None:
    """Put the state of `snapshot_press_state` back (a fresh copy each time); state created since is dropped."""
    for item, saved in snapshot["presses"]:
        for name in [name for name in vars(item) if name not in saved and name != _TELEMETRY_ATTRIBUTE]:
            item.__dict__.pop(name)
        for name, value in saved.items():
            item.__dict__[name] = _copy_state(value)
    saved_modules = {id(module) for module, _ in snapshot["masks"]}
    for module, mask in snapshot["masks"]:
        module.__dict__[_MASK_ATTRIBUTE] = _copy_state(mask)
    for module in model.modules():
        if hasattr(module, "layer_idx") and id(module) not in saved_modules and _MASK_ATTRIBUTE in module.__dict__:
            module.__dict__[_MASK_ATTRIBUTE] = None
