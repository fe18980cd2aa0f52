# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""DuoAttentionPress: head patterns loaded from local files and (mocked) URLs, the streaming/retrieval head split,
the head-wise masks, and on-the-fly head scores against a direct computation."""

import io
import json
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpress.presses import duo_attention_press as duo
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.duo_attention_press import DuoAttentionPress, LRUCache, duo_attention_on_the_fly
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import (
    ARCHITECTURES,
    attention_modules,
    compressed_layers,
    get_model,
    load_tokenizer,
    masked_bool,
    random_input_ids,
)

SINK, RECENT, SEQ_LEN = 2, 4, 40
# one row per layer, one column per KV head (2 x 2 for every test model); distinct, with values to clip
HEAD_SCORES = np.array([[0.9, -0.05], [0.3, 1.2]])


@pytest.fixture(autouse=True)
def _empty_pattern_cache():
    duo.cache.clear()
    yield
    duo.cache.clear()


def write_pattern(directory, scores=HEAD_SCORES, sink=SINK, recent=RECENT):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"sink_size": sink, "recent_size": recent, "lr": 0.02}))
    np.savetxt(directory / "full_attention_heads.tsv", scores, delimiter="\t")
    return directory


def use_local_pattern(monkeypatch, model, location, name="local/tiny-model"):
    monkeypatch.setattr(model.config, "name_or_path", name)
    monkeypatch.setitem(duo.PATTERNS_DICT, name, str(location))


def expected_streaming(model, ratio, scores=HEAD_SCORES):
    """The round(n * ratio) lowest-scoring (layer, head) pairs among the compressed layers."""
    layers = compressed_layers(model)
    candidates = [(layer, head) for layer in layers for head in range(scores.shape[1])]
    ranked = sorted(candidates, key=lambda pair: np.clip(scores, 0, 1)[pair])
    return set(ranked[: round(len(candidates) * ratio)])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_streaming_heads_keep_sink_and_recent_retrieval_heads_keep_all(arch, ratio, tmp_path, monkeypatch):
    model = get_model(arch)
    use_local_pattern(monkeypatch, model, write_pattern(tmp_path / "pattern"))
    press = DuoAttentionPress(head_compression_ratio=ratio)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(random_input_ids(2, SEQ_LEN), **cache_kwargs(model, cache))

    streaming = expected_streaming(model, ratio)
    assert {tuple(pair) for pair in press.streaming_mask.nonzero().tolist()} == streaming
    assert (press.sink_size, press.recent_size) == (SINK, RECENT)
    total_masked = total = 0
    for layer_idx in compressed_layers(model):
        assert cache.layers[layer_idx].keys.shape[2] == SEQ_LEN  # head-wise: masked, not removed
        mask = masked_bool(attention_modules(model)[layer_idx], (2, 2, SEQ_LEN))
        for head in range(2):
            if (layer_idx, head) in streaming:
                expected = torch.zeros(SEQ_LEN, dtype=torch.bool)
                expected[SINK : SEQ_LEN - RECENT] = True
                assert (mask[:, head] == expected).all()
            else:
                assert not mask[:, head].any()
        total_masked += int(mask.sum())
        total += mask.numel()
    masked_fraction = len(streaming) / (2 * len(compressed_layers(model))) * (SEQ_LEN - SINK - RECENT) / SEQ_LEN
    assert total_masked / total == pytest.approx(masked_fraction)
    assert press.compression_ratio == pytest.approx(masked_fraction)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_masked_entries_get_zero_attention_under_eager(arch, tmp_path, monkeypatch):
    """Unlike upstream, DuoAttention runs under eager attention; streaming heads see only sinks and recent tokens."""
    model = get_model(arch, "eager")
    use_local_pattern(monkeypatch, model, write_pattern(tmp_path / "pattern"))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), DuoAttentionPress(head_compression_ratio=0.5)(model):
        model(random_input_ids(1, SEQ_LEN, seed=4), **cache_kwargs(model, cache))
    masks = [masked_bool(module, (1, 2, SEQ_LEN)) for module in attention_modules(model)]
    with torch.no_grad():
        out = model(random_input_ids(1, 1, seed=5), output_attentions=True, **cache_kwargs(model, cache))
    for layer_idx, mask in enumerate(masks):
        weights = out.attentions[layer_idx][0, :, -1, :SEQ_LEN]  # (H, T): the new token over the context
        masked = mask[0].repeat_interleave(2, dim=0)
        assert (weights[masked] == 0).all()
        assert (weights[~masked] > 0).all()
    assert sum(int(mask.sum()) for mask in masks) == 2 * (SEQ_LEN - SINK - RECENT)


def test_ratio_zero_masks_nothing(tmp_path, monkeypatch):
    model = get_model("llama")
    use_local_pattern(monkeypatch, model, write_pattern(tmp_path / "pattern"))
    press = DuoAttentionPress()
    with torch.no_grad(), press(model):
        model(random_input_ids(1, SEQ_LEN), **cache_kwargs(model, DynamicCache()))
    assert not press.streaming_mask.any()
    assert all(module.masked_key_indices is None for module in attention_modules(model))
    assert press.compression_ratio == 0.0


def test_tsv_file_location_and_cache(tmp_path, monkeypatch):
    model = get_model("llama")
    directory = write_pattern(tmp_path / "pattern", sink=3, recent=5)
    use_local_pattern(monkeypatch, model, directory / "full_attention_heads.tsv")
    sink, recent, scores = DuoAttentionPress.load_attention_pattern(model)
    assert (sink, recent) == (3, 5)
    np.testing.assert_allclose(scores, np.clip(HEAD_SCORES, 0, 1))
    assert len(duo.cache) == 1
    (directory / "full_attention_heads.tsv").unlink()  # a second load is served from the cache
    assert DuoAttentionPress.load_attention_pattern(model)[0] == 3


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()


def test_url_path_builds_the_published_urls(monkeypatch):
    tsv = io.StringIO()
    np.savetxt(tsv, np.random.default_rng(0).random((32, 8)), delimiter="\t")
    files = {
        "config.json": json.dumps({"sink_size": 128, "recent_size": 256}),
        "full_attention_heads.tsv": tsv.getvalue(),
    }
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        return _FakeResponse(files[url.rsplit("/", 1)[1]].encode())

    monkeypatch.setattr(duo.urllib.request, "urlopen", fake_urlopen)
    model = SimpleNamespace(config=SimpleNamespace(name_or_path="mistralai/Mistral-7B-Instruct-v0.2"))
    sink, recent, scores = DuoAttentionPress.load_attention_pattern(model)
    folder = "Mistral-7B-Instruct-v0.2/lr%3D0.02-reg%3D0.05-ctx%3D1000_32000-multi_passkey10/"
    assert requested == [
        duo.PATTERNS_BASE_URL + folder + "config.json",
        duo.PATTERNS_BASE_URL + folder + duo.PATTERN_HEADS_FILE,
    ]
    assert (sink, recent, scores.shape) == (128, 256, (32, 8))

    # upstream's double-slash keys: both spellings reach the same folder
    requested.clear()
    model.config.name_or_path = "gradientai//Llama-3-8B-Instruct-Gradient-1048k"
    DuoAttentionPress.load_attention_pattern(model)
    assert requested[0].startswith(duo.PATTERNS_BASE_URL + "Llama-3-8B-Instruct-Gradient-1048k/")

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(duo.urllib.request, "urlopen", offline)
    model.config.name_or_path = "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(OSError, match="PATTERNS_DICT"):
        DuoAttentionPress.load_attention_pattern(model)


def test_missing_or_bad_patterns_raise_clear_errors(tmp_path, monkeypatch):
    model = get_model("llama")
    monkeypatch.setattr(model.config, "name_or_path", "someone/unknown-model")
    with pytest.raises(ValueError, match="No DuoAttention head pattern for model 'someone/unknown-model'") as error:
        DuoAttentionPress(0.5).post_init_from_model(model)
    assert "mistralai/Mistral-7B-Instruct-v0.3" in str(error.value) and "on_the_fly_scoring" in str(error.value)

    use_local_pattern(monkeypatch, model, tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        DuoAttentionPress(0.5).post_init_from_model(model)

    (tmp_path / "empty").mkdir()
    use_local_pattern(monkeypatch, model, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        DuoAttentionPress(0.5).post_init_from_model(model)

    bad_config = write_pattern(tmp_path / "bad-config")
    (bad_config / "config.json").write_text(json.dumps({"sink_size": 2}))
    use_local_pattern(monkeypatch, model, bad_config)
    with pytest.raises(ValueError, match="recent_size"):
        DuoAttentionPress(0.5).post_init_from_model(model)

    use_local_pattern(monkeypatch, model, write_pattern(tmp_path / "wrong-shape", scores=np.ones((3, 2))))
    with pytest.raises(ValueError, match="one row per layer"):
        DuoAttentionPress(0.5).post_init_from_model(model)


def reference_on_the_fly(model, texts, tokenizer, q_len):
    """Area under the cumulative attention of the last of q_len positions, for token-averaged queries and keys,
    written directly with the model's projections and transformers' RoPE."""
    config = model.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    scores = np.zeros((config.num_hidden_layers, kv_heads))
    for text in texts:
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden_states = model(input_ids, output_hidden_states=True).hidden_states
            for layer_idx, layer in enumerate(model.model.layers):
                attention = layer.self_attn
                states = layer.input_layernorm(hidden_states[layer_idx])
                query = attention.q_proj(states).view(1, -1, heads, head_dim)
                key = attention.k_proj(states).view(1, -1, kv_heads, head_dim)
                if hasattr(attention, "q_norm"):
                    query, key = attention.q_norm(query), attention.k_norm(key)
                query = query.mean(dim=1)[:, :, None].expand(1, heads, q_len, head_dim)
                key = key.mean(dim=1)[:, :, None].expand(1, kv_heads, q_len, head_dim)
                cos, sin = model.model.rotary_emb(query, torch.arange(q_len)[None])
                query, key = apply_rotary_pos_emb(query, key, cos, sin)
                key = key.repeat_interleave(heads // kv_heads, dim=1)
                weights = (torch.einsum("bhd,bhtd->bht", query[:, :, -1], key) / head_dim**0.5).softmax(dim=-1)
                area = weights.cumsum(dim=-1).mean(dim=-1)[0].view(kv_heads, -1).mean(dim=-1)
                scores[layer_idx] += area.numpy() / len(texts)
    return scores


TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "A second text, a little different: 0123456789."]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_on_the_fly_scores_equal_direct_computation(arch, tmp_path):
    model, tokenizer = get_model(arch), load_tokenizer()
    scores = duo_attention_on_the_fly(model, num_samples=2, q_len=16, dataset=TEXTS, tokenizer=tokenizer)
    expected = reference_on_the_fly(model, TEXTS, tokenizer, q_len=16)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(scores, scores.mean())  # heads differ

    if arch == "llama":  # a local dataset directory goes through datasets.load_dataset (the Hub path)
        data_dir = tmp_path / "booksum"
        data_dir.mkdir()
        (data_dir / "train.jsonl").write_text("".join(json.dumps({"chapter": text}) + "\n" for text in TEXTS))
        from_dir = duo_attention_on_the_fly(model, num_samples=2, q_len=16, dataset=str(data_dir), tokenizer=tokenizer)
        np.testing.assert_allclose(from_dir, expected, rtol=1e-4, atol=1e-6)


def test_on_the_fly_press_uses_sink_128_recent_256(monkeypatch):
    model, tokenizer = get_model("llama"), load_tokenizer()
    scores = duo_attention_on_the_fly(model, num_samples=2, q_len=16, dataset=TEXTS, tokenizer=tokenizer)
    monkeypatch.setattr(duo, "duo_attention_on_the_fly", lambda m, dataset: scores)
    press = DuoAttentionPress(head_compression_ratio=0.5, on_the_fly_scoring=True)
    assert press.on_the_fly_dataset == "kmfoda/booksum"  # upstream's texts by default
    with torch.no_grad(), press(model):
        model(random_input_ids(1, SEQ_LEN), **cache_kwargs(model, DynamicCache()))
    assert (press.sink_size, press.recent_size) == (128, 256)
    lowest = set(np.argsort(scores, axis=None)[:2].tolist())
    assert set(press.streaming_mask.flatten().nonzero().flatten().tolist()) == lowest
    # a context shorter than sink + recent masks nothing and reports 0 (upstream reports a negative ratio)
    assert all(module.masked_key_indices is None for module in attention_modules(model))
    assert press.compression_ratio == 0.0


def test_on_the_fly_texts_are_scored_once_and_rank_the_heads(monkeypatch):
    model = get_model("llama")
    scores = np.array([[0.4, 0.1], [0.3, 0.9]])
    calls = []

    def score(model_, texts, q_len, tokenizer):
        calls.append(list(texts))
        return scores

    monkeypatch.setattr(duo, "_score_heads_on_the_fly", score)
    for _ in range(2):  # a fresh press per row: the second one reads the cached scores
        press = DuoAttentionPress(head_compression_ratio=0.5, on_the_fly_scoring=True, on_the_fly_dataset=TEXTS)
        press.post_init_from_model(model)
        assert press.on_the_fly_dataset == tuple(TEXTS)
        assert press.streaming_mask.tolist() == [[False, True], [True, False]]  # the two lowest scores
    assert calls == [TEXTS]
    other = DuoAttentionPress(head_compression_ratio=0.5, on_the_fly_scoring=True, on_the_fly_dataset=TEXTS[:1])
    other.post_init_from_model(model)
    assert calls == [TEXTS, TEXTS[:1]]  # other texts, other scores
    assert "on_the_fly_dataset" not in repr(press)  # texts can be long


@pytest.mark.parametrize("bad", ["", [], ["a text", 3], 7])
def test_on_the_fly_dataset_must_be_a_name_or_texts(bad):
    with pytest.raises(ValueError, match="on_the_fly_dataset must be a Hub dataset name"):
        DuoAttentionPress(on_the_fly_scoring=True, on_the_fly_dataset=bad)


def test_compression_ratio_and_bad_input():
    press = DuoAttentionPress(head_compression_ratio=0.3)
    with pytest.raises(ValueError, match="Forward pass must be run"):
        press.compression_ratio
    with pytest.raises(AttributeError, match="head_compression_ratio"):
        press.compression_ratio = 0.5
    with pytest.raises(ValueError, match="head_compression_ratio"):
        DuoAttentionPress(head_compression_ratio=1.5)
    with pytest.raises(ValueError, match="ComposedPress cannot contain"):
        ComposedPress([press])
    module = attention_modules(get_model("llama"))[0]
    keys = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="Streaming mask not initialized"):
        press.compress(module, torch.zeros(1, 8, 64), keys, keys, None, {})


def test_lru_cache_keeps_the_most_recent_entries():
    lru = LRUCache(maxsize=2)
    lru["a"], lru["b"] = 1, 2
    assert lru["a"] == 1  # "a" becomes the most recent
    lru["c"] = 3
    assert list(lru) == ["a", "c"]
    assert duo.cache.maxsize == 128


def test_tied_head_scores_pick_the_earliest_heads(tmp_path, monkeypatch):
    """Kept as a difference: ties are broken by a stable argsort, so the earliest (layer, head) pairs in row-major
    order become streaming heads and every run picks the same ones (upstream's unstable argsort leaves the choice
    among tied heads to the sort). Without ties both orders agree (`expected_streaming` above)."""
    model = get_model("llama")
    scores = np.array([[0.5, 0.2], [0.5, 0.5]])  # three tied heads for the two remaining streaming slots
    use_local_pattern(monkeypatch, model, write_pattern(tmp_path / "pattern", scores=scores))
    press = DuoAttentionPress(head_compression_ratio=0.75)
    with torch.no_grad(), press(model):
        model(random_input_ids(1, SEQ_LEN), **cache_kwargs(model, DynamicCache()))
    assert {tuple(pair) for pair in press.streaming_mask.nonzero().tolist()} == {(0, 1), (0, 0), (1, 0)}


@pytest.mark.parametrize("length, sink, recent", [(40, 2, 0), (5, 2, 4), (6, 2, 4)])
def test_streaming_heads_keep_exactly_sink_and_recent_tokens(length, sink, recent, tmp_path, monkeypatch):
    """Kept as a difference: the masked span is [sink, T - recent) truncated to the context, so `recent_size=0`
    masks everything after the sinks (upstream's `[sink:-0]` slice masks nothing) and a context shorter than
    sink + recent masks nothing with a compression ratio of 0 (upstream reports a negative ratio)."""
    model = get_model("llama")
    use_local_pattern(monkeypatch, model, write_pattern(tmp_path / "pattern", sink=sink, recent=recent))
    press = DuoAttentionPress(head_compression_ratio=0.5)
    with torch.no_grad(), press(model):
        model(random_input_ids(1, length), **cache_kwargs(model, DynamicCache()))
    expected = torch.zeros(length, dtype=torch.bool)
    expected[sink : max(length - recent, sink)] = True
    n_masked = 0
    for layer_idx, module in enumerate(attention_modules(model)):
        mask = masked_bool(module, (1, 2, length))
        for head in range(2):
            streaming = bool(press.streaming_mask[layer_idx, head])
            assert torch.equal(mask[0, head], expected if streaming else torch.zeros_like(expected))
        n_masked += int(mask.sum())
    assert press.compression_ratio == pytest.approx(n_masked / (2 * 2 * length)) and press.compression_ratio >= 0
