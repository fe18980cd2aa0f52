# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""RKVPress: R-KV, redundancy-aware KV cache compression for reasoning models (https://arxiv.org/abs/2505.24133).

The one idea: long chains of thought repeat themselves, and attention alone keeps the repeats (they attend to each
other). R-KV scores each cached token by `lam * importance - (1 - lam) * redundancy`: importance is the attention
the last `window_size` queries pay to it, redundancy is how similar its key is to the other keys (an older
near-duplicate is redundant, its most recent copy is not). Generated tokens accumulate in a buffer of
`compress_interval` entries beyond the budget, then the cache is pruned back to `cache_budget`.

Both terms follow the R-KV authors' reference code (Zefan-Cai/R-KV, `rkv/compression/r1_kv.py` and `rkv/utils.py`),
described here in words: importance takes the raw logits `q.k * scale` of the window queries (`scale` is the attention
module's own, as the model computes attention: 1/sqrt(head_dim) for most models, Gemma3's `query_pre_attn_scalar **
-0.5`), the maximum over each GQA group, a softmax over the candidates only (the entries before the window), the mean
over the window queries and a max-pooling over `kernel_size` tokens; redundancy takes the cosine similarities between
*all* cached keys (window included), zeroes the diagonal and each row's most recent entry above `similarity_threshold`
(entry 0 when there is none, as the reference does), averages each column, takes the softmax over all entries and keeps
the candidates'. Defaults are the reference's as its run script and README use them (`kernel_size=7`, a buffer of
`compress_interval=128`, `lam=0.1`; its class default `mix_lambda=0.07` is overridden there);
`RKVPress(**RKVPress.FORK_SETTINGS, cache_budget=...)` reproduces the reasoning fork's (64, 5, 0.1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kvpress.decoding_budget import DecodingState, log_eviction
from kvpress.presses.scorer_press import ScorerPress
from kvpress.token_selection import pad_with_top_score
from kvpress.transformers_adapter import position_embeddings_of
from kvpress.utils import apply_rope, attention_scaling, get_prerope_query_states
from kvpress.validation import validate_int, validate_number

logger = logging.getLogger(__name__)


def window_logits(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Raw attention logits `(B, H, w, T)` of the window queries `(B, H, w, d)` over the keys `(B, H_kv, T, d)`, each
    query head against its KV head (no `repeat_kv` copy)."""
    bsz, num_heads, window, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    grouped = queries.reshape(bsz, num_kv_heads, (num_heads // num_kv_heads) * window, head_dim)
    logits = (grouped @ keys.transpose(-1, -2)).float() * scale
    return logits.reshape(bsz, num_heads, window, -1)


def rkv_importance(logits: torch.Tensor, num_kv_heads: int, n_candidates: int, kernel_size: int) -> torch.Tensor:
    """Importance `(B, H_kv, C)` from the window logits `(B, H, w, T)`: the maximum over each GQA group of the raw
    logits, a softmax over the first `n_candidates` keys only, the mean over the w window queries, then a
    max-pooling over `kernel_size` neighbouring tokens (so the neighbours of an important token are kept too)."""
    bsz, num_heads, window, _ = logits.shape
    grouped = logits.reshape(bsz, num_kv_heads, num_heads // num_kv_heads, window, -1).amax(dim=2)
    scores = grouped[..., :n_candidates].softmax(dim=-1).mean(dim=-2)
    pooled = F.max_pool1d(
        scores.reshape(bsz * num_kv_heads, 1, n_candidates), kernel_size=kernel_size, padding=kernel_size // 2, stride=1
    )
    return pooled[..., :n_candidates].reshape(bsz, num_kv_heads, n_candidates)


def reference_redundancy(keys: torch.Tensor, n_candidates: int, threshold: float) -> torch.Tensor:
    """R-KV's redundancy `(B, H_kv, C)` of the first `n_candidates` of the keys `(B, H_kv, T, d)`, as the reference
    code computes it: cosine similarities between all T keys, the diagonal and each row's most recent entry above
    `threshold` zeroed (entry 0 when the row has none), column means, softmax over all T entries, then the first C."""
    similarity = key_cosine_similarity(keys)
    length = similarity.shape[-1]
    diagonal = torch.eye(length, dtype=torch.bool, device=similarity.device)
    similarity = similarity.masked_fill(diagonal, 0.0)
    positions = torch.arange(length, device=similarity.device)
    retained = torch.where(similarity > threshold, positions, 0).amax(dim=-1, keepdim=True)
    similarity = similarity.scatter(-1, retained, 0.0)
    return similarity.mean(dim=-2).softmax(dim=-1)[..., :n_candidates]


def key_cosine_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity `(B, H_kv, C, C)` between the keys `(B, H_kv, C, d)` of each KV head, in float32."""
    normed = keys.float() / (keys.float().norm(dim=-1, keepdim=True) + 1e-8)
    return normed @ normed.transpose(-1, -2)


def redundancy_from_similarity(similarity: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV's redundancy `(B, H_kv, C)` from a similarity matrix `(B, H_kv, C, C)` between the candidates.

    The diagonal is ignored. For each token i, its most recent highly similar token (the largest j != i with
    `similarity[i, j] > threshold`) is exempt: `similarity[i, j]` is not counted. Token j's raw redundancy is then
    the mean of its column, `sum_i similarity[i, j] / C`, and the redundancy is its softmax over the candidates. Of
    a group of near-duplicates, the most recent copy thus gets the lowest redundancy and the older copies the
    highest, so the older ones are evicted first.
    """
    n_candidates = similarity.shape[-1]
    diagonal = torch.eye(n_candidates, dtype=torch.bool, device=similarity.device)
    similarity = similarity.float().masked_fill(diagonal, 0.0)
    similar = (similarity > threshold) & ~diagonal
    positions = torch.arange(n_candidates, device=similarity.device)
    neighbour = torch.where(similar, positions, -1).amax(dim=-1)  # (B, H_kv, C): most recent similar token
    has_neighbour = neighbour >= 0
    exempt = similarity.gather(-1, neighbour.clamp(min=0).unsqueeze(-1)).squeeze(-1) * has_neighbour
    column_sums = similarity.sum(dim=-2)
    column_sums = column_sums.scatter_add(-1, neighbour.clamp(min=0), -exempt)
    return (column_sums / n_candidates).softmax(dim=-1)


@dataclass
class RKVPress(ScorerPress):
    """R-KV: score = `lam * importance - (1 - lam) * redundancy`; the last `window_size` tokens are always kept.

    - importance: attention of the last `window_size` queries over the older entries (recomputed from their hidden
      states, at their own RoPE positions, with any attention backend), mean over the queries, max over each GQA
      group, max-pooled over `kernel_size` tokens;
    - redundancy: key cosine similarity between the older entries, each token's most recent near-duplicate
      (similarity above `similarity_threshold`) exempt, column mean, softmax (see `redundancy_from_similarity`).

    With `cache_budget` (its intended use), a longer prompt is pruned to the budget after prefill; generated tokens
    then accumulate until a layer holds `cache_budget + compress_interval` entries, and the layer is pruned back to
    `cache_budget`. So between steps each layer holds at most `cache_budget + budget_buffer` entries, with
    `budget_buffer = compress_interval - 1`. With `compression_ratio` it prunes the context once after prefill.
    `csv_path` logs every pruning (attention lost per head, evicted positions) to a CSV file.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    compress_interval: int = 128
    window_size: int = 8
    kernel_size: int = 7
    lam: float = 0.1
    similarity_threshold: float = 0.5

    # The reasoning fork's settings (its compress_interval, kernel and lambda), for reproducing its paper's numbers.
    FORK_SETTINGS: ClassVar[dict] = {"compress_interval": 64, "kernel_size": 5, "lam": 0.1}

    def __post_init__(self):
        for name in ("compress_interval", "window_size", "kernel_size"):
            validate_int(self, name, getattr(self, name), 1)
        validate_number(self, "lam", self.lam, 0, 1, meaning="the weight of importance against redundancy")
        threshold = self.similarity_threshold
        validate_number(self, "similarity_threshold", threshold, -1, 1, bound="a cosine similarity in [-1, 1]")
        super().__post_init__()

    def check_budget_settings(self, budget: int) -> None:
        if budget < self.window_size:
            raise ValueError(
                f"{type(self).__name__} always keeps its observation window, so cache_budget must be at least "
                f"window_size; got cache_budget={budget}, window_size={self.window_size}."
            )

    @property
    def budget_buffer(self) -> int:
        return self.compress_interval - 1

    @property
    def decoding_window(self) -> int:
        return self.window_size

    @property
    def required_observations(self) -> int:
        return self.window_size

    def redundancy(self, keys: torch.Tensor) -> torch.Tensor:
        """Redundancy `(B, H_kv, C)` of the candidate keys `(B, H_kv, C, d)` among themselves (exact cosine
        similarities; RKVLSHPress estimates the same quantity from hashes)."""
        return redundancy_from_similarity(key_cosine_similarity(keys), self.similarity_threshold)

    def candidate_redundancy(self, keys: torch.Tensor, n_candidates: int) -> torch.Tensor:
        """Redundancy `(B, H_kv, C)` of the first `n_candidates` of all cached keys, as the reference computes it."""
        return reference_redundancy(keys, n_candidates, self.similarity_threshold)

    def importance(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict):
        """The window logits `(B, H, w, T)` of the last `window_size` queries (rebuilt from their hidden states at
        their own RoPE positions) and the importance `(B, H_kv, C)` of the candidates before the window."""
        window = self.window_size
        cos, sin = position_embeddings_of(kwargs)
        queries = get_prerope_query_states(module, hidden_states[:, -window:])
        queries = apply_rope(queries, cos[:, -window:], sin[:, -window:])
        logits = window_logits(queries, keys, attention_scaling(module))
        n_candidates = keys.shape[2] - window
        return logits, rkv_importance(logits, keys.shape[1], n_candidates, self.kernel_size)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        k_len, window = keys.shape[2], self.window_size
        if k_len <= window:
            raise ValueError(
                f"{type(self).__name__} needs more cached tokens ({k_len}) than window_size={window}; use a longer "
                "context or a smaller window_size."
            )
        if hidden_states.shape[1] < window:
            raise ValueError(
                f"{type(self).__name__} recomputes the attention of the last window_size={window} queries but got the "
                f"hidden states of only {hidden_states.shape[1]} tokens."
            )
        logits, importance = self.importance(module, hidden_states, keys, kwargs)
        redundancy = self.candidate_redundancy(keys, k_len - window)
        scores = self.lam * importance - (1 - self.lam) * redundancy
        state = self.layer_state(module.layer_idx) if self.cache_budget else None
        if state is not None and self.csv_path:
            # the eviction log's observation: each query head's attention over the candidates
            state.scratch["observation"] = logits[0, :, :, : k_len - window].softmax(dim=-1)
        return pad_with_top_score(scores, window)

    def on_eviction(self, module: nn.Module, state: DecodingState, indices: torch.Tensor, k_len: int) -> None:
        observation = state.scratch.get("observation")
        if not self.csv_path or observation is None:
            return
        log_eviction(self.csv_path, module, state, indices, k_len, k_len - self.window_size, observation)
