# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""RandomPress: keep a random subset of tokens (a baseline)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import torch
from torch import nn

from kvpress.presses.base_press import FieldCheck
from kvpress.presses.scorer_press import ScorerPress


def _check_seed(press: Any, name: str, value: Any) -> Optional[int]:
    """None (unseeded) or an integer (numpy integers are stored as int)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{type(press).__name__}.seed must be an integer (the same seed gives the same scores) or None (fresh "
            f"random scores on every call), got {value!r}."
        )
    return int(value)


@dataclass
class RandomPress(ScorerPress):
    """Uniform random scores. With `seed`, the same scores come back on every call, on CPU and on CUDA alike.

    With a `cache_budget` and a `seed`, each decoding step of each layer draws from its own generator, seeded from
    `(seed, layer, step)`: reproducible, but not the same scores at every step (which would evict the same cache
    slot over and over).
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    seed: Optional[int] = None

    field_checks: ClassVar[Mapping[str, FieldCheck]] = {"seed": _check_seed}

    @property
    def decoding_window(self) -> int:
        return 0

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        shape = keys.shape[:3]
        if self.seed is None:
            return torch.rand(shape, dtype=keys.dtype, device=keys.device)
        # Drawn on a CPU generator then moved, so a seeded press also works on GPU tensors.
        generator = torch.Generator().manual_seed(self._step_seed(module))
        return torch.rand(shape, generator=generator).to(device=keys.device, dtype=keys.dtype)

    def _step_seed(self, module: nn.Module) -> int:
        """`seed` for a prefill (upstream); a seed derived from (seed, layer, step) for a decoding step."""
        state = self.layer_state(getattr(module, "layer_idx", -1)) if self.cache_budget else None
        seed = int(self.seed)
        if state is None or state.steps == 0:
            return seed
        return (seed * 1_000_003 + state.steps * 10_007 + int(module.layer_idx)) % (2**63 - 1)
