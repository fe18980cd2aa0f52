# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""RestoreKVPress: restore tokens appended with the LoRA adapter, never masked, budget matched; local resources."""

import functools
import importlib.metadata
import os

import pytest
import torch
import transformers
from packaging import version
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import DynamicCache

from kvpress.pipeline import KVPressTextGenerationPipeline
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.restorekv_press import (
    RESTORE_EMBEDDINGS_FILE,
    RestoreKVPress,
    default_restore_repo,
    peft_required_by_transformers,
)
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import (
    attention_modules,
    check_questions_leave_compressed_context,
    compressed_layers,
    load_saved_model,
    load_tokenizer,
    masked_bool,
    prefill_base_model,
    random_input_ids,
    saved_model_dir,
    temp_dir,
)

# transformers 5.24+ loads adapters only with peft >= 0.22, which this project's package index does not serve yet;
# there the press refuses with a clear error (tested below) and the rest of this file runs on the older releases CI
# also tests (5.2.0).
PEFT_TOO_OLD = version.parse(importlib.metadata.version("peft")) < version.parse(peft_required_by_transformers())
needs_compatible_peft = pytest.mark.skipif(
    PEFT_TOO_OLD,
    reason=f"transformers {transformers.__version__} loads adapters only with peft >= "
    f"{peft_required_by_transformers()} (installed {importlib.metadata.version('peft')})",
)

N_RESTORE = 8
CONTEXT_LEN = 40
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@functools.lru_cache(maxsize=None)
def restore_resources(arch: str = "llama", zero_embeddings: bool = True) -> str:
    """A local directory laid out like the published `higokri/RestoreKV-<model>` repos: a random (untrained) PEFT
    LoRA adapter and `restore_embeddings.safetensors` holding N_RESTORE embeddings (zeros, or random)."""
    model = load_saved_model(saved_model_dir(arch))
    torch.manual_seed(1 if zero_embeddings else 3)  # two different adapters
    targets = PHI3_LORA_TARGETS if arch == "phi3" else LORA_TARGETS
    # init_lora_weights=False: random A and B, so that the adapter really changes the restore tokens' KV
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    model.add_adapter(config, adapter_name="restorekv")
    path = temp_dir(prefix=f"kvpress-restorekv-{arch}-")
    model.save_pretrained(path)
    hidden = model.config.get_text_config().hidden_size
    if zero_embeddings:
        embeddings = torch.zeros(N_RESTORE, hidden)
    else:
        embeddings = torch.randn(N_RESTORE, hidden, generator=torch.Generator().manual_seed(2))
    save_file({"restore_embeddings": embeddings}, os.path.join(path, RESTORE_EMBEDDINGS_FILE))
    return path


class LocalRestoreKVPress(RestoreKVPress):
    """RestoreKVPress that builds local test resources for the model's architecture when none are given (for the
    press matrix: it loads a disabled adapter into the model it is applied to)."""

    def post_init_from_model(self, model):
        if self.restore_repo_or_dir is None:
            self.restore_repo_or_dir = restore_resources(model.config.model_type)
        super().post_init_from_model(model)


def fresh_model(arch: str = "llama"):
    """A model of its own: the press loads an adapter into it, which must not leak into the shared test models."""
    return load_saved_model(saved_model_dir(arch))


@needs_compatible_peft
@pytest.mark.parametrize("layerwise", [False, True])
def test_restore_tokens_appended_with_the_adapter_and_never_masked(layerwise):
    resources = restore_resources("llama", zero_embeddings=False)
    model = fresh_model()
    context_ids = random_input_ids(1, CONTEXT_LEN, seed=11)
    ratio = 0.3
    press = RestoreKVPress(ratio, layerwise=layerwise, tokenizer=load_tokenizer(False), restore_repo_or_dir=resources)
    cache = prefill_base_model(model, press, context_ids)
    assert press.num_restore_tokens == N_RESTORE and press.adapter_name == "restorekv"
    assert press.compression_ratio == ratio  # the raised ratio was temporary

    # Reference: the context prefilled without adapter, then the restore embeddings at positions C..C+n-1 through
    # the same LoRA adapter, loaded here on a model of its own.
    reference = fresh_model()
    reference.load_adapter(resources, adapter_name="reference")
    reference.disable_adapters()
    ref_cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        reference.model(input_ids=context_ids, **cache_kwargs(reference.model, ref_cache))
        reference.enable_adapters()
        embeddings = press.restore_embeddings.unsqueeze(0)
        positions = torch.arange(CONTEXT_LEN, CONTEXT_LEN + N_RESTORE).unsqueeze(0)
        reference.model(inputs_embeds=embeddings, position_ids=positions, **cache_kwargs(reference.model, ref_cache))
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        assert layer.keys.shape[2] == CONTEXT_LEN + N_RESTORE
        torch.testing.assert_close(layer.keys, ref_layer.keys)
        torch.testing.assert_close(layer.values, ref_layer.values)

    # Budget matched: the context loses ratio + n/C of its entries; the restore tokens are never masked.
    layers = compressed_layers(model)
    masks = [masked_bool(attention_modules(model)[i], (1, 2, CONTEXT_LEN + N_RESTORE)) for i in layers]
    assert not any(m[..., CONTEXT_LEN:].any() for m in masks)
    fraction = sum(m.sum().item() for m in masks) / (len(layers) * 2 * CONTEXT_LEN)
    assert abs(fraction - (ratio + N_RESTORE / CONTEXT_LEN)) < 1e-2
    live = sum((~m).sum().item() for m in masks) / (len(layers) * 2)
    assert abs(live - CONTEXT_LEN * (1 - ratio)) <= 1

    # The adapter is disabled again: the model answers as the base model does.
    base = fresh_model()
    probe = random_input_ids(1, 12, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(model(probe).logits, base(probe).logits)


@needs_compatible_peft
def test_zero_restore_embeddings_from_the_standard_layout():
    model = fresh_model()
    press = RestoreKVPress(0.5, tokenizer=load_tokenizer(False), restore_repo_or_dir=restore_resources("llama"))
    cache = prefill_base_model(model, press, random_input_ids(2, CONTEXT_LEN, seed=13))
    assert torch.equal(press.restore_embeddings, torch.zeros(N_RESTORE, model.config.hidden_size))
    for i in compressed_layers(model):
        assert cache.layers[i].keys.shape == (2, 2, CONTEXT_LEN + N_RESTORE, 16)
        seq_idx = attention_modules(model)[i].masked_key_indices[2]
        assert seq_idx.max() < CONTEXT_LEN


@needs_compatible_peft
def test_ratio_plus_restore_share_capped_at_the_whole_context():
    model = fresh_model()
    press = RestoreKVPress(0.9, tokenizer=load_tokenizer(False), restore_repo_or_dir=restore_resources("llama"))
    prefill_base_model(model, press, random_input_ids(1, CONTEXT_LEN, seed=14))
    for i in compressed_layers(model):
        masks = masked_bool(attention_modules(model)[i], (1, 2, CONTEXT_LEN + N_RESTORE))
        assert masks[..., :CONTEXT_LEN].all() and not masks[..., CONTEXT_LEN:].any()


@needs_compatible_peft
def test_ratio_zero_adds_no_restore_token():
    model = fresh_model()
    press = RestoreKVPress(0.0, tokenizer=load_tokenizer(False), restore_repo_or_dir=restore_resources("llama"))
    cache = prefill_base_model(model, press, random_input_ids(1, CONTEXT_LEN))
    assert cache.get_seq_length() == CONTEXT_LEN
    assert all(m.masked_key_indices is None for m in attention_modules(model))


@needs_compatible_peft
def test_plus_variant_uses_its_own_adapter_name_and_hub_repo():
    model = fresh_model()
    name = os.path.basename(saved_model_dir("llama"))
    assert default_restore_repo(model, plus=False) == f"higokri/RestoreKV-{name}"
    assert default_restore_repo(model, plus=True) == f"higokri/RestoreKV-{name}_plus"
    press = RestoreKVPress(0.5, kvzip_plus_normalization=True, restore_repo_or_dir=restore_resources("llama"))
    assert press.adapter_name == "restorekv_plus"
    prefill_base_model(model, press, random_input_ids(1, CONTEXT_LEN))  # tokenizer from the saved model's directory
    assert "restorekv_plus" in model.peft_config


def test_missing_resources_give_clear_errors():
    # the default Hub repo cannot be reached offline: the error says where it looked and how to point elsewhere
    with pytest.raises(RuntimeError, match="higokri/RestoreKV-.*restore_repo_or_dir"):
        with RestoreKVPress(0.5)(fresh_model()):
            pass
    empty = temp_dir(prefix="kvpress-restorekv-empty-")
    with pytest.raises(RuntimeError, match="without restore_embeddings.safetensors"):
        with RestoreKVPress(0.5, restore_repo_or_dir=empty)(fresh_model()):
            pass


@needs_compatible_peft
def test_pipeline_answers_and_cache_unchanged_after_each_question():
    model = load_saved_model(saved_model_dir("llama", with_chat_template=True))
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(True), device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 2
    questions = ["Who?", "Why?"]  # short: see test_kvzip's pipeline test
    press = RestoreKVPress(0.4, restore_repo_or_dir=restore_resources("llama", zero_embeddings=False))
    check_questions_leave_compressed_context(
        model, pipe, press, context, questions, max_new_tokens=3, n_extra=N_RESTORE
    )


@needs_compatible_peft
@pytest.mark.parametrize("arch", ["phi3", "qwen3"])
def test_local_resources_for_other_architectures(arch):
    """The matrix helper builds an adapter for the model's own projection names (Phi3 fuses q, k, v)."""
    model = fresh_model(arch)
    press = LocalRestoreKVPress(0.5, tokenizer=load_tokenizer(False))
    cache = prefill_base_model(model, press, random_input_ids(1, CONTEXT_LEN, seed=15))
    for i in compressed_layers(model):
        assert cache.layers[i].keys.shape[2] == CONTEXT_LEN + N_RESTORE
        assert attention_modules(model)[i].masked_key_indices[2].max() < CONTEXT_LEN
    with pytest.raises(ValueError, match="cannot be composed"):
        ComposedPress([press])


@needs_compatible_peft
def test_another_source_replaces_the_adapter():
    model = fresh_model()
    ids = random_input_ids(1, CONTEXT_LEN, seed=16)
    first, second = restore_resources("llama"), restore_resources("llama", zero_embeddings=False)

    def run(target, resources):
        press = RestoreKVPress(0.5, tokenizer=load_tokenizer(False), restore_repo_or_dir=resources)
        return prefill_base_model(target, press, ids).layers[0].keys[..., CONTEXT_LEN:, :]

    restored = [run(model, resources) for resources in (first, second, first)]
    assert list(model.peft_config) == ["restorekv"]
    # each run used its own source's adapter and embeddings, as on a model that never saw the other source
    torch.testing.assert_close(restored[1], run(fresh_model(), second))
    torch.testing.assert_close(restored[2], restored[0])
    assert not torch.allclose(restored[1], restored[0])


@needs_compatible_peft
def test_pipeline_questions_continue_after_the_restore_tokens():
    """The restore tokens sit at positions C..C+n-1: the question starts at position C + n, as upstream."""
    model = load_saved_model(saved_model_dir("llama", with_chat_template=True))
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(True), device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 2
    press = RestoreKVPress(0.4, restore_repo_or_dir=restore_resources("llama", zero_embeddings=False))
    seen_positions = []

    def record(module, args, kwargs):
        if kwargs.get("position_ids") is not None:
            seen_positions.append(kwargs["position_ids"][0].tolist())

    handle = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(context, question="Who?", press=press, max_new_tokens=2)
    finally:
        handle.remove()
    n_context = pipe.preprocess(context, [""], "", 10_000)["context_ids"].shape[1]
    question_positions = [p for p in seen_positions if len(p) > 1 and p[0] >= n_context]
    # the restore tokens themselves (appended by the press) come first, then the question
    assert question_positions[0] == list(range(n_context, n_context + N_RESTORE))
    assert question_positions[-1][0] == n_context + N_RESTORE


@pytest.mark.skipif(not PEFT_TOO_OLD, reason="peft is new enough for this transformers: the press works (tests above)")
def test_too_old_peft_is_refused_clearly():
    model = load_saved_model(saved_model_dir("llama"))
    with pytest.raises(ImportError, match=f"needs peft >= {peft_required_by_transformers()}"):
        with RestoreKVPress(0.5, restore_repo_or_dir=restore_resources_without_adapter())(model):
            pass


def restore_resources_without_adapter() -> str:
    directory = temp_dir(prefix="kvpress-restorekv-embeddings-")
    save_file({"restore_embeddings": torch.zeros(N_RESTORE, 64)}, os.path.join(directory, RESTORE_EMBEDDINGS_FILE))
    return directory
