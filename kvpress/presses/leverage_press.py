# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""LeverageScorePress: keep the tokens whose (pre-RoPE) keys have the largest approximate statistical leverage,
i.e. the geometric outliers of the key matrix (Compactor, https://arxiv.org/abs/2507.08143)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from kvpress.presses.base_press import NEEDS_EVERY_HIDDEN_STATE
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import get_prerope_key_states
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)


def require_prefill(press: object, hidden_states: torch.Tensor, keys: torch.Tensor) -> None:
    """Raise a ValueError unless every cached token has its hidden state (a prefill, not a decoding step)."""
    if keys.shape[-2] != hidden_states.shape[-2]:
        raise ValueError(
            f"{type(press).__name__} only supports prefill: it scores each cached token from its own hidden state, "
            f"but got {hidden_states.shape[-2]} hidden states for {keys.shape[-2]} cached tokens. Use it to compress "
            "the context, not during decoding or after another press has shortened the cache."
        )


def global_zscore(scores: torch.Tensor) -> torch.Tensor:
    """Standardise with the mean and standard deviation of the whole tensor (all batches and heads together)."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / scores.std().clamp_min(1e-6)


@dataclass
class LeverageScorePress(ScorerPress):
    """Score each token by the leverage of its pre-RoPE key in the centred key matrix of its head.

    The leverage of row i of a matrix X is `x_i^T (X^T X)^-1 x_i`: large for rows that point in directions few
    other rows share. It is approximated on a Gaussian sketch `X = (K - mean K) Phi` with `sketch_dimension`
    columns (a fresh sketch on every call), through a Cholesky factorisation of `X^T X` regularised with a small
    jitter. Scores are z-normalised over the whole layer (all heads together). Prefill only.
    """

    compression_ratio: float = 0.0
    sketch_dimension: int = 48

    # The score needs the hidden state of every cached token, which only a prefill has.
    supports_decoding: ClassVar[bool] = False
    cannot_score_during_decoding: ClassVar[Optional[str]] = NEEDS_EVERY_HIDDEN_STATE
    cannot_score_new_tokens_alone: ClassVar[Optional[str]] = NEEDS_EVERY_HIDDEN_STATE

    def __post_init__(self):
        super().__post_init__()
        validate_int(self, "sketch_dimension", self.sketch_dimension, 1)

    @staticmethod
    def chol_with_jitter(gram: torch.Tensor, jitter: float = 0.0, max_tries: int = 5) -> torch.Tensor:
        """Cholesky factor of `gram + jitter * I`, growing the jitter (x10, from at least 1e-8) until it succeeds."""
        identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        current = jitter
        for _ in range(max_tries):
            factor, info = torch.linalg.cholesky_ex(gram + current * identity)
            if bool((info == 0).all()):
                return factor
            current = max(1e-8, 1e-2 if current == 0 else 10 * current)
        raise RuntimeError(
            f"Cholesky failed after {max_tries} tries (last jitter {current:g}): the sketched key Gram matrix is not "
            "positive definite. The keys may contain NaN or inf values."
        )

    @staticmethod
    def compute_leverage_scores(key_states: torch.Tensor, sketch_dimension: int) -> torch.Tensor:
        """Approximate leverage scores `(B, H_kv, T)` of the centred `key_states` `(B, H_kv, T, d)`."""
        bsz, num_kv_heads, _, head_dim = key_states.shape
        sketch = torch.randn(
            bsz, num_kv_heads, head_dim, sketch_dimension, dtype=key_states.dtype, device=key_states.device
        )
        sketch = sketch / sketch_dimension**0.5
        centred = key_states - key_states.mean(dim=-2, keepdim=True)
        sketched = (centred @ sketch).float()  # (B, H_kv, T, k)
        gram = sketched.transpose(-1, -2) @ sketched  # (B, H_kv, k, k)
        factor = LeverageScorePress.chol_with_jitter(0.5 * (gram + gram.transpose(-1, -2)), jitter=1e-2)
        solved = torch.cholesky_solve(sketched.transpose(-1, -2), factor)  # gram^-1 X^T, (B, H_kv, k, T)
        return (sketched * solved.transpose(-1, -2)).sum(dim=-1).clamp_min(0)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        require_prefill(self, hidden_states, keys)
        key_states = get_prerope_key_states(module, hidden_states)
        return global_zscore(self.compute_leverage_scores(key_states, self.sketch_dimension))
