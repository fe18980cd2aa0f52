# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Resources presses load once and reuse (DuoAttention's head patterns and on-the-fly scores, LU-KV's budget curves):
one least-recently-used `cache` shared by every loader, `load_cached` to fill it, and `text_config` (the config of a
model's language part, composite Gemma3 configs included).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable

from transformers import PretrainedConfig, PreTrainedModel


class LRUCache(OrderedDict):
    """A mapping that keeps its `maxsize` most recently used entries."""

    def __init__(self, maxsize: int = 128):
        super().__init__()
        self.maxsize = maxsize

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


# Every loaded resource, by key (a URL, or a tuple naming the resource); cleared with `cache.clear()`.
cache: LRUCache = LRUCache(maxsize=128)


def weights_digest(model_dir: str | os.PathLike) -> str | None:
    """The first 16 hex digits of the SHA-256 of a local checkpoint's weights (its `*.safetensors` files in name
    order), so that a result file belongs to one checkpoint; None for a Hub id or a folder without such files."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    hasher = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                hasher.update(block)
    return hasher.hexdigest()[:16]


def load_cached(key: Hashable, load: Callable[[], Any]) -> Any:
    """The cached resource `key`, loaded with `load()` (and cached) the first time."""
    if key in cache:
        return cache[key]
    value = load()
    cache[key] = value
    return value


def text_config(model: PreTrainedModel) -> PretrainedConfig:
    """The config of the model's language part (`get_text_config()` of composite configs), else its config."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
