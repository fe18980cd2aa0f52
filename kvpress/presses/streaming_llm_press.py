# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""StreamingLLMPress: keep the first `n_sink` tokens and the most recent ones (https://arxiv.org/abs/2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional

import torch
from torch import nn

from kvpress.presses.base_press import FieldCheck, integer_check
from kvpress.presses.scorer_press import ScorerPress


@dataclass
class StreamingLLMPress(ScorerPress):
    """Attention sinks plus a recent window. Keys are not re-rotated; wrap in KeyRerotationPress for the paper's
    exact setting.

    With a `cache_budget`, the cache keeps the `n_sink` first tokens and the `cache_budget - n_sink` most recent ones
    at every step (the kept cache stays in positional order, so "first" and "most recent" are positions).
    """

    chunked_prefill = "exact"  # under kvpress.chunked_prefill

    n_sink: int = 4

    field_checks: ClassVar[Mapping[str, FieldCheck]] = {"n_sink": integer_check(0, "first tokens always kept")}

    # Why DMSPress(decoding=True) cannot score a new token on its own with this press (see BasePress).
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = (
        "its score depends on where a token sits in the scored sequence, not on the token"
    )

    @property
    def decoding_window(self) -> int:
        return 0

    def check_budget_settings(self, budget: int) -> None:
        if budget <= self.n_sink:
            raise ValueError(
                f"StreamingLLMPress keeps the {self.n_sink} sink tokens plus recent ones, so cache_budget must be "
                f"larger than n_sink; got cache_budget={budget}, n_sink={self.n_sink}."
            )

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        k_len = keys.shape[2]
        if k_len <= self.n_sink:
            raise ValueError(
                f"StreamingLLMPress needs more cached tokens ({k_len}) than sink tokens (n_sink={self.n_sink}); "
                "lower n_sink or use a longer context."
            )
        n_pruned = k_len - self.n_kept(k_len)
        scores = torch.ones(keys.shape[:3], dtype=keys.dtype, device=keys.device)
        scores[:, :, self.n_sink : self.n_sink + n_pruned] = 0
        return scores
