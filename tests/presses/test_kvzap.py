# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KVzapPress: the surrogate's scores on constructed hidden states, kept tokens, and loading local/Hub models."""

import functools
import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel, KVzapPress
from kvpress.presses.scorer_press import gather_tokens
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import (
    ARCHITECTURES,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    attention_modules,
    compressed_layers,
    distinct_ids,
    get_model,
    load_saved_model,
    prefill,
    random_input_ids,
    record_layers,
    saved_model_dir,
    temp_dir,
)


def save_kvzap(path: Path, hidden_dim=None, seed=0, n_modules=LAYERS, input_dim=HIDDEN, output_dim=KV_HEADS) -> str:
    """An untrained KVzap model for the tiny test models, saved with save_pretrained."""
    torch.manual_seed(seed)
    config = KVzapConfig(input_dim=input_dim, output_dim=output_dim, n_modules=n_modules, hidden_dim=hidden_dim)
    KVzapModel(config).save_pretrained(path)
    return str(path)


@functools.lru_cache(maxsize=None)
def untrained_kvzap_dir() -> str:
    """A directory laid out like kvzap/train.py's output (`linear/` and `mlp/`), for every tiny test model (they
    share hidden size, layer count and KV heads): `KVzapPress(ratio, model_type, kvzap_model_path=...)`."""
    root = Path(temp_dir(prefix="kvpress-kvzap-"))
    save_kvzap(root / "linear", seed=1)
    save_kvzap(root / "mlp", hidden_dim=8, seed=2)
    return str(root)


def direct_scores(weights: dict, layer_idx: int, hidden_states: torch.Tensor, mlp: bool) -> torch.Tensor:
    """The saved weights applied by hand: `(B, H_kv, T)`."""
    prefix = f"layers.{layer_idx}."
    if not mlp:
        out = hidden_states @ weights[prefix + "weight"].T + weights[prefix + "bias"]
    else:
        inner = hidden_states @ weights[prefix + "0.weight"].T + weights[prefix + "0.bias"]
        out = nn.functional.gelu(inner) @ weights[prefix + "2.weight"].T + weights[prefix + "2.bias"]
    return out.transpose(1, 2)


def test_kvzap_model_round_trip_and_shapes(tmp_path):
    path = save_kvzap(tmp_path / "mlp", hidden_dim=8)
    model = KVzapModel.from_pretrained(path)
    assert isinstance(model.config, KVzapConfig) and model.config.model_type == "kvzap"
    assert (model.config.input_dim, model.config.output_dim, model.config.n_modules) == (HIDDEN, KV_HEADS, LAYERS)
    assert [type(m) for m in model.layers[0]] == [nn.Linear, nn.GELU, nn.Linear]
    x = torch.randn(5, LAYERS, HIDDEN)
    out = model(x)
    assert out.shape == (5, LAYERS, KV_HEADS)
    weights = load_file(str(Path(path) / "model.safetensors"))
    for i in range(LAYERS):
        expected = direct_scores(weights, i, x[:, i][None], mlp=True)[0].T
        torch.testing.assert_close(out[:, i], expected)
    linear = KVzapModel(KVzapConfig(input_dim=4, output_dim=3, n_modules=2))
    assert all(isinstance(m, nn.Linear) for m in linear.layers)
    with pytest.raises(TypeError):
        KVzapConfig(4, 3, 2)  # keyword-only, as upstream


@pytest.mark.parametrize("model_type", ["linear", "mlp"])
def test_scores_equal_the_surrogate_on_constructed_hidden_states(model_type):
    model = get_model("llama")
    press = KVzapPress(0.5, model_type=model_type, kvzap_model_path=untrained_kvzap_dir())
    press.post_init_from_model(model)
    assert press.kvzap_model_name == str(Path(untrained_kvzap_dir()) / model_type)
    weights = load_file(str(Path(untrained_kvzap_dir()) / model_type / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(2, 7, HIDDEN, generator=generator)
    keys = torch.randn(2, KV_HEADS, 7, 16, generator=generator)
    for layer_idx, module in enumerate(attention_modules(model)):
        scores = press.score(module, hidden_states, keys, keys, None, {})
        expected = direct_scores(weights, layer_idx, hidden_states, mlp=model_type == "mlp")
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_kept_tokens_are_the_top_surrogate_scores(ratio):
    model = get_model("qwen3")
    input_ids = distinct_ids(2, 48, seed=1)
    recorded = record_layers(model, input_ids)
    press = KVzapPress(ratio, model_type="linear", kvzap_model_path=untrained_kvzap_dir())
    cache = prefill(model, input_ids, press)
    weights = load_file(str(Path(untrained_kvzap_dir()) / "linear" / "model.safetensors"))
    n_kept = int(48 * (1 - ratio))
    for layer_idx in compressed_layers(model):
        layer = recorded[layer_idx]
        scores = direct_scores(weights, layer_idx, layer["hidden_states"], mlp=False)
        kept = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        assert cache.layers[layer_idx].keys.shape[2] == n_kept
        assert torch.equal(cache.layers[layer_idx].keys, gather_tokens(layer["keys"], kept))
        assert torch.equal(cache.layers[layer_idx].values, gather_tokens(layer["values"], kept))


def test_local_directory_variants_and_loading_once(tmp_path):
    model = get_model("llama")
    direct = save_kvzap(tmp_path / "direct", seed=3)
    press = KVzapPress(0.5, kvzap_model_path=direct)  # a directory with config.json: model_type is not needed
    press.post_init_from_model(model)
    loaded = press.kvzap_model
    assert loaded.config.hidden_dim is None and press.kvzap_model_name == direct
    prefill(model, random_input_ids(1, 20), press)
    assert press.kvzap_model is loaded  # entering the press again does not reload the same name
    press.kvzap_model_path = untrained_kvzap_dir()  # a train.py output: model_type picks the sub-directory
    press.post_init_from_model(model)
    assert press.kvzap_model is not loaded and press.kvzap_model.config.hidden_dim == 8


def test_default_hub_name_and_missing_model_error():
    model = load_saved_model(saved_model_dir("llama"))
    press = KVzapPress(0.5, model_type="linear")
    base_name = model.config.name_or_path.rstrip("/").split("/")[-1]
    assert press.default_kvzap_model_name(model) == f"nvidia/KVzap-linear-{base_name}"
    with pytest.raises(OSError, match=rf"could not load the KVzap model 'nvidia/KVzap-linear-{base_name}'"):
        press.post_init_from_model(model)
    with pytest.raises(OSError, match="kvzap_model_path"):
        KVzapPress(0.5, kvzap_model_path="/nonexistent/kvzap").post_init_from_model(model)


def test_bad_input(tmp_path):
    model = get_model("llama")
    with pytest.raises(ValueError, match="model_type must be one of"):
        KVzapPress(0.5, model_type="transformer")
    with pytest.raises(ValueError, match="compression_ratio"):
        KVzapPress(1.0)
    with pytest.raises(TypeError, match="kvzap_model_path"):
        KVzapPress(0.5, kvzap_model_path=3)
    assert "kvzap_model_name" not in inspect.signature(KVzapPress).parameters  # set by post_init, as upstream
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        KVzapPress(0.5, kvzap_model_path=str(a_file)).post_init_from_model(model)
    wrong = save_kvzap(tmp_path / "wrong", n_modules=3)
    with pytest.raises(ValueError, match="does not fit LlamaForCausalLM"):
        prefill(model, random_input_ids(1, 20), KVzapPress(0.5, kvzap_model_path=wrong))
    module = attention_modules(model)[0]
    with pytest.raises(ValueError, match="no KVzap model loaded"):
        KVzapPress(0.5).score(module, torch.randn(1, 4, HIDDEN), torch.randn(1, 2, 4, 16), None, None, {})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kvzap_on_every_architecture(arch):
    model = get_model(arch)
    input_ids = random_input_ids(2, 40, seed=4)
    presses = {
        "alone": KVzapPress(0.5, kvzap_model_path=untrained_kvzap_dir()),
        "adakv": AdaKVPress(KVzapPress(0.5, kvzap_model_path=untrained_kvzap_dir())),
    }
    for name, press in presses.items():
        cache = prefill(model, input_ids, press)
        for layer_idx in compressed_layers(model):
            if name == "alone":
                assert cache.layers[layer_idx].keys.shape[2] == 20
            else:
                assert cache.layers[layer_idx].keys.shape[2] == 40
                assert attention_modules(model)[layer_idx].masked_key_indices[0].numel() == 2 * KV_HEADS * 20
        with torch.no_grad():
            logits = model(random_input_ids(2, 1, seed=5), **cache_kwargs(model, cache)).logits
        assert torch.isfinite(logits).all()
