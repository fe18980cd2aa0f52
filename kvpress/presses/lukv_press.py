# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""LUKVPress: head-wise KV budgets read from offline-profiled budget curves (LU-KV, https://arxiv.org/abs/2602.08585).

Scores from different heads are not comparable, so LU-KV does not allocate budgets by comparing them. Offline, it
profiles how much each head contributes to long-horizon utility and solves, for every global compression ratio, a
budget allocation across layers and heads. The result is a budget curve: for each ratio from 1% to 99%, the fraction
of each head's cache to prune. At run time each head keeps its budget of the inner press's best tokens (plus the
sink and recent-window tokens); the other entries are masked head by head.
"""

from __future__ import annotations

import io
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from kvpress.headwise_masks import clear_masks, set_masks_from_bool
from kvpress.presses.base_press import BasePress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.scorer_wrapper_press import require_no_budget, require_scorer_press
from kvpress.resources import cache, load_cached, text_config  # noqa: F401 (upstream exposes `cache` here)
from kvpress.token_selection import check_scores
from kvpress.utils import validate_compression_ratio
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

LLAMA_3_1_8B_EA_CURVE_URL = (
    "https://raw.githubusercontent.com/baidu-baige/LU-KV/main/evaluation/curve_data/llama-3.1-8b/"
    "ea_0.02_sink4_win1_llama_avg_ratio.npy"
)

# (model name, inner press class name) -> budget curve URL (or local path)
BUDGET_CURVE_URLS: dict[tuple[str, str], str] = {
    ("meta-llama/Llama-3.1-8B-Instruct", "ExpectedAttentionPress"): LLAMA_3_1_8B_EA_CURVE_URL,
}

# number of compression ratios a curve covers: 1%, 2%, ..., 99%
N_CURVE_RATIOS = 99
_DOWNLOAD_TIMEOUT_S = 60


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def load_budget_curve(url: str) -> np.ndarray:
    """Load a budget curve (a `.npy` array) from an http(s) URL or a local file (path or `file://` URL).

    Results are cached by `url` in the module-level `cache` (`kvpress.resources.cache`).
    """
    return load_cached(url, lambda: _read_budget_curve(url))


def _read_budget_curve(url: str) -> np.ndarray:
    if _is_url(url):
        try:
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                payload = response.read()
        except (urllib.error.URLError, OSError) as error:
            raise OSError(
                f"Could not download the LU-KV budget curve {url}: {error}. Without network access, download the "
                ".npy file on another machine and pass its local path as LUKVPress(budget_curve_path=...)."
            ) from error
        source: Any = io.BytesIO(payload)
    else:
        path = url[len("file://") :] if url.startswith("file://") else url
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"LU-KV budget curve file {path!r} does not exist. Give the path of a .npy array of shape "
                f"({N_CURVE_RATIOS}, num_layers, num_kv_heads) holding the prune ratio of each head for the "
                "compression ratios 1%..99%."
            )
        source = path
    try:
        curve = np.load(source, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{url!r} is not a budget curve saved with numpy.save (.npy): {error}") from error
    return curve


@dataclass
class LUKVPress(BasePress):
    """Head-wise budgets from an LU-KV budget curve, tokens chosen by an inner ScorerPress.

    For `compression_ratio` r, row `round(100 r) - 1` of the curve gives the prune ratio of every KV head of every
    layer; each head keeps that share of the context (at least one token), always including the first `sink` and
    the last `window` tokens, chosen by the inner press's scores. The curve is looked up in `BUDGET_CURVE_URLS` by
    the model's name and the inner press's class, or read from `budget_curve_path` (a local .npy file or a URL).
    The cache stays dense: pruned entries are masked through `module.masked_key_indices`.
    """

    press: ScorerPress = field(default_factory=lambda: ExpectedAttentionPress(epsilon=2e-2))
    compression_ratio: float = 0.0
    sink: int = 4
    window: int = 1
    _budget_curves: Optional[np.ndarray] = field(init=False, repr=False, default=None)
    budget_curve_path: Optional[str] = None

    # head-wise masks index the cache as it is after this press; see AdaKVPress
    composable: ClassVar[bool] = False
    head_wise: ClassVar[bool] = True

    def __post_init__(self):
        require_scorer_press(self, self.press)
        require_no_budget(self, self.press)
        validate_compression_ratio(self.compression_ratio)
        for name in ("sink", "window"):
            validate_int(self, name, getattr(self, name), 0, "tokens always kept")
        if self.budget_curve_path is not None and not isinstance(self.budget_curve_path, (str, os.PathLike)):
            raise TypeError(
                "budget_curve_path must be a local .npy file or a URL (a string), got "
                f"{type(self.budget_curve_path).__name__}."
            )

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        self.press.post_init_from_model(model)
        if self._budget_curves is None:
            self._load_budget_curves(model)
        self._check_budget_curves(model)

    def budget_curve_source(self, model: PreTrainedModel) -> str:
        """`budget_curve_path` when given, else the URL registered for this model and inner press."""
        if self.budget_curve_path is not None:
            return os.fspath(self.budget_curve_path)
        name_or_path = str(getattr(model.config, "name_or_path", "") or "").rstrip("/")
        press_name = type(self.press).__name__
        if (name_or_path, press_name) in BUDGET_CURVE_URLS:
            return BUDGET_CURVE_URLS[(name_or_path, press_name)]
        # a local copy of a registered model (".../Llama-3.1-8B-Instruct") uses that model's curve
        base_name = name_or_path.split("/")[-1]
        for (model_name, registered_press), url in BUDGET_CURVE_URLS.items():
            if registered_press == press_name and base_name and model_name.split("/")[-1] == base_name:
                return url
        available = ", ".join(f"({m!r}, {p!r})" for m, p in BUDGET_CURVE_URLS)
        raise KeyError(
            f"No LU-KV budget curve for model {name_or_path!r} with {press_name}. Available curves (model, press): "
            f"{available}. Profile a curve for this model with LU-KV and pass it as LUKVPress(budget_curve_path=...)."
        )

    def _load_budget_curves(self, model: PreTrainedModel) -> None:
        self._budget_curves = load_budget_curve(self.budget_curve_source(model))
        self._check_budget_curves(model)

    def _check_budget_curves(self, model: PreTrainedModel) -> None:
        config = text_config(model)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        expected = (N_CURVE_RATIOS, config.num_hidden_layers, num_kv_heads)
        if tuple(self._budget_curves.shape) != expected:
            raise ValueError(
                f"The LU-KV budget curve has shape {tuple(self._budget_curves.shape)}, but {type(model).__name__} "
                f"needs {expected}: one prune ratio per (compression ratio 1%..99%, layer, KV head)."
            )

    def head_budgets(self, layer_idx: int, k_len: int) -> torch.Tensor:
        """Tokens kept by each KV head of layer `layer_idx` for a context of `k_len` tokens, `(H_kv,)`."""
        row = min(max(int(round(self.compression_ratio * 100)) - 1, 0), N_CURVE_RATIOS - 1)
        prune = torch.as_tensor(np.asarray(self._budget_curves[row, layer_idx], dtype=np.float32)).double()
        ideal = (1 - prune).clamp(0, 1) * k_len
        num_kv_heads = ideal.numel()
        total = min(max(int(round(ideal.sum().item())), num_kv_heads), num_kv_heads * k_len)
        budgets = ideal.floor().long()
        remainder = total - int(budgets.sum().item())
        if remainder > 0:
            # the heads with the largest fractional parts get one more token each
            budgets[(ideal - budgets).topk(min(remainder, num_kv_heads)).indices] += 1
        return budgets.clamp(1, k_len)

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compression_ratio <= 0:
            return keys, values
        if self._budget_curves is None:
            raise ValueError(
                "LU-KV budget curves are not loaded. Use LUKVPress as a model context manager first "
                "(`with press(model): ...`), or call press.post_init_from_model(model)."
            )
        scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs)
        check_scores(self.press, scores, keys)
        k_len = keys.shape[2]
        scores = scores.clone()
        protected = scores.max() + 1
        scores[..., : min(self.sink, k_len)] = protected
        if self.window > 0:
            scores[..., max(0, k_len - self.window) :] = protected

        num_kv_heads = keys.shape[1]
        if self._budget_curves.shape[-1] != num_kv_heads:
            raise ValueError(
                f"The LU-KV budget curve has {self._budget_curves.shape[-1]} heads per layer but layer "
                f"{module.layer_idx} has {num_kv_heads} KV heads."
            )
        budgets = self.head_budgets(module.layer_idx, k_len).to(keys.device)
        if (budgets >= k_len).all():
            clear_masks(module)
            return keys, values
        order = scores.argsort(dim=-1, descending=True, stable=True)
        pruned_rank = torch.arange(k_len, device=keys.device) >= budgets.unsqueeze(-1)  # (H_kv, T)
        pruned = torch.zeros(scores.shape, dtype=torch.bool, device=keys.device)
        pruned.scatter_(-1, order, pruned_rank.expand_as(pruned))
        # read by the patched attention at every later (non-prefill) attention call of this layer
        set_masks_from_bool(module, pruned, empty_as_none=False)
        return keys, values
