# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""LUKVPress: per-layer, per-head budgets read from a budget curve (local file, registry or URL)."""

import functools
import http.server
import math
import threading

import numpy as np
import pytest
import torch

from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.lukv_press import (
    BUDGET_CURVE_URLS,
    LLAMA_3_1_8B_EA_CURVE_URL,
    LUKVPress,
    cache,
    load_budget_curve,
)
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import (
    ARCHITECTURES,
    attention_modules,
    compressed_layers,
    distinct_ids,
    get_model,
    load_saved_model,
    prefill,
    random_input_ids,
    saved_model_dir,
)

# prune-ratio offsets per (layer, KV head) around the global ratio
OFFSETS = np.array([[-0.1, 0.1], [0.05, -0.05]])


def write_curve(path, offsets=OFFSETS, shape=(2, 2)) -> str:
    ratios = np.arange(1, 100) / 100
    curve = np.clip(ratios[:, None, None] + np.broadcast_to(offsets, shape), 0, 1).astype(np.float32)
    np.save(path, curve)
    return str(path)


def reference_budgets(curve: np.ndarray, ratio: float, layer_idx: int, k_len: int) -> list[int]:
    row = min(max(int(round(ratio * 100)) - 1, 0), 98)
    ideal = [min(max(1 - float(p), 0.0), 1.0) * k_len for p in curve[row, layer_idx]]
    num_heads = len(ideal)
    total = min(max(round(sum(ideal)), num_heads), num_heads * k_len)
    budgets = [math.floor(x) for x in ideal]
    by_fraction = sorted(range(num_heads), key=lambda h: -(ideal[h] - budgets[h]))
    for h in by_fraction[: max(0, min(total - sum(budgets), num_heads))]:
        budgets[h] += 1
    return [min(max(b, 1), k_len) for b in budgets]


def reference_kept(scores: list[float], budget: int, sink: int, window: int) -> set[int]:
    k_len = len(scores)
    protected = set(range(min(sink, k_len))) | set(range(max(0, k_len - window), k_len))
    order = sorted(range(k_len), key=lambda t: (0, 0.0, t) if t in protected else (1, -scores[t], t))
    return set(order[:budget])


def masked_bool(module, shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    batch_idx, head_idx, seq_idx = module.masked_key_indices
    mask[batch_idx.cpu(), head_idx.cpu(), seq_idx.cpu()] = True
    return mask


@pytest.fixture
def curve_file(tmp_path):
    cache.clear()
    return write_curve(tmp_path / "curve.npy")


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.77])
def test_head_budgets_and_kept_tokens_follow_the_curve(curve_file, ratio):
    model = get_model("llama")
    bsz, seq_len, sink, window = 2, 50, 3, 2
    input_ids = distinct_ids(bsz, seq_len, seed=1)
    press = LUKVPress(KnormPress(), compression_ratio=ratio, sink=sink, window=window, budget_curve_path=curve_file)
    full = prefill(model, input_ids)  # first: a prefill without press resets the masks
    cache_ = prefill(model, input_ids, press)
    curve = np.load(curve_file)
    for layer_idx in compressed_layers(model):
        assert cache_.layers[layer_idx].keys.shape[2] == seq_len  # masked, not removed
        masked = masked_bool(attention_modules(model)[layer_idx], (bsz, 2, seq_len))
        budgets = reference_budgets(curve, ratio, layer_idx, seq_len)
        assert (~masked).sum(dim=-1).tolist() == [budgets] * bsz
        scores = -full.layers[layer_idx].keys.norm(dim=-1)
        for b in range(bsz):
            for h in range(2):
                kept = set((~masked[b, h]).nonzero().flatten().tolist())
                assert kept == reference_kept(scores[b, h].tolist(), budgets[h], sink, window)
    # the heads of a layer get different budgets, as the curve says
    assert reference_budgets(curve, ratio, 0, seq_len)[0] > reference_budgets(curve, ratio, 0, seq_len)[1]


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_uniform_curve_masks_the_compression_ratio(tmp_path, ratio):
    cache.clear()
    path = write_curve(tmp_path / "uniform.npy", offsets=np.zeros((2, 2)))
    model = get_model("qwen2")
    seq_len = 128
    prefill(model, random_input_ids(2, seq_len, seed=2), LUKVPress(KnormPress(), ratio, budget_curve_path=path))
    fractions = [
        masked_bool(attention_modules(model)[i], (2, 2, seq_len)).float().mean().item()
        for i in compressed_layers(model)
    ]
    assert abs(sum(fractions) / len(fractions) - ratio) < 1e-2


def test_sink_and_window_are_never_masked(curve_file):
    model = get_model("llama")
    press = LUKVPress(KnormPress(), compression_ratio=0.7, sink=4, window=3, budget_curve_path=curve_file)
    prefill(model, random_input_ids(1, 60, seed=3), press)
    for module in attention_modules(model):
        masked = masked_bool(module, (1, 2, 60))
        assert not masked[..., :4].any() and not masked[..., -3:].any()
        assert masked.any()


def test_curve_from_the_registry_by_model_name(tmp_path, monkeypatch, curve_file):
    model = load_saved_model(saved_model_dir("llama"))
    name = model.config.name_or_path
    monkeypatch.setitem(BUDGET_CURVE_URLS, (name, "KnormPress"), curve_file)
    press = LUKVPress(KnormPress(), compression_ratio=0.5)
    prefill(model, random_input_ids(1, 30, seed=4), press)
    assert np.array_equal(press._budget_curves, np.load(curve_file))
    assert attention_modules(model)[0].masked_key_indices is not None

    # a local copy of a registered model finds that model's curve by its last name component
    monkeypatch.delitem(BUDGET_CURVE_URLS, (name, "KnormPress"))
    monkeypatch.setitem(BUDGET_CURVE_URLS, ("some-org/" + name.rstrip("/").split("/")[-1], "KnormPress"), curve_file)
    assert LUKVPress(KnormPress(), 0.5).budget_curve_source(model) == curve_file

    with pytest.raises(KeyError, match="No LU-KV budget curve .* with SnapKVPress.*Llama-3.1-8B-Instruct"):
        LUKVPress(SnapKVPress(), 0.5).post_init_from_model(model)


def test_registry_holds_upstreams_curve():
    assert BUDGET_CURVE_URLS[("meta-llama/Llama-3.1-8B-Instruct", "ExpectedAttentionPress")] == (
        LLAMA_3_1_8B_EA_CURVE_URL
    )
    assert LLAMA_3_1_8B_EA_CURVE_URL.startswith("https://raw.githubusercontent.com/baidu-baige/LU-KV/")
    press = LUKVPress()
    assert press.press == ExpectedAttentionPress(epsilon=2e-2)
    assert (press.compression_ratio, press.sink, press.window, press.budget_curve_path) == (0.0, 4, 1, None)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_curve_loaded_from_a_url_and_cached(tmp_path, monkeypatch, curve_file):
    """The real download path (urllib), served by a local HTTP server; errors say what to do offline."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/curve.npy"
        curve = load_budget_curve(url)
        assert np.array_equal(curve, np.load(curve_file))
        assert url in cache and load_budget_curve(url) is curve
        press = LUKVPress(KnormPress(), 0.5, budget_curve_path=url)
        prefill(get_model("llama"), random_input_ids(1, 30, seed=5), press)
        assert press._budget_curves is curve
        with pytest.raises(OSError, match="Could not download the LU-KV budget curve.*budget_curve_path"):
            load_budget_curve(f"http://127.0.0.1:{server.server_port}/missing.npy")
    finally:
        server.shutdown()
        server.server_close()


def test_missing_or_bad_curve_files(tmp_path, curve_file):
    model = get_model("llama")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prefill(model, random_input_ids(1, 20), LUKVPress(KnormPress(), 0.5, budget_curve_path=str(tmp_path / "no")))
    not_npy = tmp_path / "curve.txt"
    not_npy.write_text("not an array")
    with pytest.raises(ValueError, match="not a budget curve"):
        load_budget_curve(str(not_npy))
    wrong = write_curve(tmp_path / "wrong.npy", offsets=np.zeros((3, 2)), shape=(3, 2))
    with pytest.raises(ValueError, match=r"shape \(99, 3, 2\).*needs \(99, 2, 2\)"):
        prefill(model, random_input_ids(1, 20), LUKVPress(KnormPress(), 0.5, budget_curve_path=wrong))
    assert np.array_equal(load_budget_curve("file://" + curve_file), np.load(curve_file))


def test_bad_input_and_unloaded_curves(curve_file):
    with pytest.raises(TypeError, match="ScorerPress"):
        LUKVPress(ComposedPress([KnormPress(0.5)]))
    with pytest.raises(ValueError, match="compression_ratio"):
        LUKVPress(KnormPress(), compression_ratio=1.0)
    with pytest.raises(ValueError, match="sink"):
        LUKVPress(KnormPress(), sink=-1)
    with pytest.raises(ValueError, match="window"):
        LUKVPress(KnormPress(), window=True)
    with pytest.raises(TypeError, match="budget_curve_path"):
        LUKVPress(KnormPress(), budget_curve_path=3)
    model = get_model("llama")
    module = attention_modules(model)[0]
    keys = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="not loaded"):
        LUKVPress(KnormPress(), 0.5).compress(module, torch.randn(1, 10, 64), keys, keys, None, {})
    # ratio 0 does nothing, not even loading a curve
    zero = LUKVPress(KnormPress(), 0.0, budget_curve_path=curve_file)
    assert prefill(model, random_input_ids(1, 12), zero).get_seq_length() == 12
    assert all(m.masked_key_indices is None for m in attention_modules(model))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("inner", ["knorm", "snapkv"])
def test_lukv_on_every_architecture(arch, inner, curve_file):
    model = get_model(arch)
    ratio, seq_len = 0.5, 40
    press = LUKVPress(
        KnormPress() if inner == "knorm" else SnapKVPress(window_size=2), ratio, budget_curve_path=curve_file
    )
    kv_cache = prefill(model, random_input_ids(2, seq_len, seed=6), press)
    curve = np.load(curve_file)
    for layer_idx in compressed_layers(model):
        assert kv_cache.layers[layer_idx].keys.shape[2] == seq_len
        masked = masked_bool(attention_modules(model)[layer_idx], (2, 2, seq_len))
        assert (~masked).sum(dim=-1).tolist() == [reference_budgets(curve, ratio, layer_idx, seq_len)] * 2
    with torch.no_grad():
        logits = model(random_input_ids(2, 1, seed=7), **cache_kwargs(model, kv_cache)).logits
    assert torch.isfinite(logits).all()
