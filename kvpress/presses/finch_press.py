# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""FinchPress: prompt-guided compression, the question after a delimiter is the observation window
(Finch, https://arxiv.org/abs/2408.00167).

The one idea: feed `context + delimiter + question` in one prefill; the question's queries score the context tokens
(SnapKV-like attention, normalised by the number of keys each query sees), the best ones are kept, and the kept keys
are re-rotated to contiguous positions.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Generator, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from kvpress.attention_weights import group_mean, window_attention
from kvpress.presses.base_press import BasePress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.token_selection import gather_tokens, pad_with_top_score
from kvpress.transformers_adapter import drop_decoder_tokens, input_ids_of, position_embeddings_of
from kvpress.utils import validate_compression_ratio
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

DEFAULT_DELIMITER_TOKEN = "<|finch_sep|>"


@dataclass
class FinchPress(BasePress):
    """Compress the context with the attention of the question that follows a delimiter token, in one prefill.

    Call `update_model_and_tokenizer(model, tokenizer)` once (it adds the delimiter token), then prefill
    `context + press.delimiter_token + question` inside `with press(model):`. The delimiter is removed from the
    embeddings (the model never sees it) and the `window_size` tokens after it form the observation window, which is
    always kept. Each context token is scored by the mean attention of the window's queries, each query's row
    multiplied by its position when `normalize_scores` (so late queries, spread over more keys, weigh as much);
    the top `int(T * (1 - compression_ratio))` tokens are kept, or that fraction of each `chunk_length` chunk. With
    `rerotate_keys`, kept keys are re-rotated to positions 0..n_kept-1 and generation continues at n_kept (the
    pipeline does this, and so does `model.generate` inside the press). Batch size 1 only.
    """

    compression_ratio: float = 0.0
    chunk_length: Optional[int] = None
    normalize_scores: bool = True
    rerotate_keys: bool = True
    delimiter_token: Optional[str] = field(default=None, init=False)
    delimiter_token_id: Optional[int] = field(default=None, init=False)
    window_size: Optional[int] = field(default=None, init=False)

    # Needs its own context manager (the embedding hook), which a ComposedPress never enters.
    composable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        validate_compression_ratio(self.compression_ratio)
        validate_int(self, "chunk_length", self.chunk_length, 1, allow_none=True)

    def update_model_and_tokenizer(
        self, model: PreTrainedModel, tokenizer, delimiter_token: str = DEFAULT_DELIMITER_TOKEN
    ):
        """Add `delimiter_token` to the tokenizer (if new) and the model's embeddings; returns the tokenizer."""
        self.delimiter_token = delimiter_token
        if delimiter_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [delimiter_token]})
        self.delimiter_token_id = tokenizer.convert_tokens_to_ids(delimiter_token)
        model.resize_token_embeddings(len(tokenizer))
        return tokenizer

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        if self.delimiter_token_id is None:
            raise ValueError(
                "No delimiter token ID provided. Use the update_model_and_tokenizer method before calling the press "
                "(or set press.delimiter_token_id to a token id of the tokenizer)."
            )
        hooks = [
            model.model.register_forward_pre_hook(self.model_forward_pre_hook, with_kwargs=True),
            model.get_input_embeddings().register_forward_hook(self.embed_token_forward_hook),
        ]
        try:
            with super().__call__(model):
                yield
        finally:
            for hook in hooks:
                hook.remove()

    @property
    def rerotates_kept_keys(self) -> bool:
        return self.rerotate_keys

    def find_delimiter(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """On a multi-token forward, locate the delimiter and set `window_size` (None without a delimiter).

        Returns the bool mask of the positions to keep (all but the delimiter), or None when there is nothing to do.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] <= 1:
            return None
        is_delimiter = input_ids == self.delimiter_token_id
        if not bool(is_delimiter.any()):
            return None
        if input_ids.shape[0] != 1:
            raise ValueError(f"FinchPress supports batch size 1 only, got a batch of {input_ids.shape[0]}.")
        n_delimiters = int(is_delimiter.sum())
        if n_delimiters != 1:
            raise ValueError(
                f"FinchPress expects exactly one delimiter token (id {self.delimiter_token_id}) between the context "
                f"and the question, found {n_delimiters}."
            )
        context_length = int(is_delimiter[0].nonzero()[0, 0])
        window_size = input_ids.shape[1] - 1 - context_length
        if window_size <= 0:
            raise ValueError(
                "FinchPress found nothing after the delimiter token: put the question after it (context + delimiter "
                "+ question), its tokens are the observation window."
            )
        if context_length == 0:
            raise ValueError("FinchPress found nothing before the delimiter token: the context goes before it.")
        self.window_size = window_size
        return ~is_delimiter[0]

    def model_forward_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """Remove the delimiter from the model's inputs (ids, 2-D attention mask, token types, positions).

        The remaining tokens get contiguous positions, so the model never sees the delimiter. A multi-token forward
        without a delimiter resets `window_size` (Finch cannot compress it).
        """
        input_ids = input_ids_of(args, kwargs)
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] <= 1:
            return None
        keep = self.find_delimiter(input_ids)
        if keep is None:
            self.window_size = None
            return None
        return drop_decoder_tokens(args, kwargs, keep)

    def embed_token_forward_hook(self, module: nn.Module, input: tuple, output: torch.Tensor):
        """Drop the delimiter's embedding when the embeddings are computed from ids that still hold it."""
        keep = self.find_delimiter(input[0])
        return output if keep is None else output[:, keep]

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """Attention of the window's queries on each token before it, `(B, H_kv, T)`; the window scores max + 1."""
        window = self.window_size
        k_len = keys.shape[2]
        if attentions is not None:
            weights = attentions[..., -window:, :-window]
        else:
            weights = window_attention(module, hidden_states, keys, window, position_embeddings_of(kwargs))
        if self.normalize_scores:
            query_positions = torch.arange(k_len - window, k_len, device=weights.device, dtype=weights.dtype)
            weights = weights * query_positions[:, None]
        scores = group_mean(weights.mean(dim=-2), keys.shape[1])
        return pad_with_top_score(scores, window)

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compression_ratio == 0:
            return keys, values
        if self.window_size is None:
            raise ValueError(
                "FinchPress found no delimiter token in this prefill: feed context + press.delimiter_token + "
                "question in one forward inside `with press(model):`."
            )
        k_len = keys.shape[2]
        if k_len <= self.window_size:
            raise ValueError(
                f"FinchPress needs cached context before the question window: {k_len} cached tokens for a window of "
                f"{self.window_size}."
            )
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        if self.chunk_length is None:
            indices = scores.topk(int(k_len * (1 - self.compression_ratio)), dim=-1).indices
        else:
            if not self.chunk_length > self.window_size / (1 - self.compression_ratio):
                raise ValueError(
                    f"FinchPress.chunk_length must be larger than window_size / (1 - compression_ratio) = "
                    f"{self.window_size / (1 - self.compression_ratio):.1f}, so that a chunk can keep the whole "
                    f"question window; got {self.chunk_length}."
                )
            parts = []
            for start in range(0, k_len, self.chunk_length):
                end = min(start + self.chunk_length, k_len)
                n_kept = max(1, int((end - start) * (1 - self.compression_ratio)))
                parts.append(scores[..., start:end].topk(n_kept, dim=-1).indices + start)
            indices = torch.cat(parts, dim=-1)
        indices = indices.sort(dim=-1).values
        if self.rerotate_keys:
            keys = KeyRerotationPress.rerotate_keys(module, indices, keys)
        else:
            keys = gather_tokens(keys, indices)
        return keys, gather_tokens(values, indices)
