# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Issue 21, decoding presses: DecodingPress, PrefillDecodingPress and DMSPress against upstream's behaviour as the
spec describes it (the base press's `compress` with this step's attention weights, the buffer emptied after every
compression, state reset on exit, the bases accepted), and the decisions kept (documented in the README)."""

import pytest
import torch

from kvpress import (
    CapPress,
    ComposedPress,
    CriticalKVPress,
    CURPress,
    DMSPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    LagKVPress,
    ObservedAttentionPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.presses.decoding_press import DecodingPress
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.transformers_adapter import cache_kwargs, find_cache
from tests.fixtures import compressed_layers, get_model, random_input_ids
from tests.test_decoding_compression import decode_step_by_step


def attention_modules(model):
    return [model.model.layers[i].self_attn for i in compressed_layers(model)]


class AttentionRecorder:
    """Forward hooks (registered before the press's) that record, per layer and forward, the hidden states the
    attention received, its eager weights and the cache keys before the press changes them."""

    def __init__(self, model):
        self.model = model
        self.hidden, self.weights, self.keys = {}, {}, {}

    def __enter__(self):
        def hook(module, args, kwargs, output):
            layer = module.layer_idx
            self.hidden.setdefault(layer, []).append(kwargs["hidden_states"].detach().clone())
            self.weights.setdefault(layer, []).append(output[1].detach().clone() if output[1] is not None else None)
            cache = find_cache(kwargs)
            self.keys.setdefault(layer, []).append(cache.layers[layer].keys.detach().clone())

        self.handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(self.model)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ the buffer


def test_scorer_sees_exactly_the_states_since_the_last_compression():
    """compression_interval=4, a prompt shorter than the target: compressions at steps 4, 8 and 12. The second and
    third see exactly the 4 hidden states of the steps since the previous compression (upstream empties its buffer
    after every compression; the fork's buffer had grown to 41, 45, 49, 53 states); the first also sees the prompt's
    tokens, which nothing has compressed yet."""
    model = get_model("llama")
    prompt, target, interval = 6, 8, 4
    seen = []

    class Spy(KnormPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            seen.append((module.layer_idx, hidden_states.clone()))
            return super().score(module, hidden_states, keys, values, attentions, kwargs)

    press = DecodingPress(Spy(), compression_interval=interval, target_size=target)
    with AttentionRecorder(model) as recorder:
        decode_step_by_step(model, press, random_input_ids(1, prompt), 12, lambda step, cache: None)
    assert [layer for layer, _ in seen] == [0, 1] * 3
    for index, (layer, hidden_states) in enumerate(seen):
        forwards = recorder.hidden[layer]  # forward 0 is the prefill, forward s is step s
        compression = index // 2
        if compression == 0:
            expected = torch.cat(forwards[0:5], dim=1)  # the prompt, then steps 1-4
        else:
            expected = torch.cat(forwards[4 * compression + 1 : 4 * compression + 5], dim=1)
        assert hidden_states.shape[1] == (prompt + 4 if compression == 0 else 4)
        assert torch.equal(hidden_states, expected)


def test_a_window_longer_than_the_interval_keeps_its_queries():
    """SnapKV's window of 6 queries with compression_interval=2 (upstream raises at the second compression: its
    buffer holds 2 states): the buffer keeps the window across compressions, so every compression scores with the
    true hidden states of the last 6 tokens and the cache stays within target + interval - 1."""
    model = get_model("llama")
    prompt, target, interval, window = 12, 10, 2, 6
    seen = []

    class Spy(SnapKVPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            seen.append((module.layer_idx, hidden_states.clone()))
            return super().score(module, hidden_states, keys, values, attentions, kwargs)

    press = DecodingPress(Spy(window_size=window), compression_interval=interval, target_size=target)
    lengths = []
    with AttentionRecorder(model) as recorder:
        decode_step_by_step(
            model,
            press,
            random_input_ids(1, prompt),
            9,
            lambda step, cache: lengths.append(cache.layers[0].keys.shape[2]),
        )
    assert all(target <= n <= target + interval - 1 for n in lengths[1:]), lengths
    assert len(seen) >= 8
    for layer, hidden_states in seen:
        assert hidden_states.shape[1] >= window
        # the last `window` buffered states are those of the last `window` tokens fed to the model
        fed = torch.cat(recorder.hidden[layer], dim=1)
        matches = [
            end
            for end in range(window, fed.shape[1] + 1)
            if torch.equal(hidden_states[:, -window:], fed[:, end - window : end])
        ]
        assert matches, "the scorer got hidden states that are not the last tokens'"


def test_cap_and_expected_attention_score_a_window_shorter_than_their_sinks():
    """A window of recent tokens during decoding holds no sink: with compression_interval=2 and n_sink=4, CapPress
    and ExpectedAttentionPress anchor on the 2 buffered states (upstream drops n_sink of them and gets NaN)."""
    model = get_model("llama")
    for base in (CapPress, ExpectedAttentionPress):
        seen = []

        class Spy(base):  # type: ignore[valid-type, misc]
            def score(self, module, hidden_states, keys, values, attentions, kwargs):
                scores = super().score(module, hidden_states, keys, values, attentions, kwargs)
                seen.append((hidden_states.shape[1], bool(torch.isfinite(scores).all())))
                return scores

        press = DecodingPress(Spy(), compression_interval=2, target_size=12)
        decode_step_by_step(model, press, random_input_ids(1, 8), 12, lambda step, cache: None)
        later = seen[2:]  # the first compression also sees the prompt's last states
        assert later and all(n == 2 and finite for n, finite in later), (base.__name__, seen)


def test_state_is_reset_when_the_block_exits():
    """Upstream resets DecodingPress (and PrefillDecodingPress's decoding press) when the `with` block exits,
    an exception included; ours also restarts each layer at every prefill."""
    model = get_model("llama")
    for press in (
        DecodingPress(KnormPress(), compression_interval=100, target_size=100),
        PrefillDecodingPress(KnormPress(0.5), DecodingPress(KnormPress(), compression_interval=100, target_size=100)),
        # inside a ComposedPress the inner press's block never opens: the composed press resets it on exit
        ComposedPress([KnormPress(0.2), DecodingPress(KnormPress(), compression_interval=100, target_size=100)]),
    ):
        if isinstance(press, ComposedPress):
            decoding = press.presses[1]
        else:
            decoding = press if isinstance(press, DecodingPress) else press.decoding_press
        inside = {}

        def record(step, cache, decoding=decoding):
            buffered = {layer: tokens.n_tokens for layer, tokens in decoding.recent_tokens.items()}
            inside[step] = (dict(decoding.layer_step_counts), buffered)

        decode_step_by_step(model, press, random_input_ids(1, 10), 3, record)
        assert inside[3][0] == {0: 3, 1: 3}  # the state lived during the block
        assert dict(decoding.layer_step_counts) == {} and dict(decoding.recent_tokens) == {}
        with pytest.raises(RuntimeError, match="boom"):
            with torch.no_grad(), press(model):
                model(random_input_ids(1, 10))
                decoding.layer_step_counts[0] = 7
                raise RuntimeError("boom")
        assert dict(decoding.layer_step_counts) == {}


# --------------------------------------------------------------------------- the base's compress, with attentions


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_base_compress_gets_this_steps_attention_weights(implementation):
    """Upstream calls `base_press.compress(..., attentions=output[1], ...)`: the step's eager weights, None else."""
    model = get_model("llama", implementation)
    calls = []

    class Spy(KnormPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            calls.append((self.compression_ratio, None if attentions is None else tuple(attentions.shape)))
            return super().compress(module, hidden_states, keys, values, attentions, kwargs)

    press = DecodingPress(Spy(), compression_interval=4, target_size=4)
    decode_step_by_step(model, press, random_input_ids(1, 4), 4, lambda step, cache: None)
    # step 4: 8 tokens, pruned to 4 through the ratio 0.5; the spy's ratio is restored afterwards
    expected = (1, 4, 1, 8) if implementation == "eager" else None
    assert calls == [(0.5, expected)] * 2
    assert press.base_press.compression_ratio == 0.0


def reference_observed_attention_kept(recorder: AttentionRecorder, layer: int, steps: range, target: int):
    """Kept positions of the cache at the last of `steps` by the mean attention each key received from the queries
    of `steps` (their recorded eager rows, right-padded; no eviction happened in between), GQA-group mean."""
    rows = [recorder.weights[layer][s][0, :, -1] for s in steps]  # (H, T_s)
    k_len = rows[-1].shape[-1]
    sums = torch.stack([torch.nn.functional.pad(r, (0, k_len - r.shape[-1])) for r in rows]).sum(dim=0)
    n_queries = (k_len - torch.arange(k_len)).clamp(max=len(steps)).float()
    scores = (sums / n_queries).view(2, 2, k_len).mean(dim=1)  # 4 query heads, 2 KV heads
    return scores.topk(target, dim=-1).indices.sort(dim=-1).values


def test_observed_attention_base_is_accepted_and_scores_the_buffered_queries():
    """ObservedAttention as base (upstream accepts it): every compression keeps the tokens with the most mean
    attention from the queries since the last compression (upstream, under eager, would use only the current
    query; under sdpa it asserts), and sdpa keeps the same tokens as eager."""
    target, interval, prompt = 6, 4, 4
    kept = {}
    for implementation in ("eager", "sdpa"):
        model = get_model("llama", implementation)
        press = DecodingPress(ObservedAttentionPress(), compression_interval=interval, target_size=target)
        caches = {}
        with AttentionRecorder(model) as recorder:
            decode_step_by_step(
                model, press, random_input_ids(1, prompt), 8, lambda step, cache: caches.setdefault(step, cache)
            )
        kept[implementation] = [caches[8].layers[layer].keys.clone() for layer in (0, 1)]
        if implementation == "eager":
            for layer in (0, 1):
                # compression at step 8 (steps 5-8 since the one at step 4); keys before it: recorded at step 8
                indices = reference_observed_attention_kept(recorder, layer, range(5, 9), target)
                keys_before = recorder.keys[layer][8][0]
                expected = torch.stack([keys_before[h, indices[h]] for h in range(2)])
                torch.testing.assert_close(kept["eager"][layer][0], expected)
    for layer in (0, 1):
        torch.testing.assert_close(kept["sdpa"][layer], kept["eager"][layer], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "base, reason",
    [
        ("PyramidKVPress", "per-layer budgets"),
        ("H2OPress", "accumulates the attention"),
        ("KVzapPress", "predicts one score per hidden state"),
        ("CompactorPress", "hidden states of every cached token"),
        ("LeverageScorePress", "hidden states of every cached token"),
        ("NonCausalAttnPress", "hidden states of every cached token"),
    ],
)
def test_refused_bases_say_why(base, reason):
    import kvpress

    with pytest.raises(ValueError, match=f"cannot use {base} during decoding: .*{reason}"):
        DecodingPress(getattr(kvpress, base)())
    with pytest.raises(ValueError, match="budget would prune the cache through the press's own hook"):
        DecodingPress(KnormPress(cache_budget=8))


# ---------------------------------------------------------------------------------------------- DMSPress


@pytest.mark.parametrize(
    "scorer",
    [TOVAPress, KeyDiffPress, LagKVPress, CURPress, ObservedAttentionPress, lambda: CriticalKVPress(KnormPress())],
    ids=["tova", "keydiff", "lagkv", "cur", "observed_attention", "criticalkv"],
)
def test_dms_decoding_accepts_scorers_that_score_one_token(scorer):
    """As upstream, DMSPress(decoding=True) scores each new token alone; these scorers run on one token, so they are
    accepted. The masks are the entries whose score (the scorer's own, on the token alone) was below the threshold
    once they left the window."""
    model = get_model("llama")
    window, threshold, prompt, n_new = 3, 0.0, 12, 6
    press = DMSPress(scorer(), threshold=threshold, sliding_window_size=window, decoding=True)
    scores = {0: [], 1: []}
    inner = press.press
    original = inner.score

    def spy(module, hidden_states, keys, values, attentions, kwargs):
        assert attentions is None  # as upstream, also in prefill
        out = original(module, hidden_states, keys, values, attentions, kwargs)
        scores[module.layer_idx].append(out.clone())
        return out

    inner.score = spy
    masks = {}
    decode_step_by_step(
        model,
        press,
        random_input_ids(1, prompt),
        n_new,
        lambda step, cache: masks.update({step: [m.masked_key_indices for m in attention_modules(model)]}),
    )
    for layer in (0, 1):
        all_scores = torch.cat(scores[layer], dim=-1)[0]  # (H_kv, prompt + n_new)
        decided = prompt + n_new - window
        expected = {(0, h, t) for h in range(2) for t in range(decided) if all_scores[h, t] < threshold}
        indices = masks[n_new][layer]
        got = set() if indices is None else set(zip(*(i.tolist() for i in indices)))
        assert got == expected


@pytest.mark.parametrize(
    "scorer, reason",
    [
        (SnapKVPress, "observation window"),
        (StreamingLLMPress, "where a token sits"),
        (ExpectedAttentionPress, "more than n_sink"),
        (CapPress, "more than n_sink"),
    ],
)
def test_dms_decoding_refuses_scorers_that_cannot_score_one_token(scorer, reason):
    """Upstream accepts them and fails with an AssertionError at the first generated token; ours says why at once."""
    with pytest.raises(ValueError, match=f"{scorer.__name__} cannot do: .*{reason}"):
        DMSPress(scorer(), threshold=0.0, decoding=True)
    DMSPress(scorer(), threshold=0.0)  # prefill only: the prompt is scored as a whole


def test_dms_prefill_scores_are_the_same_under_eager_and_sdpa():
    """DMS passes no attention weights (upstream), so an attention scorer recomputes them: same masks under both."""
    masks = {}
    for implementation in ("eager", "sdpa"):
        model = get_model("llama", implementation)
        press = DMSPress(TOVAPress(), threshold=0.05, sliding_window_size=4)
        decode_step_by_step(model, press, random_input_ids(1, 24), 0, lambda step, cache: None)
        masks[implementation] = [
            set(zip(*(i.tolist() for i in m.masked_key_indices))) for m in attention_modules(model)
        ]
    assert masks["eager"] == masks["sdpa"]
    assert all(len(m) > 0 for m in masks["eager"])


@pytest.mark.parametrize("base, first_compression", [(KnormPress, 1), (lambda: SnapKVPress(window_size=4), 4)])
def test_early_compression_waits_for_the_scorers_observations(base, first_compression):
    """The prefill in one block, the decoding steps in another (the state is reset in between, as upstream): the
    early compression (cache above target + interval - 1) needs the scorer's observations, so a SnapKV base with a
    window of 4 waits for 4 buffered steps (upstream's interval trigger), while Knorm, which reads no hidden state,
    compresses at the first step."""
    from transformers import DynamicCache

    model = get_model("llama")
    press = DecodingPress(base(), compression_interval=4, target_size=24)
    cache = DynamicCache(config=model.config)
    lengths = []
    with torch.no_grad():
        with press(model):
            logits = model(random_input_ids(1, 40), **cache_kwargs(model, cache)).logits
        with press(model):
            token = logits[:, -1:].argmax(-1)
            for step in range(6):
                logits = model(
                    input_ids=token, position_ids=torch.tensor([[40 + step]]), **cache_kwargs(model, cache)
                ).logits
                token = logits[:, -1:].argmax(-1)
                lengths.append(cache.layers[0].keys.shape[2])
    expected = [41 + step if step + 1 < first_compression else None for step in range(6)]
    assert lengths[first_compression - 1] == 24
    assert [n for n, e in zip(lengths, expected) if e is not None] == [e for e in expected if e is not None]


def _matrix_entries():
    from kvpress import PyramidKVPress
    from tests.default_presses import default_presses, eager_presses

    entries = default_presses + eager_presses + [{"cls": PyramidKVPress, "kwargs": [{"window_size": 2}]}]
    return [
        (entry["cls"], {k: v for k, v in entry["kwargs"][-1].items() if k != "compression_ratio"}) for entry in entries
    ]


# upstream's decoding tests use every default ScorerPress but these as a base (H2O is the reasoning fork's)
REFUSED_BASES = {
    "PyramidKVPress",
    "CompactorPress",
    "NonCausalAttnPress",
    "LeverageScorePress",
    "KVzapPress",
    "H2OPress",
}


@pytest.mark.parametrize("cls, kwargs", _matrix_entries(), ids=lambda v: getattr(v, "__name__", ""))
def test_every_default_scorer_as_base_keeps_the_target(cls, kwargs):
    """Upstream's matrix: each default scorer as DecodingPress base keeps target <= length <= target + interval - 1
    at every step (the bases upstream's tests leave out are refused here, each with its reason)."""
    if cls.__name__ in REFUSED_BASES:
        with pytest.raises(ValueError, match=f"cannot use {cls.__name__} during decoding"):
            DecodingPress(cls(**kwargs))
        return
    model = get_model("llama")
    # an interval below the 4 sinks of CapPress and ExpectedAttention: a window of recent hidden states holds no sink,
    # so none of it is dropped (upstream drops n_sink of them: NaN scores for an interval <= n_sink)
    target, interval = 16, 3
    press = DecodingPress(cls(**kwargs), compression_interval=interval, target_size=target)
    lengths = []
    decode_step_by_step(
        model, press, random_input_ids(1, 40), 13, lambda step, cache: lengths.append(cache.layers[0].keys.shape[2])
    )
    assert all(target <= n <= target + interval - 1 for n in lengths[1:]), lengths
