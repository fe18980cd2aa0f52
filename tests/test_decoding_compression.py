# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Decoding presses (DecodingPress, CompressionRatioDecodingPress, CAMPress, PrefillDecodingPress): the cache size
after every generated token, through a step-by-step loop, `model.generate` and the pipeline."""

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    AdaKVPress,
    ChunkPress,
    ExpectedAttentionPress,
    H2OPress,
    KnormPress,
    KVPressTextGenerationPipeline,
    PyramidKVPress,
    RandomPress,
    ScorerPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.presses.cam_press import CAMPress
from kvpress.presses.compression_ratio_decoding_press import CompressionRatioDecodingPress
from kvpress.presses.decoding_press import DecodingPress, lower_masked_scores, remap_masked_key_indices
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.transformers_adapter import cache_kwargs, find_cache
from kvpress.utils import extract_keys_and_values
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, load_tokenizer, random_input_ids

PROMPT, TARGET, INTERVAL = 40, 4, 3
N_NEW = 3 * TARGET

BASES = {
    "knorm": lambda: KnormPress(),
    "random": lambda: RandomPress(seed=0),
    "streaming_llm": lambda: StreamingLLMPress(n_sink=2),
    "snapkv": lambda: SnapKVPress(window_size=2),
    "tova": lambda: TOVAPress(),
    "expected_attention": lambda: ExpectedAttentionPress(n_future_positions=64),
}


def expected_lengths(wrapper: str, n_steps: int, prompt_length: int = PROMPT, ratio: float = 0.5) -> list[int]:
    """Cache length after each decoding step, simulated from the documented triggers (not from the press code)."""
    length, count, lengths = prompt_length, 0, []
    for step in range(1, n_steps + 1):
        length, count = length + 1, count + 1
        target = int((prompt_length + step) * (1 - ratio)) if wrapper == "ratio" else TARGET
        if wrapper == "cam":
            trigger = (count >= INTERVAL and length > target) or length >= target + INTERVAL
        else:
            trigger = count >= INTERVAL or 1 >= target or length >= target + INTERVAL
        if trigger:
            length, count = min(length, target), 0
        lengths.append(length)
    return lengths


def make_wrapper(wrapper: str, base, prefill_ratio: float = 0.5):
    if wrapper == "decoding":
        return DecodingPress(base, compression_interval=INTERVAL, target_size=TARGET)
    if wrapper == "cam":
        return CAMPress(base, compression_interval=INTERVAL, target_size=TARGET, merge_budget=4)
    if wrapper == "ratio":
        return CompressionRatioDecodingPress(base, compression_interval=INTERVAL, target_compression_ratio=0.5)
    if wrapper == "prefill_decoding":
        return PrefillDecodingPress(
            KnormPress(prefill_ratio), DecodingPress(base, compression_interval=INTERVAL, target_size=TARGET)
        )
    raise ValueError(wrapper)


def layer_lengths(model, cache) -> list[int]:
    return [extract_keys_and_values(cache, i)[0].shape[2] for i in compressed_layers(model)]


def decode_step_by_step(model, press, prompt_ids, n_new, on_step, cache=None, tokens=None):
    """Prefill then feed tokens one at a time (logical positions) inside `press`: the greedy ones, or `tokens`
    `(B, n_new)` when given. `on_step(step, cache)` runs after the prefill (step 0) and after every token."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    position = prompt_ids.shape[1]
    with torch.no_grad(), press(model):
        out = model(input_ids=prompt_ids, **cache_kwargs(model, cache))
        on_step(0, cache)
        for step in range(1, n_new + 1):
            token = out.logits[:, -1:].argmax(dim=-1) if tokens is None else tokens[:, step - 1 : step]
            position_ids = torch.full((prompt_ids.shape[0], 1), position)
            out = model(input_ids=token, position_ids=position_ids, **cache_kwargs(model, cache))
            position += 1
            on_step(step, cache)
    return cache


class CacheRecorder:
    """Forward hook on a (sub)model that records the compressed layers' cache lengths after each forward."""

    def __init__(self, model, module):
        self.model, self.module, self.lengths = model, module, []

    def __enter__(self):
        def hook(module, args, kwargs, output):
            cache = find_cache(kwargs)
            if cache is not None:
                self.lengths.append(layer_lengths(self.model, cache))

        self.handle = self.module.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------- size after every step


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("wrapper", ["decoding", "cam", "ratio", "prefill_decoding"])
def test_cache_size_after_every_step(wrapper, base):
    model = get_model("llama")
    press = make_wrapper(wrapper, BASES[base]())
    prompt_after_prefill = int(PROMPT * 0.5) if wrapper == "prefill_decoding" else PROMPT
    expected = expected_lengths(wrapper, N_NEW, prompt_after_prefill)
    seen = []

    def check(step, cache):
        lengths = layer_lengths(model, cache)
        seen.append(lengths)
        if step == 0:  # the prompt is pruned in prefill only by PrefillDecodingPress
            assert lengths == [prompt_after_prefill] * len(lengths)
            return
        target = int((PROMPT + step) * 0.5) if wrapper == "ratio" else TARGET
        assert all(length <= target + INTERVAL - 1 for length in lengths), (step, lengths)
        assert lengths == [expected[step - 1]] * len(lengths), (step, lengths, expected[step - 1])

    decode_step_by_step(model, press, random_input_ids(1, PROMPT), N_NEW, check)
    assert len(seen) == N_NEW + 1


@pytest.mark.parametrize("wrapper", ["decoding", "cam"])
def test_base_press_sees_the_states_since_the_last_compression_and_their_positions(wrapper):
    """As upstream, the buffer is emptied after every compression: the scorer gets the hidden states of the steps
    since the layer's last compression (the first compression, right after the prompt, also sees the prompt's last
    hidden_states_buffer_size tokens), with matching cos/sin."""
    model = get_model("llama")
    calls = []

    class Spy(KnormPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            cos, _ = kwargs["position_embeddings"]
            calls.append((hidden_states.shape[1], cos.shape[1], attentions, keys.shape[2], module.layer_idx))
            return super().score(module, hidden_states, keys, values, attentions, kwargs)

    cls = DecodingPress if wrapper == "decoding" else CAMPress
    press = cls(Spy(), compression_interval=INTERVAL, target_size=TARGET, hidden_states_buffer_size=6)
    decode_step_by_step(model, press, random_input_ids(1, PROMPT), 7, lambda step, cache: None)
    # Compressions at steps 1, 4 and 7 on both layers: 5 prompt tokens + step 1, then steps 2-4, then steps 5-7.
    assert [c[4] for c in calls] == [0, 1] * 3
    assert [c[0] for c in calls] == [6, 6, INTERVAL, INTERVAL, INTERVAL, INTERVAL]
    assert all(c[0] == c[1] for c in calls)
    assert [c[3] for c in calls] == [PROMPT + 1] * 2 + [TARGET + INTERVAL] * 4


def test_buffered_positions_are_the_true_positions():
    model = get_model("llama")
    seen = {}

    class Spy(KnormPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            seen["hidden"], seen["cos"] = hidden_states.clone(), kwargs["position_embeddings"][0].clone()
            return super().score(module, hidden_states, keys, values, attentions, kwargs)

    press = DecodingPress(Spy(), compression_interval=INTERVAL, target_size=TARGET, hidden_states_buffer_size=5)
    decode_step_by_step(model, press, random_input_ids(1, PROMPT), 1, lambda step, cache: None)
    # The last compression was layer 1 at step 1: tokens at positions 36..40.
    cos, _ = model.model.rotary_emb(seen["hidden"], torch.arange(PROMPT - 4, PROMPT + 1).unsqueeze(0))
    torch.testing.assert_close(seen["cos"], cos)


GENERATE_CASES = [(arch, ("decoding", "cam", "prefill_decoding")[i % 3]) for i, arch in enumerate(ARCHITECTURES)]


@pytest.mark.parametrize("arch, wrapper", GENERATE_CASES)
def test_model_generate_keeps_every_step_within_target(arch, wrapper):
    model = get_model(arch)
    press = make_wrapper(wrapper, SnapKVPress(window_size=2))
    with CacheRecorder(model, model) as recorder, torch.no_grad(), press(model):
        model.generate(random_input_ids(1, PROMPT), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    prefill, steps = recorder.lengths[0], recorder.lengths[1:]
    assert prefill == [int(PROMPT * 0.5) if wrapper == "prefill_decoding" else PROMPT] * len(prefill)
    # generate feeds N_NEW - 1 generated tokens back
    prompt = prefill[0]
    assert steps == [[n] * len(prefill) for n in expected_lengths(wrapper, N_NEW - 1, prompt)]


def test_adakv_base_masks_down_to_the_target():
    """With AdaKVPress as base, the cache is not shortened; masks leave at most the target per head on average."""
    model = get_model("llama")
    press = DecodingPress(AdaKVPress(KnormPress(), alpha_safeguard=0.2), INTERVAL, TARGET)
    attention = model.model.layers[0].self_attn
    expected = expected_lengths("decoding", N_NEW)

    def check(step, cache):
        length = layer_lengths(model, cache)[0]
        assert length == PROMPT + step  # masked, not removed
        if step == 0:
            return
        masks = attention.masked_key_indices
        n_masked = len({(int(b), int(h), int(s)) for b, h, s in zip(*masks)})
        live = 2 * length - n_masked  # 2 KV heads
        assert live <= 2 * expected[step - 1], (step, live)
        assert all(int(s) < length for s in masks[2])

    decode_step_by_step(model, press, random_input_ids(1, PROMPT), N_NEW, check)


def test_decoding_press_in_quantized_cache():
    from tests.test_quantized_cache import Int8Cache

    model = get_model("llama")
    press = DecodingPress(KnormPress(), INTERVAL, TARGET)
    expected = expected_lengths("decoding", 10)
    seen = []
    decode_step_by_step(
        model,
        press,
        random_input_ids(1, PROMPT),
        10,
        lambda step, cache: seen.append(layer_lengths(model, cache)[0]),
        cache=Int8Cache(model.config.num_hidden_layers, residual_length=4),
    )
    assert seen == [PROMPT] + expected


# ------------------------------------------------------------------------------------- kept tokens


class FullCacheGrabber:
    """Forward hook on the attention layers, registered before the press's: each layer's cache before compression."""

    def __init__(self, model):
        self.model, self.caches = model, {}

    def __enter__(self):
        def grab(module, args, kwargs, output):
            keys, values = extract_keys_and_values(find_cache(kwargs), module.layer_idx)
            self.caches[module.layer_idx] = (keys.clone(), values.clone())

        layers = [self.model.model.layers[i].self_attn for i in compressed_layers(self.model)]
        self.handles = [layer.register_forward_hook(grab, with_kwargs=True) for layer in layers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_decoding_press_keeps_the_best_scored_tokens_in_positional_order():
    model = get_model("llama")
    press = DecodingPress(KnormPress(), compression_interval=INTERVAL, target_size=TARGET)
    compressions = []

    def check(step, cache):
        if step == 0 or expected_lengths("decoding", step)[-1] != TARGET:
            return
        for i in compressed_layers(model):
            full_keys, full_values = grabber.caches[i]
            keys, values = extract_keys_and_values(cache, i)
            # reference: the 8 smallest key norms of the cache before compression, in positional order
            kept = (-full_keys.norm(dim=-1)).topk(TARGET, dim=-1).indices.sort(dim=-1).values
            index = kept.unsqueeze(-1).expand(-1, -1, -1, full_keys.shape[-1])
            torch.testing.assert_close(keys, full_keys.gather(2, index))
            torch.testing.assert_close(values, full_values.gather(2, index))
        compressions.append(step)

    with FullCacheGrabber(model) as grabber:
        decode_step_by_step(model, press, random_input_ids(1, PROMPT), 10, check)
    assert compressions == [1, 4, 7, 10]


def test_streaming_llm_base_keeps_sinks_and_the_most_recent_tokens():
    """Kept tokens stay in positional order, so StreamingLLM during decoding keeps the sinks and the newest."""
    model = get_model("llama")
    prompt, tokens = random_input_ids(1, PROMPT), random_input_ids(1, 10, seed=1)
    press = DecodingPress(StreamingLLMPress(n_sink=2), compression_interval=INTERVAL, target_size=TARGET)
    lengths = expected_lengths("decoding", 10)

    def check(step, cache):
        if step == 0:
            return
        total = PROMPT + step
        positions = [0, 1] + list(range(total - (lengths[step - 1] - 2), total))
        # Layer 0's keys depend only on the tokens and positions (later layers see the compressed cache).
        torch.testing.assert_close(extract_keys_and_values(cache, 0)[0], full_keys[:, :, positions])

    full = decode_step_by_step(model, PrefillDecodingPress(), prompt, 10, lambda step, cache: None, tokens=tokens)
    full_keys = extract_keys_and_values(full, 0)[0]
    decode_step_by_step(model, press, prompt, 10, check, tokens=tokens)


def test_masks_of_a_prefill_press_are_removed_first_and_remapped():
    scores = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]])
    module = SimpleNamespace(
        masked_key_indices=(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1]), torch.tensor([1, 5, 2]))
    )
    lowered = lower_masked_scores(module, scores)
    assert lowered[0, 0, 1] == float("-inf") and lowered[0, 1, 5] == float("-inf") and lowered[0, 1, 2] < -1e30
    kept = lowered.topk(4, dim=-1).indices.sort(dim=-1).values
    assert kept.tolist() == [[[0, 2, 3, 4], [0, 1, 3, 4]]]
    remap_masked_key_indices(module, kept, 6)
    assert module.masked_key_indices is None  # every masked entry was removed
    # When a head cannot drop all its masked entries, the rest move to their new positions.
    module.masked_key_indices = (torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1]), torch.tensor([0, 3, 5]))
    kept = torch.tensor([[[1, 2, 4, 5], [1, 2, 3, 4]]])
    remap_masked_key_indices(module, kept, 6)
    assert [t.tolist() for t in module.masked_key_indices] == [[0], [1], [2]]


def test_prefill_adakv_then_decoding_press():
    model = get_model("llama")
    press = PrefillDecodingPress(AdaKVPress(KnormPress(0.5)), DecodingPress(KnormPress(), INTERVAL, TARGET))
    seen = []

    def check(step, cache):
        seen.append(layer_lengths(model, cache)[0])
        masks = model.model.layers[0].self_attn.masked_key_indices
        if step > 0 and masks is not None:
            assert all(int(s) < seen[-1] for s in masks[2])

    decode_step_by_step(model, press, random_input_ids(1, PROMPT), 6, check)
    assert seen == [PROMPT] + expected_lengths("decoding", 6)


# ------------------------------------------------------------------------------------- CAM


def test_cam_merge_equals_direct_computation():
    """Constructed case where every merge probability is 0 or 1 (so Bernoulli is deterministic)."""
    torch.manual_seed(0)
    target, merge_budget, n_steps = 5, 3, 3
    order = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 5.0, 4.0, 0.5])  # mean score per position

    class Fixed(ScorerPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            return torch.stack([order + 0.25, order - 0.25]).unsqueeze(0)  # head mean == order

    press = CAMPress(Fixed(), compression_interval=1, target_size=target, merge_budget=merge_budget)
    press.layer_step_counts[0] = n_steps
    keys, values = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    running = torch.rand(1, 2, 10) + 0.5
    running[0, 1, :] = running[0, 1, :] * 0 + 1.0
    running[0, 0, 5] = 100.0  # head 0: token 5 attended far more than its window -> p = 1
    running[0, 1, 5] = 0.0  # head 1: never attended -> p = 0
    running[0, 0, 3] = 100.0  # token 3 too (head 0), p = 1 in head 0; head 1 -> p = 1 (equal attention)
    module = SimpleNamespace(layer_idx=0)
    new_keys, new_values = press.compress(module, torch.zeros(1, 1, 8), keys, values, running.clone(), {})

    # Reference by hand. Kept = top-5 by score, in order: positions 0, 2, 4, 6, 7.
    kept = [0, 2, 4, 6, 7]
    # Evicted: 1, 3, 5, 8, 9 with scores 1, 2, 3, 4, 0.5; the 3 best are 8, 5, 3 -> merged in order 3, 5, 8.
    expected = values.clone()
    for head in range(2):
        for m in (3, 5, 8):
            window = [p for p in kept if p > m][:merge_budget]
            if not window:
                continue
            mean = running[0, head, window].mean()
            p = min(max(float(running[0, head, m] / mean), 0.0), 1.0)
            assert p in (0.0, 1.0)
            for w in window:
                expected[0, head, w] += p * values[0, head, m] / len(window)
    torch.testing.assert_close(new_values, expected[:, :, kept])
    torch.testing.assert_close(new_keys, keys[:, :, kept])
    torch.testing.assert_close(press._running_attn_sum[0], running[:, :, kept])
    # The merge changed the values of the window tokens of 3 and 5 (but not of token 8: no kept token after it)
    assert not torch.equal(new_values, values[:, :, kept])


def test_cam_recomputed_attention_equals_eager_attention():
    """Under sdpa CAM recomputes the current token's attention; the running sum equals eager's weights."""
    sums = {}
    for implementation in ("eager", "sdpa"):
        model = get_model("llama", implementation)
        press = CAMPress(KnormPress(), compression_interval=1000, target_size=1000)

        def record(step, cache, press=press, implementation=implementation):
            sums[implementation] = dict(press._running_attn_sum)  # the state is reset when the block exits

        decode_step_by_step(model, press, random_input_ids(1, 12), 5, record)
    for layer in (0, 1):
        assert sums["eager"][layer].shape == (1, 2, 17)
        torch.testing.assert_close(sums["sdpa"][layer], sums["eager"][layer], atol=1e-5, rtol=1e-4)
    # each step adds one softmax row (sums to 1 per head): 5 steps
    torch.testing.assert_close(sums["eager"][0].sum(dim=-1), torch.full((1, 2), 5.0), atol=1e-4, rtol=0)


def test_cam_with_an_adakv_base_uses_its_inner_scorer(caplog):
    """Upstream's registry ships `cam_adakv_snapkv`; CAM evicts the same tokens in every head, so the inner scorer
    ranks them (upstream fails at the first compression)."""
    model = get_model("llama")
    with caplog.at_level("WARNING", logger="kvpress.presses.cam_press"):
        press = CAMPress(AdaKVPress(SnapKVPress(window_size=2)), INTERVAL, TARGET)
    assert "inner SnapKVPress scores the tokens" in caplog.text
    seen = []
    decode_step_by_step(
        model, press, random_input_ids(1, PROMPT), 7, lambda step, cache: seen.append(layer_lengths(model, cache))
    )
    assert seen == [[PROMPT] * 2] + [[n] * 2 for n in expected_lengths("cam", 7)]


def test_cam_evicts_the_same_tokens_in_every_head():
    model = get_model("llama")
    press = CAMPress(RandomPress(seed=0), INTERVAL, TARGET)
    prompt = random_input_ids(1, PROMPT)
    full = decode_step_by_step(model, PrefillDecodingPress(), prompt, 1, lambda step, cache: None)
    cache = decode_step_by_step(model, press, prompt, 1, lambda step, cache: None)
    for i in compressed_layers(model):
        keys = extract_keys_and_values(cache, i)[0]
        full_keys = extract_keys_and_values(full, i)[0]
        # find each kept key in the full cache: same positions in both heads, increasing
        positions = [
            [int((full_keys[0, h] - keys[0, h, j]).abs().sum(-1).argmin()) for j in range(TARGET)] for h in range(2)
        ]
        assert positions[0] == positions[1] == sorted(positions[0])


# ------------------------------------------------------------------------------------- CompressionRatioDecodingPress


def test_compression_ratio_decoding_target_and_ratio_search():
    press = CompressionRatioDecodingPress(KnormPress(), compression_interval=4, target_compression_ratio=0.5)
    assert press._resolve_target_size({"position_ids": torch.tensor([[107]])}) == 54
    ratio = press._find_target_compression_ratio(58, 54)
    assert ratio == pytest.approx(1 - 54 / 58, abs=1e-3) and int(58 * (1 - ratio)) == 54
    assert press._find_target_compression_ratio(50, 54) == 0.0
    with pytest.raises(NotImplementedError, match="position_ids"):
        press._resolve_target_size({})
    assert "target_size" not in CompressionRatioDecodingPress.__init__.__code__.co_varnames


def test_target_ratio_search_is_exact_for_every_length():
    for length in range(1, 130):
        for target in range(1, length + 1):
            ratio = DecodingPress._find_target_compression_ratio(length, target)
            assert int(length * (1 - ratio)) == target, (length, target, ratio)


# ------------------------------------------------------------------------------------- pipeline

CONTEXT = "The quick brown fox jumps over the lazy dog, twice. "


def make_pipeline(arch="llama", chat=False):
    return KVPressTextGenerationPipeline(model=get_model(arch), tokenizer=load_tokenizer(chat), device="cpu")


@pytest.mark.parametrize("wrapper", ["decoding", "cam", "ratio", "prefill_decoding"])
def test_pipeline_keeps_every_step_within_target(wrapper, monkeypatch):
    pipe = make_pipeline()
    # no early stop at EOS, so the number of decoding steps is known exactly
    monkeypatch.setattr(pipe.model.generation_config, "eos_token_id", None)
    press = make_wrapper(wrapper, KnormPress())
    context_length = pipe.preprocess(CONTEXT, [""], "", 10_000)["context_ids"].shape[1]
    with CacheRecorder(pipe.model, pipe.model.model) as recorder:
        answer = pipe(CONTEXT, question="", press=press, max_new_tokens=N_NEW)["answer"]
    assert isinstance(answer, str)
    prefill, steps = recorder.lengths[0], recorder.lengths[1:]
    expected_prefill = int(context_length * 0.5) if wrapper == "prefill_decoding" else context_length
    assert prefill == [expected_prefill] * 2
    # question "" -> one forward for its token ("\n"), then one forward per generated token but the last
    assert len(steps) == N_NEW
    assert steps == [[n] * 2 for n in expected_lengths(wrapper, len(steps), expected_prefill)]


def test_standalone_equals_prefill_decoding_press_without_prefilling_press():
    pipe = make_pipeline()
    results = []
    for press in (
        DecodingPress(SnapKVPress(window_size=2), INTERVAL, TARGET),
        PrefillDecodingPress(None, DecodingPress(SnapKVPress(window_size=2), INTERVAL, TARGET)),
    ):
        with CacheRecorder(pipe.model, pipe.model.model) as recorder:
            answer = pipe(CONTEXT, question="Who?", press=press, max_new_tokens=N_NEW)["answer"]
        results.append((answer, recorder.lengths))
    assert results[0] == results[1]
    # and with model.generate
    model, prompt = get_model("llama"), random_input_ids(1, PROMPT)
    outputs = []
    for press in (
        DecodingPress(KnormPress(), INTERVAL, TARGET),
        PrefillDecodingPress(None, DecodingPress(KnormPress(), INTERVAL, TARGET)),
    ):
        with torch.no_grad(), press(model):
            outputs.append(model.generate(prompt, max_new_tokens=N_NEW, do_sample=False))
    assert torch.equal(outputs[0], outputs[1])


def test_decoding_press_changes_the_answer_only_through_the_cache():
    """A DecodingPress whose target is never reached gives the uncompressed answer."""
    pipe = make_pipeline()
    plain = pipe(CONTEXT, question="Who?", max_new_tokens=10)["answer"]
    untouched = pipe(CONTEXT, question="Who?", press=DecodingPress(KnormPress(), 4, 1000), max_new_tokens=10)
    assert untouched["answer"] == plain


@pytest.mark.parametrize(
    "factory",
    [
        lambda: DecodingPress(KnormPress(), INTERVAL, TARGET),
        lambda: DecodingPress(SnapKVPress(window_size=2), INTERVAL, TARGET),
        lambda: CAMPress(TOVAPress(), INTERVAL, TARGET),
        lambda: CompressionRatioDecodingPress(KnormPress(), INTERVAL, target_compression_ratio=0.5),
        lambda: PrefillDecodingPress(KnormPress(0.5), DecodingPress(ExpectedAttentionPress(), INTERVAL, TARGET)),
        lambda: PrefillDecodingPress(None, CAMPress(StreamingLLMPress(n_sink=2), INTERVAL, TARGET)),
    ],
)
def test_reusing_one_press_for_sequences_of_different_lengths(factory):
    model = get_model("llama")
    press = factory()
    wrapper = {DecodingPress: "decoding", CAMPress: "cam", CompressionRatioDecodingPress: "ratio"}
    inner = press.decoding_press if isinstance(press, PrefillDecodingPress) else press
    kind = wrapper[type(inner)]
    for prompt_length, n_new in ((PROMPT, 12), (25, 8)):
        with CacheRecorder(model, model) as recorder, torch.no_grad(), press(model):
            model.generate(
                random_input_ids(1, prompt_length, seed=prompt_length),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
            )
        prefill = recorder.lengths[0][0]
        if isinstance(press, PrefillDecodingPress) and press.prefilling_press is not None:
            assert prefill == int(prompt_length * 0.5)
        else:
            assert prefill == prompt_length
        assert [lengths[0] for lengths in recorder.lengths[1:]] == expected_lengths(kind, n_new - 1, prefill)


def test_pipeline_answers_several_questions_with_a_decoding_press():
    """Each question is answered from the compressed context: the same answers as one call per question."""
    pipe = make_pipeline()
    presses = {
        "decoding": lambda: DecodingPress(KnormPress(), INTERVAL, TARGET),
        "cam": lambda: PrefillDecodingPress(None, CAMPress(KnormPress())),
        "prefill_decoding": lambda: PrefillDecodingPress(KnormPress(0.5), DecodingPress(KnormPress(), 2, 12)),
    }
    questions = ["a?", "b?", "c?"]
    for make in presses.values():
        together = pipe(CONTEXT, questions=questions, press=make(), max_new_tokens=8)["answers"]
        assert together == [pipe(CONTEXT, question=q, press=make(), max_new_tokens=8)["answer"] for q in questions]
    # a PrefillDecodingPress without decoding press is a prefill press: several questions are fine
    out = pipe(CONTEXT, questions=["a?", "b?"], press=PrefillDecodingPress(KnormPress(0.5)), max_new_tokens=2)
    assert len(out["answers"]) == 2


# ------------------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match=r"H2OPress.*accumulates the attention.*KnormPress"):
        DecodingPress(H2OPress())
    with pytest.raises(ValueError, match=r"PyramidKVPress.*per-layer budgets.*KnormPress"):
        CAMPress(AdaKVPress(PyramidKVPress()))
    with pytest.raises(TypeError, match=r"ScorerPress that can score during decoding.*got ChunkPress"):
        DecodingPress(ChunkPress(KnormPress()))

    class NoDecoding(KnormPress):
        scores_during_decoding = False

    class NotSupported(KnormPress):
        supports_decoding = False

    with pytest.raises(ValueError, match="scores_during_decoding = False"):
        CompressionRatioDecodingPress(NoDecoding())
    with pytest.raises(ValueError, match="supports_decoding = False"):
        DecodingPress(NotSupported())
    with pytest.raises(ValueError, match="must not have a cache_budget"):
        DecodingPress(KnormPress(cache_budget=8))
    for kwargs, name in (
        ({"compression_interval": 0}, "compression_interval"),
        ({"target_size": -1}, "target_size"),
        ({"target_size": 2.5}, "target_size"),
        ({"hidden_states_buffer_size": -1}, "hidden_states_buffer_size"),
    ):
        with pytest.raises(ValueError, match=name):
            DecodingPress(KnormPress(), **kwargs)
    with pytest.raises(ValueError, match="merge_budget"):
        CAMPress(KnormPress(), merge_budget=0)
    with pytest.raises(ValueError, match="target_compression_ratio"):
        CompressionRatioDecodingPress(KnormPress(), target_compression_ratio=1.0)
    with pytest.raises(TypeError, match="decoding_press must be a DecodingPress"):
        PrefillDecodingPress(decoding_press=KnormPress(0.5))
    with pytest.raises(TypeError, match="pass it as decoding_press"):
        PrefillDecodingPress(prefilling_press=DecodingPress(KnormPress()))
    with pytest.raises(TypeError, match="prefilling_press must be a kvpress press"):
        PrefillDecodingPress(prefilling_press="snapkv")


def test_decoding_presses_declare_that_they_act_during_decoding():
    assert DecodingPress(KnormPress()).acts_during_decoding
    assert CAMPress(KnormPress()).acts_during_decoding
    assert CompressionRatioDecodingPress(KnormPress()).acts_during_decoding
    assert PrefillDecodingPress(KnormPress(0.5), DecodingPress(KnormPress())).acts_during_decoding
    assert not PrefillDecodingPress(KnormPress(0.5)).acts_during_decoding
    assert not hasattr(DecodingPress(KnormPress()), "compression_ratio")


def test_warns_that_the_base_ratio_is_overridden(caplog):
    with caplog.at_level("WARNING", logger="kvpress.presses.decoding_press"):
        DecodingPress(KnormPress(0.3))
    assert "ignored" in caplog.text


def test_prefill_decoding_compress_dispatches_by_phase():
    """`PrefillDecodingPress.compress` uses the prefilling press on a prefill and the decoding press on a decoding
    step (upstream's dispatch), read from the cache the forward received; with no press for the phase it warns."""
    model = get_model("llama")
    module = model.model.layers[0].self_attn
    calls = []

    class Recorder(KnormPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            calls.append(("prefill", keys.shape[2]))
            return keys, values

    class DecodingRecorder(DecodingPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            calls.append(("decoding", keys.shape[2]))
            return keys, values

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(random_input_ids(1, 12), **cache_kwargs(model, cache))
    keys = cache.layers[0].keys
    prompt_hidden, step_hidden = torch.zeros(1, 12, 64), torch.zeros(1, 1, 64)
    press = PrefillDecodingPress(Recorder(0.5), DecodingRecorder(KnormPress(), INTERVAL, TARGET))
    press.compress(module, prompt_hidden, keys, keys, None, cache_kwargs(model, cache))  # the cache holds the prompt
    step_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(random_input_ids(1, 13), **cache_kwargs(model, step_cache))  # 13 cached, a 1-token forward
    step_keys = step_cache.layers[0].keys
    press.compress(module, step_hidden, step_keys, step_keys, None, cache_kwargs(model, step_cache))
    assert calls == [("prefill", 12), ("decoding", 13)]
    # no decoding press: a decoding step is left alone, with upstream's warning
    only_prefill = PrefillDecodingPress(Recorder(0.5), None)
    out_keys, _ = only_prefill.compress(
        module, step_hidden, step_keys, step_keys, None, cache_kwargs(model, step_cache)
    )
    assert out_keys is step_keys and calls == [("prefill", 12), ("decoding", 13)]
