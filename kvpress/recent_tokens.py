# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""RecentTokens: the last tokens one attention layer saw (hidden states and positions), for scoring during decoding.

A decoding step brings one token, but scorers observe a window of recent queries. Both decoding-time compressions
(a press's `cache_budget`, `kvpress.decoding_budget`, and `DecodingPress`) keep the last tokens of every layer in a
`RecentTokens` and hand them to the scorer in place of the current forward's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch

from kvpress.transformers_adapter import hidden_states_by_keyword, optional_position_embeddings, replace_inputs


@dataclass(eq=False)
class RecentTokens(Mapping):
    """The last tokens of one layer, read like a dict of tensors along the token axis (dim 1):

    - `"hidden_states"` `(B, n, hidden)`;
    - `"cos"`, `"sin"` `(B, n, d)`: their RoPE embeddings, present only when every buffered forward passed them;
    - `"position_ids"` `(B, n)`: their positions, present only when every buffered forward gave them.

    Tensors are detached copies (a prefill's full hidden states are not kept alive by a view). A dataclass, so that
    `kvpress.press_state` snapshots it like the rest of a press's decoding state.
    """

    _tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def n_tokens(self) -> int:
        """How many tokens are buffered."""
        hidden_states = self._tensors.get("hidden_states")
        return 0 if hidden_states is None else int(hidden_states.shape[1])

    def clear(self) -> None:
        self._tensors = {}

    def append(self, hidden_states: torch.Tensor, kwargs: dict, positions: Optional[torch.Tensor] = None) -> None:
        """Add this forward's tokens: `hidden_states` `(B, q, hidden)`, the RoPE cos/sin of `kwargs` (when they
        cover the `q` tokens) and `positions` `(B, q)` (when known). A forward with another batch size restarts the
        buffer; what one forward lacks is dropped for all."""
        bsz, q_len = hidden_states.shape[:2]
        new = {"hidden_states": hidden_states}
        if positions is not None:
            new["position_ids"] = positions
        position_embeddings = optional_position_embeddings(kwargs)
        if position_embeddings is not None and position_embeddings[0].shape[-2] == q_len:
            # cos/sin may be shared by the batch (leading dim 1): store them per sequence
            new["cos"], new["sin"] = (t.expand(bsz, *t.shape[1:]) for t in position_embeddings)
        old = self._tensors
        if old and tuple(old["hidden_states"].shape[::2]) != tuple(hidden_states.shape[::2]):
            old = {}
        merged = {}
        for name, value in new.items():
            value = value.detach()
            if old:
                if name not in old:
                    continue  # unknown for the earlier tokens
                value = torch.cat([old[name], value], dim=1)
            merged[name] = value
        self._tensors = merged

    def keep_last(self, n: int) -> None:
        """Keep the last `n` tokens (none when `n` <= 0)."""
        if n <= 0:
            self._tensors = {}
            return
        self._tensors = {name: value[:, -n:].clone() for name, value in self._tensors.items()}

    def scoring_inputs(self, kwargs: dict) -> tuple[torch.Tensor, dict]:
        """The buffered tokens as `(hidden_states, kwargs)` for `score`: their `hidden_states`, RoPE
        `position_embeddings` and `position_ids` (those buffered) replace the current forward's in a copy of
        `kwargs`."""
        hidden_states = self._tensors["hidden_states"]
        changes: dict = {}
        if "position_ids" in self._tensors:
            changes["position_ids"] = self._tensors["position_ids"]
        if hidden_states_by_keyword(kwargs):
            changes["hidden_states"] = hidden_states
        if "cos" in self._tensors:
            changes["position_embeddings"] = (self._tensors["cos"], self._tensors["sin"])
        return hidden_states, replace_inputs(kwargs, **changes)
