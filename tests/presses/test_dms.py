# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""DMSPress: which entries are evicted (score below threshold, outside the sliding window), in prefill and during
decoding, and that evicted entries really receive no attention."""

import pytest
import torch
from transformers import DynamicCache, pipeline

from kvpress import AdaKVPress, KnormPress, RandomPress, ScorerPress, SnapKVPress, StreamingLLMPress
from kvpress.presses.dms_press import DMSPress
from kvpress.transformers_adapter import cache_kwargs, find_cache, output_cache
from tests.default_presses import default_presses
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, random_input_ids, saved_model_dir
from tests.test_decoding_compression import decode_step_by_step

N_POSITIONS = 64


class TableScorer(ScorerPress):
    """Scores read from a fixed table (KV head, absolute position), at the positions of the scored tokens."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        positions = kwargs["position_ids"][0, -keys.shape[2] :]
        return self.table[:, positions].unsqueeze(0).expand(keys.shape[0], -1, -1)


def attention_modules(model):
    language_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [language_model.layers[i].self_attn for i in compressed_layers(model)]


def mask_set(module) -> set:
    masks = module.masked_key_indices
    if masks is None:
        return set()
    entries = list(zip(*(m.tolist() for m in masks)))
    assert len(entries) == len(set(entries)), "an entry was masked twice"
    return set(entries)


def expected_masks(scores: torch.Tensor, cache_len: int, window: int, threshold: float) -> set:
    """Entries (0, head, position) that left the window (position < cache_len - window) with a low score."""
    return {
        (0, head, position)
        for head in range(scores.shape[0])
        for position in range(max(cache_len - window, 0))
        if scores[head, position] < threshold
    }


def table(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, N_POSITIONS, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [0, 3, 25])
def test_decoding_masks_exactly_the_low_scores_that_left_the_window(window):
    model = get_model("llama")
    scores = table()
    press = DMSPress(TableScorer(scores), threshold=0.0, sliding_window_size=window, decoding=True)
    prompt = 20
    checked = []

    def check(step, cache):
        cache_len = prompt + step
        expected = expected_masks(scores, cache_len, window, 0.0)
        for module in attention_modules(model):
            assert mask_set(module) == expected, step
        n_heads = 2
        assert press.compression_ratio == pytest.approx(len(expected) / (n_heads * cache_len))
        checked.append(step)

    decode_step_by_step(model, press, random_input_ids(1, prompt), 12, check)
    assert checked == list(range(13))


def test_prefill_only_masks_the_prompt_and_keeps_them_while_decoding():
    model = get_model("llama")
    scores = table(1)
    press = DMSPress(TableScorer(scores), threshold=0.3, sliding_window_size=4)
    assert not press.acts_during_decoding
    expected = expected_masks(scores, 20, 4, 0.3)
    assert expected  # the constructed case evicts something

    def check(step, cache):
        for module in attention_modules(model):
            assert mask_set(module) == expected
        assert press.compression_ratio == pytest.approx(len(expected) / (2 * 20))  # measured at prefill

    decode_step_by_step(model, press, random_input_ids(1, 20), 5, check)


def test_knorm_scores_against_the_keys_themselves():
    """Reference: -||k|| of every key as the attention layer produced it (recorded before any fake key)."""
    model = get_model("llama")
    prompt = random_input_ids(1, 24)
    with torch.no_grad():
        first = output_cache(model(prompt, use_cache=True))
    threshold = float((-first.layers[0].keys.norm(dim=-1)).median())
    press = DMSPress(KnormPress(), threshold=threshold, sliding_window_size=5, decoding=True)
    recorded: dict[int, list] = {0: [], 1: []}

    def grab(module, args, kwargs, output):
        q_len = kwargs["hidden_states"].shape[1]
        keys = find_cache(kwargs).layers[module.layer_idx].keys
        recorded[module.layer_idx].append(-keys[0, :, -q_len:].norm(dim=-1))

    handles = [model.model.layers[i].self_attn.register_forward_hook(grab, with_kwargs=True) for i in (0, 1)]
    n_masked = []

    def check(step, cache):
        cache_len = 24 + step
        for layer, module in enumerate(attention_modules(model)):
            scores = torch.cat(recorded[layer], dim=-1)
            assert mask_set(module) == expected_masks(scores, cache_len, 5, threshold)
            n_masked.append(len(mask_set(module)))

    try:
        decode_step_by_step(model, press, prompt, 10, check)
    finally:
        for handle in handles:
            handle.remove()
    assert 0 < n_masked[-1] < 2 * 34


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_keeps_the_window_and_masks_only_decided_entries(arch):
    model = get_model(arch)
    torch.manual_seed(0)  # RandomPress() draws from the global generator
    press = DMSPress(RandomPress(), threshold=0.5, sliding_window_size=6, decoding=True)
    with torch.no_grad(), press(model):
        out = model.generate(random_input_ids(1, 30), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cache_len = out.shape[1] - 1  # the last generated token was not fed back
    for module in attention_modules(model):
        masked = mask_set(module)
        assert masked and all(position < cache_len - 6 for _, _, position in masked)
    assert 0 < press.compression_ratio < 1


def test_masked_entries_receive_no_attention():
    model = get_model("llama", "eager")
    scores = table(2)
    press = DMSPress(TableScorer(scores), threshold=0.0, sliding_window_size=2, decoding=True)
    prompt = random_input_ids(1, 16)
    attentions = []
    with torch.no_grad(), press(model):
        cache = DynamicCache(config=model.config)
        model(prompt, **cache_kwargs(model, cache))
        for position in range(16, 20):
            out = model(
                random_input_ids(1, 1, seed=position),
                position_ids=torch.tensor([[position]]),
                output_attentions=True,
                **cache_kwargs(model, cache),
            )
            attentions.append((position, out.attentions))
    for position, layer_attentions in attentions:
        # masks were decided after the previous step: cache length then was `position`
        expected = expected_masks(scores, position, 2, 0.0)
        for weights in layer_attentions:  # (1, 4 query heads, 1, position + 1)
            for head in range(2):
                for key in range(position + 1):
                    group = weights[0, 2 * head : 2 * head + 2, 0, key]
                    if (0, head, key) in expected:
                        assert torch.all(group == 0), (position, head, key)
                    else:
                        assert torch.all(group > 0), (position, head, key)


def test_state_is_reset_at_each_prefill():
    model = get_model("llama")
    press = DMSPress(KnormPress(), threshold=-3.0, sliding_window_size=3, decoding=True)
    decode_step_by_step(model, press, random_input_ids(1, 30, seed=1), 6, lambda step, cache: None)
    decode_step_by_step(model, press, random_input_ids(1, 18, seed=2), 4, lambda step, cache: None)
    reused = [mask_set(module) for module in attention_modules(model)]
    ratio = press.compression_ratio
    fresh = DMSPress(KnormPress(), threshold=-3.0, sliding_window_size=3, decoding=True)
    decode_step_by_step(model, fresh, random_input_ids(1, 18, seed=2), 4, lambda step, cache: None)
    assert reused == [mask_set(module) for module in attention_modules(model)]
    assert ratio == fresh.compression_ratio
    assert all(position < 22 for masks in reused for _, _, position in masks)


@pytest.mark.parametrize("entry", default_presses, ids=lambda e: e["cls"].__name__)
def test_every_default_press_as_prefill_scorer(entry):
    model = get_model("llama")
    for kwargs in entry["kwargs"]:
        press = DMSPress(entry["cls"](**kwargs), threshold=-0.5, sliding_window_size=8)
        decode_step_by_step(model, press, random_input_ids(1, 40), 1, lambda step, cache: None)
        for module in attention_modules(model):
            assert all(position < 32 for _, _, position in mask_set(module))
        assert 0 <= press.compression_ratio <= 32 / 40


def test_pipeline_ratio_equals_the_masked_fraction():
    """Upstream's exact test: with window 0, every token is decided when it arrives."""
    pipe = pipeline("kv-press-text-generation", model=saved_model_dir("llama"), device="cpu")
    pipe.model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    torch.manual_seed(0)  # RandomPress() draws from the global generator
    press = DMSPress(RandomPress(), threshold=0.5, sliding_window_size=0, decoding=True)
    context, question, max_new_tokens = "A context that is compressed while decoding. " * 2, "Why?", 7
    pipe(context, question=question, press=press, max_new_tokens=max_new_tokens)
    inputs = pipe.preprocess(context, [question], "", 10_000)
    seq_len = inputs["context_ids"].shape[1] + inputs["questions_ids"][0].shape[1] + max_new_tokens - 1
    modules = attention_modules(pipe.model)
    fractions = [module.masked_key_indices[0].numel() / (2 * seq_len) for module in modules]
    assert press.compression_ratio == pytest.approx(sum(fractions) / len(fractions), abs=1e-12)
    assert 0.2 < press.compression_ratio < 0.8


def test_pipeline_with_prefill_only_dms_answers_several_questions():
    pipe = pipeline("kv-press-text-generation", model=saved_model_dir("llama"), device="cpu")
    press = DMSPress(KnormPress(), threshold=-3.0, sliding_window_size=4)
    out = pipe("Some context to answer from. " * 2, questions=["a?", "b?"], press=press, max_new_tokens=3)
    assert len(out["answers"]) == 2
    # with decoding, each question is answered from the compressed context (state and masks rolled back)
    decoding = DMSPress(KnormPress(), -3.0, 4, decoding=True)
    context = "Some context to answer from. " * 2
    together = pipe(context, questions=["a?", "b?"], press=decoding, max_new_tokens=4)["answers"]
    fresh = DMSPress(KnormPress(), -3.0, 4, decoding=True)
    assert together == [pipe(context, question=q, press=fresh, max_new_tokens=4)["answer"] for q in ("a?", "b?")]


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match=r"StreamingLLMPress.*KnormPress, RandomPress, KVzapPress"):
        DMSPress(StreamingLLMPress(), threshold=0.0, decoding=True)
    with pytest.raises(ValueError, match="SnapKVPress"):
        DMSPress(SnapKVPress(), threshold=0.0, decoding=True)
    DMSPress(SnapKVPress(), threshold=0.0)  # fine in prefill: the prompt is scored as a whole
    with pytest.raises(TypeError, match="ScorerPress"):
        DMSPress(AdaKVPress(KnormPress()), threshold=0.0)
    with pytest.raises(ValueError, match="cache_budget=8 of KnormPress would be ignored"):
        DMSPress(KnormPress(cache_budget=8), threshold=0.0)
    with pytest.raises(TypeError, match="threshold must be a number"):
        DMSPress(KnormPress(), threshold="low")
    with pytest.raises(ValueError, match="sliding_window_size"):
        DMSPress(KnormPress(), threshold=0.0, sliding_window_size=-1)
    with pytest.raises(TypeError, match="decoding must be True or False"):
        DMSPress(KnormPress(), threshold=0.0, decoding="yes")
    press = DMSPress(KnormPress(), threshold=0.0)
    with pytest.raises(ValueError, match="run a forward pass"):
        press.compression_ratio
    with pytest.raises(AttributeError, match="threshold"):
        press.compression_ratio = 0.5
    model = get_model("llama")
    with pytest.raises(ValueError, match="threshold is None"):
        decode_step_by_step(model, DMSPress(KnormPress()), random_input_ids(1, 8), 0, lambda step, cache: None)

    class WrongShape(ScorerPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            return keys.norm(dim=-1)[:, :1]

    with pytest.raises(ValueError, match=r"needs \(batch, kv_heads, new_tokens\)"):
        decode_step_by_step(
            model, DMSPress(WrongShape(), threshold=0.0), random_input_ids(1, 8), 0, lambda step, cache: None
        )
