# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Train the KVzap surrogates of a model (https://arxiv.org/abs/2601.07891) and save what `KVzapPress` loads.

    python kvzap/train.py --model_name reference/model --data_path kvzap/reference_texts.txt --output_dir out
    python kvzap/train.py --model_name Qwen/Qwen3-8B --output_dir out --device cuda:0      # Nemotron sample (Hub)

The one idea: collect (attention input, log KVzip+ score) pairs once (`kvzap/data.py`, sharded and resumable under
`output_dir/data/`), then fit, per decoder layer, a linear model by closed-form ridge regression and a
one-hidden-layer MLP with AdamW (validation split, early stopping, gradient clipping, cosine learning rate). Both
are written as `KVzapModel`s to `output_dir/linear/` and `output_dir/mlp/` (with `true.npy`/`pred.npy` on the test
documents) and their per-layer test R2/MSE to `output_dir/metrics.json`;
`KVzapPress(model_type="mlp", kvzap_model_path=output_dir)` loads them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from kvpress.presses.kvzap_press import KVZAP_MODEL_TYPES, KVzapConfig, KVzapModel
from kvzap.data import (
    check_finite_targets,
    collect,
    describe,
    load_layer,
    load_local_documents,
    load_nemotron_dataset,
    read_manifest,
    select_documents,
    split_masks,
)
from kvzap.shared import REFERENCE_MODEL_DIR, write_report

logger = logging.getLogger("kvzap.train")

REPOSITORY_ROOT = REFERENCE_MODEL_DIR.parent.parent


# ---------------------------------------------------------------------------------------------------------------------
# Models


def fit_ridge(X: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with an unpenalised intercept (as scikit-learn's `Ridge(alpha)`), in float64 closed form:
    `W = (Xc'Xc + alpha I)^-1 Xc'yc` on centred data, `b = mean(y) - mean(X) W`. Returns `weight` `(out, in)` and
    `bias` `(out,)` in float32."""
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"ridge alpha must be a finite number >= 0, got {alpha!r}.")
    if X.ndim != 2 or y.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"fit_ridge needs X (N, D) and y (N, K) with the same N, got {tuple(X.shape)}, {tuple(y.shape)}."
        )
    X64, y64 = X.double(), y.double()
    x_mean, y_mean = X64.mean(0), y64.mean(0)
    Xc, yc = X64 - x_mean, y64 - y_mean
    gram = Xc.T @ Xc + alpha * torch.eye(X.shape[1], dtype=torch.float64, device=X.device)
    weight = torch.linalg.solve(gram, Xc.T @ yc)  # (D, K); lstsq-free: the Gram matrix is positive definite if alpha>0
    bias = y_mean - x_mean @ weight
    return weight.T.float().contiguous(), bias.float().contiguous()


def r2_and_mse(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """R2 averaged over the outputs (scikit-learn's `r2_score` default) and the mean squared error."""
    true, pred = np.asarray(true, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    residual = ((true - pred) ** 2).sum(0)
    total = ((true - true.mean(0)) ** 2).sum(0)
    r2 = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1), 0.0)
    return float(r2.mean()), float(((true - pred) ** 2).mean())


def train_mlp_layer(
    X: torch.Tensor,
    y: torch.Tensor,
    hidden_dim: int,
    device: str,
    max_epochs: int = 15,
    lr: float = 5e-3,
    batch_size: int = 512,
    val_fraction: float = 0.05,
    patience: int = 3,
    max_grad_norm: float = 1.0,
    seed: int = 42,
) -> tuple[nn.Module, dict]:
    """One layer's MLP (`Linear, GELU, Linear`) fitted to `y` by MSE with AdamW: a random `val_fraction` of the
    samples is held out, the learning rate follows a cosine over `max_epochs`, gradients are clipped to
    `max_grad_norm`, and training stops after `patience` epochs without a better validation loss (the best weights
    are kept). Returns the module (float32, on `device`) and its history."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(X.shape[0], generator=generator)
    n_val = max(1, int(round(val_fraction * X.shape[0]))) if val_fraction > 0 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]
    if train_idx.numel() == 0:
        raise ValueError(f"No training sample is left after the validation split ({X.shape[0]} samples).")
    X_train, y_train = X[train_idx].to(device), y[train_idx].to(device)
    X_val, y_val = X[val_idx].to(device), y[val_idx].to(device)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(X.shape[1], hidden_dim), nn.GELU(), nn.Linear(hidden_dim, y.shape[1])).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    loss_fn = nn.MSELoss()
    best = (math.inf, copy.deepcopy(module.state_dict()), 0)
    history: dict = {"train_loss": [], "val_loss": []}
    for epoch in range(max_epochs):
        module.train()
        permutation = torch.randperm(X_train.shape[0], generator=generator).to(device)
        total = 0.0
        for start in range(0, X_train.shape[0], batch_size):
            batch = permutation[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(X_train[batch]), y_train[batch])
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
            optimizer.step()
            total += float(loss.detach()) * batch.numel()
        scheduler.step()
        history["train_loss"].append(total / X_train.shape[0])
        if n_val == 0:
            best = (history["train_loss"][-1], copy.deepcopy(module.state_dict()), epoch + 1)
            continue
        module.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(module(X_val), y_val))
        history["val_loss"].append(val_loss)
        if val_loss < best[0]:
            best = (val_loss, copy.deepcopy(module.state_dict()), epoch + 1)
        elif epoch + 1 - best[2] >= patience:
            logger.info("early stop at epoch %d (best validation MSE %.4f at epoch %d)", epoch + 1, best[0], best[2])
            break
    module.load_state_dict(best[1])
    history.update(best_epoch=best[2], best_val_mse=best[0] if n_val else None, epochs=len(history["train_loss"]))
    return module.eval(), history


def empty_kvzap_model(num_layers: int, input_dim: int, output_dim: int, hidden_dim: Optional[int]) -> KVzapModel:
    config = KVzapConfig(input_dim=input_dim, output_dim=output_dim, n_modules=num_layers, hidden_dim=hidden_dim)
    return KVzapModel(config).float().eval()


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def resolve_model_name(model_name: str) -> str:
    """A Hub id, a local directory, or a directory relative to the repository root (`reference/model`)."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a Hub id or a local path, got {model_name!r}.")
    if Path(model_name).expanduser().exists():
        return str(Path(model_name).expanduser())
    in_repository = REPOSITORY_ROOT / model_name
    if in_repository.is_dir():
        return str(in_repository)
    return model_name


def resolve_device(device: Optional[str]) -> str:
    if device is None or device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use --device cpu.")
    return device


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _model_types(model_types: Union[str, Sequence[str]]) -> list[str]:
    names = model_types.split(",") if isinstance(model_types, str) else list(model_types)
    names = [str(name).strip() for name in names if str(name).strip()]
    unknown = [name for name in names if name not in KVZAP_MODEL_TYPES]
    if unknown or not names:
        raise ValueError(f"model_types must list some of {KVZAP_MODEL_TYPES} (comma-separated), got {model_types!r}.")
    return list(dict.fromkeys(names))


def load_documents(tokenizer, data_path, min_tokens, max_tokens, n_train_per_subset, n_test_per_subset):
    if data_path is None:
        return load_nemotron_dataset(tokenizer, min_tokens, max_tokens, n_train_per_subset, n_test_per_subset)
    frame = load_local_documents(data_path)
    return select_documents(frame, tokenizer, min_tokens, max_tokens, n_train_per_subset, n_test_per_subset)


def collect_data(
    model_name: str,
    data_dir: Path,
    data_path,
    min_tokens: int,
    max_tokens: int,
    n_train_per_subset: int,
    n_test_per_subset: int,
    n_tokens: int,
    device: str,
    fp8: bool,
    seed: int,
    docs_per_shard: int,
    progress: bool,
) -> dict:
    """Collect (or resume, or reuse) the samples of `model_name` under `data_dir`; the model is freed afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    documents = load_documents(tokenizer, data_path, min_tokens, max_tokens, n_train_per_subset, n_test_per_subset)
    manifest = read_manifest(data_dir)
    if manifest is not None and manifest.get("complete"):
        logger.info("reusing the collection in %s (%s)", data_dir, describe(manifest))
    kwargs: dict = {"dtype": "auto"}
    if fp8:
        from transformers import FineGrainedFP8Config

        kwargs["quantization_config"] = FineGrainedFP8Config()
    model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs).to(device).eval()
    try:
        manifest = collect(
            model,
            tokenizer,
            documents,
            data_dir,
            n_tokens=n_tokens,
            docs_per_shard=docs_per_shard,
            seed=seed,
            model_name=Path(model_name).name,
            progress=progress,
        )
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return manifest


def train(
    model_name: str,
    output_dir: str,
    data_path: Optional[str] = None,
    min_tokens: int = 750,
    max_tokens: int = 1250,
    n_train_per_subset: int = 500,
    n_test_per_subset: int = 5,
    n_tokens: int = 500,
    fp8: bool = False,
    hidden_dim: int = 512,
    max_epochs: int = 15,
    lr: float = 5e-3,
    batch_size: int = 512,
    device: Optional[str] = None,
    model_types: str = "mlp,linear",
    ridge_alpha: float = 1.0,
    val_fraction: float = 0.05,
    patience: int = 3,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    data_dir: Optional[str] = None,
    docs_per_shard: int = 64,
    push_to_hub: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Collect the data, train the surrogates and save them; returns the metrics (also in `output_dir/metrics.json`).

    model_name: Hub id or local directory of the model (`reference/model` is found from any directory).
    output_dir: gets `mlp/` and `linear/` (KVzapModel checkpoints), `metrics.json` and, unless `data_dir` is given,
        the collected samples in `data/` (an interrupted run resumes them).
    data_path: local documents (.txt with blank-line separated documents, .jsonl/.parquet with a `text` column, or a
        directory of them); None loads upstream's Nemotron pretraining sample from the Hub.
    min_tokens, max_tokens, n_train_per_subset, n_test_per_subset: which documents are used (per `subset`).
    n_tokens: context tokens sampled per document (must be below min_tokens).
    device: "cpu", "cuda:0", ...; None picks CUDA when available.
    model_types: which surrogates to train, "mlp,linear".
    push_to_hub: a Hub namespace; when given, pushes `{namespace}/KVzap-{type}-{model name}` (never by default).
    """
    for name, value in (
        ("n_tokens", n_tokens),
        ("hidden_dim", hidden_dim),
        ("max_epochs", max_epochs),
        ("batch_size", batch_size),
        ("patience", patience),
        ("docs_per_shard", docs_per_shard),
    ):
        _positive_int(name, value)
    if n_tokens >= min_tokens:
        raise ValueError(
            f"n_tokens ({n_tokens}) must be smaller than min_tokens ({min_tokens}): every document must "
            "have more context tokens than are sampled from it."
        )
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    if output_dir is None or str(output_dir) == "":
        raise ValueError("output_dir is required: the directory that gets mlp/, linear/ and metrics.json.")
    types = _model_types(model_types)
    device = resolve_device(device)
    model_path = resolve_model_name(model_name)
    output = Path(output_dir).expanduser()
    existing = [name for name in types + ["metrics.json"] if (output / name).exists()]
    if existing:
        raise ValueError(
            f"{output} already holds {existing} from an earlier training: choose another --output_dir or delete them "
            "(collected data in data/ is reused)."
        )
    output.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir).expanduser() if data_dir else output / "data"

    started = time.perf_counter()
    manifest = collect_data(
        model_path,
        data,
        data_path,
        min_tokens,
        max_tokens,
        n_train_per_subset,
        n_test_per_subset,
        n_tokens,
        device,
        fp8,
        seed,
        docs_per_shard,
        progress,
    )
    collect_seconds = time.perf_counter() - started
    logger.info("collected %s in %.1f s", describe(manifest), collect_seconds)

    num_layers, hidden, kv_heads = manifest["num_layers"], manifest["hidden_size"], manifest["num_kv_heads"]
    models = {
        name: empty_kvzap_model(num_layers, hidden, kv_heads, hidden_dim if name == "mlp" else None) for name in types
    }
    true_layers: list[np.ndarray] = []
    pred_layers: dict[str, list[np.ndarray]] = {name: [] for name in types}
    metrics: dict = {name: {"layers": []} for name in types}
    started = time.perf_counter()
    for layer in range(num_layers):
        X, y, doc = load_layer(data, layer)
        check_finite_targets(y, f"layer {layer}")
        test, train_mask = split_masks(manifest, doc)
        X_train, y_train, X_test, y_test = X[train_mask], y[train_mask], X[test], y[test]
        true_layers.append(y_test.numpy())
        for name in types:
            if name == "linear":
                weight, bias = fit_ridge(X_train, y_train, ridge_alpha)
                target = models[name].layers[layer]
                with torch.no_grad():
                    target.weight.copy_(weight)
                    target.bias.copy_(bias)
                extra: dict = {}
            else:
                trained, extra = train_mlp_layer(
                    X_train,
                    y_train,
                    hidden_dim,
                    device,
                    max_epochs=max_epochs,
                    lr=lr,
                    batch_size=batch_size,
                    val_fraction=val_fraction,
                    patience=patience,
                    max_grad_norm=max_grad_norm,
                    seed=42 + layer,
                )
                models[name].layers[layer].load_state_dict({k: v.cpu() for k, v in trained.state_dict().items()})
            with torch.no_grad():
                pred = models[name].layers[layer](X_test).numpy() if len(X_test) else np.zeros((0, kv_heads))
            pred_layers[name].append(pred)
            r2, mse = r2_and_mse(y_test.numpy(), pred) if len(X_test) else (float("nan"), float("nan"))
            entry = {"layer": layer, "test_r2": r2, "test_mse": mse}
            if name == "mlp":
                entry.update(best_val_mse=extra["best_val_mse"], best_epoch=extra["best_epoch"], epochs=extra["epochs"])
            metrics[name]["layers"].append(entry)
            logger.info("layer %d %s: test R2 %.3f, MSE %.4f", layer, name, r2, mse)
    train_seconds = time.perf_counter() - started

    true = np.stack(true_layers, axis=1).astype(np.float32)  # (N_test, L, H_kv)
    for name in types:
        directory = output / name
        models[name].save_pretrained(directory)
        pred = np.stack(pred_layers[name], axis=1).astype(np.float32)
        np.save(directory / "true.npy", true)
        np.save(directory / "pred.npy", pred)
        layers = metrics[name]["layers"]
        metrics[name]["mean_test_r2"] = float(np.mean([entry["test_r2"] for entry in layers]))
        metrics[name]["mean_test_mse"] = float(np.mean([entry["test_mse"] for entry in layers]))
        if push_to_hub:
            repo_id = f"{push_to_hub}/KVzap-{name}-{Path(model_path).name}"
            models[name].push_to_hub(repo_id)
            metrics[name]["hub_repo"] = repo_id
    report = {
        "model_name": model_name,
        "data": describe(manifest),
        "device": device,
        "collect_seconds": round(collect_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        **metrics,
    }
    write_report(output / "metrics.json", report)
    for name in types:
        logger.info(
            "%s: mean test R2 %.3f (per layer %s)",
            name,
            metrics[name]["mean_test_r2"],
            ", ".join(f"{e['test_r2']:.2f}" for e in metrics[name]["layers"]),
        )
    return report


def main() -> None:
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fire.Fire(train, serialize=lambda report: None)  # the metrics are logged and in metrics.json


if __name__ == "__main__":
    main()
