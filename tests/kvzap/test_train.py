# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""kvzap/train.py end to end on the reference model and a tiny local text file: collect, train the linear and MLP
surrogates, load them with KVzapPress, and evict with DMSPress(KVzapPress(...)) in a prefill and in the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline

import kvpress  # noqa: F401  (registers the pipeline)
from kvpress.presses.dms_press import DMSPress
from kvpress.presses.kvzap_press import KVzapModel, KVzapPress
from kvzap.data import load_layer, read_manifest, split_masks
from kvzap.shared import REFERENCE_MODEL_DIR
from kvzap.train import fit_ridge, r2_and_mse, train, train_mlp_layer

SMALL = dict(
    min_tokens=60,
    max_tokens=400,
    n_test_per_subset=1,
    n_tokens=24,
    hidden_dim=16,
    max_epochs=4,
    batch_size=32,
    device="cpu",
    progress=False,
)


@pytest.fixture(scope="module")
def trained(tiny_text_file, tmp_path_factory):
    """`python kvzap/train.py --model_name reference/model --data_path tiny.txt --output_dir out` (small sizes)."""
    out = tmp_path_factory.mktemp("kvzap-train") / "out"
    pushed = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KVzapModel, "push_to_hub", lambda self, repo_id, **kw: pushed.append(repo_id), raising=False)
        report = train("reference/model", str(out), data_path=str(tiny_text_file), **SMALL)
    assert pushed == []  # the Hub is only reached when asked
    return out, report


def test_fit_ridge_matches_an_augmented_least_squares_solution():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 12)) * rng.uniform(0.1, 3, size=12) + rng.normal(size=12)
    y = X @ rng.normal(size=(12, 3)) + rng.normal(size=3) + 0.1 * rng.normal(size=(200, 3))
    for alpha in (0.0, 1.0, 50.0):
        weight, bias = fit_ridge(torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), alpha)
        # min ||[X 1] [W; b] - y||^2 + alpha ||W||^2, the intercept not penalised: stack sqrt(alpha) I under X
        design = np.vstack(
            [np.hstack([X, np.ones((200, 1))]), np.hstack([np.sqrt(alpha) * np.eye(12), np.zeros((12, 1))])]
        )
        target = np.vstack([y, np.zeros((12, 3))])
        solution = np.linalg.lstsq(design, target, rcond=None)[0]
        np.testing.assert_allclose(weight.numpy(), solution[:12].T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(bias.numpy(), solution[12], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="alpha"):
        fit_ridge(torch.zeros(3, 2), torch.zeros(3, 1), -1.0)
    with pytest.raises(ValueError, match="same N"):
        fit_ridge(torch.zeros(3, 2), torch.zeros(4, 1))


def test_r2_and_mse():
    true = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 5.0]])
    assert r2_and_mse(true, true) == (1.0, 0.0)
    r2, mse = r2_and_mse(true, np.full_like(true, true.mean(0)))
    assert r2 == pytest.approx(0.0) and mse == pytest.approx(((true - true.mean(0)) ** 2).mean())


def test_mlp_learns_a_smooth_target_and_stops_early():
    torch.manual_seed(0)
    X = torch.randn(600, 8)
    y = torch.stack([X[:, 0] ** 2, torch.sin(X[:, 1])], dim=1)
    module, history = train_mlp_layer(X, y, hidden_dim=32, device="cpu", max_epochs=30, lr=1e-2, batch_size=64)
    with torch.no_grad():
        r2, _ = r2_and_mse(y.numpy(), module(X).numpy())
    assert r2 > 0.8
    assert history["val_loss"][history["best_epoch"] - 1] == min(history["val_loss"])
    # pure noise: the validation loss stops improving, so training stops before max_epochs
    _, noisy = train_mlp_layer(
        torch.randn(400, 8), torch.randn(400, 1), 64, "cpu", max_epochs=50, lr=5e-2, batch_size=32, patience=2
    )
    assert noisy["epochs"] < 50 and noisy["epochs"] - noisy["best_epoch"] == 2


def test_training_writes_checkpoints_and_metrics(trained):
    out, report = trained
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("linear", "mlp"):
        assert len(metrics[name]["layers"]) == 6
        assert all(np.isfinite(entry["test_mse"]) for entry in metrics[name]["layers"])
        assert (out / name / "config.json").exists() and (out / name / "pred.npy").exists()
    assert metrics["mlp"]["layers"][0]["epochs"] <= SMALL["max_epochs"]
    manifest = read_manifest(out / "data")
    assert manifest["complete"] and manifest["n_test_documents"] == 1 and manifest["n_documents"] == 5
    true = np.load(out / "linear" / "true.npy")
    assert true.shape == (24, 6, 2)  # the one test document's 24 tokens
    weights = load_file(str(out / "linear" / "model.safetensors"))
    for layer in (0, 5):
        X, y, doc = load_layer(out / "data", layer)
        test, train_mask = split_masks(manifest, doc)
        np.testing.assert_array_equal(true[:, layer], y[test].numpy())
        # the saved linear layer is the ridge solution on the training samples (checked by least squares)
        Xt, yt = X[train_mask].double().numpy(), y[train_mask].double().numpy()
        design = np.vstack([np.hstack([Xt, np.ones((len(Xt), 1))]), np.hstack([np.eye(256), np.zeros((256, 1))])])
        solution = np.linalg.lstsq(design, np.vstack([yt, np.zeros((256, 2))]), rcond=None)[0]
        np.testing.assert_allclose(weights[f"layers.{layer}.weight"].numpy(), solution[:256].T, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(weights[f"layers.{layer}.bias"].numpy(), solution[256], rtol=1e-3, atol=1e-4)
        pred = np.load(out / "linear" / "pred.npy")[:, layer]
        expected = X[test].numpy() @ solution[:256] + solution[256]
        np.testing.assert_allclose(pred, expected, rtol=1e-3, atol=1e-3)
        r2, mse = r2_and_mse(true[:, layer], pred)
        assert metrics["linear"]["layers"][layer]["test_r2"] == pytest.approx(r2, abs=1e-5)
        assert metrics["linear"]["layers"][layer]["test_mse"] == pytest.approx(mse, abs=1e-6)
    # a second training into the same directory is refused (the collected data could be reused elsewhere)
    with pytest.raises(ValueError, match="already holds"):
        train("reference/model", str(out), data_path="unused.txt", **SMALL)


def test_kvzap_press_loads_the_checkpoint_and_dms_evicts_below_the_threshold(trained, reference_model, tokenizer):
    out, _ = trained
    for model_type in ("linear", "mlp"):
        press = KVzapPress(model_type=model_type, kvzap_model_path=str(out))
        press.post_init_from_model(reference_model)
        assert press.kvzap_model_name == str(out / model_type)
        assert press.kvzap_model.config.hidden_dim == (16 if model_type == "mlp" else None)

    # DMSPress(KVzapPress(linear)): the masked entries are the surrogate's scores below the threshold, computed by
    # hand from the saved weights on the attention inputs of the prefill
    weights = load_file(str(out / "linear" / "model.safetensors"))
    ids = tokenizer(
        "<s>" + "The river is wide. The hills are green. " * 30, return_tensors="pt", add_special_tokens=False
    ).input_ids
    attention_inputs = {}

    def keep_input(module, args, kwargs):
        attention_inputs[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [
        layer.self_attn.register_forward_pre_hook(keep_input, with_kwargs=True)
        for layer in reference_model.model.layers
    ]
    window = 32
    try:
        with torch.no_grad():
            reference_model.model(input_ids=ids)
        scores0 = attention_inputs[0][0] @ weights["layers.0.weight"].T + weights["layers.0.bias"]  # (T, H_kv)
        threshold = float(scores0[: ids.shape[1] - window].median())
        press = DMSPress(
            KVzapPress(model_type="linear", kvzap_model_path=str(out)), threshold=threshold, sliding_window_size=window
        )
        with torch.no_grad(), press(reference_model):
            reference_model.model(input_ids=ids, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    T = ids.shape[1]
    masks = [layer.self_attn.masked_key_indices for layer in reference_model.model.layers]
    for layer in reference_model.model.layers:
        layer.self_attn.masked_key_indices = None  # the session's model stays as it was
    for layer_idx, mask in enumerate(masks):
        scores = (
            attention_inputs[layer_idx][0] @ weights[f"layers.{layer_idx}.weight"].T
            + weights[f"layers.{layer_idx}.bias"]
        )
        expected = {(h, t) for t in range(T - window) for h in range(2) if scores[t, h] < threshold}
        batch, heads, positions = mask
        assert set(zip(heads.tolist(), positions.tolist())) == expected
        assert press.compression_ratios[layer_idx] == pytest.approx(len(expected) / (2 * T))
    assert 0.2 < press.compression_ratios[0] < 0.6  # the median of layer 0's decided scores


def test_dms_kvzap_runs_through_the_pipeline(trained):
    out, _ = trained
    pipe = pipeline("kv-press-text-generation", model=str(REFERENCE_MODEL_DIR), device="cpu")
    context = "The text below hides a special magic number. " + "The river is wide. " * 20
    context += "One special magic number for bright-lake is: 4417021.\n" + "The wind is soft. " * 20 + "\n"
    question = "What is the special magic number for bright-lake?"
    full = pipe(context, question=question, max_new_tokens=8)["answer"]
    press = DMSPress(KVzapPress(model_type="linear", kvzap_model_path=str(out)), threshold=-1e9)
    answer = pipe(context, question=question, press=press, max_new_tokens=8)["answer"]
    assert press.compression_ratio == 0.0 and answer == full  # nothing below -1e9: the full cache
    press = DMSPress(KVzapPress(model_type="mlp", kvzap_model_path=str(out)), threshold=1e9, sliding_window_size=16)
    answer = pipe(context, question=question, press=press, max_new_tokens=8)["answer"]
    n_context = len(pipe.tokenizer("<s>" + context, add_special_tokens=False).input_ids)
    assert isinstance(answer, str)
    assert press.compression_ratio == pytest.approx((n_context - 16) / n_context)  # all but the window


def test_push_to_hub_only_when_asked(trained, tiny_text_file, tmp_path, monkeypatch):
    out, _ = trained
    pushed = []
    monkeypatch.setattr(KVzapModel, "push_to_hub", lambda self, repo_id, **kw: pushed.append(repo_id), raising=False)
    options = {**SMALL, "model_types": "linear"}
    report = train(
        "reference/model",
        str(tmp_path / "o"),
        data_path=str(tiny_text_file),
        data_dir=str(out / "data"),
        push_to_hub="someone",
        **options,
    )
    assert pushed == ["someone/KVzap-linear-model"] and report["linear"]["hub_repo"] == pushed[0]
    assert not (tmp_path / "o" / "mlp").exists()


def test_bad_training_options_raise(tmp_path, tiny_text_file):
    common = {**SMALL, "data_path": str(tiny_text_file)}
    with pytest.raises(ValueError, match="smaller than min_tokens"):
        train("reference/model", str(tmp_path / "a"), **{**common, "n_tokens": 60})
    with pytest.raises(ValueError, match="model_types"):
        train("reference/model", str(tmp_path / "b"), **{**common, "model_types": "tree"})
    with pytest.raises(ValueError, match="positive integer"):
        train("reference/model", str(tmp_path / "c"), **{**common, "max_epochs": 0})
    with pytest.raises(ValueError, match="lr"):
        train("reference/model", str(tmp_path / "d"), **{**common, "lr": -1})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train("reference/model", str(tmp_path / "e"), **{**common, "device": "cuda:0"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train("reference/model", str(tmp_path / "f"), **{**common, "data_path": str(tmp_path / "none.txt")})
