# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""QFilterPress: score keys by their projection on a learned per-head query direction, the "Q-filter"
(Q-Filters, https://arxiv.org/abs/2503.02812)."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from huggingface_hub import PyTorchModelHubMixin, get_collection
from torch import nn
from transformers import PreTrainedModel

from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import describe_hub_source, get_language_model

logger = logging.getLogger(__name__)

QFILTERS_HUB_NAMESPACE = "nthngdy"
QFILTERS_COLLECTION = "nthngdy/q-filters-67a4994dcb302a3d37f3d119"
_HUB_ERRORS = (OSError, ValueError, TypeError, RuntimeError)


class QFilters(nn.Module, PyTorchModelHubMixin):
    """One filter vector per layer and KV head, `q_filters` of shape `(num_layers, num_kv_heads, kv_head_dim)`.

    Save local filters with `QFilters(...).save_pretrained(directory)` and load them with
    `QFilterPress(filters_path=directory)`.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, kv_head_dim: int):
        super().__init__()
        self.q_filters = nn.Parameter(torch.randn(num_layers, num_kv_heads, kv_head_dim))


def _filters_from_file(path: str) -> torch.Tensor:
    """Filters stored in a single file: a safetensors or torch file holding `q_filters` (or just that tensor)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        content: object = load_file(path)
    else:
        content = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(content, dict):
        if "q_filters" not in content:
            raise ValueError(f"{path} holds {sorted(content)}; Q-filters files must hold a tensor named 'q_filters'.")
        content = content["q_filters"]
    if not isinstance(content, torch.Tensor) or content.dim() != 3:
        raise ValueError(f"{path} does not hold a (num_layers, num_kv_heads, head_dim) Q-filters tensor.")
    return content


def load_qfilters_from(name_or_path: str) -> torch.Tensor:
    """Q-filters `(L, H_kv, d)` from a local directory (`QFilters.save_pretrained`), a local file, or a Hub repo."""
    if os.path.isfile(name_or_path):
        return _filters_from_file(name_or_path)
    try:
        return QFilters.from_pretrained(name_or_path).q_filters.detach()
    except _HUB_ERRORS as error:
        where = describe_hub_source(name_or_path)
        raise ValueError(
            f"Could not load Q-filters from {where} ({type(error).__name__}: {error}). Q-filters are published on "
            f"the Hub for some models only (QFilterPress.available_qfilters() lists them); otherwise save a QFilters "
            "module with save_pretrained(directory) and pass QFilterPress(filters_path=directory)."
        ) from error


def _model_dimensions(model: PreTrainedModel) -> tuple[int, int, int]:
    attention = getattr(get_language_model(model), "layers")[0].self_attn
    config = attention.config
    return config.num_hidden_layers, config.num_key_value_heads, attention.head_dim


@dataclass
class QFilterPress(ScorerPress):
    """Score = minus the dot product of each key with the Q-filter of its layer and KV head.

    Q-filters are directions estimated offline from the model's queries (the main singular direction of the
    queries of each head): keys with a large negative projection on them receive little attention. They are loaded
    by `post_init_from_model`: from `filters_path` when given (a local directory written by
    `QFilters.save_pretrained`, a local safetensors/torch file, or a Hub repo id), otherwise from the Hub repo
    `nthngdy/{model name}_qfilt`.
    """

    chunked_prefill = "approximate"  # under kvpress.chunked_prefill

    compression_ratio: float = 0.0
    filters_path: Optional[str] = None
    q_filters: Optional[torch.Tensor] = field(default=None, init=False)

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        if self.filters_path is not None:
            filters = load_qfilters_from(str(self.filters_path))
            source = str(self.filters_path)
        else:
            model_name = model.config.name_or_path.rstrip("/").split("/")[-1]
            filters = self.load_q_filters(model_name)
            source = f"the Hub Q-filters of {model_name!r}"
        expected = _model_dimensions(model)
        if tuple(filters.shape) != expected:
            raise ValueError(
                f"Q-filters from {source} have shape {tuple(filters.shape)}, but {type(model).__name__} needs "
                f"(num_layers, num_kv_heads, head_dim) = {expected}. Use Q-filters computed for this model."
            )
        self.q_filters = filters.detach().to(model.dtype)

    @staticmethod
    @functools.cache
    def load_q_filters(model_name: str) -> torch.Tensor:
        """Q-filters of `model_name` (the last part of the model id) from the Hub repo `nthngdy/{name}_qfilt`."""
        if "Meta-Llama-3.1-405B" not in model_name:
            model_name = model_name.replace("Meta-Llama", "Llama")
        return load_qfilters_from(f"{QFILTERS_HUB_NAMESPACE}/{model_name}_qfilt")

    @staticmethod
    def available_qfilters() -> list[str]:
        """Model names with published Q-filters (from the Hub collection; needs network access)."""
        collection = get_collection(QFILTERS_COLLECTION, token=False)
        return [item.item_id.split("/")[-1][: -len("_qfilt")] for item in collection.items]

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        if self.q_filters is None:
            raise ValueError(
                "Q-filters not loaded. They are loaded when entering `with press(model)`; if you are using a "
                "wrapper press or calling score directly, call press.post_init_from_model(model) first."
            )
        layer_filters = self.q_filters[int(module.layer_idx)].to(device=keys.device, dtype=keys.dtype)
        return -torch.einsum("bhtd,hd->bht", keys, layer_filters)
