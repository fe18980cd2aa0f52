# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""KVzap training data: per-layer attention inputs and their log KVzip+ scores (https://arxiv.org/abs/2601.07891).

The one idea: KVzip+ scores a context token by the largest normalised attention it receives while the model repeats
the context. Putting the context and its repetition in one prompt (`<context>\\n\\nRepeat the previous context
exactly.` then the context again, in the assistant turn when the tokenizer has a chat template) gives every target
in a single forward pass. Hooks on each attention module read the attention input `h` of every context token (what
`KVzapPress` scores) and compute, per KV head, `log max_{rows, group} A[row, col] * ||W_o v_col|| / ||h_row||` over
the rows of the repetition: the target the surrogate learns. A fixed number of context tokens per document is kept.

`collect(...)` streams the samples to `shard_NNNNN.safetensors` files (`X` `(n, layers, hidden)`, `y`
`(n, layers, kv_heads)`, `doc`, `position`) and records finished shards in `manifest.json`; a collection that was
interrupted resumes at the first unfinished document and gives the same samples as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from kvpress.presses.base_press import get_hook_inputs
from kvpress.presses.kvzip_press import FIRST_CHUNK_PROMPT, chat_template_parts
from kvpress.transformers_adapter import position_embeddings_of
from kvpress.utils import (
    apply_rope,
    attention_scaling,
    extract_keys_and_values,
    get_language_model,
    get_prerope_query_states,
)

logger = logging.getLogger(__name__)

NEMOTRON_DATASET = "nvidia/Nemotron-Pretraining-Dataset-sample"
NEMOTRON_SUBSETS = (
    "Nemotron-CC-MATH",
    "Nemotron-CC-High-Quality",
    "Nemotron-CC-High-Quality-Synthetic",
    "Nemotron-CC-Diverse-QA",
    "Nemotron-CC-Translated-Diverse-QA",
    "Nemotron-Synthetic-Code",
    "Nemotron-SFT-Code",
    "Nemotron-SFT-General",
    "Nemotron-SFT-MATH",
)
LOCAL_TEXT_FORMATS = (
    "a .txt file (documents separated by blank lines), a .jsonl or .parquet file with a 'text' column, "
    "or a directory of such files (each .txt file in a directory is one document)"
)
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("test", "train")


# ---------------------------------------------------------------------------------------------------------------------
# Documents


def load_nemotron_dataset(
    tokenizer,
    min_tokens: int = 750,
    max_tokens: int = 1250,
    n_train_per_subset: int = 500,
    n_test_per_subset: int = 5,
) -> pd.DataFrame:
    """Upstream's training documents: the nine subsets of `nvidia/Nemotron-Pretraining-Dataset-sample` (needs the
    network or the datasets cache), filtered by token length and split per subset (test rows first)."""
    from datasets import load_dataset

    frames = []
    for subset in NEMOTRON_SUBSETS:
        try:
            dataset = load_dataset(NEMOTRON_DATASET, subset, split="train")
        except Exception as error:  # noqa: BLE001 - offline or unknown subset: the same hint helps
            raise RuntimeError(
                f"Could not load {NEMOTRON_DATASET} ({subset}) from the Hugging Face Hub: {error}. Offline, pass "
                f"local documents with --data_path ({LOCAL_TEXT_FORMATS})."
            ) from error
        frame = dataset.to_pandas()[["text"]]
        frame["subset"] = subset
        frames.append(frame)
    return select_documents(
        pd.concat(frames, ignore_index=True), tokenizer, min_tokens, max_tokens, n_train_per_subset, n_test_per_subset
    )


def _texts_of_txt(path: Path, whole_file: bool) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if whole_file:
        return [text.strip()] if text.strip() else []
    return [part.strip() for part in re.split(r"\n[ \t]*\n", text) if part.strip()]


def _frame_of_file(path: Path, in_directory: bool) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return pd.DataFrame({"text": _texts_of_txt(path, whole_file=in_directory), "source": path.name})
    if suffix in (".jsonl", ".parquet"):
        from kvzap.shared import load_local_dataset

        frame = load_local_dataset(path)
        if "text" not in frame.columns:
            raise ValueError(f"{path} has no 'text' column (columns: {list(frame.columns)}); KVzap reads 'text'.")
        frame = frame.copy()
        frame["source"] = path.name
        return frame
    raise ValueError(f"Unsupported KVzap data file {path}: pass {LOCAL_TEXT_FORMATS}.")


def load_local_documents(path: Union[str, Path]) -> pd.DataFrame:
    """Documents from local files, in a stable order: a column `text`, plus `subset`/`split` when the files have
    them. Empty documents are dropped."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"The KVzap data path {path} does not exist. Pass {LOCAL_TEXT_FORMATS}.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise ValueError(f"{path} holds no .txt, .jsonl or .parquet file. Pass {LOCAL_TEXT_FORMATS}.")
        frame = pd.concat([_frame_of_file(file, in_directory=True) for file in files], ignore_index=True)
    else:
        frame = _frame_of_file(path, in_directory=False)
    if frame.empty:
        raise ValueError(f"{path} holds no non-empty document.")
    bad = [i for i, text in enumerate(frame["text"]) if not isinstance(text, str)]
    if bad:
        raise ValueError(f"{path}: the 'text' of rows {bad[:5]} is not a string.")
    frame = frame[frame["text"].str.strip() != ""].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"{path} holds no non-empty document.")
    return frame


def select_documents(
    frame: pd.DataFrame,
    tokenizer,
    min_tokens: int,
    max_tokens: int,
    n_train_per_subset: int,
    n_test_per_subset: int,
) -> pd.DataFrame:
    """Keep documents of `min_tokens < length < max_tokens` tokens (special tokens included, as upstream) and split
    them per `subset` (one subset when the column is missing): a `split` column of the data is kept; otherwise the
    first `n_test_per_subset` are the test set and the next `n_train_per_subset` the training set. Test rows come
    first. Columns: text, length, subset, split."""
    for name, value in (
        ("min_tokens", min_tokens),
        ("max_tokens", max_tokens),
        ("n_train_per_subset", n_train_per_subset),
        ("n_test_per_subset", n_test_per_subset),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    if min_tokens >= max_tokens:
        raise ValueError(f"min_tokens ({min_tokens}) must be smaller than max_tokens ({max_tokens}).")
    frame = frame.copy()
    if "subset" not in frame.columns:
        frame["subset"] = "local"
    frame["text"] = [text.strip() for text in frame["text"]]
    frame["length"] = [len(tokenizer.encode(text)) for text in frame["text"]]
    kept = frame[(frame["length"] > min_tokens) & (frame["length"] < max_tokens)]
    parts: dict[str, list[pd.DataFrame]] = {"test": [], "train": []}
    for _, group in kept.groupby("subset", sort=False):
        if "split" in group.columns:
            unknown = sorted(set(group["split"]) - set(SPLITS))
            if unknown:
                raise ValueError(f"The 'split' column holds {unknown}; allowed: {SPLITS}.")
            parts["test"].append(group[group["split"] == "test"].head(n_test_per_subset))
            parts["train"].append(group[group["split"] == "train"].head(n_train_per_subset))
        else:
            parts["test"].append(group.head(n_test_per_subset).assign(split="test"))
            rest = group.iloc[n_test_per_subset:]
            parts["train"].append(rest.head(n_train_per_subset).assign(split="train"))
    frames = parts["test"] + parts["train"]
    documents = pd.concat(frames, ignore_index=True) if frames else kept.iloc[:0].assign(split=[])
    n_train = int((documents["split"] == "train").sum())
    if n_train == 0:
        lengths = sorted(frame["length"])
        raise ValueError(
            f"No training document is left: {len(frame)} documents, {len(kept)} of them with more than {min_tokens} "
            f"and fewer than {max_tokens} tokens (shortest {lengths[:3]}, longest {lengths[-3:]}), "
            f"{n_test_per_subset} per subset kept for testing. Adjust --min_tokens/--max_tokens or add documents."
        )
    logger.info("KVzap documents: %d train, %d test", n_train, len(documents) - n_train)
    return documents[["text", "length", "subset", "split"]].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class RepeatPrompt:
    """A tokenized repeat prompt: `input_ids` `(1, T)`; the context occupies tokens `[start_prompt, end_prompt)` and
    its repetition `[start_repeated, end_repeated)`."""

    input_ids: torch.Tensor
    start_prompt: int
    end_prompt: int
    start_repeated: int
    end_repeated: int


def repeat_prompt_text(tokenizer, prompt: str) -> str:
    """The text of the repeat prompt: with a chat template, a user turn `prompt + "\\n\\nRepeat the previous context
    exactly."` and an assistant turn `prompt` (upstream); without one, the same as KVzipPress's repeat pass:
    BOS, `prompt`, the repeat instruction, a newline, `prompt`. The text is tokenized without adding special tokens
    (the template or the BOS text holds them)."""
    if getattr(tokenizer, "chat_template", None) is None:
        _, suffix = chat_template_parts(tokenizer)
        bos = getattr(tokenizer, "bos_token", None) or ""  # as the pipeline starts a context without a template
        return bos + prompt + FIRST_CHUNK_PROMPT + suffix + prompt
    messages = [
        {"role": "user", "content": prompt + FIRST_CHUNK_PROMPT},
        {"role": "assistant", "content": prompt},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def repeat_prompt_tokenization(tokenizer, prompt: str) -> RepeatPrompt:
    """Tokenize the repeat prompt of `prompt` (stripped) and locate the context and its repetition in tokens: each
    boundary is the first token that starts at or after the boundary's character."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"A KVzap document must be a non-empty string, got {prompt!r:.60}.")
    prompt = prompt.strip()
    text = repeat_prompt_text(tokenizer, prompt)
    pieces = text.split(prompt)
    if len(pieces) != 3:
        raise ValueError(
            f"The repeat prompt must hold the document exactly twice, but it occurs {len(pieces) - 1} times (the chat "
            "template may contain the document's text, or the document repeats itself); drop or shorten it."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("KVzap data collection needs a fast tokenizer (token offsets); load it with use_fast=True.")
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    starts = [start for start, _ in encoding["offset_mapping"]] + [len(text)]
    prefix, repeat, _ = pieces
    start_repeat_char = len(prefix) + len(prompt) + len(repeat)
    boundaries = (len(prefix), len(prefix) + len(prompt), start_repeat_char, start_repeat_char + len(prompt))

    def first_token_at(char: int) -> int:
        return next(i for i, start in enumerate(starts) if start >= char)

    start_prompt, end_prompt, start_repeated, end_repeated = (first_token_at(char) for char in boundaries)
    if not start_prompt < end_prompt <= start_repeated < end_repeated:
        raise ValueError(f"Could not locate the document and its repetition in the tokens of {prompt[:40]!r}...")
    return RepeatPrompt(
        input_ids=torch.tensor([encoding["input_ids"]]),
        start_prompt=start_prompt,
        end_prompt=end_prompt,
        start_repeated=start_repeated,
        end_repeated=end_repeated,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Targets


def output_projection_weight(o_proj: nn.Module) -> torch.Tensor:
    """The dense `(hidden, H * d)` weight of the attention output projection, dequantized for FP8 block-quantized
    linears (`weight_scale_inv` per block of `block_size`)."""
    weight = o_proj.weight
    scale = getattr(o_proj, "weight_scale_inv", None)
    if scale is None:
        return weight.float()
    block = getattr(o_proj, "block_size", None) or (
        weight.shape[0] // scale.shape[0],
        weight.shape[1] // scale.shape[1],
    )
    expanded = scale.float().repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return weight.float() * expanded[: weight.shape[0], : weight.shape[1]]


def kvzip_plus_targets(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    prompt: RepeatPrompt,
) -> torch.Tensor:
    """Log KVzip+ score of each context token per KV head, `(P, H_kv)` with `P = end_prompt - start_prompt`.

    `hidden_states` `(1, T, hidden)` are the attention inputs of the whole prompt and `keys`/`values` `(1, H_kv, T, d)`
    the layer's cache after the pass (keys with RoPE). The attention of the repetition's rows over the prompt is
    recomputed (causal softmax with the module's scale), each row divided by `||h_row||`, each column multiplied by
    `||W_o^h v_col||`, then the maximum over the rows and the query heads of each group is taken."""
    rows = slice(prompt.start_repeated, prompt.end_repeated)
    n_rows = prompt.end_repeated - prompt.start_repeated
    n_keys = prompt.end_repeated  # a repetition row attends to nothing after the repetition
    num_kv_heads, head_dim = keys.shape[1], keys.shape[-1]
    groups = module.config.num_attention_heads // num_kv_heads
    cos, sin = position_embeddings
    queries = apply_rope(get_prerope_query_states(module, hidden_states[:, rows]), cos[:, rows], sin[:, rows])
    queries = queries.view(1, num_kv_heads, groups, n_rows, head_dim)
    scaling = attention_scaling(module)
    softcap = getattr(module, "attn_logit_softcapping", None)
    key_positions = torch.arange(n_keys, device=keys.device)
    row_positions = torch.arange(prompt.start_repeated, prompt.end_repeated, device=keys.device)
    future = key_positions[None, :] > row_positions[:, None]  # (rows, keys)
    inv_norm = 1.0 / hidden_states[0, rows].float().norm(dim=-1)  # (rows,)
    out_proj = output_projection_weight(module.o_proj).t().reshape(num_kv_heads, groups, head_dim, -1)
    columns = slice(prompt.start_prompt, prompt.end_prompt)
    targets = []
    for head in range(num_kv_heads):
        head_keys = keys[0, head, :n_keys].float()
        logits = torch.einsum("gqd,kd->gqk", queries[0, head].float(), head_keys) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        weights = logits.masked_fill(future, float("-inf")).softmax(dim=-1)[..., columns]  # (G, rows, P)
        head_values = values[0, head, columns].float()  # (P, d)
        value_norms = torch.einsum("pd,gde->gpe", head_values, out_proj[head]).norm(dim=-1)  # (G, P)
        scores = weights * inv_norm[None, :, None] * value_norms[:, None, :]
        targets.append(scores.amax(dim=(0, 1)))
    return torch.stack(targets, dim=-1).log()


class KVzapDataCollector:
    """Run `model` on repeat prompts and return, per document, the attention inputs of `n_tokens` sampled context
    tokens `(n, layers, hidden)` and their log KVzip+ targets `(n, layers, kv_heads)`. Works with any attention
    implementation (the attention of the repetition is recomputed from the cached keys)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.language_model = get_language_model(model)
        self.attention_modules = [layer.self_attn for layer in self.language_model.layers]
        if any(getattr(module, "is_sliding", False) for module in self.attention_modules):
            logger.warning("Sliding-window layers see a window of the context only; their targets are approximate.")
        self._prompt: Optional[RepeatPrompt] = None
        self._layer_outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_layers(self) -> int:
        return len(self.attention_modules)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden_states, cache = get_hook_inputs(module, args, kwargs)
        if cache is None:
            raise ValueError("KVzap data collection runs the model with a cache (use_cache=True) to read the values.")
        keys, values = extract_keys_and_values(cache, int(module.layer_idx))
        prompt = self._prompt
        targets = kvzip_plus_targets(module, hidden_states, keys, values, position_embeddings_of(kwargs), prompt)
        states = hidden_states[0, prompt.start_prompt : prompt.end_prompt]
        self._layer_outputs[int(module.layer_idx)] = (states.detach(), targets)
        return output

    @torch.no_grad()
    def document_samples(self, text: str, n_tokens: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """`X`, `y`, `position` (token index inside the document) of `n_tokens` tokens of one document."""
        prompt = repeat_prompt_tokenization(self.tokenizer, text)
        n_context = prompt.end_prompt - prompt.start_prompt
        if n_context < n_tokens:
            raise ValueError(
                f"A document has {n_context} context tokens, fewer than n_tokens={n_tokens}: raise min_tokens above "
                "n_tokens or lower n_tokens."
            )
        self._prompt, self._layer_outputs = prompt, {}
        hooks = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.attention_modules]
        try:
            self.language_model(input_ids=prompt.input_ids.to(self.model.device), use_cache=True)
        finally:
            for hook in hooks:
                hook.remove()
            self._prompt = None
        missing = [i for i in range(self.num_layers) if i not in self._layer_outputs]
        if missing:
            raise RuntimeError(f"The attention hooks of layers {missing} did not run.")
        chosen = torch.randperm(n_context, generator=generator)[:n_tokens].sort().values
        X = torch.stack([self._layer_outputs[i][0][chosen.to(self.model.device)] for i in range(self.num_layers)], 1)
        y = torch.stack([self._layer_outputs[i][1][chosen.to(self.model.device)] for i in range(self.num_layers)], 1)
        self._layer_outputs = {}
        return {"X": X.cpu().contiguous(), "y": y.float().cpu().contiguous(), "position": chosen}


# ---------------------------------------------------------------------------------------------------------------------
# Sharded, resumable collection


def documents_fingerprint(documents: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for text, split in zip(documents["text"], documents["split"]):
        digest.update(f"{split}\0{len(text)}\0{text}\0".encode("utf-8"))
    return digest.hexdigest()[:16]


def document_generator(seed: int, doc: int) -> torch.Generator:
    """The sampling generator of document `doc`: independent of the order and the shards, so a resumed collection
    samples the same tokens."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(doc))


def _atomic_write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(data_dir: Union[str, Path]) -> Optional[dict]:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete {data_dir} to collect again.") from error


def collect(
    model,
    tokenizer,
    documents: pd.DataFrame,
    data_dir: Union[str, Path],
    n_tokens: int = 500,
    docs_per_shard: int = 64,
    seed: int = 0,
    model_name: Optional[str] = None,
    max_documents: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Collect `n_tokens` samples per document into shards under `data_dir` and return the manifest.

    Resumes a collection of the same documents and settings found in `data_dir`; a different one raises a
    ValueError. `max_documents` stops after that many documents in all (the collection is then incomplete and the
    next call continues it)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer (tokens sampled per document), got {n_tokens!r}.")
    if isinstance(docs_per_shard, bool) or not isinstance(docs_per_shard, int) or docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be a positive integer, got {docs_per_shard!r}.")
    if not {"text", "split"} <= set(documents.columns):
        raise ValueError(f"documents need the columns 'text' and 'split', got {list(documents.columns)}.")
    splits = list(documents["split"])
    first_train = splits.index("train") if "train" in splits else len(splits)
    if any(split != "test" for split in splits[:first_train]) or any(s != "train" for s in splits[first_train:]):
        raise ValueError("documents must list the test documents first, then the training ones (select_documents).")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    collector = KVzapDataCollector(model, tokenizer)
    config = get_language_model(model).config
    settings = {
        "version": MANIFEST_VERSION,
        "model": str(model_name if model_name is not None else getattr(model.config, "name_or_path", "")),
        "num_layers": collector.num_layers,
        "hidden_size": int(config.hidden_size),
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        "n_tokens": n_tokens,
        "docs_per_shard": docs_per_shard,
        "seed": int(seed),
        "documents": documents_fingerprint(documents),
        "n_documents": len(documents),
        "n_test_documents": first_train,
    }
    manifest = read_manifest(data_dir)
    if manifest is None:
        stray = [p.name for p in data_dir.iterdir() if p.name != MANIFEST]
        if any(name.startswith("shard_") for name in stray):
            logger.warning("%s holds shards without a manifest; they are overwritten.", data_dir)
        manifest = {**settings, "shards": [], "complete": False}
    else:
        different = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
        if different:
            raise ValueError(
                f"{data_dir} holds a KVzap collection with other settings ({different}, as (found, asked)); use "
                "another data directory, or delete this one to collect again."
            )
    done = sum(shard["n_docs"] for shard in manifest["shards"])
    stop = len(documents) if max_documents is None else min(len(documents), int(max_documents))
    if done >= len(documents):
        return manifest
    bar = tqdm(total=len(documents), initial=done, desc="KVzap data (documents)", disable=not progress, unit="doc")
    try:
        while done < stop:
            end = min(done + docs_per_shard, len(documents))
            if end > stop:
                end = stop
            parts = []
            for doc in range(done, end):
                sample = collector.document_samples(
                    documents["text"].iloc[doc], n_tokens, document_generator(seed, doc)
                )
                sample["doc"] = torch.full((sample["X"].shape[0],), doc, dtype=torch.int64)
                parts.append(sample)
                bar.update(1)
            tensors = {name: torch.cat([part[name] for part in parts]).contiguous() for name in parts[0]}
            name = f"shard_{len(manifest['shards']):05d}.safetensors"
            tmp = data_dir / (name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, data_dir / name)
            manifest["shards"].append(
                {"file": name, "first_doc": done, "n_docs": end - done, "n_samples": int(tensors["X"].shape[0])}
            )
            done = end
            manifest["complete"] = done >= len(documents)
            _atomic_write_json(data_dir / MANIFEST, manifest)
    finally:
        bar.close()
    return manifest


def load_layer(data_dir: Union[str, Path], layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(X, y, doc)` of one layer from a complete collection: `(N, hidden)`, `(N, kv_heads)` float32, `(N,)`; only
    that layer's slice of every shard is read."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"{data_dir} holds no KVzap collection ({MANIFEST} is missing).")
    if not manifest.get("complete"):
        raise ValueError(f"The KVzap collection in {data_dir} is incomplete: run the collection again to finish it.")
    if not 0 <= layer < manifest["num_layers"]:
        raise ValueError(f"layer must be in [0, {manifest['num_layers']}), got {layer}.")
    xs, ys, docs = [], [], []
    for shard in manifest["shards"]:
        with safe_open(str(Path(data_dir) / shard["file"]), framework="pt") as handle:
            xs.append(handle.get_slice("X")[:, layer])
            ys.append(handle.get_slice("y")[:, layer])
            docs.append(handle.get_tensor("doc"))
    return torch.cat(xs).float(), torch.cat(ys).float(), torch.cat(docs)


def split_masks(manifest: dict, doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the test and training samples (test documents come first)."""
    test = doc < int(manifest["n_test_documents"])
    return test, ~test


def expected_samples(manifest: dict) -> int:
    return int(manifest["n_documents"]) * int(manifest["n_tokens"])


def check_finite_targets(y: torch.Tensor, where: str) -> None:
    """KVzip+ scores are positive, so their logs are finite; -inf means a score underflowed to 0."""
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} targets of {where} are not finite (a KVzip+ score of 0 underflowed in the model's "
            "dtype); collect with a float32 model."
        )


def describe(manifest: dict) -> str:
    return (
        f"{manifest['n_documents']} documents ({manifest['n_test_documents']} test) x {manifest['n_tokens']} tokens, "
        f"{manifest['num_layers']} layers, {len(manifest['shards'])} shards"
    )


__all__ = [
    "KVzapDataCollector",
    "RepeatPrompt",
    "collect",
    "describe",
    "kvzip_plus_targets",
    "load_layer",
    "load_local_documents",
    "load_nemotron_dataset",
    "repeat_prompt_tokenization",
    "select_documents",
    "split_masks",
]
