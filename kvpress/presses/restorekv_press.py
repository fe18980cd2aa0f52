# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""RestoreKVPress: KVzip plus learned restore tokens (RestoreKV, https://arxiv.org/abs/2608.01247).

The one idea: after KVzip has decided what to prune, a few learned "restore" tokens are appended to the context
through a LoRA adapter trained to summarise what the pruned entries held. They are never pruned, and the budget
is matched: the context loses `n_restore` more entries than the requested ratio, so the cache keeps about
`C * (1 - compression_ratio)` live entries in total.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import transformers
from packaging import version
from transformers import PreTrainedModel

from kvpress.presses.base_press import compression_ratio_set_to
from kvpress.presses.kvzip_press import KVzipPress, compressed_attention_modules
from kvpress.resources import text_config
from kvpress.transformers_adapter import forward_kwargs

logger = logging.getLogger(__name__)

RESTORE_EMBEDDINGS_FILE = "restore_embeddings.safetensors"
RESTOREKV_REPO_PREFIX = "higokri/RestoreKV-"


def default_restore_repo(model: PreTrainedModel, plus: bool) -> str:
    """The published resources of a model: `higokri/RestoreKV-<model name>[_plus]`."""
    name = str(getattr(model.config, "name_or_path", "") or "")
    if not name:
        raise ValueError(
            "RestoreKVPress finds its adapter and restore embeddings from model.config.name_or_path, but this model "
            "has none. Pass restore_repo_or_dir=<Hub repo or local directory holding restore_embeddings.safetensors "
            "and the PEFT adapter>."
        )
    return f"{RESTOREKV_REPO_PREFIX}{name.rstrip('/').split('/')[-1]}{'_plus' if plus else ''}"


def _restore_embeddings_path(source: str) -> str:
    if os.path.isdir(source):
        path = os.path.join(source, RESTORE_EMBEDDINGS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{source!r} is a local directory without {RESTORE_EMBEDDINGS_FILE}; RestoreKVPress needs that file "
                "(a safetensors file with a 'restore_embeddings' tensor of shape (n_restore, hidden_size)) next to "
                "the PEFT adapter (adapter_config.json, adapter_model.safetensors)."
            )
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=source, filename=RESTORE_EMBEDDINGS_FILE)


def peft_required_by_transformers() -> str:
    """The oldest peft that the installed transformers loads adapters with (0.18 for 5.2, 0.22 for 5.24)."""
    from transformers.integrations import peft as peft_integration

    return str(getattr(peft_integration, "MIN_PEFT_VERSION", "0.0.0"))


def check_peft_for_adapters() -> None:
    """Raise a clear ImportError when the installed peft is older than transformers needs to load an adapter."""
    required = peft_required_by_transformers()
    if version.parse(importlib.metadata.version("peft")) < version.parse(required):
        raise ImportError(
            f"RestoreKVPress loads its LoRA adapter through transformers {transformers.__version__}, which needs "
            f"peft >= {required}; peft {importlib.metadata.version('peft')} is installed: "
            f"pip install 'peft>={required}' (or use transformers < 5.24, which takes older peft releases)."
        )


@dataclass
class RestoreKVPress(KVzipPress):
    """KVzip, then `n_restore` learned tokens appended after the context with a LoRA adapter enabled.

    Parameters: those of KVzipPress, plus
    restore_repo_or_dir: where the adapter and `restore_embeddings.safetensors` are: a Hub repo id or a local
        directory. None (default) uses the published `higokri/RestoreKV-<model name>[_plus]` (`_plus` with
        `kvzip_plus_normalization`).

    Needs `peft`. The adapter is loaded into the model (disabled except while the restore tokens are encoded).
    The restore tokens take the positions right after the context; questions must continue after them, as the
    pipeline does. With `compression_ratio == 0` nothing is scored and no restore token is added.
    """

    restore_repo_or_dir: Optional[str] = None
    restore_embeddings: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    restore_model_name: Optional[str] = field(default=None, init=False, repr=False, compare=False)
    encoding_restore_tokens: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def num_restore_tokens(self) -> int:
        return 0 if self.restore_embeddings is None else int(self.restore_embeddings.shape[0])

    @property
    def adapter_name(self) -> str:
        return "restorekv_plus" if self.kvzip_plus_normalization else "restorekv"

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        """Load the restore embeddings and the LoRA adapter (once per source and model), adapters disabled."""
        source = self.restore_repo_or_dir or default_restore_repo(model, self.kvzip_plus_normalization)
        adapter_loaded = self.adapter_name in (getattr(model, "peft_config", None) or {})
        # the source each RestoreKV adapter of this model came from: another source replaces the adapter
        sources = model.__dict__.setdefault("_kvpress_restorekv_sources", {})
        if adapter_loaded and sources.get(self.adapter_name, source) != source:
            model.delete_adapter(self.adapter_name)
            adapter_loaded = False
        if self.restore_model_name == source and self.restore_embeddings is not None and adapter_loaded:
            return
        if importlib.util.find_spec("peft") is None:
            raise ImportError("RestoreKVPress loads a LoRA adapter and needs peft: pip install peft")
        try:
            path = _restore_embeddings_path(source)
            from safetensors.torch import load_file

            tensors = load_file(path)
            if "restore_embeddings" not in tensors:
                raise KeyError(f"{path} has no 'restore_embeddings' tensor (found {sorted(tensors)})")
            embeddings = tensors["restore_embeddings"]
            if not adapter_loaded:
                check_peft_for_adapters()
                model.load_adapter(source, adapter_name=self.adapter_name)
                sources[self.adapter_name] = source
        except ImportError:
            raise
        except Exception as error:
            raise RuntimeError(
                f"RestoreKVPress could not load its resources from {source!r} ({type(error).__name__}: {error}). "
                "It needs restore_embeddings.safetensors and a PEFT LoRA adapter, published as "
                f"{RESTOREKV_REPO_PREFIX}<model name>[_plus] on the Hub; pass restore_repo_or_dir=<local directory "
                "or Hub repo> to use others."
            ) from error
        hidden_size = text_config(model).hidden_size
        if embeddings.dim() != 2 or embeddings.shape[1] != hidden_size:
            raise ValueError(
                f"restore_embeddings from {source!r} have shape {tuple(embeddings.shape)}; expected "
                f"(n_restore, hidden_size={hidden_size}) for this model."
            )
        self.restore_embeddings = embeddings.to(model.device, dtype=model.dtype)
        model.disable_adapters()
        self.restore_model_name = source
        logger.info(
            "RestoreKV: loaded %d restore tokens and adapter %s from %s", embeddings.shape[0], self.adapter_name, source
        )

    def forward_hook(self, module, input, kwargs, output):
        if self.encoding_restore_tokens:
            return output
        return super().forward_hook(module, input, kwargs, output)

    def append_restore_tokens(self, model: PreTrainedModel) -> None:
        """Encode the restore tokens with the adapter enabled, appending their KV entries after the context."""
        n_restore = self.num_restore_tokens
        if n_restore == 0:
            return
        cache = self._cache
        bsz = self._context_ids.shape[0]
        # positions right after everything the compressed layers hold (the context, unless tokens followed it)
        start = cache.get_seq_length(int(compressed_attention_modules(model)[0].layer_idx))
        positions = torch.arange(start, start + n_restore, device=model.device).unsqueeze(0).expand(bsz, -1)
        embeddings = self.restore_embeddings.to(model.device, dtype=model.dtype).unsqueeze(0).expand(bsz, -1, -1)
        self.encoding_restore_tokens = True
        model.set_adapter(self.adapter_name)
        model.enable_adapters()
        try:
            with torch.no_grad():
                model.model(**forward_kwargs(model.model, embeddings, cache, position_ids=positions))
        finally:
            model.disable_adapters()
            self.encoding_restore_tokens = False

    def compress_post(self, model: PreTrainedModel) -> None:
        """Append the restore tokens, then let KVzip prune `n_restore / C` more of the context (budget matched)."""
        if self.compression_ratio <= 0 or self.score_val is None:
            return
        self.append_restore_tokens(model)
        # up to 1 (more restore tokens than the context can pay for): set without the [0, 1) check of the field
        with compression_ratio_set_to(
            self, min(1.0, self.compression_ratio + self.num_restore_tokens / self.context_length)
        ):
            super().compress_post(model)
