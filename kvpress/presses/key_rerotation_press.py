# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KeyRerotationPress: after pruning, re-rotate the kept keys so they sit at positions 0..n_kept-1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress
from kvpress.token_selection import gather_tokens
from kvpress.utils import rope_inv_freq, rotate_half


@dataclass
class KeyRerotationPress(ScorerWrapperPress):
    """Prune with the inner press's scores, then move the kept keys to contiguous positions.

    RoPE composes additively, so rotating a key cached at position p by (j - p) gives the key it would have had at
    position j. Generation then continues at position n_kept, as in StreamingLLM's rolling cache: the pipeline
    does this, and so does `with press(model): model.generate(...)` (on models without sliding-window layers).
    """

    @property
    def rerotates_kept_keys(self) -> bool:
        return True

    @staticmethod
    def _rerotate_cos_sin(
        x: torch.Tensor, inv_freq: torch.Tensor, selected_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rotating the key at original position p_j to its new position j, `(B, H_kv, n, d)`."""
        n_kept = selected_positions.shape[-1]
        new_positions = torch.arange(n_kept, device=selected_positions.device)
        delta = (new_positions - selected_positions).to(torch.float32)
        device_type = x.device.type if x.device.type in ("cuda", "cpu") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = delta.unsqueeze(-1) * inv_freq.to(device=delta.device, dtype=torch.float32)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(device=x.device, dtype=x.dtype), emb.sin().to(device=x.device, dtype=x.dtype)

    @staticmethod
    def rerotate_keys(module: nn.Module, indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Gather `keys` at sorted `indices` `(B, H_kv, n)` and re-rotate them to positions 0..n-1."""
        indices = indices.to(keys.device)
        cos, sin = KeyRerotationPress._rerotate_cos_sin(keys, rope_inv_freq(module), indices)
        kept = gather_tokens(keys, indices)
        return kept * cos + rotate_half(kept) * sin

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
        n_kept = int(keys.shape[2] * (1 - self.press.compression_ratio))
        indices = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        return self.rerotate_keys(module, indices, keys), gather_tokens(values, indices)
