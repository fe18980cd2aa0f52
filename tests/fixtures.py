# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Tiny random-weight models and a byte-level tokenizer, all built locally: nothing is downloaded."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

from kvpress import BasePress
from kvpress.transformers_adapter import cache_kwargs

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|end|>", "<|assistant|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|user|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ARCHITECTURES = ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma3_text", "gemma3")

# Shared sizes: 4 query heads, 2 KV heads (GQA groups of 2), head_dim 16.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 4, 2, 16, 2


def temp_dir(prefix: str = "kvpress-test-") -> str:
    """A new directory under the system's temporary directory, removed when this test process exits: the cached
    fixtures (saved models, tokenizers, statistics) outlive any one test, so pytest's `tmp_path` does not fit them.
    The random part is hex: `mkdtemp`'s may end in `_`, which runs into the `__` between the parts of an evaluation
    run's folder name (`<dataset>__<data_dir>__<model>__<press>...`) and makes the name read back wrong."""
    path = os.path.join(tempfile.gettempdir(), prefix + uuid.uuid4().hex[:16])
    os.mkdir(path)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def tokenizer_dir(with_chat_template: bool) -> str:
    """Save a byte-level tokenizer (256 byte tokens + special tokens) and return its directory."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    if with_chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    path = Path(temp_dir(prefix=f"kvpress-tokenizer-{'chat' if with_chat_template else 'plain'}-"))
    tokenizer.save_pretrained(path)
    return str(path)


def load_tokenizer(with_chat_template: bool = False):
    return AutoTokenizer.from_pretrained(tokenizer_dir(with_chat_template))


def vocab_size() -> int:
    return len(load_tokenizer(False))


def _common(**overrides) -> dict:
    kwargs = dict(
        vocab_size=vocab_size(),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return kwargs


def make_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**_common(head_dim=HEAD_DIM)), LlamaForCausalLM
    if arch == "mistral":
        return MistralConfig(**_common(head_dim=HEAD_DIM, sliding_window=None)), MistralForCausalLM
    if arch == "phi3":
        return Phi3Config(**_common()), Phi3ForCausalLM
    if arch == "qwen2":
        return Qwen2Config(**_common()), Qwen2ForCausalLM
    if arch == "qwen3":
        return Qwen3Config(**_common(head_dim=HEAD_DIM)), Qwen3ForCausalLM
    text_kwargs = _common(
        head_dim=HEAD_DIM,
        # unlike head_dim, as in Gemma3 27B (168 against 128): a press that scales by 1/sqrt(head_dim) is caught
        query_pre_attn_scalar=HEAD_DIM + 8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    if arch == "gemma3_text":
        return Gemma3TextConfig(**text_kwargs), Gemma3ForCausalLM
    if arch == "gemma3":
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        n_vocab = text_kwargs["vocab_size"]
        config = Gemma3Config(
            text_config=Gemma3TextConfig(**text_kwargs),
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=n_vocab - 3,
            eoi_token_index=n_vocab - 2,
            image_token_index=n_vocab - 1,
            tie_word_embeddings=False,
        )
        return config, Gemma3ForConditionalGeneration
    raise ValueError(f"Unknown test architecture {arch!r}; known: {ARCHITECTURES}")


BUILT_MODELS: list[PreTrainedModel] = []  # every cached model, so that tests can check none is left modified


@functools.lru_cache(maxsize=None)
def _build_model(arch: str, attn_implementation: str) -> PreTrainedModel:
    config, model_class = make_config(arch)
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    BUILT_MODELS.append(model)
    return model.eval()


def get_model(arch: str = "llama", attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A tiny random-weight model (cached per architecture and attention backend). Do not modify it in tests."""
    return _build_model(arch, attn_implementation)


def save_tiny_model(arch: str, path) -> None:
    """Save the shared tiny model of `arch` (weights and config) to `path`, leaving the shared model as it was."""
    model = get_model(arch)
    dtype = model.config.dtype
    try:
        model.save_pretrained(path)
    finally:
        # transformers' save_pretrained writes the config's dtype back as a string ("float32") on the shared model
        model.config.dtype = dtype


@functools.lru_cache(maxsize=None)
def saved_model_dir(arch: str = "llama", with_chat_template: bool = False) -> str:
    """Save a tiny model with its tokenizer to a local directory, so it loads through `from_pretrained(path)`."""
    path = Path(temp_dir(prefix=f"kvpress-{arch}-"))
    save_tiny_model(arch, path)
    load_tokenizer(with_chat_template).save_pretrained(path)
    return str(path)


def load_saved_model(path: str, attn_implementation: str = "sdpa") -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation).eval()


def random_input_ids(batch_size: int = 1, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    """Random ids among the byte tokens (never special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), vocab_size() - 4, (batch_size, seq_len), generator=generator)


def distinct_ids(bsz: int, seq_len: int, seed: int) -> torch.Tensor:
    """Input ids without a repeated token in a row: repeated tokens have equal key norms and hidden states in the
    first layer (RoPE keeps norms), and ties would make any top-k ambiguous."""
    generator = torch.Generator().manual_seed(seed)
    byte_ids = torch.arange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + 256)
    return torch.stack([byte_ids[torch.randperm(256, generator=generator)[:seq_len]] for _ in range(bsz)])


def compressed_layers(model: PreTrainedModel) -> list[int]:
    """Indices of the layers a press compresses (Gemma3's sliding-window layers are left alone)."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, layer_type in enumerate(layer_types) if layer_type != "sliding_attention"]


def prefill(model: PreTrainedModel, input_ids: torch.Tensor, press=None) -> DynamicCache:
    """Run `input_ids` through the model (inside `press` when given) and return the filled cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
        model(input_ids, **cache_kwargs(model, cache))
    return cache


def prefill_base_model(model: PreTrainedModel, press, input_ids: torch.Tensor) -> DynamicCache:
    """Run `input_ids` through the base model `model.model` (no LM head) inside `press`; return the filled cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model.model(input_ids=input_ids, **cache_kwargs(model.model, cache))
    return cache


def attention_modules(model: PreTrainedModel) -> list:
    """The attention module of every decoder layer of `model` (of its language model for multimodal ones)."""
    language_model = getattr(model.model, "language_model", model.model)
    return [layer.self_attn for layer in language_model.layers]


def masked_bool(module, shape) -> torch.Tensor:
    """A boolean tensor of `shape` `(B, H_kv, T)`, True at the entries listed in `module.masked_key_indices`."""
    mask = torch.zeros(shape, dtype=torch.bool)
    if module.masked_key_indices is not None:
        mask[tuple(idx.cpu() for idx in module.masked_key_indices)] = True
    return mask


def check_questions_leave_compressed_context(
    model: PreTrainedModel, pipe, press, context: str, questions: list, max_new_tokens: int, n_extra: int = 0
) -> None:
    """Answer `questions` about `context` in one pipeline call sharing a cache, and check that each answer is the one
    a fresh compression gives, and that the cache is left exactly as `prefill_base_model` leaves the context (with
    `n_extra` more entries per layer than context tokens, e.g. appended restore tokens)."""
    cache = DynamicCache(config=model.config)
    answers = pipe(context, questions=questions, press=press, max_new_tokens=max_new_tokens, cache=cache)["answers"]
    assert len(answers) == len(questions) and all(isinstance(answer, str) for answer in answers)
    # each answer is the one a fresh compression gives: nothing of a previous question stayed in the cache
    assert answers == [
        pipe(context, question=q, press=press, max_new_tokens=max_new_tokens)["answer"] for q in questions
    ]

    # after the questions, the cache is exactly the compressed context
    context_ids = pipe.preprocess(context, [""], "", 10_000)["context_ids"]
    reference = prefill_base_model(model, press, context_ids)
    for layer, ref_layer in zip(cache.layers, reference.layers):
        assert layer.keys.shape[2] == context_ids.shape[1] + n_extra
        assert torch.equal(layer.keys, ref_layer.keys) and torch.equal(layer.values, ref_layer.values)


@dataclass
class RecordingPress(BasePress):
    """Leaves the cache untouched and records what each hooked layer received."""

    calls: dict = field(default_factory=dict)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        self.calls[module.layer_idx] = dict(
            module=module, hidden_states=hidden_states, keys=keys, values=values, attentions=attentions, kwargs=kwargs
        )
        return keys, values


def record_layers(model: PreTrainedModel, input_ids: torch.Tensor) -> dict:
    """What every hooked layer's `compress` receives during a prefill of `input_ids`."""
    recorder = RecordingPress()
    prefill(model, input_ids, recorder)
    return recorder.calls


def is_press_hook(hook) -> bool:
    """Whether a module hook was registered by a press (transformers registers output-recording hooks of its own)."""
    func = getattr(hook, "__func__", getattr(hook, "func", hook))
    return (getattr(func, "__module__", "") or "").startswith(("kvpress", "tests"))


def press_hooks(module) -> list:
    """The press hooks (forward and forward-pre) still registered on `module`."""
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return [hook for hook in hooks if is_press_hook(hook)]
