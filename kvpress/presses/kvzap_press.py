# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KVzapPress: score every token with a small learned surrogate of KVzip+ applied to its hidden state
(KVzap, https://arxiv.org/abs/2601.07891).

KVzip+ scores a token by the attention it receives when the model is asked to repeat the context, which needs an
extra pass over the context. KVzap trains, per layer, a linear model or a small MLP that predicts the log KVzip+ score
of each KV head from the token's attention input (the hidden state after the input layer norm), so scoring costs one
tiny matmul. The trained models live on the Hub (`nvidia/KVzap-{linear|mlp}-{model name}`, collection `nvidia/kvzap`)
and are trained by `kvzap/train.py`; any local directory saved with `save_pretrained` works as well.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from kvpress.presses.scorer_press import ScorerPress
from kvpress.resources import text_config

logger = logging.getLogger(__name__)

KVZAP_MODEL_TYPES = ("linear", "mlp")


class KVzapConfig(PretrainedConfig):
    """Sizes of a KVzap surrogate: `n_modules` (one per decoder layer) maps of `input_dim` (the model's hidden size)
    to `output_dim` (its number of KV heads); `hidden_dim=None` makes them linear, otherwise a one-hidden-layer MLP."""

    model_type = "kvzap"
    # every size is required: transformers must not try to build a default instance (5.2 does so when saving)
    has_no_defaults_at_init = True

    def __init__(
        self, *, input_dim: int, output_dim: int, n_modules: int, hidden_dim: Optional[int] = None, **kwargs
    ) -> None:
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.n_modules = n_modules
        self.hidden_dim = hidden_dim
        super().__init__(**kwargs)


class KVzapModel(PreTrainedModel):
    """One scorer per decoder layer: `layers[i]` maps hidden states `(..., input_dim)` to scores `(..., output_dim)`."""

    config_class = KVzapConfig

    def __init__(self, config: KVzapConfig) -> None:
        super().__init__(config)
        self.all_tied_weights_keys = {}  # nothing is tied; transformers 5 reads this attribute when saving/loading
        if config.hidden_dim is None:
            layers = [nn.Linear(config.input_dim, config.output_dim) for _ in range(config.n_modules)]
        else:
            layers = [
                nn.Sequential(
                    nn.Linear(config.input_dim, config.hidden_dim),
                    nn.GELU(),
                    nn.Linear(config.hidden_dim, config.output_dim),
                )
                for _ in range(config.n_modules)
            ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `(N, n_modules, input_dim)` -> `(N, n_modules, output_dim)`: module i reads slice i."""
        return torch.stack([layer(x[:, i]) for i, layer in enumerate(self.layers)], dim=1)


def resolve_kvzap_source(kvzap_model_path: str, model_type: str) -> str:
    """The directory or Hub id to load: a local directory written by `kvzap/train.py` holds one sub-directory per
    model type (`mlp/`, `linear/`), which is picked by `model_type`; any other value is used as it is."""
    if os.path.isdir(kvzap_model_path) and not os.path.isfile(os.path.join(kvzap_model_path, "config.json")):
        nested = os.path.join(kvzap_model_path, model_type)
        if os.path.isfile(os.path.join(nested, "config.json")):
            return nested
    return kvzap_model_path


@dataclass
class KVzapPress(ScorerPress):
    """Score = the KVzap surrogate's prediction of each token's log KVzip+ score, per KV head (higher is kept).

    `post_init_from_model` loads `nvidia/KVzap-{model_type}-{model name}` from the Hub (once per name), or the
    model given by `kvzap_model_path`: a local directory saved with `KVzapModel.save_pretrained`, the output
    directory of `kvzap/train.py` (its `mlp/` or `linear/` sub-directory is chosen by `model_type`), or a Hub id.
    The scores are log-scores (negative numbers), so the press is also meant to be used with a threshold:
    `DMSPress(KVzapPress(), threshold=...)`.
    """

    compression_ratio: float = 0.0
    model_type: Literal["linear", "mlp"] = "mlp"
    kvzap_model_name: Optional[str] = field(default=None, init=False)
    kvzap_model_path: Optional[str] = None

    # The score needs the hidden state of every cached token, which decoding steps do not provide.
    supports_decoding: ClassVar[bool] = False

    # Why DecodingPress cannot use it (see BasePress); DMSPress(decoding=True) can: it scores each token alone.
    cannot_score_during_decoding: ClassVar[Optional[str]] = (
        "it predicts one score per hidden state and decoding keeps only the recent ones; use DMSPress(KVzapPress(...), "
        "decoding=True) to score each new token instead"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in KVZAP_MODEL_TYPES:
            raise ValueError(
                f"KVzapPress.model_type must be one of {KVZAP_MODEL_TYPES} (a linear model or an MLP per layer), "
                f"got {self.model_type!r}."
            )
        if self.kvzap_model_path is not None and not isinstance(self.kvzap_model_path, (str, os.PathLike)):
            raise TypeError(
                "kvzap_model_path must be a local directory or a Hub repo id (a string), got "
                f"{type(self.kvzap_model_path).__name__}."
            )

    def default_kvzap_model_name(self, model: PreTrainedModel) -> str:
        """`nvidia/KVzap-{model_type}-{last component of the model's name or path}`."""
        name_or_path = str(getattr(model.config, "name_or_path", "") or "").rstrip("/")
        return f"nvidia/KVzap-{self.model_type}-{name_or_path.split('/')[-1]}"

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        if self.kvzap_model_path is not None:
            name = resolve_kvzap_source(os.fspath(self.kvzap_model_path), self.model_type)
        else:
            name = self.default_kvzap_model_name(model)
        if name != self.kvzap_model_name or getattr(self, "kvzap_model", None) is None:
            self.kvzap_model = self.load_kvzap_model(name)
            self.kvzap_model_name = name
        self.check_kvzap_model(model)

    def load_kvzap_model(self, name: str) -> KVzapModel:
        if self.kvzap_model_path is not None and not os.path.isdir(name) and os.path.exists(name):
            raise ValueError(
                f"kvzap_model_path={name!r} is a file; give the directory that holds the KVzap model's config.json "
                "and weights (as written by KVzapModel.save_pretrained or kvzap/train.py)."
            )
        try:
            return KVzapModel.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise OSError(
                f"KVzapPress could not load the KVzap model {name!r}: {error}\nTrained KVzap models are published "
                "on the Hugging Face Hub as nvidia/KVzap-{linear|mlp}-<model name> (collection nvidia/kvzap). For a "
                "model without one, or offline, train one with kvzap/train.py (or save a KVzapModel with "
                "save_pretrained) and pass its local directory as KVzapPress(kvzap_model_path=...)."
            ) from error

    def check_kvzap_model(self, model: PreTrainedModel) -> None:
        """Raise a ValueError when the loaded KVzap model was not trained for `model`'s sizes."""
        config = text_config(model)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        expected = {
            "n_modules": config.num_hidden_layers,
            "input_dim": config.hidden_size,
            "output_dim": num_kv_heads,
        }
        kvzap_config = self.kvzap_model.config
        found = {name: getattr(kvzap_config, name, None) for name in expected}
        if found != expected:
            raise ValueError(
                f"The KVzap model {self.kvzap_model_name!r} does not fit {type(model).__name__}: it has {found}, "
                f"the model needs {expected} (one module per decoder layer, hidden size in, one score per KV head "
                "out). Use the KVzap model trained for this model."
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
        kvzap_model = getattr(self, "kvzap_model", None)
        if kvzap_model is None:
            raise ValueError(
                "KVzapPress has no KVzap model loaded: use it as `with press(model): ...` (which calls "
                "post_init_from_model) or call press.post_init_from_model(model) before scoring."
            )
        layer = kvzap_model.layers[module.layer_idx].to(device=hidden_states.device, dtype=hidden_states.dtype).eval()
        with torch.no_grad():
            scores = layer(hidden_states)  # (B, T, H_kv)
        return scores.transpose(1, 2)
