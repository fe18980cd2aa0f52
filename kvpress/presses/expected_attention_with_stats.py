# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""ExpectedAttentionStatsPress: Expected Attention with query statistics precomputed offline on a dataset instead of
estimated from the context (https://arxiv.org/abs/2510.00636).

Run this module as a script (`python -m kvpress.presses.expected_attention_with_stats --model_name ...`) to compute
the statistics of a model; see `main`.
"""

from __future__ import annotations

import importlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generator, Optional

import torch
from huggingface_hub import PyTorchModelHubMixin, get_collection
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.utils import describe_hub_source, get_language_model

logger = logging.getLogger(__name__)

STATS_HUB_NAMESPACE = "alessiodevoto"
STATS_COLLECTION = "alessiodevoto/expectedattentionstats-68b0248d519303713320e2cf"
_HUB_ERRORS = (OSError, ValueError, TypeError, RuntimeError)


class ExpectedAttentionStats(nn.Module, PyTorchModelHubMixin):
    """Per-layer, per-head mean `query_mean` `(L, H, d)` and covariance `query_cov` `(L, H, d, d)` of a model's
    pre-RoPE queries, with the settings they were computed with (used to name the Hub repo, see `stats_id`)."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        dataset_name: str,
        model_name: str,
        num_samples: int,
        sample_seq_len: int,
        n_sink: int,
    ):
        super().__init__()
        self.query_mean = nn.Parameter(torch.zeros(num_layers, num_heads, head_dim))
        self.query_cov = nn.Parameter(torch.zeros(num_layers, num_heads, head_dim, head_dim))
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dataset_name = dataset_name
        self.model_name = model_name
        self.num_samples = num_samples
        self.sample_seq_len = sample_seq_len
        self.n_sink = n_sink

    def stats_id(self) -> str:
        """The Hub repo id of these statistics."""
        model = self.model_name.replace("/", "_")
        dataset = self.dataset_name.replace("/", "_")
        return (
            f"{STATS_HUB_NAMESPACE}/exp_att_stats_{model}_{dataset}_{self.num_samples}_{self.sample_seq_len}_"
            f"{self.n_sink}"
        )


def _model_dimensions(model: PreTrainedModel) -> tuple[int, int, int]:
    attention = getattr(get_language_model(model), "layers")[0].self_attn
    config = attention.config
    return config.num_hidden_layers, config.num_attention_heads, attention.head_dim


def _stats_from_file(path: str, press: "ExpectedAttentionStatsPress") -> ExpectedAttentionStats:
    """Statistics stored in one safetensors or torch file holding `query_mean` and `query_cov`."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        content = load_file(path)
    else:
        content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or not {"query_mean", "query_cov"} <= set(content):
        raise ValueError(f"{path} must hold two tensors named 'query_mean' (L, H, d) and 'query_cov' (L, H, d, d).")
    num_layers, num_heads, head_dim = content["query_mean"].shape
    stats = ExpectedAttentionStats(
        num_layers, num_heads, head_dim, press.dataset_name, path, press.num_samples, press.sample_seq_len, press.n_sink
    )
    stats.load_state_dict({"query_mean": content["query_mean"], "query_cov": content["query_cov"]})
    return stats


def _load_stats(name_or_path: str, press: "ExpectedAttentionStatsPress", hint: str) -> ExpectedAttentionStats:
    """Load statistics from a local file, a local directory (`save_pretrained`) or a Hub repo id."""
    if os.path.isfile(name_or_path):
        return _stats_from_file(name_or_path, press)
    try:
        return ExpectedAttentionStats.from_pretrained(name_or_path)
    except _HUB_ERRORS as error:
        where = describe_hub_source(name_or_path)
        raise ValueError(
            f"Could not load Expected Attention statistics from {where} ({type(error).__name__}: {error}). {hint}"
        ) from error


def _compute_hint(model_name: str, press: "ExpectedAttentionStatsPress") -> str:
    return (
        "Statistics are published for some models only (ExpectedAttentionStatsPress.available_stats() lists them). "
        "Compute them with `python -m kvpress.presses.expected_attention_with_stats "
        f"--model_name {model_name} --output_path DIR --dataset_name {press.dataset_name} "
        f"--num_samples {press.num_samples} --sample_seq_len {press.sample_seq_len} --n_sink {press.n_sink}` "
        "and pass the printed directory as ExpectedAttentionStatsPress(stats_folder=...)."
    )


@dataclass
class ExpectedAttentionStatsPress(ExpectedAttentionPress):
    """ExpectedAttentionPress whose query mean and covariance come from statistics computed offline.

    The statistics (an `ExpectedAttentionStats`) are loaded by `post_init_from_model`, once: from `stats_folder`
    when given (a local directory written by `save_pretrained`, a local safetensors/torch file, or a Hub repo id),
    otherwise from the Hub repo named after the model and the collection settings (`dataset_name`, `num_samples`,
    `sample_seq_len`, `n_sink`; see `ExpectedAttentionStats.stats_id`). The context's own queries are not used: only
    its length, which fixes the future positions whose RoPE is averaged.
    """

    sample_seq_len: int = 1000
    num_samples: int = 100
    dataset_name: str = "kmfoda/booksum"
    stats_folder: Optional[str] = None
    mu: torch.Tensor = field(default=None, init=False)
    cov: torch.Tensor = field(default=None, init=False)

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        if self.mu is not None or self.cov is not None:
            return
        if self.stats_folder is not None:
            stats = _load_stats(str(self.stats_folder), self, _compute_hint(model.config.name_or_path, self))
            source = str(self.stats_folder)
        else:
            stats = self._maybe_load_stats_from_hub(model)
            source = f"the Hub statistics of {model.config.name_or_path!r}"
        num_layers, num_heads, head_dim = _model_dimensions(model)
        expected = (num_layers, num_heads, head_dim)
        if tuple(stats.query_mean.shape) != expected or tuple(stats.query_cov.shape) != expected + (head_dim,):
            raise ValueError(
                f"Expected Attention statistics from {source} have query_mean {tuple(stats.query_mean.shape)} and "
                f"query_cov {tuple(stats.query_cov.shape)}, but {type(model).__name__} needs (num_layers, num_heads, "
                f"head_dim) = {expected}. Use statistics computed for this model."
            )
        self.mu = stats.query_mean.data.to(model.device, model.dtype)
        self.cov = stats.query_cov.data.to(model.device, model.dtype)

    def _maybe_load_stats_from_hub(self, model: PreTrainedModel) -> ExpectedAttentionStats:
        """The statistics of `model` for this press's collection settings, from the Hub."""
        num_layers, num_heads, head_dim = _model_dimensions(model)
        model_name = model.config.name_or_path
        wanted = ExpectedAttentionStats(
            num_layers=num_layers,
            num_heads=num_heads,
            head_dim=head_dim,
            dataset_name=self.dataset_name,
            model_name=model_name,
            num_samples=self.num_samples,
            sample_seq_len=self.sample_seq_len,
            n_sink=self.n_sink,
        )
        return _load_stats(wanted.stats_id(), self, _compute_hint(model_name, self))

    @staticmethod
    def available_stats() -> list[str]:
        """Hub repo ids of the published statistics (from the Hub collection; needs network access)."""
        return [item.item_id for item in get_collection(STATS_COLLECTION).items]

    def get_query_statistics(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        start_position: int | None = None,
        n_sink_queries: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored mean `(1, H, d)` and covariance `(1, H, d, d)` of this layer, rotated by the RoPE averaged over
        the positions that follow the context (`n_sink_queries` is not used: the statistics are precomputed)."""
        if self.mu is None:
            raise ValueError(
                "Expected Attention statistics not loaded. They are loaded when entering `with press(model)`; if you "
                "are using a wrapper press or calling score directly, call press.post_init_from_model(model) first."
            )
        layer_idx = int(module.layer_idx)
        if layer_idx >= self.mu.shape[0]:
            raise ValueError(
                f"The loaded statistics cover {self.mu.shape[0]} layers, none for layer {layer_idx}: they were "
                "computed for another model."
            )
        q_len = hidden_states.shape[1]
        target = dict(device=hidden_states.device, dtype=hidden_states.dtype)
        mu = self.mu[layer_idx].to(**target)
        cov = self.cov[layer_idx].to(**target) if self.use_covariance else None
        mu, cov = self.apply_avg_rope(module, mu, cov, q_len if start_position is None else start_position)
        return mu.unsqueeze(0), (cov.unsqueeze(0) if cov is not None else None)


@contextmanager
def patch_rotary_embedding(model: PreTrainedModel) -> Generator[list[torch.Tensor], None, None]:
    """Record the queries that every attention layer of `model` passes to RoPE, in call order.

    Replaces `apply_rotary_pos_emb` in the model's modeling module by a wrapper that appends each query tensor
    `(B, H, T, d)` (pre-RoPE, after any q-norm; detached, on CPU) to the yielded list. Restored on exit.
    """
    modeling = importlib.import_module(model.__class__.__module__)
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None:
        raise AttributeError(
            f"{modeling.__name__} has no `apply_rotary_pos_emb`: queries of {type(model).__name__} cannot be "
            "recorded this way."
        )
    captured: list[torch.Tensor] = []

    def recording_apply_rotary_pos_emb(q, k, *args, **kwargs):
        captured.append(q.detach().cpu())
        return original(q, k, *args, **kwargs)

    setattr(modeling, "apply_rotary_pos_emb", recording_apply_rotary_pos_emb)
    try:
        yield captured
    finally:
        setattr(modeling, "apply_rotary_pos_emb", original)


def collect_queries(
    model: PreTrainedModel,
    dataset_name: str,
    num_samples: int,
    sample_seq_len: int,
    n_sink: int,
    text_column: str = "chapter",
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Pre-RoPE queries of `model` on the first `num_samples` texts of `dataset_name` (split "train").

    Each text is cut to its first `sample_seq_len` *characters* and tokenized with the model's tokenizer (special
    tokens included); the first `n_sink` tokens of each sample are dropped. `dataset_name` is anything
    `datasets.load_dataset` accepts (a Hub dataset or a local directory of data files).

    Returns the per-sample queries `(L, H, T_i, d)`, their mean `(L, H, d)` and their covariance `(L, H, d, d)`
    (unbiased, N - 1) over all tokens of all samples.
    """
    from datasets import load_dataset

    tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
    dataset = load_dataset(dataset_name, split=f"train[:{num_samples}]")
    if text_column not in dataset.column_names:
        raise ValueError(f"{dataset_name} has no column {text_column!r}; its columns are {dataset.column_names}.")
    per_sample: list[torch.Tensor] = []
    with patch_rotary_embedding(model) as captured, torch.no_grad():
        for text in tqdm(dataset[text_column], desc="Collecting queries"):
            captured.clear()
            inputs = tokenizer(text[:sample_seq_len], return_tensors="pt").to(model.device)
            model(**inputs)
            # one capture (1, H, T, d) per layer, in layer order
            per_sample.append(torch.cat(captured, dim=0)[:, :, n_sink:])
    queries = torch.cat(per_sample, dim=2).float()
    n_tokens = queries.shape[2]
    if n_tokens < 2:
        raise ValueError(
            f"Only {n_tokens} query token(s) left after dropping {n_sink} sink tokens per sample; the covariance "
            "needs at least 2: use more or longer samples."
        )
    mean = queries.mean(dim=2)
    centred = queries - mean.unsqueeze(2)
    cov = centred.transpose(-1, -2) @ centred / (n_tokens - 1)
    return per_sample, mean, cov


def main(
    model_name: str = "meta-llama/Llama-3.1-8B-Instruct",
    output_path: str = ".",
    dataset_name: str = "kmfoda/booksum",
    num_samples: int = 100,
    sample_seq_len: int = 1000,
    n_sink: int = 4,
    text_column: str = "chapter",
    device_map: str = "auto",
) -> str:
    """Compute the query statistics of `model_name` (a Hub id or a local directory) and save them.

    They are written with `save_pretrained` to `output_path/<stats_id>` (the directory is returned); load them with
    `ExpectedAttentionStatsPress(stats_folder=that_directory)`, or push them to the Hub under their `stats_id`.
    """
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.bfloat16, device_map=device_map).eval()
    _, mean, cov = collect_queries(model, dataset_name, num_samples, sample_seq_len, n_sink, text_column)
    stats = ExpectedAttentionStats(
        num_layers=mean.shape[0],
        num_heads=mean.shape[1],
        head_dim=mean.shape[2],
        dataset_name=dataset_name,
        model_name=model_name,
        num_samples=num_samples,
        sample_seq_len=sample_seq_len,
        n_sink=n_sink,
    )
    with torch.no_grad():
        stats.query_mean.copy_(mean)
        stats.query_cov.copy_(cov)
    path = os.path.join(output_path, stats.stats_id())
    stats.save_pretrained(path)
    logger.info("Saved Expected Attention statistics of %s to %s", model_name, path)
    return path


if __name__ == "__main__":
    import fire  # only the command line needs it

    fire.Fire(main)
