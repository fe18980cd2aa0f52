# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Chunked prefill (`kvpress.chunked_prefill`, pipeline `prefill_chunk_size`).

- one chunk (chunk size >= context length) is today's prefill: same cache, logits and answers, for every press;
- with smaller chunks, what Knorm and StreamingLLM keep is pinned against a hand-written loop (the decoder run chunk
  by chunk without a press, each layer pruned by hand), StreamingLLM against the unchunked positions (exact), and
  every press that declares support keeps exactly the unchunked number of tokens, at logical positions;
- presses that cannot chunk refuse with an error naming the alternatives.
"""

import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    ChunkPress,
    KnormPress,
    KVPressTextGenerationPipeline,
    KVzapPress,
    LeverageScorePress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
)
from kvpress.chunked_prefill import (
    check_chunk_size,
    chunk_bounds,
    chunk_ratio,
    chunked_prefill,
    presses_supporting_chunked_prefill,
)
from kvpress.transformers_adapter import cache_kwargs, find_cache
from kvpress.utils import extract_keys_and_values, get_language_model, write_keys_and_values
from tests.default_presses import default_presses, eager_presses
from tests.fixtures import get_model, load_tokenizer

LENGTH = 72
CHUNK = 16


def _ids(length: int = LENGTH, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


def _unchunked(model, ids, press):
    """Today's prefill, written out: one forward inside the press, logits of the last position."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model) if press is not None else _nothing():
        logits = model(input_ids=ids, logits_to_keep=1, **cache_kwargs(model, cache)).logits
    return cache, logits


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _chunked(model, ids, press, chunk_size):
    cache = DynamicCache(config=model.config)
    logits = chunked_prefill(model, ids, cache, press=press, chunk_size=chunk_size)
    return cache, logits


def _layers(model, cache):
    """`(keys, values)` of every compressed (not sliding-window) layer."""
    return [
        extract_keys_and_values(cache, layer.self_attn.layer_idx)
        for layer in get_language_model(model).layers
        if not getattr(layer.self_attn, "is_sliding", False)
    ]


def _matrix(entries, attn):
    return [
        pytest.param(entry["cls"], kwargs, attn, id=f"{entry['cls'].__name__}-{i}-{attn}")
        for entry in entries
        for i, kwargs in enumerate(entry["kwargs"])
    ]


MATRIX = _matrix(default_presses, "sdpa") + _matrix(eager_presses, "eager")


# ---- one chunk is today's prefill --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs,attn", MATRIX)
@pytest.mark.parametrize("chunk_size", [LENGTH, 4 * LENGTH])
def test_one_chunk_is_the_unchunked_prefill(cls, kwargs, attn, chunk_size):
    model = get_model("llama", attn)
    ids = _ids()
    torch.manual_seed(0)  # presses that sample (Random, sketches) draw the same numbers in both runs
    reference, reference_logits = _unchunked(model, ids, cls(**kwargs))
    torch.manual_seed(0)
    cache, logits = _chunked(model, ids, cls(**kwargs), chunk_size)
    assert torch.equal(logits, reference_logits)
    for (keys, values), (ref_keys, ref_values) in zip(_layers(model, cache), _layers(model, reference)):
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)


def _pipe():
    return KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(False), device="cpu")


CONTEXT = "The quick brown fox jumps over the lazy dog. " * 4


@pytest.mark.parametrize("press", [None, KnormPress(0.5), SnapKVPress(0.5, window_size=2), StreamingLLMPress(0.7)])
def test_pipeline_answers_are_unchanged_with_one_chunk(press):
    pipe = _pipe()
    expected = pipe(CONTEXT, question="Who?", press=press, max_new_tokens=6)["answer"]
    assert pipe(CONTEXT, question="Who?", press=press, max_new_tokens=6, prefill_chunk_size=10_000)["answer"] == (
        expected
    )


# ---- without a press: same cache and logits, one chunk of activations at a time ------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3_text"])
def test_no_press_chunked_equals_unchunked(arch):
    model = get_model(arch)
    ids = _ids(batch=2)
    reference, reference_logits = _unchunked(model, ids, None)
    cache, logits = _chunked(model, ids, None, CHUNK)
    assert logits.shape == (2, 1, model.config.vocab_size)  # the last position only
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-4)
    for layer, ref_layer in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-4)


def test_no_press_computes_no_logits_for_context_tokens():
    model = get_model("llama")
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    try:
        _chunked(model, _ids(), None, CHUNK)
    finally:
        handle.remove()
    assert shapes == [(1, 1, model.config.hidden_size)]


# ---- what each press family keeps, against a hand-written reference --------------------------------------------


def _n_kept(length: int, ratio: float) -> int:
    return int(length * (1 - ratio))


def _reference_loop(model, ids, prune):
    """The decoder run chunk by chunk with no press, at logical positions; after each chunk every layer is pruned by
    `prune(keys, positions, end) -> kept indices (B, H, n)`. Returns the cache and each layer's kept positions."""
    cache = DynamicCache(config=model.config)
    batch = ids.shape[0]
    heads = model.config.num_key_value_heads
    positions: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for start, end in chunk_bounds(ids.shape[1], CHUNK):
            position_ids = torch.arange(start, end).unsqueeze(0).expand(batch, -1)
            model.model(input_ids=ids[:, start:end], position_ids=position_ids, **cache_kwargs(model.model, cache))
            for layer in model.model.layers:
                index = layer.self_attn.layer_idx
                new = torch.arange(start, end).expand(batch, heads, -1)
                positions[index] = torch.cat([positions[index], new], -1) if index in positions else new
                keys, values = extract_keys_and_values(cache, index)
                kept = prune(keys, positions[index], end)
                gather = kept.unsqueeze(-1).expand(*kept.shape, keys.shape[-1])
                write_keys_and_values(cache, index, keys.gather(2, gather), values.gather(2, gather))
                positions[index] = positions[index].gather(-1, kept)
    return cache, positions


def test_knorm_chunked_keeps_the_top_norms_of_each_chunk_and_the_previously_kept():
    ratio = 0.6
    model = get_model("llama")
    ids = _ids(batch=2)

    def prune(keys, positions, end):
        n = _n_kept(end, ratio)
        return (-keys.norm(dim=-1)).topk(n, dim=-1).indices.sort(dim=-1).values

    reference, _ = _reference_loop(model, ids, prune)
    cache, _ = _chunked(model, ids, KnormPress(ratio), CHUNK)
    for layer, ref_layer in zip(cache.layers, reference.layers):
        assert layer.keys.shape[2] == _n_kept(LENGTH, ratio)
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-4)


def test_knorm_chunked_differs_from_unchunked_where_a_greedy_choice_must():
    """Approximate, not exact: the chunked cache is not the unchunked top norms (the earlier chunks were pruned to
    their own budget before the later ones were seen)."""
    model = get_model("llama")
    ids = _ids()
    full, _ = _unchunked(model, ids, None)
    cache, _ = _chunked(model, ids, KnormPress(0.6), CHUNK)
    # layer 0: keys depend only on the token and its position, so the kept keys are rows of the full prefill's
    keys, full_keys = cache.layers[0].keys, full.layers[0].keys
    kept = (keys[..., None, :] - full_keys[..., None, :, :]).abs().amax(-1).argmin(-1)
    unchunked = (-full_keys.norm(dim=-1)).topk(keys.shape[2], dim=-1).indices.sort(dim=-1).values
    torch.testing.assert_close(keys, full_keys.gather(2, kept[..., None].expand_as(keys)), atol=1e-5, rtol=1e-4)
    assert not torch.equal(kept, unchunked)


@pytest.mark.parametrize("n_sink", [0, 3])
def test_streaming_llm_chunked_is_exact(n_sink):
    ratio = 0.7
    model = get_model("llama")
    ids = _ids()

    def prune(keys, positions, end):
        n = _n_kept(end, ratio)
        length = keys.shape[2]
        kept = list(range(n_sink)) + list(range(length - (n - n_sink), length))
        return torch.tensor(kept).expand(*keys.shape[:2], -1)

    reference, positions = _reference_loop(model, ids, prune)
    n = _n_kept(LENGTH, ratio)
    expected = torch.tensor(list(range(n_sink)) + list(range(LENGTH - (n - n_sink), LENGTH)))
    for index, kept in positions.items():
        assert torch.equal(kept[0, 0], expected)  # the unchunked StreamingLLM's positions
    cache, _ = _chunked(model, ids, StreamingLLMPress(ratio, n_sink=n_sink), CHUNK)
    for layer, ref_layer in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-4)
    # layer 0 holds exactly the unchunked press's keys
    unchunked, _ = _unchunked(model, ids, StreamingLLMPress(ratio, n_sink=n_sink))
    torch.testing.assert_close(cache.layers[0].keys, unchunked.layers[0].keys, atol=1e-5, rtol=1e-4)


SUPPORTED = [param for param in MATRIX if param.values[0].chunked_prefill != "unsupported"]
UNSUPPORTED = [param for param in MATRIX if param.values[0].chunked_prefill == "unsupported"]


@pytest.mark.parametrize("cls,kwargs,attn", SUPPORTED)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_supported_press_keeps_the_unchunked_size_at_logical_positions(cls, kwargs, attn, arch):
    model = get_model(arch, attn)
    ids = _ids()
    sizes: list[int] = []
    layers = get_language_model(model).layers
    compressed = [layer.self_attn.layer_idx for layer in layers if not getattr(layer.self_attn, "is_sliding", False)]

    def after_chunk(module, args, kwargs_, output):
        cache = find_cache(kwargs_)
        sizes.append(cache.layers[compressed[0]].keys.shape[2])

    full, _ = _unchunked(model, ids, None)
    reference, _ = _unchunked(model, ids, cls(**kwargs))
    handle = model.model.register_forward_hook(after_chunk, with_kwargs=True)
    try:
        cache, _ = _chunked(model, ids, cls(**kwargs), CHUNK)
    finally:
        handle.remove()
    ratio = kwargs["compression_ratio"]
    # after the chunk ending at L the cache holds what the press keeps of L tokens; the last is the unchunked size
    assert sizes == [_n_kept(end, ratio) for _, end in chunk_bounds(LENGTH, CHUNK)]
    assert [k.shape for k, _ in _layers(model, cache)] == [k.shape for k, _ in _layers(model, reference)]
    # the first compressed layer's keys depend only on tokens and positions: every kept key is the full prefill's
    # key of the same token at its logical position
    first = compressed[0]
    keys, full_keys = cache.layers[first].keys, full.layers[first].keys
    distance = (keys[..., None, :] - full_keys[..., None, :, :]).abs().amax(-1).amin(-1)
    assert distance.max() < 1e-4


@pytest.mark.parametrize("cls,kwargs,attn", UNSUPPORTED)
def test_unsupported_press_refuses_naming_alternatives(cls, kwargs, attn):
    model = get_model("llama", attn)
    with pytest.raises(ValueError, match=rf"{cls.__name__} does not support chunked prefill.*StreamingLLMPress"):
        _chunked(model, _ids(), cls(**kwargs), CHUNK)


@pytest.mark.parametrize(
    "press",
    [ChunkPress(KnormPress(0.5), chunk_length=8), PyramidKVPress(0.5, window_size=2), LeverageScorePress(0.5)],
    ids=lambda press: type(press).__name__,
)
def test_wrappers_and_per_layer_budgets_refuse(press):
    with pytest.raises(ValueError, match="does not support chunked prefill.*prefill_chunk_size=None"):
        _chunked(get_model("llama"), _ids(), press, CHUNK)


def test_kvzap_is_unsupported_and_listed_nowhere():
    found = presses_supporting_chunked_prefill()
    assert "StreamingLLMPress" in found["exact"] and "KnormPress" in found["approximate"]
    assert KVzapPress.chunked_prefill == "unsupported"
    assert all("KVzapPress" not in names for names in found.values())


def test_budget_press_prunes_each_chunk_to_its_budget():
    model = get_model("llama")
    ids = _ids()
    press = KnormPress(cache_budget=20)
    lengths: list[int] = []
    handle = model.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, kwargs, output: lengths.append(int(output[0].shape[1])), with_kwargs=True
    )
    try:
        cache, _ = _chunked(model, ids, press, CHUNK)
    finally:
        handle.remove()
    assert lengths == [end - start for start, end in chunk_bounds(LENGTH, CHUNK)]
    assert [layer.keys.shape[2] for layer in cache.layers] == [20] * len(cache.layers)


# ---- the arithmetic of a chunk's ratio, and bad input -----------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.8, 0.9, 0.999])
def test_chunk_ratio_lands_on_the_unchunked_size_for_every_chunking(ratio):
    for length in range(1, 400, 7):
        for chunk in (1, 3, 64, 333):
            kept = 0
            for start, end in chunk_bounds(length, chunk):
                cached = kept + (end - start)
                target = _n_kept(end, ratio)
                assert int(cached * (1 - chunk_ratio(cached, target))) == target
                kept = target
            assert kept == _n_kept(length, ratio)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "16"])
def test_bad_chunk_sizes_raise(bad):
    with pytest.raises(ValueError, match="positive integer"):
        check_chunk_size(bad)
    with pytest.raises(ValueError, match="positive integer"):
        _pipe()(CONTEXT, question="Who?", max_new_tokens=2, prefill_chunk_size=bad)


def test_chunked_prefill_refuses_a_filled_cache_and_bad_ids():
    model = get_model("llama")
    cache, _ = _unchunked(model, _ids(), None)
    with pytest.raises(ValueError, match="already holds"):
        chunked_prefill(model, _ids(), cache, chunk_size=CHUNK)
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        chunked_prefill(model, _ids()[0], DynamicCache(config=model.config), chunk_size=CHUNK)


def test_pipeline_chunked_answers_from_the_compressed_cache():
    """The pipeline's chunked prefill leaves the cache with the unchunked size, and the answer continues at the
    logical position (same as the helper's cache followed by greedy steps by hand)."""
    pipe = _pipe()
    press = StreamingLLMPress(0.5, n_sink=2)
    cache = DynamicCache(config=pipe.model.config)
    answer = pipe(CONTEXT, question="Who?", press=press, max_new_tokens=5, prefill_chunk_size=8, cache=cache)
    inputs = pipe.preprocess(CONTEXT, questions=["Who?"], answer_prefix="", max_context_length=10**6)
    context_ids, question = inputs["context_ids"], inputs["questions_ids"][0]
    assert cache.get_seq_length() == _n_kept(context_ids.shape[1], 0.5)
    own = DynamicCache(config=pipe.model.config)
    chunked_prefill(pipe.model, context_ids, own, press=press, chunk_size=8, return_logits=False)
    position = context_ids.shape[1]
    tokens = []
    with torch.no_grad():
        step_ids, positions = question, torch.arange(position, position + question.shape[1])[None]
        for _ in range(5):
            logits = pipe.model(input_ids=step_ids, position_ids=positions, **cache_kwargs(pipe.model, own)).logits
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] == pipe.model.generation_config.eos_token_id:
                break
            step_ids, positions = torch.tensor([[tokens[-1]]]), positions[:, -1:] + 1
    assert answer["answer"] == pipe.tokenizer.decode(tokens, skip_special_tokens=True)


# ---- the benchmark's --prefill_chunk_size ----------------------------------------------------------------------


def _benchmark(tmp_path, *extra):
    from kvpress.benchmark import main

    common = ["--model", "tiny", "--context_lengths", "96", "--max_new_tokens", "3", "--output_dir", str(tmp_path)]
    return main([*common, "--decode_loops", "dynamic", *extra])


def test_benchmark_rows_with_and_without_chunks(tmp_path):
    chunked = _benchmark(tmp_path, "--presses", "none,knorm:0.5,StreamingLLMPress:0.8", "--prefill_chunk_size", "32")
    unchunked = _benchmark(tmp_path, "--presses", "none,knorm:0.5,StreamingLLMPress:0.8")
    assert [row["prefill_chunk_size"] for row in chunked] == [32] * 3
    assert [row["prefill_chunk_size"] for row in unchunked] == [None] * 3  # measured anew, not the chunked rows
    for row, reference in zip(chunked, unchunked):
        assert not row.get("error") and row["kv_bytes"] == reference["kv_bytes"]
        assert row["peak_prefill_bytes"] >= 0 and row["tokens_per_s"] > 0
    assert [row["achieved_ratio"] for row in chunked] == pytest.approx([0.0, 0.5, 0.8], abs=0.01)


def test_benchmark_refuses_an_unsupported_press_before_running(tmp_path):
    with pytest.raises(SystemExit):
        _benchmark(tmp_path, "--presses", "none,LeverageScorePress:0.5", "--prefill_chunk_size", "32")
    with pytest.raises(SystemExit):
        _benchmark(tmp_path, "--presses", "none", "--prefill_chunk_size", "0")
    assert not (tmp_path / "results.jsonl").exists()


# ---- scorers that chunk their own work --------------------------------------------------------------------------


@pytest.mark.parametrize("length,chunk", [(40, 8), (37, 8), (5, 8)])
@pytest.mark.parametrize("budget", [1, 2 * 4 * 8 * 8 * 2, 1 << 26])
def test_non_causal_attention_in_groups_of_chunks_equals_the_direct_sum(monkeypatch, length, chunk, budget):
    from kvpress.presses import non_causal_attention_press as module

    monkeypatch.setattr(module, "_SCORE_ELEMENTS", budget)  # 1: one chunk per group; 1 << 26: all at once
    generator = torch.Generator().manual_seed(length)
    queries, keys = torch.randn(2, 4, length, 16, generator=generator), torch.randn(
        2, 4, length, 16, generator=generator
    )
    received = module.NonCausalAttnPress.non_causal_chunked_attn(queries, keys, chunk)
    expected = torch.zeros(2, 4, length)
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        weights = (queries[:, :, start:end] @ keys[:, :, start:end].transpose(-1, -2)).softmax(dim=-1)
        expected[:, :, start:end] = weights.sum(dim=-2)
    torch.testing.assert_close(received, expected, atol=1e-5, rtol=1e-5)


# ---- the generate helper ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "press", [None, KnormPress(0.5), StreamingLLMPress(0.7), KnormPress(cache_budget=24)], ids=lambda p: repr(p)[:20]
)
def test_generate_helper_with_one_chunk_equals_greedy_generate(press):
    from kvpress.chunked_prefill import generate_with_chunked_prefill
    from kvpress.decoding_loop import greedy_generate

    model = get_model("llama")
    ids = _ids(batch=2)
    expected = greedy_generate(model, ids, press=press, max_new_tokens=6, inplace=False)
    assert torch.equal(generate_with_chunked_prefill(model, ids, press, chunk_size=LENGTH, max_new_tokens=6), expected)


def test_generate_helper_chunked_continues_the_pipeline_way():
    """Chunked: the new tokens are the greedy continuation of the chunked cache at logical positions."""
    from kvpress.chunked_prefill import generate_with_chunked_prefill

    model = get_model("llama")
    ids = _ids()
    out = generate_with_chunked_prefill(model, ids, StreamingLLMPress(0.5), chunk_size=CHUNK, max_new_tokens=4)
    cache, logits = _chunked(model, ids, StreamingLLMPress(0.5), CHUNK)
    tokens = [logits[:, -1:].argmax(-1)]
    with torch.no_grad():
        for step in range(3):
            position = torch.tensor([[LENGTH + step]])
            logits = model(input_ids=tokens[-1], position_ids=position, **cache_kwargs(model, cache)).logits
            tokens.append(logits[:, -1:].argmax(-1))
    assert torch.equal(out, torch.cat([ids, *tokens], dim=1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_with_chunked_prefill(model, ids, max_new_tokens=0)
