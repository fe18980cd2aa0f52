# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The Hub-backed presses, QFilterPress and ExpectedAttentionStatsPress, with small local resources saved here and
loaded through the same `from_pretrained` path as Hub repos; the statistics collection (`collect_queries`, the Fire
CLI `main`); scores against reference computations; clear errors for missing or mismatched resources.

`local_qfilters_dir()` and `local_ea_stats_dir()` give resources that fit every tiny test model (2 layers, 4 heads,
2 KV heads, head_dim 16), e.g. for the press matrix: `QFilterPress(0.5, filters_path=local_qfilters_dir())`.
"""

import functools
import json
from pathlib import Path

import fire
import pytest
import torch
from safetensors.torch import save_file

from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.expected_attention_with_stats import (
    ExpectedAttentionStats,
    ExpectedAttentionStatsPress,
    collect_queries,
    main,
    patch_rotary_embedding,
)
from kvpress.presses.qfilter_press import QFilterPress, QFilters
from tests.fixtures import (
    ARCHITECTURES,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LAYERS,
    compressed_layers,
    get_model,
    load_saved_model,
    load_tokenizer,
    prefill,
    random_input_ids,
    record_layers,
    saved_model_dir,
    temp_dir,
)

GROUPS = HEADS // KV_HEADS
SEQ_LEN = 40
RATIOS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)


def random_qfilters(seed: int = 0, shape=(LAYERS, KV_HEADS, HEAD_DIM)) -> QFilters:
    torch.manual_seed(seed)
    return QFilters(*shape)


def random_stats(seed: int = 0, num_layers: int = LAYERS) -> ExpectedAttentionStats:
    stats = ExpectedAttentionStats(num_layers, HEADS, HEAD_DIM, "local/data", "tiny", 2, 100, 4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        stats.query_mean.copy_(torch.randn(num_layers, HEADS, HEAD_DIM, generator=generator))
        factor = torch.randn(num_layers, HEADS, HEAD_DIM, HEAD_DIM, generator=generator) / HEAD_DIM**0.5
        stats.query_cov.copy_(factor @ factor.transpose(-1, -2))  # symmetric positive semi-definite
    return stats


@functools.lru_cache(maxsize=None)
def local_qfilters_dir() -> str:
    """A directory with random Q-filters for the tiny test models, saved with `save_pretrained`."""
    path = temp_dir(prefix="kvpress-qfilters-")
    random_qfilters().save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def local_ea_stats_dir() -> str:
    """A directory with random Expected Attention statistics for the tiny test models, saved with `save_pretrained`."""
    path = temp_dir(prefix="kvpress-ea-stats-")
    random_stats().save_pretrained(path)
    return path


def score_of(press, call, hidden_states=None):
    hidden_states = call["hidden_states"] if hidden_states is None else hidden_states
    with torch.no_grad():
        return press.score(call["module"], hidden_states, call["keys"], call["values"], None, call["kwargs"])


def kept_indices(full_keys: torch.Tensor, kept_keys: torch.Tensor) -> torch.Tensor:
    distances = (kept_keys.unsqueeze(3) - full_keys.unsqueeze(2)).norm(dim=-1)
    assert distances.min(dim=-1).values.max() < 1e-5, "a kept key is not in the uncompressed cache"
    return distances.argmin(dim=-1)


# ---------------------------------------------------------------- QFilterPress


def test_qfilters_load_from_a_local_directory_and_score(tmp_path):
    filters = random_qfilters(seed=1)
    filters.save_pretrained(tmp_path)
    model = get_model("llama")
    press = QFilterPress(0.5, filters_path=str(tmp_path))
    press.post_init_from_model(model)
    torch.testing.assert_close(press.q_filters, filters.q_filters.detach())
    calls = record_layers(model, random_input_ids(2, SEQ_LEN, seed=2))
    for layer_idx, call in calls.items():
        scores = score_of(press, call)
        keys = call["keys"]
        for b in range(2):
            for h in range(KV_HEADS):
                direction = filters.q_filters[layer_idx, h].detach()
                expected = torch.stack([-(k @ direction) for k in keys[b, h]])
                torch.testing.assert_close(scores[b, h], expected, rtol=1e-5, atol=1e-5)


def test_qfilters_keep_the_keys_least_aligned_with_the_filter(tmp_path):
    random_qfilters(seed=3).save_pretrained(tmp_path)
    filters = random_qfilters(seed=3).q_filters.detach()
    model = get_model("qwen3")
    input_ids = random_input_ids(1, SEQ_LEN, seed=4)
    full = prefill(model, input_ids)
    compressed = prefill(model, input_ids, QFilterPress(0.75, filters_path=str(tmp_path)))
    n_kept = int(SEQ_LEN * (1 - 0.75))
    for layer_idx in compressed_layers(model):
        full_keys = full.layers[layer_idx].keys
        kept = kept_indices(full_keys, compressed.layers[layer_idx].keys)
        for h in range(KV_HEADS):
            projections = full_keys[0, h] @ filters[layer_idx, h]
            assert kept[0, h].tolist() == sorted(projections.argsort()[:n_kept].tolist())


def test_qfilters_load_from_a_single_file(tmp_path):
    filters = random_qfilters(seed=5).q_filters.detach()
    save_file({"q_filters": filters}, str(tmp_path / "filters.safetensors"))
    torch.save(filters, tmp_path / "filters.pt")
    model = get_model("mistral")
    for name in ("filters.safetensors", "filters.pt"):
        press = QFilterPress(0.5, filters_path=str(tmp_path / name))
        press.post_init_from_model(model)
        torch.testing.assert_close(press.q_filters, filters)
    save_file({"something_else": filters}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="named 'q_filters'"):
        QFilterPress(0.5, filters_path=str(tmp_path / "bad.safetensors")).post_init_from_model(model)


def test_qfilters_missing_or_mismatched_resources_raise_clear_errors(tmp_path):
    model = get_model("llama")
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match=r"(?s)no_such_dir.*neither a local directory or file.*filters_path"):
        QFilterPress(0.5, filters_path=missing).post_init_from_model(model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"local directory .*empty"):
        QFilterPress(0.5, filters_path=str(tmp_path / "empty")).post_init_from_model(model)
    # default path: the Hub repo named after the model (nothing is reachable offline)
    hub_model = load_saved_model(saved_model_dir("llama"))
    model_name = Path(saved_model_dir("llama")).name
    with pytest.raises(ValueError, match=rf"nthngdy/{model_name}_qfilt"):
        QFilterPress(0.5).post_init_from_model(hub_model)
    random_qfilters(shape=(LAYERS + 1, KV_HEADS, HEAD_DIM)).save_pretrained(tmp_path / "three_layers")
    with pytest.raises(ValueError, match=r"shape \(3, 2, 16\).*\(2, 2, 16\)"):
        QFilterPress(0.5, filters_path=str(tmp_path / "three_layers")).post_init_from_model(model)
    call = record_layers(model, random_input_ids(1, 8))[0]
    with pytest.raises(ValueError, match="Q-filters not loaded.*post_init_from_model"):
        score_of(QFilterPress(0.5), call)


def test_qfilters_hub_repo_naming(monkeypatch):
    import kvpress.presses.qfilter_press as module

    requested = []
    monkeypatch.setattr(module, "load_qfilters_from", lambda name: requested.append(name) or torch.zeros(1))
    QFilterPress.load_q_filters("Meta-Llama-3.1-8B-Instruct-naming-test")
    QFilterPress.load_q_filters("Meta-Llama-3.1-405B-Instruct-naming-test")
    QFilterPress.load_q_filters("Qwen3-4B-naming-test")
    assert requested == [
        "nthngdy/Llama-3.1-8B-Instruct-naming-test_qfilt",
        "nthngdy/Meta-Llama-3.1-405B-Instruct-naming-test_qfilt",
        "nthngdy/Qwen3-4B-naming-test_qfilt",
    ]
    QFilterPress.load_q_filters("Qwen3-4B-naming-test")  # memoized: not requested again
    assert len(requested) == 3


def test_qfilters_through_wrappers():
    model = get_model("phi3")
    for press in (
        AdaKVPress(QFilterPress(0.5, filters_path=local_qfilters_dir())),
        ChunkPress(QFilterPress(0.5, filters_path=local_qfilters_dir()), chunk_length=16),
    ):
        cache = prefill(model, random_input_ids(1, SEQ_LEN), press)
        expected = SEQ_LEN if isinstance(press, AdaKVPress) else 8 + 8 + 4
        assert all(cache.layers[i].keys.shape[2] == expected for i in compressed_layers(model))


# ---------------------------------------------------------------- ExpectedAttentionStatsPress


def rope_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`x` (..., d) rotated as RoPE does at each position: (P, ..., d)."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1).view(len(positions), *([1] * (x.dim() - 1)), x.shape[-1])
    half = x.shape[-1] // 2
    return x * angles.cos() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * angles.sin()


def reference_stats_scores(model, stats, call, n_future_positions, n_sink, use_covariance=True, use_vnorm=True):
    """Expected attention with the given statistics: mean and covariance of the future queries, rotated by RoPE at
    each future position and averaged, then the Gaussian expected logit, softmax, group mean, value norms."""
    layer_idx, keys, values = call["module"].layer_idx, call["keys"], call["values"]
    length = call["hidden_states"].shape[1]
    inv_freq = model.model.rotary_emb.inv_freq
    future = torch.arange(length, length + n_future_positions)
    rotation = rope_at(torch.eye(HEAD_DIM), future, inv_freq).transpose(1, 2).mean(dim=0)  # mean of R_p
    scores = torch.zeros(KV_HEADS, length - n_sink)
    for head in range(HEADS):
        mean = rope_at(stats.query_mean[layer_idx, head].detach(), future, inv_freq).mean(dim=0)
        cov = rotation @ stats.query_cov[layer_idx, head].detach() @ rotation.T
        head_keys = keys[0, head // GROUPS, n_sink:]
        logits = torch.stack(
            [mean @ k / HEAD_DIM**0.5 + (k @ cov @ k / (2 * HEAD_DIM) if use_covariance else 0) for k in head_keys]
        )
        scores[head // GROUPS] += logits.softmax(dim=0) / GROUPS
    if use_vnorm:
        scores = scores * values[0, :, n_sink:].norm(dim=-1)
    return torch.cat([torch.full((KV_HEADS, n_sink), scores.max().item() + 1), scores], dim=1).unsqueeze(0)


@pytest.mark.parametrize(
    "options",
    [dict(n_future_positions=64, n_sink=4), dict(n_future_positions=8, n_sink=2, use_covariance=False)],
)
def test_stats_press_scores_match_reference(tmp_path, options):
    stats = random_stats(seed=6)
    stats.save_pretrained(tmp_path)
    model = get_model("llama")
    press = ExpectedAttentionStatsPress(0.5, stats_folder=str(tmp_path), **options)
    press.post_init_from_model(model)
    torch.testing.assert_close(press.mu, stats.query_mean.detach())
    torch.testing.assert_close(press.cov, stats.query_cov.detach())
    calls = record_layers(model, random_input_ids(1, 24, seed=7))
    for call in calls.values():
        expected = reference_stats_scores(model, stats, call, **options)
        torch.testing.assert_close(score_of(press, call), expected, rtol=1e-4, atol=1e-6)
        # the statistics replace the context's queries: other hidden states of the same length give the same scores
        other = torch.randn_like(call["hidden_states"])
        torch.testing.assert_close(score_of(press, call, other), expected, rtol=1e-4, atol=1e-6)


def test_stats_press_loads_once_and_from_a_file(tmp_path):
    stats = random_stats(seed=8)
    save_file(
        {"query_mean": stats.query_mean.detach(), "query_cov": stats.query_cov.detach()},
        str(tmp_path / "stats.safetensors"),
    )
    model = get_model("gemma3")
    press = ExpectedAttentionStatsPress(0.5, stats_folder=str(tmp_path / "stats.safetensors"))
    press.post_init_from_model(model)
    torch.testing.assert_close(press.mu, stats.query_mean.detach())
    loaded = press.mu
    press.post_init_from_model(model)  # already loaded: kept as is
    assert press.mu is loaded


def test_stats_missing_or_mismatched_resources_raise_clear_errors(tmp_path):
    model = get_model("llama")
    with pytest.raises(ValueError, match=r"(?s)no_stats.*python -m kvpress.presses.expected_attention_with_stats"):
        ExpectedAttentionStatsPress(0.5, stats_folder=str(tmp_path / "no_stats")).post_init_from_model(model)
    # default path: the Hub repo named after the model and the collection settings
    hub_model = load_saved_model(saved_model_dir("llama"))
    expected_id = ExpectedAttentionStats(
        LAYERS, HEADS, HEAD_DIM, "kmfoda/booksum", saved_model_dir("llama"), 100, 1000, 4
    ).stats_id()
    with pytest.raises(ValueError, match=r"(?s)Could not load Expected Attention statistics.*--model_name") as info:
        ExpectedAttentionStatsPress(0.5).post_init_from_model(hub_model)
    assert expected_id in str(info.value)
    random_stats(num_layers=1).save_pretrained(tmp_path / "one_layer")
    with pytest.raises(ValueError, match=r"query_mean \(1, 4, 16\).*\(2, 4, 16\)"):
        ExpectedAttentionStatsPress(0.5, stats_folder=str(tmp_path / "one_layer")).post_init_from_model(model)
    call = record_layers(model, random_input_ids(1, 8))[0]
    with pytest.raises(ValueError, match="statistics not loaded.*post_init_from_model"):
        score_of(ExpectedAttentionStatsPress(0.5), call)


def test_stats_hub_repo_naming(monkeypatch):
    import kvpress.presses.expected_attention_with_stats as module

    stats = ExpectedAttentionStats(32, 32, 128, "kmfoda/booksum", "meta-llama/Llama-3.1-8B-Instruct", 100, 1000, 4)
    assert stats.stats_id() == "alessiodevoto/exp_att_stats_meta-llama_Llama-3.1-8B-Instruct_kmfoda_booksum_100_1000_4"
    requested = []

    def fake_load(name, press, hint):
        requested.append(name)
        return random_stats()

    monkeypatch.setattr(module, "_load_stats", fake_load)
    hub_model = load_saved_model(saved_model_dir("llama"))
    ExpectedAttentionStatsPress(
        0.5, n_sink=2, num_samples=7, sample_seq_len=300, dataset_name="org/data"
    ).post_init_from_model(hub_model)
    name = saved_model_dir("llama").replace("/", "_")
    assert requested == [f"alessiodevoto/exp_att_stats_{name}_org_data_7_300_2"]


def test_stats_press_through_wrappers():
    model = get_model("qwen2")
    for press in (
        AdaKVPress(ExpectedAttentionStatsPress(0.5, stats_folder=local_ea_stats_dir())),
        ChunkPress(ExpectedAttentionStatsPress(0.5, stats_folder=local_ea_stats_dir()), chunk_length=16),
    ):
        cache = prefill(model, random_input_ids(1, SEQ_LEN), press)
        expected = SEQ_LEN if isinstance(press, AdaKVPress) else 8 + 8 + 4
        assert all(cache.layers[i].keys.shape[2] == expected for i in compressed_layers(model))


# ---------------------------------------------------------------- collecting statistics


@pytest.fixture
def local_dataset(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Pack my box with five dozen liquor jugs!", "abc"]
    data_dir = tmp_path / "dataset"
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"chapter": text, "other": 1}) + "\n")
    return str(data_dir), texts


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_patch_rotary_embedding_records_pre_rope_queries(arch):
    model = get_model(arch)
    input_ids = random_input_ids(1, 12, seed=9)
    calls = record_layers(model, input_ids)
    import importlib

    modeling = importlib.import_module(type(model).__module__)
    original = modeling.apply_rotary_pos_emb
    with patch_rotary_embedding(model) as captured, torch.no_grad():
        model(input_ids)
    assert modeling.apply_rotary_pos_emb is original  # restored
    assert len(captured) == LAYERS
    for layer_idx, call in calls.items():
        attention = call["module"]
        with torch.no_grad():
            queries = attention.q_proj(call["hidden_states"]).view(1, 12, HEADS, HEAD_DIM)
            if hasattr(attention, "q_norm"):
                queries = attention.q_norm(queries)
        torch.testing.assert_close(captured[layer_idx], queries.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_collect_queries_matches_reference(local_dataset):
    data_dir, texts = local_dataset
    model = load_saved_model(saved_model_dir("llama"))
    tokenizer = load_tokenizer()
    n_sink, sample_seq_len = 2, 60
    per_sample, mean, cov = collect_queries(model, data_dir, 2, sample_seq_len, n_sink)
    assert len(per_sample) == 2  # num_samples texts, from the "train" split
    reference = []
    for text in texts[:2]:
        ids = tokenizer(text[:sample_seq_len], return_tensors="pt").input_ids  # cut by characters
        calls = record_layers(model, ids)
        layers = []
        for layer_idx in range(LAYERS):
            attention, hidden_states = calls[layer_idx]["module"], calls[layer_idx]["hidden_states"]
            with torch.no_grad():
                queries = attention.q_proj(hidden_states).view(ids.shape[1], HEADS, HEAD_DIM).transpose(0, 1)
            layers.append(queries[:, n_sink:])
        reference.append(torch.stack(layers))  # (L, H, T - n_sink, d)
    for got, expected in zip(per_sample, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    everything = torch.cat(reference, dim=2)
    torch.testing.assert_close(mean, everything.mean(dim=2), rtol=1e-5, atol=1e-6)
    for layer_idx in range(LAYERS):
        for head in range(HEADS):
            expected_cov = torch.cov(everything[layer_idx, head].T)  # unbiased (N - 1)
            torch.testing.assert_close(cov[layer_idx, head], expected_cov, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no column 'text'"):
        collect_queries(model, data_dir, 1, 10, 0, text_column="text")


def test_cli_computes_and_saves_statistics_the_press_loads(local_dataset, tmp_path):
    data_dir, _ = local_dataset
    model_dir = saved_model_dir("llama")
    output = tmp_path / "out"
    command = [
        "--model_name", model_dir, "--output_path", str(output), "--dataset_name", data_dir,
        "--num_samples", "2", "--sample_seq_len", "60", "--n_sink", "2", "--device_map", "cpu",
    ]  # fmt: skip
    path = fire.Fire(main, command=command)
    stats_id = ExpectedAttentionStats(LAYERS, HEADS, HEAD_DIM, data_dir, model_dir, 2, 60, 2).stats_id()
    assert path == str(output / stats_id)
    saved = json.loads((Path(path) / "config.json").read_text())
    assert saved["num_samples"] == 2 and saved["n_sink"] == 2 and saved["model_name"] == model_dir

    # the press loads them through stats_folder; they are the bf16 model's query statistics
    model = load_saved_model(model_dir)
    press = ExpectedAttentionStatsPress(0.5, stats_folder=path)
    press.post_init_from_model(model)
    _, mean, cov = collect_queries(model, data_dir, 2, 60, 2)
    torch.testing.assert_close(press.mu, mean, rtol=0.05, atol=0.02)
    torch.testing.assert_close(press.cov, cov, rtol=0.05, atol=0.02)
    cache = prefill(model, random_input_ids(1, SEQ_LEN), press)
    assert all(layer.keys.shape[2] == SEQ_LEN // 2 for layer in cache.layers)


# ---------------------------------------------------------------- kept sizes


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kept_sizes_on_every_architecture(arch):
    model = get_model(arch)
    for ratio in RATIOS:
        for press in (
            QFilterPress(ratio, filters_path=local_qfilters_dir()),
            ExpectedAttentionStatsPress(ratio, stats_folder=local_ea_stats_dir(), n_future_positions=64),
        ):
            cache = prefill(model, random_input_ids(2, SEQ_LEN, seed=10), press)
            n_kept = int(SEQ_LEN * (1 - ratio))
            for layer_idx in compressed_layers(model):
                layer = cache.layers[layer_idx]
                assert layer.keys.shape == layer.values.shape == (2, KV_HEADS, n_kept, HEAD_DIM)
                assert torch.isfinite(layer.keys).all()


def test_fields_and_defaults():
    press = ExpectedAttentionStatsPress()
    assert (press.compression_ratio, press.n_future_positions, press.n_sink) == (0.0, 512, 4)
    assert (press.use_covariance, press.use_vnorm, press.epsilon) == (True, True, 0.0)
    assert (press.sample_seq_len, press.num_samples, press.dataset_name, press.stats_folder) == (
        1000,
        100,
        "kmfoda/booksum",
        None,
    )
    assert press.mu is None and press.cov is None
    qfilter = QFilterPress()
    assert (qfilter.compression_ratio, qfilter.filters_path, qfilter.q_filters) == (0.0, None, None)
    assert QFilterPress(0.3) == QFilterPress(compression_ratio=0.3)
