# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""DuoAttentionPress: retrieval heads keep the whole context, streaming heads only sinks and recent tokens
(DuoAttention, https://arxiv.org/abs/2410.10819).

The one idea: only a few attention heads retrieve information from far away; the others ("streaming heads") look
at the first tokens and the recent ones. A per-head score (learned by DuoAttention, or estimated on the fly) says
which heads are which, and the streaming heads drop the middle of the context.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from io import StringIO
from typing import ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from kvpress.attention_weights import attention_probabilities
from kvpress.headwise_masks import set_masks
from kvpress.presses.base_press import BasePress, FieldCheck, ratio_check
from kvpress.resources import LRUCache, cache, load_cached, text_config  # noqa: F401 (upstream exposes them here)
from kvpress.transformers_adapter import forward_kwargs
from kvpress.utils import (
    apply_rope,
    get_language_model,
    get_prerope_key_states,
    get_prerope_query_states,
    rope_cos_sin,
)
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

# Where DuoAttention publishes its trained head patterns: one folder per model holding `config.json` (with
# `sink_size` and `recent_size`) and `full_attention_heads.tsv` (one row per layer, one column per KV head).
PATTERNS_BASE_URL = "https://raw.githubusercontent.com/mit-han-lab/duo-attention/refs/heads/main/attn_patterns/"
PATTERN_CONFIG_FILE = "config.json"
PATTERN_HEADS_FILE = "full_attention_heads.tsv"

_CTX_32K = "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10"
_CTX_128K = "lr=0.02-reg=0.05-ctx=1000_128000-multi_passkey10"

# model name (`model.config.name_or_path`) -> where its pattern is: a folder of PATTERNS_BASE_URL, a full URL, or a
# local directory (holding the two files) or local `.tsv` file (with `config.json` beside it). Add an entry to use a
# local copy, e.g. PATTERNS_DICT["/models/my-llama"] = "/data/duo-attention/attn_patterns/<model>/<run>".
PATTERNS_DICT: dict[str, str] = {
    "togethercomputer/Llama-2-7B-32K-Instruct": f"Llama-2-7B-32K-Instruct/{_CTX_32K}",
    "gradientai/Llama-3-8B-Instruct-Gradient-1048k": f"Llama-3-8B-Instruct-Gradient-1048k/{_CTX_32K}",
    "gradientai/Llama-3-8B-Instruct-Gradient-4194k": f"Llama-3-8B-Instruct-Gradient-4194k/{_CTX_32K}",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": f"Meta-Llama-3.1-8B-Instruct/{_CTX_128K}",
    "meta-llama/Llama-3.1-8B-Instruct": f"Meta-Llama-3.1-8B-Instruct/{_CTX_128K}",
    "mistralai/Mistral-7B-Instruct-v0.2": f"Mistral-7B-Instruct-v0.2/{_CTX_32K}",
    "mistralai/Mistral-7B-Instruct-v0.3": f"Mistral-7B-Instruct-v0.3/{_CTX_32K}",
}

# sink and recent sizes used with on-the-fly head scores
ON_THE_FLY_SINK_SIZE = 128
ON_THE_FLY_RECENT_SIZE = 256
ON_THE_FLY_DATASET = "kmfoda/booksum"  # upstream's texts for on-the-fly scoring (from the Hub)


# Loaded patterns and on-the-fly scores live in the shared resource cache (cleared with `cache.clear()`).


def _normalize_name(name: str) -> str:
    """Model names with repeated slashes (upstream's `gradientai//...` keys) match their single-slash form."""
    while "//" in name and "://" not in name:
        name = name.replace("//", "/")
    return name


def pattern_entry(name: str) -> str:
    """The `PATTERNS_DICT` entry of model `name`; a clear error listing the known models when there is none."""
    entry = PATTERNS_DICT.get(name)
    if entry is None:
        entry = {_normalize_name(key): value for key, value in PATTERNS_DICT.items()}.get(_normalize_name(name))
    if entry is None:
        known = "\n  ".join(PATTERNS_DICT)
        raise ValueError(
            f"No DuoAttention head pattern for model {name!r} (model.config.name_or_path). Patterns are known for:\n"
            f"  {known}\nTo use your own or a local copy, set kvpress.presses.duo_attention_press.PATTERNS_DICT"
            f"[{name!r}] to a directory holding {PATTERN_CONFIG_FILE} (with sink_size and recent_size) and "
            f"{PATTERN_HEADS_FILE} (layers x KV heads), to such a .tsv file, or to a URL; or use "
            "DuoAttentionPress(on_the_fly_scoring=True)."
        )
    return entry


def pattern_location(name: str) -> str:
    """Where the head pattern of model `name` is: a local directory or `.tsv` file, or a URL ending with '/'."""
    entry = pattern_entry(name)
    local = os.path.expanduser(entry)
    if os.path.exists(local):
        return local
    if entry.startswith(("http://", "https://")):
        return entry if entry.endswith("/") else entry + "/"
    if os.path.isabs(local) or entry.startswith((".", "~")):
        raise FileNotFoundError(
            f"The DuoAttention pattern of {name!r} is set to the local path {entry!r}, which does not exist; it must "
            f"be a directory holding {PATTERN_CONFIG_FILE} and {PATTERN_HEADS_FILE}, or such a .tsv file."
        )
    return PATTERNS_BASE_URL + urllib.parse.quote(entry.strip("/")) + "/"


def _read_pattern_file(location: str, filename: str) -> str:
    """Text of one pattern file, from a local directory, next to a local .tsv file, or from a URL."""
    if location.startswith(("http://", "https://")):
        url = location + filename
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read().decode("utf-8")
        except (urllib.error.URLError, OSError) as error:
            raise OSError(
                f"Could not download the DuoAttention pattern file {url} ({error}). Without network access, download "
                f"the folder ({PATTERN_CONFIG_FILE} and {PATTERN_HEADS_FILE}) and point PATTERNS_DICT at it."
            ) from error
    if os.path.isfile(location):
        path = location if filename == PATTERN_HEADS_FILE else os.path.join(os.path.dirname(location), filename)
    else:
        path = os.path.join(location, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"DuoAttention pattern file {path} is missing: a pattern is a directory holding {PATTERN_CONFIG_FILE} "
            f"(with sink_size and recent_size) and {PATTERN_HEADS_FILE} (one row per layer, one column per KV head)."
        )
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def read_attention_pattern(location: str) -> tuple[int, int, np.ndarray]:
    """`(sink_size, recent_size, head_scores)` of a pattern; head scores `(layers, KV heads)` clipped to [0, 1]."""
    config = json.loads(_read_pattern_file(location, PATTERN_CONFIG_FILE))
    sizes = []
    for key in ("sink_size", "recent_size"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"The DuoAttention pattern at {location} needs a non-negative integer {key!r} in its "
                f"{PATTERN_CONFIG_FILE}, got {value!r}."
            )
        sizes.append(value)
    text = _read_pattern_file(location, PATTERN_HEADS_FILE)
    head_scores = np.clip(np.loadtxt(StringIO(text), dtype=float, delimiter="\t", ndmin=2), 0, 1)
    return sizes[0], sizes[1], head_scores


def _sample_texts(dataset: str | Sequence[str], num_samples: int) -> list[str]:
    """`num_samples` texts: from a list, or sampled (seed 42) from the train split of a Hub or local dataset."""
    if not isinstance(dataset, str):
        texts = [str(text) for text in list(dataset)[:num_samples]]
    else:
        from datasets import load_dataset

        frame = load_dataset(dataset, split="train").to_pandas()
        column = "chapter" if "chapter" in frame.columns else "text" if "text" in frame.columns else None
        if column is None:
            raise ValueError(
                f"Dataset {dataset!r} has no 'chapter' (booksum) or 'text' column to score heads on; columns: "
                f"{list(frame.columns)}."
            )
        texts = list(frame.sample(min(num_samples, len(frame)), random_state=42)[column])
    if len(texts) == 0:
        raise ValueError("duo_attention_on_the_fly needs at least one text to score the heads on.")
    return texts


def duo_attention_on_the_fly(
    model: PreTrainedModel,
    num_samples: int = 50,
    q_len: int = 500,
    dataset: str | Sequence[str] = ON_THE_FLY_DATASET,
    tokenizer=None,
) -> np.ndarray:
    """Score every (layer, KV head) without a trained pattern: low scores mark streaming heads, `(layers, H_kv)`.

    For each text, the queries and keys of each layer are averaged over the tokens and placed at positions
    0..q_len-1 with RoPE; the score is the area under the cumulative attention curve of the last query, so a head
    whose attention stays on recent positions scores low. Averaged over `num_samples` texts of `dataset` (a Hub
    name, a local dataset directory, or a list of strings). Results are cached per model and arguments.
    """
    validate_int(None, "q_len", q_len, 1, "positions of the synthetic sequence")
    validate_int(None, "num_samples", num_samples, 1)

    # texts given as a list are taken once; a dataset name is read only when the scores are not cached
    texts = None if isinstance(dataset, str) else _sample_texts(dataset, num_samples)

    def compute() -> np.ndarray:
        return _score_heads_on_the_fly(model, texts or _sample_texts(dataset, num_samples), q_len, tokenizer)

    if tokenizer is not None:
        return compute()
    # A list of texts is cached under a digest of the texts it scores on (a fresh press per row scores once).
    source = dataset if texts is None else _digest(texts)
    key = ("on_the_fly", model.config.name_or_path, type(model).__name__, num_samples, q_len, source)
    return load_cached(key, compute)


def _digest(texts: Sequence[str]) -> str:
    hasher = hashlib.sha256()
    for text in texts:
        hasher.update(text.encode())
        hasher.update(b"\0")
    return "texts:" + hasher.hexdigest()


def _check_dataset(press: object, name: str, value: object) -> str | tuple[str, ...]:
    """`on_the_fly_dataset`: a Hub name or local dataset directory, or texts (stored as a tuple)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Sequence) and len(value) > 0 and all(isinstance(text, str) for text in value):
        return tuple(value)
    raise ValueError(
        f"{type(press).__name__}.{name} must be a Hub dataset name, a local dataset directory or a non-empty list of "
        f"texts to score the heads on, got {value!r:.200}."
    )


@torch.no_grad()
def _score_heads_on_the_fly(model: PreTrainedModel, texts: list[str], q_len: int, tokenizer) -> np.ndarray:
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
    language_model = get_language_model(model)
    config = text_config(model)
    num_kv_heads = config.num_key_value_heads
    scores = np.zeros((len(language_model.layers), num_kv_heads))
    device = next(model.parameters()).device
    positions = torch.arange(q_len, device=device)[None]
    for text in texts:
        input_ids = tokenizer(text, return_tensors="pt", truncation=True).input_ids.to(device)
        hidden_states = model(**forward_kwargs(model, input_ids, output_hidden_states=True)).hidden_states[:-1]
        for layer_idx, (layer, states) in enumerate(zip(language_model.layers, hidden_states)):
            module = layer.self_attn
            object.__setattr__(module, "rotary_emb", language_model.rotary_emb)
            states = layer.input_layernorm(states)
            queries = get_prerope_query_states(module, states).mean(dim=2, keepdim=True)
            keys = get_prerope_key_states(module, states).mean(dim=2, keepdim=True)
            queries = queries.expand(-1, -1, q_len, -1)
            keys = keys.expand(-1, -1, q_len, -1)
            cos, sin = rope_cos_sin(module, queries, positions)
            queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)
            weights = attention_probabilities(module, queries[:, :, -1:], keys, causal=False)[:, :, 0]  # (1, H, q_len)
            area = weights.cumsum(dim=-1).mean(dim=-1)[0]  # (H,)
            area = area.view(num_kv_heads, -1).mean(dim=-1)
            scores[layer_idx] += area.cpu().numpy() / len(texts)
    return scores


@dataclass
class DuoAttentionPress(BasePress):
    """Turn a fraction `head_compression_ratio` of the KV heads into streaming heads.

    Head scores come from DuoAttention's trained patterns (`load_attention_pattern`: `PATTERNS_DICT` maps a model
    name to the published folder, a URL, or a local directory / .tsv file), or are estimated with
    `duo_attention_on_the_fly` when `on_the_fly_scoring=True` (sink 128, recent 256) on the texts of
    `on_the_fly_dataset` (upstream's booksum from the Hub by default; a local dataset directory, or a list of texts
    for offline use, e.g. the press registry's `duo_attention_synthetic`). The
    `round(n_heads * head_compression_ratio)` lowest-scoring (layer, head) pairs become streaming heads: they keep
    their `sink_size` first and `recent_size` last tokens. The cache stays dense; the dropped entries are listed in
    `module.masked_key_indices` and neutralised by the patched attention (sdpa, flash and eager).
    `compression_ratio` (the fraction masked at the last prefill) is known after a forward pass and cannot be set.
    """

    head_compression_ratio: float = 0.0
    on_the_fly_scoring: bool = False
    on_the_fly_dataset: str | tuple[str, ...] = field(default=ON_THE_FLY_DATASET, repr=False)  # texts can be long
    compression_ratio_: float | None = field(init=False, default=None)
    recent_size: int | None = field(init=False, default=None)
    sink_size: int | None = field(init=False, default=None)
    streaming_mask: torch.Tensor | None = field(init=False, default=None)

    # The masks index the cache as this press leaves it; a later press that removes tokens would make them point
    # at the wrong entries.
    composable: ClassVar[bool] = False
    head_wise: ClassVar[bool] = True

    field_checks: ClassVar[Mapping[str, FieldCheck]] = {
        "head_compression_ratio": ratio_check(allow_one=True),
        "on_the_fly_dataset": _check_dataset,
    }

    def __post_init__(self) -> None:
        self._streaming_fraction = 0.0

    @staticmethod
    def load_attention_pattern(model: PreTrainedModel) -> tuple[int, int, np.ndarray]:
        """`(sink_size, recent_size, head_scores)` for `model`, from `PATTERNS_DICT` (cached)."""
        name = model.config.name_or_path
        return load_cached(
            ("pattern", name, pattern_entry(name)), lambda: read_attention_pattern(pattern_location(name))
        )

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        if self.on_the_fly_scoring:
            self.sink_size, self.recent_size = ON_THE_FLY_SINK_SIZE, ON_THE_FLY_RECENT_SIZE
            head_scores = duo_attention_on_the_fly(model, dataset=self.on_the_fly_dataset)
        else:
            self.sink_size, self.recent_size, head_scores = self.load_attention_pattern(model)
        config = text_config(model)
        expected = (config.num_hidden_layers, config.num_key_value_heads)
        head_scores = torch.as_tensor(np.asarray(head_scores, dtype=float))
        if tuple(head_scores.shape) != expected:
            raise ValueError(
                f"The DuoAttention head scores of {model.config.name_or_path!r} have shape {tuple(head_scores.shape)}, "
                f"but the model has {expected[0]} layers and {expected[1]} KV heads: the pattern must have one row "
                "per layer and one column per KV head."
            )
        # Sliding-window layers (Gemma3) are never compressed: their heads cannot become streaming heads.
        layers = get_language_model(model).layers
        candidates = torch.tensor([not getattr(layer.self_attn, "is_sliding", False) for layer in layers])
        candidates = candidates[:, None].expand(expected)
        n_candidates = int(candidates.sum())
        n_pruned = round(n_candidates * self.head_compression_ratio)
        ranked = head_scores.masked_fill(~candidates, float("inf")).flatten().argsort(stable=True)
        streaming_mask = torch.zeros(expected[0] * expected[1], dtype=torch.bool)
        streaming_mask[ranked[:n_pruned]] = True
        self.streaming_mask = streaming_mask.view(expected).to(model.device)
        self._streaming_fraction = n_pruned / n_candidates if n_candidates else 0.0

    @property
    def compression_ratio(self) -> float:
        if self.compression_ratio_ is None:
            raise ValueError("Forward pass must be run to compute the compression ratio")
        return self.compression_ratio_

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        raise AttributeError(
            "compression ratio cannot be set for DuoAttentionPress: it results from the streaming heads; set "
            "head_compression_ratio instead."
        )

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.streaming_mask is None:
            raise ValueError(
                "Streaming mask not initialized: DuoAttentionPress loads its head pattern in post_init_from_model, "
                "which `with press(model):` calls; enter the press as a context manager before running the model."
            )
        bsz, num_kv_heads, k_len, _ = keys.shape
        start = min(self.sink_size, k_len)
        end = max(k_len - self.recent_size, start)
        streaming_heads = self.streaming_mask[int(module.layer_idx)].to(keys.device)
        masked = torch.zeros(bsz, num_kv_heads, k_len, dtype=torch.bool, device=keys.device)
        masked[:, streaming_heads, start:end] = True
        # read by the patched attention at every later (non-prefill) attention call of this layer
        indices = masked.nonzero(as_tuple=True) if bool(masked.any()) else None
        set_masks(module, indices)
        self.compression_ratio_ = self._streaming_fraction * (end - start) / k_len
        return keys, values
