# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CriticalKVPress and CriticalAdaKVPress: a two-stage selection that also weighs how much each token's value can
change the attention output (CriticalKV, https://arxiv.org/abs/2502.03805).

The perturbation of the attention output caused by evicting token j is bounded by its attention weight times the
L1 norm of its value projected by the output matrix, `||W_o^h v_j||_1`. Stage one keeps a fraction
(`first_stage_ratio`) of the budget by the inner press's score alone; stage two fills the rest of the budget by
`(score + epsilon) * ||W_o v_j||_1`. CriticalAdaKVPress does the same inside AdaKV's head-wise budgets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import nn

from kvpress.attention_weights import group_mean
from kvpress.headwise_masks import set_masks
from kvpress.presses.adakv_press import check_alpha_safeguard
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.scorer_wrapper_press import InnerPressDelegation, ScorerWrapperPress, require_scorer_press

logger = logging.getLogger(__name__)


def _check_two_stage_parameters(owner: object, epsilon: float, first_stage_ratio: float) -> None:
    name = type(owner).__name__
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(
            f"{name}.epsilon must be a number >= 0, got {epsilon!r}. It is added to the inner scores before they "
            "are multiplied by the projected value norms."
        )
    if isinstance(first_stage_ratio, bool) or not isinstance(first_stage_ratio, (int, float)):
        raise ValueError(f"{name}.first_stage_ratio must be a number in [0, 1], got {first_stage_ratio!r}.")
    if not 0 <= first_stage_ratio <= 1:
        raise ValueError(
            f"{name}.first_stage_ratio must be in [0, 1], got {first_stage_ratio!r}. It is the fraction of the budget "
            "selected by the inner scores alone (0: only the value-weighted stage, 1: only the inner scores)."
        )


def _warn_on_value_norm(owner: object, press: ScorerPress) -> None:
    if isinstance(press, ExpectedAttentionPress) and press.use_vnorm:
        logger.warning(
            "use_vnorm should be disabled for %s: its second stage already weighs tokens by their projected value "
            "norms (ExpectedAttentionPress(use_vnorm=False)).",
            type(owner).__name__,
        )


def projected_value_l1_norm(values: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`||W_o^h v_j||_1` for every token j, averaged over the query heads h of each KV head: `(B, H_kv, T)`.

    `W_o^h` is the slice of the output projection that reads head h. The projection is done one query head at a
    time (memory), in the values' dtype, and the L1 sum is accumulated in float32.
    """
    num_kv_heads, head_dim = values.shape[1], values.shape[3]
    num_heads = module.config.num_attention_heads
    groups = num_heads // num_kv_heads
    weight = cast(torch.Tensor, module.o_proj.weight)  # (hidden, H * d)
    norms = []
    for head in range(num_heads):
        w_o = weight[:, head * head_dim : (head + 1) * head_dim].T.to(device=values.device, dtype=values.dtype)
        projected = values[:, head // groups] @ w_o  # (B, T, hidden)
        norms.append(projected.abs().sum(dim=-1, dtype=torch.float32))
    return group_mean(torch.stack(norms, dim=1), num_kv_heads)


class CriticalKVPress(InnerPressDelegation, ScorerPress):
    """Two-stage CriticalKV selection on top of any ScorerPress, with a uniform budget per head.

    The first `int((1 - compression_ratio) * T * first_stage_ratio)` tokens of each head are chosen by the inner
    press's score; the rest of the budget by `(score + epsilon) * ||W_o v||_1`. `compression_ratio` is the inner
    press's (read and written through). Not a dataclass: `CriticalKVPress(press, epsilon, first_stage_ratio)`.

    A token budget works as for every scorer: `CriticalKVPress(KnormPress(), cache_budget=256)` (keyword-only; it is
    stored on the inner press, so `CriticalKVPress(KnormPress(cache_budget=256))` is the same) keeps at most 256
    entries per layer and KV head through prefill and decoding, `first_stage_ratio` of them by the inner score.
    Stateful inner scorers (H2O, whose statistics follow its own cache) are refused with a budget.
    """

    def __init__(
        self, press: ScorerPress, epsilon: float = 1e-4, first_stage_ratio: float = 0.5, *, cache_budget: int = 0
    ):
        require_scorer_press(self, press)
        if cache_budget:
            inner_budget = getattr(press, "cache_budget", 0)
            if inner_budget and inner_budget != cache_budget:
                raise ValueError(
                    f"CriticalKVPress got cache_budget={cache_budget!r} but its inner {type(press).__name__} already "
                    f"has cache_budget={inner_budget}: set the budget in one place."
                )
            # the budget is the inner press's (as the ratio): set it there, checked as for the inner press alone
            press.cache_budget = cache_budget
            try:
                press.validate_cache_budget()
            except ValueError:
                press.cache_budget = 0  # leave the caller's press as it was
                raise
        if getattr(press, "cache_budget", 0) and type(press).update_state is not ScorerPress.update_state:
            raise ValueError(
                f"CriticalKVPress cannot carry the cache_budget of {type(press).__name__}: that press keeps its own "
                "per-entry statistics during decoding. Use it alone with the budget, or give it a compression_ratio."
            )
        _check_two_stage_parameters(self, epsilon, first_stage_ratio)
        self.press = press
        self.epsilon = epsilon
        self.first_stage_ratio = first_stage_ratio
        _warn_on_value_norm(self, press)

    def __repr__(self) -> str:
        return (
            f"CriticalKVPress(press={self.press!r}, epsilon={self.epsilon!r}, "
            f"first_stage_ratio={self.first_stage_ratio!r})"
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.press, self.epsilon, self.first_stage_ratio) == (
            other.press,  # type: ignore[attr-defined]
            other.epsilon,  # type: ignore[attr-defined]
            other.first_stage_ratio,  # type: ignore[attr-defined]
        )

    __hash__ = None  # type: ignore[assignment]

    # The budget and everything that depends on it are the inner press's.
    @property
    def cache_budget(self) -> int:  # type: ignore[override]
        return int(getattr(self.press, "cache_budget", 0) or 0)

    @cache_budget.setter
    def cache_budget(self, value: int) -> None:
        self.press.cache_budget = value

    @property
    def supports_decoding(self) -> bool:  # type: ignore[override]
        return bool(self.press.supports_decoding)

    @property
    def decoding_window(self) -> int:
        return int(self.press.decoding_window)

    @property
    def required_observations(self) -> int:
        return int(self.press.required_observations)

    @property
    def budget_buffer(self) -> int:
        return int(self.press.budget_buffer)

    def check_budget_settings(self, budget: int) -> None:
        self.press.check_budget_settings(budget)

    def layer_cache_budget(self, module: nn.Module) -> int:
        return int(self.press.layer_cache_budget(module))

    @staticmethod
    def vwl1norm(values: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """Projected value L1 norms `(B, H_kv, T)` (see `projected_value_l1_norm`)."""
        return projected_value_l1_norm(values, module)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        scores = self.inner_scores(module, hidden_states, keys, values, attentions, kwargs)
        k_len = keys.shape[2]
        kept = (
            min(self.layer_cache_budget(module), k_len) if self.cache_budget else (1 - self.compression_ratio) * k_len
        )
        n_first = int(kept * self.first_stage_ratio)
        first_stage = scores.topk(n_first, dim=-1).indices
        scores = (scores.float() + self.epsilon) * self.vwl1norm(values, module)
        # +inf rather than the dtype's max: a product of two large floats cannot outrank a first-stage token
        return scores.scatter(-1, first_stage, float("inf"))


def _top_per_head(scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Boolean mask `(B, H_kv, T)` of the `budgets[b, h]` highest scores of every (batch, head)."""
    selected = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    k = int(budgets.max().item()) if budgets.numel() > 0 else 0
    if k == 0:
        return selected
    indices = scores.topk(k, dim=-1).indices
    ranks = torch.arange(k, device=scores.device)
    return selected.scatter(-1, indices, ranks < budgets.unsqueeze(-1).to(scores.device))


@dataclass
class CriticalAdaKVPress(ScorerWrapperPress):
    """CriticalKV inside AdaKV's head-wise budgets (https://arxiv.org/abs/2502.03805, https://arxiv.org/abs/2407.11550).

    1. AdaKV allocation: every head's top `int(n_kept * alpha_safeguard)` tokens are reserved, then the layer's top
       `H_kv * n_kept` scores (across heads) give each head its budget, with `n_kept = int(T * (1 - ratio))`.
    2. Stage one: each head keeps `int(budget * first_stage_ratio)` tokens by the inner score.
    3. Stage two: each head fills its budget by `(score + epsilon) * ||W_o v||_1`.
    The other entries are masked through `module.masked_key_indices` (the cache stays dense), as for AdaKVPress.
    """

    press: ScorerPress = None
    alpha_safeguard: float = 0.20
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    # head-wise masks index the cache as it is after this press; see AdaKVPress
    composable: ClassVar[bool] = False
    head_wise: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_alpha_safeguard(self.alpha_safeguard)
        _check_two_stage_parameters(self, self.epsilon, self.first_stage_ratio)
        _warn_on_value_norm(self, self.press)

    def head_budgets(self, scores: torch.Tensor, n_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
        """AdaKV's allocation: `(budgets (B, H_kv), reserved (B, H_kv, T))`, where `reserved` marks each head's
        safeguarded top tokens and `budgets[b]` sums to `H_kv * n_kept` for every batch item."""
        bsz, num_kv_heads, k_len = scores.shape
        n_safe = int(n_kept * self.alpha_safeguard)
        reserved = _top_per_head(scores, torch.full((bsz, num_kv_heads), n_safe, device=scores.device))
        guarded = scores.float().masked_fill(reserved, float("inf"))
        winners = guarded.reshape(bsz, num_kv_heads * k_len).topk(num_kv_heads * n_kept, dim=-1).indices
        budgets = torch.zeros(bsz, num_kv_heads, dtype=torch.long, device=scores.device)
        budgets.scatter_add_(1, winners // k_len, torch.ones_like(winners))
        return budgets, reserved

    def compress_with_inner(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.inner_scores(module, hidden_states, keys, values, attentions, kwargs)
        k_len = scores.shape[-1]
        n_kept = int(k_len * (1 - self.compression_ratio))
        if n_kept == k_len:
            return keys, values
        budgets, reserved = self.head_budgets(scores, n_kept)

        # stage 1: a fraction of each head's budget by the inner score (reserved tokens first)
        first_budgets = (budgets.double() * self.first_stage_ratio).floor().long()
        guarded = scores.float().masked_fill(reserved, float("inf"))
        protected = reserved | _top_per_head(guarded, first_budgets)

        # stage 2: the rest of each head's budget by the value-weighted score
        weighted = (scores.float() + self.epsilon) * projected_value_l1_norm(values, module)
        kept = _top_per_head(weighted.masked_fill(protected, float("inf")), budgets)

        batch_idx, head_idx, seq_idx = (~kept).nonzero(as_tuple=True)
        # read by the patched attention at every later (non-prefill) attention call of this layer
        set_masks(module, (batch_idx, head_idx, seq_idx))
        return keys, values
