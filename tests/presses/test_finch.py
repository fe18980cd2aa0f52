# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""FinchPress: the delimiter sets the observation window and is never seen by the model; kept tokens equal a
reference computed from the model's own attention weights; chunking; kept keys re-rotated to their new positions."""

import copy

import pytest
import torch
from transformers import DynamicCache

from kvpress.pipeline import KVPressTextGenerationPipeline
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.finch_press import FinchPress
from kvpress.presses.scorer_press import gather_tokens
from kvpress.transformers_adapter import cache_kwargs, output_cache
from kvpress.utils import apply_rope, get_prerope_key_states, rope_cos_sin
from tests.fixtures import (
    ARCHITECTURES,
    SPECIAL_TOKENS,
    compressed_layers,
    get_model,
    load_tokenizer,
    random_input_ids,
)

DELIMITER = 5  # "<|end|>": a special token that random_input_ids never draws
N_CONTEXT, N_QUESTION = 30, 5


def finch_inputs(n_context=N_CONTEXT, n_question=N_QUESTION, seed=0):
    """(ids with the delimiter between context and question, the same ids without it). Tokens are distinct, so
    that kept tokens can be recognised by their values."""
    generator = torch.Generator().manual_seed(seed)
    plain = (torch.randperm(240, generator=generator)[: n_context + n_question] + len(SPECIAL_TOKENS))[None]
    with_delimiter = torch.cat([plain[:, :n_context], torch.tensor([[DELIMITER]]), plain[:, n_context:]], dim=1)
    return with_delimiter, plain


def make_press(**kwargs):
    press = FinchPress(**kwargs)
    press.delimiter_token_id = DELIMITER
    return press


def prefill(model, input_ids, press=None, **model_kwargs):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if press is None:
            model(input_ids, **model_kwargs, **cache_kwargs(model, cache))
        else:
            with press(model):
                model(input_ids, **model_kwargs, **cache_kwargs(model, cache))
    return cache


def reference_indices(plain_ids, window, ratio, normalize=True, chunk_length=None):
    """Kept token indices per (layer, KV head), from the eager attention weights of a plain forward."""
    model = get_model("llama", "eager")
    with torch.no_grad():
        attentions = model(plain_ids, output_attentions=True).attentions
    indices = {}
    for layer_idx, weights in enumerate(attentions):
        seq_len = weights.shape[-1]
        window_weights = weights[..., -window:, :-window]
        if normalize:
            window_weights = window_weights * torch.arange(seq_len - window, seq_len, dtype=torch.float32)[:, None]
        scores = window_weights.mean(dim=-2)
        scores = scores.view(1, 2, 2, -1).mean(dim=2)  # GQA: 4 query heads -> 2 KV heads
        scores = torch.cat([scores, torch.full((1, 2, window), float("inf"))], dim=-1)
        if chunk_length is None:
            kept = scores.topk(int(seq_len * (1 - ratio)), dim=-1).indices
        else:
            kept = torch.cat(
                [
                    scores[..., start : start + chunk_length]
                    .topk(max(1, int(scores[..., start : start + chunk_length].shape[-1] * (1 - ratio))), dim=-1)
                    .indices
                    + start
                    for start in range(0, seq_len, chunk_length)
                ],
                dim=-1,
            )
        indices[layer_idx] = kept.sort(dim=-1).values
    return indices


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_delimiter_sets_the_window_and_is_never_seen(arch):
    model = get_model(arch)
    with_delimiter, plain = finch_inputs()
    press = make_press(compression_ratio=0.0)
    cache = prefill(model, with_delimiter, press)
    reference = prefill(model, plain)
    assert press.window_size == N_QUESTION
    for layer_idx in compressed_layers(model):
        assert cache.layers[layer_idx].keys.shape[2] == N_CONTEXT + N_QUESTION
        torch.testing.assert_close(cache.layers[layer_idx].keys, reference.layers[layer_idx].keys)
        torch.testing.assert_close(cache.layers[layer_idx].values, reference.layers[layer_idx].values)


def test_delimiter_is_also_removed_from_mask_and_positions_given_to_the_model():
    model = get_model("llama")
    with_delimiter, plain = finch_inputs(seed=1)
    n = with_delimiter.shape[1]
    press = make_press(compression_ratio=0.0)
    cache = prefill(
        model,
        with_delimiter,
        press,
        attention_mask=torch.ones(1, n, dtype=torch.long),
        position_ids=torch.arange(n)[None],
    )
    reference = prefill(model, plain)
    for layer_idx in range(2):
        torch.testing.assert_close(cache.layers[layer_idx].keys, reference.layers[layer_idx].keys)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("normalize", [True, False])
def test_kept_tokens_equal_reference_attention(attn, normalize):
    """sdpa recomputes the window attention, eager uses the model's weights; both keep the reference tokens."""
    model = get_model("llama", attn)
    with_delimiter, plain = finch_inputs(seed=2)
    ratio = 0.5
    press = make_press(compression_ratio=ratio, normalize_scores=normalize, rerotate_keys=False)
    cache = prefill(model, with_delimiter, press)
    reference = prefill(model, plain)
    expected = reference_indices(plain, N_QUESTION, ratio, normalize=normalize)
    for layer_idx in range(2):
        indices = expected[layer_idx]
        assert indices.shape[-1] == int((N_CONTEXT + N_QUESTION) * (1 - ratio))
        torch.testing.assert_close(
            cache.layers[layer_idx].keys, gather_tokens(reference.layers[layer_idx].keys, indices)
        )
        torch.testing.assert_close(
            cache.layers[layer_idx].values, gather_tokens(reference.layers[layer_idx].values, indices)
        )


def test_chunked_selection_equals_reference_per_chunk():
    model = get_model("llama")
    with_delimiter, plain = finch_inputs(seed=3)
    ratio, chunk_length = 0.25, 8
    cache = prefill(model, with_delimiter, make_press(compression_ratio=ratio, chunk_length=chunk_length))
    reference = prefill(model, plain)
    expected = reference_indices(plain, N_QUESTION, ratio, chunk_length=chunk_length)
    seq_len = N_CONTEXT + N_QUESTION
    n_kept = sum(max(1, int(min(chunk_length, seq_len - s) * (1 - ratio))) for s in range(0, seq_len, chunk_length))
    for layer_idx in range(2):
        assert cache.layers[layer_idx].values.shape[2] == n_kept
        torch.testing.assert_close(
            cache.layers[layer_idx].values, gather_tokens(reference.layers[layer_idx].values, expected[layer_idx])
        )

    press = make_press(compression_ratio=0.5, chunk_length=10)  # must exceed window / (1 - ratio) = 10
    with pytest.raises(ValueError, match="chunk_length must be larger than window_size"):
        prefill(model, with_delimiter, press)


def kept_indices_from_values(values, full_values):
    """Which original tokens each head kept, found by matching the (un-rotated) values."""
    match = (values[:, :, :, None, :] == full_values[:, :, None, :, :]).all(dim=-1)  # (B, H, n, T)
    assert (match.sum(dim=-1) == 1).all()
    return match.float().argmax(dim=-1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kept_keys_are_rerotated_to_new_positions(arch):
    model = get_model(arch)
    with_delimiter, plain = finch_inputs(seed=4)
    language_model = getattr(model.model, "language_model", model.model)
    layers = compressed_layers(model)
    hidden = {}

    def record(module, args, kwargs):
        hidden[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handles = [language_model.layers[i].self_attn.register_forward_pre_hook(record, with_kwargs=True) for i in layers]
    try:
        cache = prefill(model, with_delimiter, make_press(compression_ratio=0.6))
    finally:
        for handle in handles:
            handle.remove()
    reference = prefill(model, plain)
    n_kept = int((N_CONTEXT + N_QUESTION) * 0.4)
    for layer_idx in layers:
        module = language_model.layers[layer_idx].self_attn
        keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
        assert keys.shape[2] == n_kept
        indices = kept_indices_from_values(values, reference.layers[layer_idx].values)
        assert (indices[..., -N_QUESTION:] == torch.arange(N_CONTEXT, N_CONTEXT + N_QUESTION)).all()  # window kept
        with torch.no_grad():
            prerope = get_prerope_key_states(module, hidden[layer_idx])
            cos, sin = rope_cos_sin(module, prerope, torch.arange(n_kept)[None])
        expected = apply_rope(gather_tokens(prerope, indices), cos, sin)
        torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-4)


def test_first_layer_keys_equal_the_kept_tokens_run_at_new_positions():
    """Layer 0's keys depend only on each token and its position: re-running the kept tokens alone at positions
    0..n-1 must give exactly the re-rotated keys."""
    model = get_model("llama")
    with_delimiter, plain = finch_inputs(seed=5)
    cache = prefill(model, with_delimiter, make_press(compression_ratio=0.5))
    reference = prefill(model, plain)
    indices = kept_indices_from_values(cache.layers[0].values, reference.layers[0].values)
    for head in range(2):
        rerun = prefill(model, plain[:, indices[0, head]])
        torch.testing.assert_close(cache.layers[0].keys[0, head], rerun.layers[0].keys[0, head], atol=1e-5, rtol=1e-4)


def test_delimiter_errors():
    model = get_model("llama")
    with pytest.raises(ValueError, match="update_model_and_tokenizer"):
        with FinchPress(0.5)(model):
            pass
    with_delimiter, _ = finch_inputs()
    cases = [
        (with_delimiter.repeat(2, 1), "batch size 1"),
        (torch.cat([with_delimiter, torch.tensor([[DELIMITER, 9]])], dim=1), "exactly one delimiter"),
        (torch.cat([with_delimiter[:, :-N_QUESTION]], dim=1), "nothing after the delimiter"),
        (with_delimiter[:, N_CONTEXT:], "nothing before the delimiter"),
        (random_input_ids(1, 20), "found no delimiter token"),
    ]
    for input_ids, message in cases:
        with pytest.raises(ValueError, match=message):
            prefill(model, input_ids, make_press(compression_ratio=0.5))
    with pytest.raises(ValueError, match="chunk_length"):
        FinchPress(0.5, chunk_length=0)
    with pytest.raises(ValueError, match="compression_ratio"):
        FinchPress(1.0)
    with pytest.raises(ValueError, match="ComposedPress cannot contain"):
        ComposedPress([make_press(compression_ratio=0.5)])


def test_update_model_and_tokenizer_then_pipeline_continues_at_compressed_length():
    model, tokenizer = copy.deepcopy(get_model("llama")), load_tokenizer()
    n_vocab = len(tokenizer)
    press = FinchPress(compression_ratio=0.5)
    tokenizer = press.update_model_and_tokenizer(model, tokenizer)
    assert press.delimiter_token == "<|finch_sep|>" and press.delimiter_token_id == n_vocab
    assert model.get_input_embeddings().weight.shape[0] == n_vocab + 1
    assert tokenizer.encode("ab" + press.delimiter_token + "c", add_special_tokens=False)[2] == n_vocab

    context = "The quick brown fox jumps over the lazy dog. " * 2 + press.delimiter_token + "Who jumps?"
    answer = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")(
        context, question="", press=press, max_new_tokens=4
    )["answer"]

    # the same by hand: compress, then answer at positions that follow the compressed (re-rotated) cache
    context_ids = tokenizer.encode(tokenizer.bos_token + context, add_special_tokens=False, return_tensors="pt")
    cache = prefill(model, context_ids, press)
    n_kept = cache.get_seq_length()
    assert n_kept == int((context_ids.shape[1] - 1) * 0.5)
    tokens = tokenizer.encode("\n", add_special_tokens=False, return_tensors="pt")
    generated = []
    position = n_kept
    with torch.no_grad():
        for _ in range(4):
            positions = torch.arange(position, position + tokens.shape[1])[None]
            logits = model(tokens, position_ids=positions, **cache_kwargs(model, cache)).logits
            position += tokens.shape[1]
            tokens = logits[:, -1:].argmax(dim=-1)
            generated.append(int(tokens))
            if int(tokens) == tokenizer.eos_token_id and len(generated) > 1:
                break
    assert answer == tokenizer.decode(generated, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_inside_the_press(arch):
    model = get_model(arch)
    with_delimiter, _ = finch_inputs(seed=6)
    with torch.no_grad(), make_press(compression_ratio=0.5)(model):
        out = model.generate(
            with_delimiter,
            attention_mask=torch.ones_like(with_delimiter),
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape[1] == with_delimiter.shape[1] + 3
    n_kept = int((N_CONTEXT + N_QUESTION) * 0.5)
    for layer_idx in compressed_layers(model):
        assert output_cache(out).layers[layer_idx].keys.shape[2] == n_kept + 2


def test_generate_continues_after_the_rerotated_cache():
    # As in the pipeline: with `rerotate_keys` the new tokens follow the kept ones (n_kept, n_kept + 1, ...); without
    # it they keep the logical positions that `generate` passes (the prompt's length with the delimiter, and on).
    model = get_model("llama")
    with_delimiter, _ = finch_inputs(seed=6)
    n_kept = int((N_CONTEXT + N_QUESTION) * 0.5)
    for rerotate, first in ((True, n_kept), (False, with_delimiter.shape[1])):
        seen = []

        def record(module, args, kwargs):
            seen.append((kwargs["position_ids"] if "position_ids" in kwargs else args[1])[0].tolist())

        handle = model.model.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad(), make_press(compression_ratio=0.5, rerotate_keys=rerotate)(model):
                model.generate(
                    with_delimiter,
                    attention_mask=torch.ones_like(with_delimiter),
                    max_new_tokens=3,
                    do_sample=False,
                    eos_token_id=None,  # all three steps, whatever the random model predicts
                )
        finally:
            handle.remove()
        assert seen[0] == list(range(N_CONTEXT + N_QUESTION))  # the delimiter is never seen
        assert seen[1:] == [[first], [first + 1]], rerotate
