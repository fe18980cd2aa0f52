# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KVzipPress: repeat-pass scores against eager attention, head-wise budgets, tokenizer loading, the pipeline."""

import copy

import pytest
import torch
from transformers import DynamicCache

from kvpress.pipeline import KVPressTextGenerationPipeline
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.kvzip_press import FIRST_CHUNK_PROMPT, NEXT_CHUNK_PROMPT, KVzipPress, headwise_masks
from kvpress.transformers_adapter import cache_kwargs
from kvpress.utils import extract_keys_and_values
from tests.fixtures import (
    attention_modules,
    check_questions_leave_compressed_context,
    compressed_layers,
    get_model,
    load_saved_model,
    load_tokenizer,
    masked_bool,
    prefill_base_model,
    random_input_ids,
    save_tiny_model,
    saved_model_dir,
    temp_dir,
)
from tests.test_quantized_cache import make_caches

CONTEXT_LEN = 40


def repeat_ids_for(tokenizer, chunks, index, suffix):
    """The repeat input of chunk `index`, built here from the paper's recipe (prompt + template suffix + chunk)."""
    prompt = FIRST_CHUNK_PROMPT if index == 0 else NEXT_CHUNK_PROMPT
    prompt_ids = tokenizer.encode(prompt, return_tensors="pt", add_special_tokens=False)
    if index > 0:
        prompt_ids = torch.cat([prompt_ids, chunks[index - 1][:, -8:]], dim=1)
    suffix_ids = tokenizer.encode(suffix, return_tensors="pt", add_special_tokens=False)
    return torch.cat([prompt_ids, suffix_ids, chunks[index]], dim=1)


def reference_scores(arch, context_ids, repeat_ids, start, end, sink, plus=False):
    """Max over (group, repeat token) of the attention onto context[start:end], from eager attention weights.

    The repeat tokens run after the whole context (one eager forward over context + repeat). KVzip's softmax only
    covers the sinks, the chunk and the repeat tokens: the eager weights are renormalised over that subset.
    """
    model = get_model(arch, "eager")
    n_ctx, n_rep = context_ids.shape[1], repeat_ids.shape[1]
    inputs = {}

    def record(module, args, kwargs):
        inputs[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in attention_modules(model)]
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            out = model(
                torch.cat([context_ids, repeat_ids], dim=1), output_attentions=True, **cache_kwargs(model, cache)
            )
    finally:
        for handle in handles:
            handle.remove()
    config = model.config.get_text_config()
    groups = config.num_attention_heads // config.num_key_value_heads
    columns = torch.cat([torch.arange(sink), torch.arange(start, end), torch.arange(n_ctx, n_ctx + n_rep)])
    scores = {}
    for layer_idx in compressed_layers(model):
        weights = out.attentions[layer_idx][:, :, n_ctx:, :]  # (B, H, R, n_ctx + R)
        weights = weights[..., columns]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if plus:
            module = attention_modules(model)[layer_idx]
            values = cache.layers[layer_idx].values[..., columns, :]  # (B, H_kv, K, d)
            values = values.repeat_interleave(groups, dim=1)  # (B, H, K, d)
            head_dim = values.shape[-1]
            w_o = module.o_proj.weight  # (hidden, H * d)
            per_head = torch.stack(
                [values[:, h] @ w_o[:, h * head_dim : (h + 1) * head_dim].T for h in range(values.shape[1])], dim=1
            )  # (B, H, K, hidden)
            weights = weights * per_head.norm(dim=-1)[:, :, None, :]
            weights = weights / inputs[layer_idx][:, n_ctx:].norm(dim=-1)[:, None, :, None]
        chunk = weights[..., sink : sink + end - start]
        bsz, _, n_q, n_k = chunk.shape
        scores[layer_idx] = chunk.reshape(bsz, -1, groups * n_q, n_k).amax(dim=2)
    return scores


@pytest.mark.parametrize(
    "arch,chat", [("llama", False), ("llama", True), ("qwen3", False), ("phi3", True), ("gemma3", False)]
)
def test_scores_equal_max_attention_of_the_repeat_tokens(arch, chat):
    tokenizer = load_tokenizer(chat)
    model = get_model(arch)
    context_ids = random_input_ids(1, CONTEXT_LEN, seed=3)
    press = KVzipPress(compression_ratio=0.5, tokenizer=tokenizer)
    prefill_base_model(model, press, context_ids)

    prefix_length = 2 if chat else 0  # "<s><|user|>" of the fixtures' chat template
    suffix = "<|end|><|assistant|>" if chat else "\n"
    chunks = [context_ids[:, prefix_length:]]
    repeat = repeat_ids_for(tokenizer, chunks, 0, suffix)
    sink = min(press.n_sink, prefix_length)
    reference = reference_scores(arch, context_ids, repeat, prefix_length, CONTEXT_LEN, sink)

    protected = max(press.n_sink, prefix_length)
    for layer_idx, expected in reference.items():
        scores = press.score_val[layer_idx]
        assert scores.shape == (1, 2, CONTEXT_LEN)
        torch.testing.assert_close(scores[..., protected:], expected[..., protected - prefix_length :])
        assert torch.all(scores[..., :protected] == 1.0)


def test_every_chunk_is_scored_with_its_own_prompt_and_sinks():
    """Three chunks (16, 16, 8 tokens): later chunks resume after the last 8 tokens of the previous one."""

    class SmallChunks(KVzipPress):
        def prepare(self, model, tokenizer, chunk_size=2048, prev_postfix_size=8):
            return super().prepare(model, tokenizer, chunk_size=16, prev_postfix_size=prev_postfix_size)

    tokenizer = load_tokenizer(False)
    model = get_model("llama")
    context_ids = random_input_ids(1, CONTEXT_LEN, seed=4)
    press = SmallChunks(compression_ratio=0.3, tokenizer=tokenizer)
    prefill_base_model(model, press, context_ids)

    chunks = list(context_ids.split(16, dim=1))
    assert [c.shape[1] for c in chunks] == [16, 16, 8]
    for index, start in enumerate((0, 16, 32)):
        end = start + chunks[index].shape[1]
        sink = min(press.n_sink, start)
        repeat = repeat_ids_for(tokenizer, chunks, index, "\n")
        reference = reference_scores("llama", context_ids, repeat, start, end, sink)
        for layer_idx, expected in reference.items():
            got = press.score_val[layer_idx][..., start:end]
            if index == 0:  # the sinks are protected
                got, expected = got[..., press.n_sink :], expected[..., press.n_sink :]
            torch.testing.assert_close(got, expected)


def test_kvzip_plus_weights_attention_by_value_output_norm_over_hidden_norm():
    tokenizer = load_tokenizer(False)
    model = get_model("qwen2")
    context_ids = random_input_ids(1, CONTEXT_LEN, seed=5)
    press = KVzipPress(compression_ratio=0.5, kvzip_plus_normalization=True, tokenizer=tokenizer)
    prefill_base_model(model, press, context_ids)
    repeat = repeat_ids_for(tokenizer, [context_ids], 0, "\n")
    reference = reference_scores("qwen2", context_ids, repeat, 0, CONTEXT_LEN, 0, plus=True)
    for layer_idx, expected in reference.items():
        torch.testing.assert_close(press.score_val[layer_idx][..., 4:], expected[..., 4:])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("compression_ratio", [0.25, 0.75])
def test_head_wise_masks_prune_the_lowest_scores(arch, layerwise, compression_ratio):
    model = get_model(arch)
    bsz, seq_len = 2, 64
    press = KVzipPress(compression_ratio=compression_ratio, layerwise=layerwise, tokenizer=load_tokenizer(False))
    cache = prefill_base_model(model, press, random_input_ids(bsz, seq_len, seed=6))

    layers = compressed_layers(model)
    modules = attention_modules(model)
    num_kv = model.config.get_text_config().num_key_value_heads
    shape = (bsz, num_kv, seq_len)
    masks = {i: masked_bool(modules[i], shape) for i in layers}
    for i in layers:  # the cache keeps the full context: the masks do the pruning
        assert cache.layers[i].keys.shape[2] == seq_len
    fractions = [masks[i].float().mean().item() for i in layers]
    assert abs(sum(fractions) / len(fractions) - compression_ratio) < 1e-2

    for b in range(bsz):
        if layerwise:
            for i in layers:
                assert masks[i][b].sum() == int(num_kv * seq_len * compression_ratio)
                scores = press.score_val[i][b]
                assert scores[masks[i][b]].max() <= scores[~masks[i][b]].min()
        else:
            all_masked = torch.cat([masks[i][b].flatten() for i in layers])
            all_scores = torch.cat([press.score_val[i][b].flatten() for i in layers])
            assert all_masked.sum() == int(len(layers) * num_kv * seq_len * compression_ratio)
            assert all_scores[all_masked].max() <= all_scores[~all_masked].min()
        for i in layers:  # sinks are never pruned
            assert not masks[i][b, :, : press.n_sink].any()

    # the compressed cache still decodes, and the masks change the next token's output
    with torch.no_grad():
        out = model(input_ids=random_input_ids(bsz, 1, seed=7), **cache_kwargs(model, cache))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_masked_entries_get_zero_attention_from_the_next_tokens(arch):
    """Under eager attention (covered by the fork's patch) the masked entries get exactly zero weight."""
    model = get_model(arch, "eager")
    bsz, seq_len = 2, 32
    press = KVzipPress(compression_ratio=0.5, tokenizer=load_tokenizer(False))
    cache = prefill_base_model(model, press, random_input_ids(bsz, seq_len, seed=8))
    modules = attention_modules(model)
    with torch.no_grad():
        out = model(random_input_ids(bsz, 2, seed=9), output_attentions=True, **cache_kwargs(model, cache))
    for layer_idx in compressed_layers(model):
        masked = masked_bool(modules[layer_idx], (bsz, 2, seq_len))
        assert masked.any()
        weights = out.attentions[layer_idx][..., :seq_len]  # (B, H, 2, T): the new tokens over the context
        masked = masked.repeat_interleave(weights.shape[1] // 2, dim=1)[:, :, None, :].expand_as(weights)
        assert (weights[masked] == 0).all()
        assert (weights[~masked] > 0).all()


def test_ratio_zero_runs_no_repeat_pass_and_masks_nothing():
    model = get_model("llama")
    press = KVzipPress(compression_ratio=0.0, tokenizer=load_tokenizer(False))
    cache = prefill_base_model(model, press, random_input_ids(1, CONTEXT_LEN))
    assert press.score_val is None
    assert all(m.masked_key_indices is None for m in attention_modules(model))
    assert cache.get_seq_length() == CONTEXT_LEN


def test_context_captured_through_the_causal_lm_and_forward_restored():
    model = get_model("llama")
    press = KVzipPress(compression_ratio=0.5, tokenizer=load_tokenizer(False))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(random_input_ids(1, CONTEXT_LEN), **cache_kwargs(model, cache))  # full model, positional input_ids
    assert "forward" not in model.model.__dict__
    assert cache.get_seq_length() == CONTEXT_LEN
    assert all(m.masked_key_indices is not None for m in attention_modules(model))


def test_no_compression_when_the_block_raises():
    model = get_model("llama")
    press = KVzipPress(compression_ratio=0.5, tokenizer=load_tokenizer(False))
    cache = DynamicCache(config=model.config)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), press(model):
            model.model(input_ids=random_input_ids(1, CONTEXT_LEN), **cache_kwargs(model.model, cache))
            raise RuntimeError("boom")
    assert "forward" not in model.model.__dict__
    assert press.score_val is None


def test_tokenizer_loaded_from_the_saved_model_directory():
    model = load_saved_model(saved_model_dir("llama", with_chat_template=True))
    press = KVzipPress(compression_ratio=0.5)
    prefill_base_model(model, press, random_input_ids(1, CONTEXT_LEN))
    # The chat template's prefix "<s><|user|>" and the sinks are protected; the rest was scored.
    assert torch.all(press.score_val[..., :4] == 1.0)
    assert torch.all(press.score_val[..., 4:] < 1.0) and torch.all(press.score_val[..., 4:] > 0)


def test_clear_error_when_no_tokenizer_can_be_found():
    with pytest.raises(ValueError, match="name_or_path.*tokenizer="):
        with KVzipPress(0.5)(get_model("llama")):
            pass
    path = temp_dir(prefix="kvpress-no-tokenizer-")
    save_tiny_model("llama", path)
    with pytest.raises(ValueError, match="could not load a tokenizer from model.config.name_or_path"):
        with KVzipPress(0.5)(load_saved_model(path)):
            pass


@pytest.mark.parametrize(
    "kwargs,match",
    [({"compression_ratio": 1.0}, "compression_ratio"), ({"compression_ratio": 0.5, "n_sink": -1}, "n_sink")],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVzipPress(**kwargs)


def test_headwise_masks_counts():
    scores = torch.arange(2 * 1 * 2 * 5, dtype=torch.float32).reshape(2, 1, 2, 5)
    global_masks = headwise_masks(scores, 0.3, layerwise=False)
    # the 6 lowest of 20 scores are all in layer 0, head 0 (5 entries) and head 1 (first entry)
    assert global_masks[1] is None
    assert sorted(zip(global_masks[0][1].tolist(), global_masks[0][2].tolist())) == [(0, i) for i in range(5)] + [
        (1, 0)
    ]
    layer_masks = headwise_masks(scores, 0.3, layerwise=True)
    assert [m[0].numel() for m in layer_masks] == [3, 3]
    assert sorted(layer_masks[1][2].tolist()) == [0, 1, 2]


def test_pipeline_answers_and_cache_unchanged_after_each_question():
    path = saved_model_dir("llama", with_chat_template=True)
    model = load_saved_model(path)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(True), device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 2
    # Short questions: the fake keys of the attention patch need a hyperplane that separates all queries of a pass
    # from 0, which isotropic random queries (2 per token here, head_dim 16) only allow for a few tokens.
    questions = ["Who?", "Why?"]
    press = KVzipPress(compression_ratio=0.5)
    check_questions_leave_compressed_context(model, pipe, press, context, questions, max_new_tokens=4)


def test_quantized_cache_is_rolled_back_exactly_after_the_repeat_passes():
    model = get_model("llama")
    context_ids = random_input_ids(1, CONTEXT_LEN, seed=10)
    compressed = make_caches(model)[-1]  # FP8 where transformers has it (>= 5.3), else the int8 test backend
    press = KVzipPress(compression_ratio=0.5, layerwise=True, tokenizer=load_tokenizer(False))
    with torch.no_grad(), press(model):
        model.model(input_ids=context_ids, **cache_kwargs(model.model, compressed))
    masks = [module.masked_key_indices for module in attention_modules(model)]
    assert all(mask[0].numel() == int(2 * CONTEXT_LEN * 0.5) for mask in masks)
    plain = make_caches(model)[-1]
    with torch.no_grad():
        model.model(input_ids=context_ids, **cache_kwargs(model.model, plain))
    for layer_idx in range(len(plain.layers)):
        assert compressed.layers[layer_idx].cumulative_length == CONTEXT_LEN
        for got, expected in zip(
            extract_keys_and_values(compressed, layer_idx), extract_keys_and_values(plain, layer_idx)
        ):
            assert torch.equal(got, expected)


def test_cannot_be_composed():
    with pytest.raises(ValueError, match="cannot be composed"):
        ComposedPress([KVzipPress(0.5), KnormPress(0.5)])


def test_telemetry_counts_the_prefill_and_the_compression_time():
    model = get_model("llama")
    press = KVzipPress(0.5, tokenizer=load_tokenizer(False))
    with torch.no_grad(), press(model):
        model.model(input_ids=random_input_ids(1, CONTEXT_LEN, seed=3), **cache_kwargs(model.model, DynamicCache()))
    assert press.get_timing_metrics()["total_prefill_tokens"] == 0  # latency off: nothing recorded

    press.latency = True
    press.reset_timing()
    with torch.no_grad(), press(model):
        model.model(input_ids=random_input_ids(1, CONTEXT_LEN, seed=3), **cache_kwargs(model.model, DynamicCache()))
    metrics = press.get_timing_metrics()
    assert metrics["total_prefill_tokens"] == CONTEXT_LEN and metrics["total_decoding_tokens"] == 0
    assert metrics["prefill_time"] > 0


def test_scores_stay_float32_on_a_bfloat16_model():
    """Kept as a difference: KVzip scores in float32 whatever the model dtype (upstream keeps the model's dtype for
    the softmax and the scores). The global bottom-k over every (layer, head, token) score is decided by score order;
    in bfloat16 (8 bits of mantissa) many distinct scores round to the same value and the pruned set among them is
    left to the sort's tie order."""
    model = copy.deepcopy(get_model("llama")).to(torch.bfloat16)
    press = KVzipPress(compression_ratio=0.5, tokenizer=load_tokenizer(False))
    prefill_base_model(model, press, random_input_ids(1, CONTEXT_LEN, seed=3))
    scores = torch.stack([press.score_val[layer_idx] for layer_idx in compressed_layers(model)])
    assert scores.dtype == torch.float32
    assert scores.unique().numel() > scores.bfloat16().unique().numel()
