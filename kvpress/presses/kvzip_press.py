# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KVzipPress: query-agnostic KV importance through context reconstruction (KVzip, https://arxiv.org/abs/2505.23416).

The one idea: once the context is in the cache, ask the model to repeat it ("Repeat the previous context exactly.")
and score every cached entry by the largest attention it receives from the repeating tokens. Entries the model needs
to reconstruct the context are the ones worth keeping, whatever the question will be. The lowest-scored entries are
pruned head by head (each KV head, and in global mode each layer, keeps a different number of entries) through
`module.masked_key_indices` and the patched attention (`kvpress.attention_patch`); the cache keeps its length.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generator, Optional

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvpress.attention_weights import attention_logits, future_mask
from kvpress.headwise_masks import set_masks
from kvpress.presses.base_press import SUPPORTED_MODELS, BasePress, get_hook_inputs
from kvpress.resources import text_config
from kvpress.timing import telemetry_of
from kvpress.transformers_adapter import (
    find_cache,
    forward_kwargs,
    input_ids_of,
    output_cache,
    position_embeddings_of,
)
from kvpress.utils import (
    apply_rope,
    extract_keys_and_values,
    get_language_model,
    get_prerope_query_states,
    restore_cache,
    snapshot_cache,
    validate_compression_ratio,
)
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

FIRST_CHUNK_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_CHUNK_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
_DUMMY_CONTEXT = "dummy context"

MaskIndices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

_overhead_warned = False
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def chat_template_parts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The text a chat template puts before a user message and after it (generation prompt included).

    Without a chat template the prefix is empty and the suffix is a newline, as in the pipeline.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return "", "\n"
    separator = "\n" + "#" * len(_DUMMY_CONTEXT)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _DUMMY_CONTEXT + separator}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=False,
    )
    context_part, suffix = text.split(separator)
    prefix = context_part.split(_DUMMY_CONTEXT)[0]
    return prefix, suffix


def compressed_attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The attention modules a press compresses (all but Gemma3's sliding-window layers), with RoPE attached."""
    language_model = get_language_model(model)
    modules = []
    for layer in language_model.layers:
        attention = layer.self_attn
        if getattr(attention, "is_sliding", False):
            continue
        # Plain attribute, not a registered submodule, exactly as BasePress attaches it.
        object.__setattr__(attention, "rotary_emb", language_model.rotary_emb)
        modules.append(attention)
    return modules


def headwise_masks(scores: torch.Tensor, compression_ratio: float, layerwise: bool) -> list[Optional[MaskIndices]]:
    """Entries to mask in each layer, from `scores` `(n_layers, B, H_kv, T)`: the lowest scores are pruned.

    `layerwise`: every layer prunes `int(H_kv * T * compression_ratio)` entries of each batch element, spread over
    its heads as the scores say. Otherwise the `int(n_layers * H_kv * T * compression_ratio)` lowest scores of all
    layers are pruned, so layers lose different amounts. Returns, per layer, `(batch_idx, head_idx, seq_idx)` as
    read by the patched attention, or None when nothing is pruned in that layer.
    """
    n_layers, bsz, num_kv_heads, length = scores.shape
    per_layer = num_kv_heads * length
    flat = scores.reshape(n_layers, bsz, per_layer)
    batch_of_entry = torch.arange(bsz, device=scores.device)
    masks: list[Optional[MaskIndices]] = []
    if layerwise:
        n_pruned = min(int(per_layer * compression_ratio), per_layer)
        pruned = flat.topk(n_pruned, dim=-1, largest=False).indices  # (L, B, n)
        for layer in range(n_layers):
            if n_pruned == 0:
                masks.append(None)
                continue
            entries = pruned[layer].reshape(-1)
            batch_idx = batch_of_entry.repeat_interleave(n_pruned)
            masks.append((batch_idx, entries // length, entries % length))
        return masks

    n_pruned = min(int(n_layers * per_layer * compression_ratio), n_layers * per_layer)
    pruned = flat.transpose(0, 1).reshape(bsz, n_layers * per_layer).topk(n_pruned, dim=-1, largest=False).indices
    layer_of_entry = pruned // per_layer
    batch_idx_all = batch_of_entry[:, None].expand_as(pruned)
    for layer in range(n_layers):
        selected = layer_of_entry == layer
        if not bool(selected.any()):
            masks.append(None)
            continue
        entries = pruned[selected] % per_layer
        masks.append((batch_idx_all[selected], entries // length, entries % length))
    return masks


def _restore_layer(cache: Any, layer_idx: int, snapshot: list[dict]) -> None:
    """Put one cache layer back as it was in `snapshot` (see `kvpress.utils.snapshot_cache`)."""
    if layer_idx < len(snapshot):
        for name, value in snapshot[layer_idx].items():
            setattr(cache.layers[layer_idx], name, value)


@dataclass
class KVzipPress(BasePress):
    """Score each context entry by the attention it gets while the model repeats the context; prune head-wise.

    Use it as a context manager around the prefill of the context (`with press(model): model(input_ids=ctx)`,
    `model.generate(...)`, or the `kv-press-text-generation` pipeline). The prefill runs uncompressed; when the
    block exits, the press runs the repeat passes (the context in chunks of 2048 tokens, each after a "Repeat ..."
    prompt and the chat template's suffix), which cost 2-3 times the prefill, rolls the cache back after each pass
    and masks the lowest-scored entries. The cache keeps the context length; pruned entries are neutralised by
    `module.masked_key_indices` at every later attention call.

    Parameters
    ----------
    compression_ratio: fraction of the context's KV entries (all layers and heads together) that is pruned.
    layerwise: every layer prunes the same fraction (default False: the lowest scores of all layers are pruned,
        so layers lose different amounts).
    n_sink: the first `n_sink` tokens are always kept (attention sinks).
    kvzip_plus_normalization: KVzip+: weight each attention by `||W_o v|| / ||h||` (value output norm of the key,
        divided by the norm of the repeating token's hidden state) before taking the maximum.
    tokenizer: the model's tokenizer, needed to build the repeat prompt. When None it is loaded from
        `model.config.name_or_path` (a Hub name or a local directory).
    """

    compression_ratio: float = 0.0
    layerwise: bool = False
    n_sink: int = 4
    kvzip_plus_normalization: bool = False
    tokenizer: Optional[PreTrainedTokenizerBase] = field(default=None, repr=False, compare=False)

    # Runs its own passes in its own context manager, and masks entries head by head: it cannot be chained.
    composable: ClassVar[bool] = False
    head_wise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        validate_compression_ratio(self.compression_ratio)
        validate_int(self, "n_sink", self.n_sink, 0, bound="a non-negative integer")
        global _overhead_warned
        if not _overhead_warned:
            logger.warning(
                "KVzipPress runs extra forward passes that reconstruct the context chunk by chunk: prefilling "
                "costs 2-3 times as much as without it. This is inherent to the KVzip algorithm."
            )
            _overhead_warned = True
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self.score_val: Optional[torch.Tensor] = None
        self._reset_internal_parameters()

    def _reset_internal_parameters(self) -> None:
        """Forget the context of the last prefill (the scores in `score_val` stay, for inspection)."""
        self.context_length = 0
        self.prefix_length = 0
        self._suffix_ids: Optional[torch.Tensor] = None
        self._context_ids: Optional[torch.Tensor] = None
        self._cache: Any = None
        self._snapshot: Optional[list[dict]] = None
        self.start_idx = 0
        self.end_idx = 0

    def _load_tokenizer(self, model: PreTrainedModel) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        name = getattr(model.config, "name_or_path", "") or getattr(model, "name_or_path", "") or ""
        name = str(name)
        if not name:
            raise ValueError(
                f"{type(self).__name__} builds its repeat prompt with the model's tokenizer, which it loads from "
                "model.config.name_or_path, but this model has none (it was not loaded with from_pretrained). "
                f"Pass the tokenizer: {type(self).__name__}(..., tokenizer=tokenizer)."
            )
        if name not in self._tokenizers:
            try:
                if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, f)) for f in _TOKENIZER_FILES):
                    # some transformers versions silently build an empty default tokenizer for such a directory
                    raise FileNotFoundError(f"no tokenizer file ({', '.join(_TOKENIZER_FILES)}) in {name}")
                self._tokenizers[name] = AutoTokenizer.from_pretrained(name)
            except Exception as error:
                raise ValueError(
                    f"{type(self).__name__} could not load a tokenizer from model.config.name_or_path={name!r} "
                    f"({type(error).__name__}: {error}). It needs the model's tokenizer to build its repeat prompt: "
                    "save the tokenizer next to the model (tokenizer.save_pretrained(path)) or pass it with "
                    f"{type(self).__name__}(..., tokenizer=tokenizer)."
                ) from error
        return self._tokenizers[name]

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Generator:
        """Record the prefill inside the block; at exit, run the repeat passes and mask the lowest-scored entries.

        The compression only runs when the block exits normally. The context is the input of the last forward
        inside the block that started on an empty cache; tokens appended to that cache afterwards (e.g. by
        `generate`) are neither scored nor masked.
        """
        get_language_model(model)  # clear error for unsupported models
        if not isinstance(model, SUPPORTED_MODELS):
            logger.warning(
                "Model %s not tested, supported models: %s",
                type(model).__name__,
                ", ".join(cls.__name__ for cls in SUPPORTED_MODELS),
            )
        self._reset_internal_parameters()
        self.score_val = None
        self.post_init_from_model(model)
        tokenizer = self._load_tokenizer(model)
        prefix_text, suffix_text = chat_template_parts(tokenizer)
        self.prefix_length = len(tokenizer.encode(prefix_text, add_special_tokens=False))
        self._suffix_ids = tokenizer.encode(suffix_text, return_tensors="pt", add_special_tokens=False)

        base_model = model.model
        had_instance_forward = "forward" in base_model.__dict__
        original_forward = base_model.forward

        def recording_forward(*args, **kwargs):
            input_ids = input_ids_of(args, kwargs)
            cache = find_cache(kwargs)
            starts_empty = cache is None or cache.get_seq_length() == 0
            outputs = original_forward(*args, **kwargs)
            if starts_empty:
                self._context_ids = input_ids
                self._cache = cache if cache is not None else output_cache(outputs)
            return outputs

        base_model.forward = recording_forward
        try:
            try:
                with self.track_timing(model):  # telemetry counts the prefill (and any generation) in the block
                    yield
            finally:
                if had_instance_forward:
                    base_model.forward = original_forward
                else:
                    del base_model.forward
            if self.compression_ratio > 0:
                if self._context_ids is None or self._cache is None:
                    logger.warning(
                        "%s compressed nothing: no prefill with input_ids and a cache ran inside the `with` block "
                        "(call model(input_ids=...) or model.generate(...) inside it, with use_cache on).",
                        type(self).__name__,
                    )
                else:
                    telemetry = telemetry_of(self)
                    start = time.perf_counter()
                    self._perform_kvzip_compression(model, tokenizer)
                    if telemetry.enabled:
                        # the repeat passes and the masking are this press's prefill compression cost
                        if torch.cuda.is_available() and torch.cuda.is_initialized():
                            torch.cuda.synchronize()
                        telemetry.prefill_time += time.perf_counter() - start
        finally:
            self._reset_internal_parameters()

    def forward_hook(self, module: nn.Module, input: tuple, kwargs: dict, output: tuple):
        """During a repeat pass: score the context entries, then roll this layer's cache back."""
        hidden_states, cache = get_hook_inputs(module, input, kwargs)
        keys, values = extract_keys_and_values(cache, module.layer_idx)
        self.score_kvzip(module, hidden_states, keys, values, output[1], kwargs)
        if self._snapshot is not None:
            # Drop the repeat tokens right away (the whole cache is rolled back after the pass too).
            _restore_layer(cache, module.layer_idx, self._snapshot)
        return output

    def _perform_kvzip_compression(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Run one repeat pass per context chunk (scores go to `score_val`), then mask the lowest scores."""
        cache = self._cache
        self.context_length = self._context_ids.shape[1]
        pairs = self.prepare(model, tokenizer)
        modules = compressed_attention_modules(model)
        hooks = [module.register_forward_hook(self.forward_hook, with_kwargs=True) for module in modules]
        try:
            self.start_idx = self.prefix_length
            with torch.no_grad():
                for chunk_ids, repeat_ids in pairs:
                    self.end_idx = self.start_idx + chunk_ids.shape[1]
                    self._snapshot = snapshot_cache(cache)
                    try:
                        model.model(**forward_kwargs(model.model, repeat_ids.to(model.device), cache))
                    finally:
                        restore_cache(cache, self._snapshot)
                        self._snapshot = None
                    self.start_idx = self.end_idx
        finally:
            for hook in hooks:
                hook.remove()
        # The sinks and the chat template's prefix are never scored by a repeat pass: always keep them.
        n_protected = min(max(self.n_sink, self.prefix_length), self.context_length)
        self.score_val[..., :n_protected] = 1.0
        self.compress_post(model)

    def _chunk_fn(self, ctx_ids: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
        """Split `(B, n)` ids into chunks of `chunk_size` tokens (the last one may be shorter)."""
        if ctx_ids.shape[1] <= chunk_size:
            return [ctx_ids]
        return [chunk for chunk in ctx_ids.split(chunk_size, dim=1) if chunk.shape[1] > 0]

    def prepare(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        chunk_size: int = 2048,
        prev_postfix_size: int = 8,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Initialise `score_val` and build `(chunk_ids, repeat_ids)` for every chunk of the context.

        `repeat_ids` = repeat prompt + chat template suffix + chunk. The prompt of a later chunk ends with the last
        `prev_postfix_size` tokens of the previous chunk, so the model knows where to resume.
        """
        ctx_ids = self._context_ids[:, self.prefix_length :].cpu()
        bsz = ctx_ids.shape[0]
        config = text_config(model)
        n_layers = len(get_language_model(model).layers)
        self.score_val = torch.zeros(
            (n_layers, bsz, config.num_key_value_heads, self.context_length), dtype=torch.float32, device=model.device
        )
        self.score_val[..., : self.n_sink] = 1.0

        suffix_ids = self._suffix_ids.cpu().expand(bsz, -1)
        chunks = self._chunk_fn(ctx_ids, chunk_size)
        pairs = []
        for i, chunk in enumerate(chunks):
            prompt = FIRST_CHUNK_PROMPT if i == 0 else NEXT_CHUNK_PROMPT
            prompt_ids = tokenizer.encode(prompt, return_tensors="pt", add_special_tokens=False).expand(bsz, -1)
            if i > 0:
                prompt_ids = torch.cat([prompt_ids, chunks[i - 1][:, -prev_postfix_size:]], dim=1)
            pairs.append((chunk, torch.cat([prompt_ids, suffix_ids, chunk], dim=1)))
        return pairs

    def score_kvzip(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: Optional[torch.Tensor],
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store in `score_val` the max attention that the repeat tokens pay to the current chunk's entries.

        The attention is a softmax over the sink entries, the chunk's entries and the repeat tokens (causal among
        themselves), with the module's own scale. The max is over the GQA group and the repeat tokens. Returns the
        cache entries that precede the repeat tokens.
        """
        bsz, q_len, _ = hidden_states.shape
        num_kv_heads = keys.shape[1]
        groups = module.config.num_attention_heads // num_kv_heads
        head_dim = module.head_dim

        cos, sin = position_embeddings_of(kwargs)
        queries = apply_rope(get_prerope_query_states(module, hidden_states), cos, sin)
        queries = queries.view(bsz, num_kv_heads, groups, q_len, head_dim)

        sink = min(self.n_sink, self.start_idx)
        ctx_len = self.end_idx - self.start_idx

        def subsample(states: torch.Tensor) -> torch.Tensor:
            parts = [states[:, :, :sink], states[:, :, self.start_idx : self.end_idx], states[:, :, -q_len:]]
            return torch.cat(parts, dim=2)

        sub_keys = subsample(keys)
        future = future_mask(q_len, sub_keys.shape[2], keys.device)
        if self.kvzip_plus_normalization:
            sub_values = subsample(values)
            # each query head's slice of W_o, (H_kv, G, d, hidden), and its (d, d) Gram matrix: ||W_o v||^2 = v'Mv
            out_proj = module.o_proj.weight.float().t().reshape(num_kv_heads, groups, head_dim, -1)
            gram = out_proj @ out_proj.transpose(-1, -2)
            inv_hidden_norm = 1 / hidden_states.float().norm(dim=-1)  # (B, q_len)

        layer_scores = self.score_val[int(module.layer_idx)]
        # one KV head at a time: the (B, G, q_len, K) float32 weights of a 2048-token chunk stay small
        for head in range(num_kv_heads):
            logits = attention_logits(module, queries[:, head].float(), sub_keys[:, head, None].float())
            weights = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
            if self.kvzip_plus_normalization:
                # rows divided by the repeating token's hidden-state norm, columns times ||W_o v|| of the entry
                head_values = sub_values[:, head].float()
                sq_norm = torch.einsum("bkd,gde,bke->bgk", head_values, gram[head], head_values)
                weights = weights * inv_hidden_norm[:, None, :, None] * sq_norm.clamp(min=0).sqrt()[:, :, None, :]
            scores = weights[..., sink : sink + ctx_len].amax(dim=(1, 2))  # max over the group and the repeat tokens
            layer_scores[:, head, self.start_idx : self.end_idx] = scores.to(layer_scores.dtype)
        return keys[:, :, :-q_len], values[:, :, :-q_len]

    def compress_post(self, model: PreTrainedModel) -> None:
        """Mask the lowest `score_val` entries of every compressed layer (head-wise, through the attention patch)."""
        if self.compression_ratio <= 0 or self.score_val is None:
            return
        modules = compressed_attention_modules(model)
        layer_ids = [int(module.layer_idx) for module in modules]
        masks = headwise_masks(self.score_val[layer_ids], self.compression_ratio, self.layerwise)
        for module, mask in zip(modules, masks):
            # read by the patched attention at every later (non-prefill) attention call of this layer
            set_masks(module, mask)
