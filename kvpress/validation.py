# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Checks of press settings and inputs: each raises a ValueError that says what was wrong and what is allowed.

`validate_compression_ratio` and `validate_int` check a value; `ratio_check` and `integer_check` build the field checks
that `BasePress.field_checks` runs on every assignment (`FieldCheck`); `check_prefill_lengths` checks that a press
that needs every token's hidden state got a prefill.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import torch

# A field check takes the press, the field's name and the value being assigned; it raises a ValueError/TypeError that
# says what is allowed, or returns the value to store (e.g. a numpy scalar as a Python number).
FieldCheck = Callable[[Any, str, Any], Any]


def real_number(value: object) -> Optional[float]:
    """`value` as a float when it is a real number: a Python int or float, a numpy scalar (anything registered as
    `numbers.Real`) or a 0-dim torch tensor of a real dtype; None for anything else, bools included."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def validate_compression_ratio(value: object, name: str = "compression_ratio", allow_one: bool = False) -> float:
    """`value` as a float; a ValueError that says what is allowed when it is not a real number (Python, numpy or 0-dim
    torch) in [0, 1) ([0, 1] with `allow_one`), NaN included."""
    number = real_number(value)
    if number is None or not (0 <= number and (number <= 1 if allow_one else number < 1)):
        allowed = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(
            f"{name} must be a number in {allowed}, got {value!r}. It is the fraction of the KV cache that is "
            "removed: 0 keeps every token, 0.5 keeps half of them."
        )
    return number


def validate_int(
    owner: object,
    name: str,
    value: object,
    minimum: int,
    meaning: str = "",
    *,
    maximum: Optional[int] = None,
    allow_none: bool = False,
    bound: Optional[str] = None,
) -> None:
    """Raise a ValueError unless `value` is an integer (bools refused) in `[minimum, maximum]` (or None with
    `allow_none`). The message names `type(owner).__name__ + "." + name` (just `name` when `owner` is None), says the
    allowed values (`bound` replaces the default words: "a positive integer", "an integer >= m", "an integer in
    [m, M]") and what the value counts (`meaning`)."""
    if allow_none and value is None:
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and minimum <= value and (maximum is None or value <= maximum):  # type: ignore[operator]
        return
    if bound is None:
        if maximum is not None:
            bound = f"an integer in [{minimum}, {maximum}]"
        else:
            bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if allow_none:
        bound = f"None or {bound}"
    detail = f" ({meaning})" if meaning else ""
    field_name = name if owner is None else f"{type(owner).__name__}.{name}"
    raise ValueError(f"{field_name} must be {bound}{detail}, got {value!r}.")


def validate_number(
    owner: object,
    name: str,
    value: object,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    *,
    open_minimum: bool = False,
    meaning: str = "",
    note: str = "",
    bound: Optional[str] = None,
) -> None:
    """Raise a ValueError unless `value` is a Python int or float (bools refused) in `[minimum, maximum]` (`(minimum,`
    with `open_minimum`; a missing bound is unbounded). The message names the field as `validate_int` does, says the
    allowed values (`bound` replaces "a number in [m, M]" / "a number >= m"), what it means (`meaning`, in
    parentheses) and, after the value, `note`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and minimum is not None:
        ok = value > minimum if open_minimum else value >= minimum  # type: ignore[operator]
    if ok and maximum is not None:
        ok = value <= maximum  # type: ignore[operator]
    if ok:
        return
    if bound is None:
        if maximum is None:
            bound = f"a number >= {minimum}"
        else:
            bound = f"a number in {'(' if open_minimum else '['}{minimum}, {maximum}]"
    detail = f" ({meaning})" if meaning else ""
    field_name = name if owner is None else f"{type(owner).__name__}.{name}"
    raise ValueError(f"{field_name} must be {bound}{detail}, got {value!r}." + (f" {note}" if note else ""))


def check_token_count(name: str, value: object, meaning: str) -> None:
    """Raise a ValueError unless `value` (the field `name`, a number of tokens described by `meaning`) is a
    positive integer; used by the wrappers that walk the context in chunks or blocks."""
    validate_int(None, name, value, 1, meaning)


def check_prefill_lengths(press_name: str, q_len: int, k_len: int) -> None:
    """Raise a ValueError unless the `q_len` hidden states cover all `k_len` cached tokens (a prefill)."""
    if q_len != k_len:
        raise ValueError(
            f"{press_name} compresses a prefill, where every cached token has its hidden state; got {q_len} hidden "
            f"states for {k_len} cached tokens."
        )


def ratio_check(allow_one: bool = False) -> FieldCheck:
    """The field check of a compression ratio: a real number in [0, 1) ([0, 1] with `allow_one`), stored as float."""

    def check(press: Any, name: str, value: Any) -> float:
        return validate_compression_ratio(value, name=name, allow_one=allow_one)

    return check


def integer_check(minimum: int, meaning: str) -> FieldCheck:
    """The field check of an integer >= `minimum` (`meaning` says what it counts); numpy integers are stored as int."""

    def check(press: Any, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(
                f"{type(press).__name__}.{name} must be an integer >= {minimum} ({meaning}), got {value!r}."
            )
        return int(value)

    return check
