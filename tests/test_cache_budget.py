# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Token budgets: every budget press keeps each layer within `cache_budget` (+ its declared buffer) after every step,
through `model.generate` and through the pipeline; decoding-time scoring matches a prefill on the same tokens; state
is reset between sequences; bad settings are refused with clear errors."""

import contextlib
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    CapPress,
    CURPress,
    ExpectedAttentionStatsPress,
    KeyDiffPress,
    LagKVPress,
    PyramidKVPress,
    QFilterPress,
)
from kvpress.pipeline import KVPressTextGenerationPipeline
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.full_press import FullPress
from kvpress.presses.h2o_press import H2OPress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.observed_attention_press import ObservedAttentionPress
from kvpress.presses.per_layer_compression_press import PerLayerCompressionPress
from kvpress.presses.random_press import RandomPress
from kvpress.presses.rkv_lsh_press import RKVLSHPress
from kvpress.presses.rkv_press import RKVPress
from kvpress.presses.scorer_press import POSITIONS, ScorerPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.streaming_llm_press import StreamingLLMPress
from kvpress.presses.tova_press import TOVAPress
from kvpress.transformers_adapter import cache_kwargs, output_cache
from tests.fixtures import PAD_ID, attention_modules, compressed_layers, get_model, load_tokenizer, random_input_ids
from tests.presses.test_ea_stats_qfilter import local_ea_stats_dir, local_qfilters_dir

BUDGET = 10
PROMPT = 16
NEW_TOKENS = 3 * BUDGET
CONTEXT = "The quick brown fox jumps over the lazy dog."

# Every press that takes a cache_budget: (id, factory, attention backend). Append entries to cover more presses.
BUDGET_PRESSES = [
    ("knorm", lambda: KnormPress(cache_budget=BUDGET), "sdpa"),
    ("random", lambda: RandomPress(cache_budget=BUDGET, seed=0), "sdpa"),
    ("streaming_llm", lambda: StreamingLLMPress(cache_budget=BUDGET, n_sink=2), "sdpa"),
    ("snapkv", lambda: SnapKVPress(cache_budget=BUDGET, window_size=4), "sdpa"),
    ("tova", lambda: TOVAPress(cache_budget=BUDGET), "sdpa"),
    ("expected_attention", lambda: ExpectedAttentionPress(cache_budget=BUDGET, n_future_positions=16), "sdpa"),
    ("observed_attention", lambda: ObservedAttentionPress(cache_budget=BUDGET), "eager"),
    ("h2o", lambda: H2OPress(cache_budget=BUDGET), "eager"),
    ("rkv", lambda: RKVPress(cache_budget=BUDGET, window_size=4, compress_interval=4), "sdpa"),
    ("rkv_lsh", lambda: RKVLSHPress(cache_budget=BUDGET, window_size=4, compress_interval=4, seed=0), "sdpa"),
    # the other upstream scorers that can score during decoding take a budget too
    ("keydiff", lambda: KeyDiffPress(cache_budget=BUDGET), "sdpa"),
    ("lagkv", lambda: LagKVPress(cache_budget=BUDGET, n_sink=2, lag_size=4), "sdpa"),
    ("cur", lambda: CURPress(cache_budget=BUDGET), "sdpa"),
    ("cap", lambda: CapPress(cache_budget=BUDGET), "sdpa"),
    ("qfilter", lambda: QFilterPress(cache_budget=BUDGET, filters_path=local_qfilters_dir()), "sdpa"),
    (
        "expected_attention_stats",
        lambda: ExpectedAttentionStatsPress(cache_budget=BUDGET, stats_folder=local_ea_stats_dir()),
        "sdpa",
    ),
    ("pyramidkv", lambda: PyramidKVPress(cache_budget=BUDGET, window_size=4), "sdpa"),
    # a pyramid that fits: layer 0 keeps 15, layer 1 keeps 5 (mean BUDGET)
    ("pyramidkv_pyramid", lambda: PyramidKVPress(cache_budget=BUDGET, window_size=2, beta=2), "sdpa"),
]
IDS = [entry[0] for entry in BUDGET_PRESSES]


@contextlib.contextmanager
def record_steps(model, press=None):
    """Record, after every forward of the decoder, each layer's cache length (and the press's kept positions)."""
    lengths, positions = [], []

    def hook(module, args, output):
        cache = output_cache(output)
        # the held length (an in-place layer's buffers are larger than what they hold)
        lengths.append([layer.get_seq_length() if layer.keys is not None else 0 for layer in cache.layers])
        if press is not None and isinstance(press, ScorerPress):
            positions.append({i: s.entries[POSITIONS].clone() for i, s in press.decoding_states.items()})

    handle = model.model.register_forward_hook(hook)
    try:
        yield lengths, positions
    finally:
        handle.remove()


def expected_lengths(forward_tokens: list[int], budget: int, buffer: int) -> list[int]:
    """Cache length after each forward: a prefill is pruned to the budget, later forwards when above budget+buffer."""
    lengths, length = [], 0
    for step, n_tokens in enumerate(forward_tokens):
        length += n_tokens
        limit = budget if step == 0 else budget + buffer
        if length > limit:
            length = budget
        lengths.append(length)
    return lengths


def layer_budget(model, press, layer_idx: int) -> int:
    """The budget of one layer: `cache_budget`, or the press's own per-layer share (PyramidKV)."""
    if isinstance(press, ScorerPress):
        return press.layer_cache_budget(attention_modules(model)[layer_idx])
    return press.cache_budget


def check_trace(model, lengths, press, forward_tokens):
    assert len(lengths) == len(forward_tokens)
    for layer_idx in compressed_layers(model):
        budget = layer_budget(model, press, layer_idx)
        expected = expected_lengths(forward_tokens, budget, press.budget_buffer)
        trace = [step[layer_idx] for step in lengths]
        assert trace == expected, (layer_idx, trace, expected)
        assert max(trace[1:]) <= budget + press.budget_buffer
        if forward_tokens[0] > budget:
            assert lengths[0][layer_idx] == budget  # the prompt was pruned


def generate(model, press, input_ids, new_tokens):
    with torch.no_grad(), press(model):
        return model.generate(
            input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID
        )


@pytest.mark.parametrize("name,make_press,attn", BUDGET_PRESSES, ids=IDS)
def test_generate_keeps_every_layer_within_budget_after_every_step(name, make_press, attn):
    model = get_model("llama", attn)
    press = make_press()
    assert press.acts_during_decoding
    if name == "pyramidkv_pyramid":
        assert [layer_budget(model, press, i) for i in range(2)] == [15, 5]
    with record_steps(model, press) as (lengths, positions):
        out = generate(model, press, random_input_ids(1, PROMPT), NEW_TOKENS)
    assert out.shape == (1, PROMPT + NEW_TOKENS)
    check_trace(model, lengths, press, [PROMPT] + [1] * (NEW_TOKENS - 1))
    # The kept cache stays in positional order, and every entry's position is known.
    for step in positions:
        for layer_positions in step.values():
            assert (layer_positions >= 0).all()
            assert (layer_positions.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("name,make_press,attn", BUDGET_PRESSES, ids=IDS)
def test_pipeline_keeps_every_layer_within_budget_after_every_step(name, make_press, attn, monkeypatch):
    model = get_model("llama", attn)
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)  # always generate NEW_TOKENS tokens
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(False), device="cpu")
    press = make_press()
    question = "Who jumps?"
    with record_steps(model) as (lengths, _):
        answer = pipe(CONTEXT, question=question, press=press, max_new_tokens=NEW_TOKENS)["answer"]
    assert isinstance(answer, str)
    inputs = pipe.preprocess(CONTEXT, [question], "", 10_000)
    n_context, n_question = inputs["context_ids"].shape[1], inputs["questions_ids"][0].shape[1]
    assert n_context > BUDGET
    # the context, the question, then one forward per generated token but the last
    check_trace(model, lengths, press, [n_context, n_question] + [1] * (NEW_TOKENS - 1))


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gemma3_text", "gemma3"])
@pytest.mark.parametrize("name", ["snapkv", "h2o", "rkv"])
def test_budget_on_other_architectures(arch, name):
    _, make_press, attn = BUDGET_PRESSES[IDS.index(name)]
    model = get_model(arch, attn)
    press = make_press()
    new_tokens = 12
    with record_steps(model) as (lengths, _):
        generate(model, press, random_input_ids(1, PROMPT), new_tokens)
    check_trace(model, lengths, press, [PROMPT] + [1] * (new_tokens - 1))


def test_short_prompt_grows_to_the_budget_then_stays_there():
    model = get_model("llama")
    press = KnormPress(cache_budget=BUDGET)
    with record_steps(model) as (lengths, _):
        generate(model, press, random_input_ids(1, 4), 12)
    assert [step[0] for step in lengths] == [4, 5, 6, 7, 8, 9, 10, 10, 10, 10, 10, 10]


def test_no_budget_means_no_compression_during_decoding():
    model = get_model("llama")
    press = KnormPress()
    assert not press.acts_during_decoding
    with record_steps(model) as (lengths, _):
        generate(model, press, random_input_ids(1, PROMPT), 5)
    assert [step[0] for step in lengths] == [16, 17, 18, 19, 20]


def test_streaming_llm_keeps_the_sinks_and_the_most_recent_tokens():
    model = get_model("llama")
    press = StreamingLLMPress(cache_budget=BUDGET, n_sink=3)
    with record_steps(model, press) as (_, positions):
        generate(model, press, random_input_ids(1, PROMPT), 8)
    for step, step_positions in enumerate(positions):
        last = PROMPT + step - 1  # position of the newest token in the cache after this forward
        expected = list(range(3)) + list(range(last - (BUDGET - 3) + 1, last + 1))
        for layer_positions in step_positions.values():
            assert layer_positions[0, 0].tolist() == expected
            assert layer_positions[0, 1].tolist() == expected


def test_knorm_evicts_the_highest_norm_entries_at_every_step():
    model = get_model("llama")
    press = KnormPress(cache_budget=BUDGET)
    snapshots = []

    def hook(module, args, output):
        snapshots.append(
            [
                (layer.keys.clone(), press.layer_state(i).entries[POSITIONS].clone())
                for i, layer in enumerate(output_cache(output).layers)
            ]
        )

    handle = model.model.register_forward_hook(hook)
    try:
        generate(model, press, random_input_ids(1, PROMPT), 8)
    finally:
        handle.remove()
    evictions = 0
    for step in range(1, len(snapshots)):
        new_position = PROMPT + step - 1  # the token fed by this forward
        for (keys_before, pos_before), (keys_after, pos_after) in zip(snapshots[step - 1], snapshots[step]):
            for head in range(keys_after.shape[1]):
                kept = set(pos_after[0, head].tolist())
                evicted = [j for j, p in enumerate(pos_before[0, head].tolist()) if p not in kept]
                assert len(evicted) + (new_position not in kept) == 1  # exactly one entry leaves per step
                kept_norms = keys_after[0, head].norm(dim=-1)
                for j in evicted:
                    assert keys_before[0, head, j].norm() >= kept_norms.max() - 1e-6
                    evictions += 1
    assert evictions > 0


def run_steps(model, press, input_ids, n_prompt):
    """Prefill `n_prompt` tokens with `press`, then feed the others one by one; the kept positions per layer."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids[:, :n_prompt], **cache_kwargs(model, cache))
        for t in range(n_prompt, input_ids.shape[1]):
            model(
                input_ids[:, t : t + 1], position_ids=torch.tensor([[t]] * len(input_ids)), **cache_kwargs(model, cache)
            )
    return {i: state.entries[POSITIONS] for i, state in press.decoding_states.items()}, cache


WINDOW_PRESSES = [
    ("snapkv", lambda: SnapKVPress(cache_budget=BUDGET, window_size=4), "sdpa", 1),
    ("snapkv_eager", lambda: SnapKVPress(cache_budget=BUDGET, window_size=4), "eager", 1),
    ("tova", lambda: TOVAPress(cache_budget=BUDGET), "sdpa", 1),
    ("expected_attention", lambda: ExpectedAttentionPress(cache_budget=BUDGET, n_future_positions=16), "sdpa", 1),
    ("h2o", lambda: H2OPress(cache_budget=BUDGET), "eager", 1),
    ("rkv", lambda: RKVPress(cache_budget=BUDGET, window_size=4, compress_interval=3), "sdpa", 3),
    ("rkv_lsh", lambda: RKVLSHPress(cache_budget=BUDGET, window_size=4, compress_interval=3, seed=1), "sdpa", 3),
]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("name,make_press,attn,interval", WINDOW_PRESSES, ids=[w[0] for w in WINDOW_PRESSES])
def test_first_decoding_eviction_equals_a_prefill_of_the_same_tokens(arch, name, make_press, attn, interval):
    """Up to the first eviction nothing was removed, so the decoding-time score (recent hidden states at their own
    RoPE positions, accumulated attention) must keep exactly what a prefill of the same tokens keeps."""
    model = get_model(arch, attn)
    input_ids = random_input_ids(2, BUDGET + interval, seed=3)
    decoded, _ = run_steps(model, make_press(), input_ids, n_prompt=BUDGET - 2)
    prefilled, _ = run_steps(model, make_press(), input_ids, n_prompt=input_ids.shape[1])
    assert set(decoded) == set(prefilled) == set(compressed_layers(model))
    for layer_idx in decoded:
        assert decoded[layer_idx].shape[-1] == BUDGET
        assert torch.equal(decoded[layer_idx], prefilled[layer_idx]), layer_idx


@pytest.mark.parametrize("name", ["snapkv", "h2o", "rkv", "random"])
def test_state_is_reset_between_sequences(name):
    """A press reused for a second generation behaves exactly like a fresh press: nothing leaks."""
    _, make_press, attn = BUDGET_PRESSES[IDS.index(name)]
    model = get_model("llama", attn)
    first, second = random_input_ids(1, PROMPT, seed=1), random_input_ids(1, PROMPT + 3, seed=2)
    reused = make_press()
    generate(model, reused, first, 9)
    reused_out = generate(model, reused, second, 7)
    fresh = make_press()
    fresh_out = generate(model, fresh, second, 7)
    assert torch.equal(reused_out, fresh_out)
    for layer_idx in compressed_layers(model):
        state, fresh_state = reused.layer_state(layer_idx), fresh.layer_state(layer_idx)
        assert state.seen == PROMPT + 3 + 6 and state.steps == 6
        for key, value in fresh_state.entries.items():
            assert torch.equal(state.entries[key], value)


def test_window_presses_remember_the_last_tokens_at_their_positions():
    model = get_model("llama")
    press = SnapKVPress(cache_budget=BUDGET, window_size=4)
    generate(model, press, random_input_ids(1, PROMPT), 6)
    recent = press.layer_state(0).recent
    # after the prompt and 5 fed tokens, the last 4 positions are 17..20
    assert recent["position_ids"].tolist() == [[17, 18, 19, 20]]
    assert recent["hidden_states"].shape == (1, 4, model.config.hidden_size)
    cos, _ = model.model.rotary_emb(recent["hidden_states"], torch.arange(17, 21)[None])
    torch.testing.assert_close(recent["cos"], cos)


def test_composed_press_with_a_budget_press_compresses_during_decoding():
    model = get_model("llama")
    press = ComposedPress([KnormPress(cache_budget=BUDGET)])
    with record_steps(model) as (lengths, _):
        generate(model, press, random_input_ids(1, PROMPT), 5)
    assert [step[0] for step in lengths] == [BUDGET] * 5


def test_seeded_random_press_keeps_upstream_prefill_scores_and_draws_anew_at_each_step():
    model = get_model("llama")
    press = RandomPress(cache_budget=BUDGET, seed=3)
    with record_steps(model, press) as (_, positions):
        generate(model, press, random_input_ids(1, PROMPT), 10)
    # prefill: upstream's seeded scores, torch.rand with a generator seeded with `seed`
    reference = torch.rand((1, 2, PROMPT), generator=torch.Generator().manual_seed(3))
    expected = reference.topk(BUDGET, dim=-1).indices.sort(dim=-1).values
    for layer_positions in positions[0].values():
        assert torch.equal(layer_positions, expected)
    # decoding: the evicted cache slot changes from step to step (a fixed draw would always evict the same slot)
    evicted_slots = set()
    for step in range(1, len(positions)):
        before = torch.cat([positions[step - 1][0][0, 0], torch.tensor([PROMPT + step - 1])])
        kept = set(positions[step][0][0, 0].tolist())
        evicted_slots.update(i for i, p in enumerate(before.tolist()) if p not in kept)
    assert len(evicted_slots) > 1


def test_full_press_never_compresses():
    model = get_model("llama")
    press = FullPress()
    assert press.compression_ratio == 0.0 and not getattr(press, "acts_during_decoding", False)
    with record_steps(model) as (lengths, _):
        generate(model, press, random_input_ids(1, PROMPT), 5)
    assert [step[0] for step in lengths] == [16, 17, 18, 19, 20]
    keys, values = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    kept_keys, kept_values = press.compress(None, None, keys, values, None, {})
    assert kept_keys is keys and kept_values is values


# --------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [-1, -100, 2.5, "8", True])
def test_bad_budget_is_rejected(bad):
    with pytest.raises(ValueError, match="cache_budget must be a non-negative integer"):
        KnormPress(cache_budget=bad)


def test_ratio_and_budget_together_are_rejected():
    with pytest.raises(ValueError, match="both compression_ratio=0.5 and cache_budget=8; choose one"):
        KnormPress(0.5, cache_budget=8)


def test_budget_assigned_later_is_checked_when_the_press_runs():
    model = get_model("llama")
    press = KnormPress()
    press.cache_budget = -3
    with pytest.raises(ValueError, match="non-negative integer"):
        generate(model, press, random_input_ids(1, PROMPT), 2)
    press.cache_budget = BUDGET  # the fork's style: construct, then assign the budget
    with record_steps(model) as (lengths, _):
        generate(model, press, random_input_ids(1, PROMPT), 3)
    assert [step[0] for step in lengths] == [BUDGET] * 3


def test_budget_on_a_press_that_cannot_score_during_decoding_is_rejected():
    @dataclass
    class PrefillOnly(KnormPress):
        supports_decoding = False

    @dataclass
    class OptedOut(KnormPress):
        scores_during_decoding = False

    PrefillOnly(0.5)  # fine without a budget
    for cls in (PrefillOnly, OptedOut):
        with pytest.raises(
            ValueError, match="cannot score the cache during decoding, so it cannot take a cache_budget"
        ):
            cls(cache_budget=8)


def test_budgets_smaller_than_what_a_press_always_keeps_are_rejected():
    with pytest.raises(ValueError, match="cache_budget must be at least window_size"):
        SnapKVPress(cache_budget=3, window_size=4)
    with pytest.raises(ValueError, match="cache_budget must be at least window_size"):
        RKVPress(cache_budget=4, window_size=8)
    with pytest.raises(ValueError, match="larger than n_sink"):
        StreamingLLMPress(cache_budget=4, n_sink=4)
    with pytest.raises(ValueError, match="n_recent must not exceed cache_budget"):
        H2OPress(cache_budget=4, n_recent=5)


@pytest.mark.parametrize("wrapper", [AdaKVPress, KeyRerotationPress, ChunkPress])
def test_ratio_wrappers_refuse_an_inner_budget(wrapper):
    with pytest.raises(ValueError, match="would ignore the cache_budget=8 of KnormPress"):
        wrapper(KnormPress(cache_budget=8))


def test_per_layer_ratios_on_a_budget_press_are_refused_when_run():
    model = get_model("llama")
    press = PerLayerCompressionPress(KnormPress(cache_budget=8), [0.5, 0.5])
    with pytest.raises(ValueError, match="choose one"):
        generate(model, press, random_input_ids(1, PROMPT), 2)
