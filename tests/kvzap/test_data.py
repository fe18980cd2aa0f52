# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""kvzap/data.py: repeat prompts, KVzip+ targets against eager attention weights, sharded resumable collection,
and the errors bad inputs raise."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kvpress.transformers_adapter import output_cache
from kvzap.data import (
    KVzapDataCollector,
    collect,
    load_layer,
    load_local_documents,
    repeat_prompt_tokenization,
    select_documents,
)
from kvzap.shared import REFERENCE_MODEL_DIR
from tests.kvzap.conftest import tiny_texts


def test_repeat_prompt_holds_the_document_twice(tokenizer):
    text = tiny_texts(tokenizer)[0]
    prompt = repeat_prompt_tokenization(tokenizer, "  " + text + "\n")
    ids = prompt.input_ids[0]
    assert ids[0].item() == tokenizer.bos_token_id  # no chat template: BOS as the pipeline puts it
    context = ids[prompt.start_prompt : prompt.end_prompt]
    repeated = ids[prompt.start_repeated : prompt.end_repeated]
    assert torch.equal(context, repeated)
    assert tokenizer.decode(context) == text
    assert prompt.end_repeated == len(ids)
    between = tokenizer.decode(ids[prompt.end_prompt : prompt.start_repeated])
    assert between == "\n\nRepeat the previous context exactly.\n"


def eager_reference_targets(text: str, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention inputs `(P, L, D)` and log KVzip+ targets `(P, L, H_kv)` computed from the eager attention
    weights that transformers returns, query head by query head, with plain loops."""
    model = AutoModelForCausalLM.from_pretrained(str(REFERENCE_MODEL_DIR), attn_implementation="eager").eval()
    prompt = repeat_prompt_tokenization(tokenizer, text)
    inputs = {}

    def keep_input(module, args, kwargs):
        inputs[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    layers = model.model.layers
    hooks = [layer.self_attn.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            outputs = model.model(input_ids=prompt.input_ids, use_cache=True, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    cache = output_cache(outputs)
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    d = config.head_dim
    ctx = range(prompt.start_prompt, prompt.end_prompt)
    rows = range(prompt.start_repeated, prompt.end_repeated)
    all_states, all_targets = [], []
    for layer_idx, layer in enumerate(layers):
        attention = outputs.attentions[layer_idx][0]  # (H, T, T)
        hidden = inputs[layer_idx][0]
        values = cache.layers[layer_idx].values[0]  # (H_kv, T, d)
        w_o = layer.self_attn.o_proj.weight  # (hidden, H * d)
        per_head = []
        for head in range(config.num_attention_heads):
            kv = head // groups
            w_head = w_o[:, head * d : (head + 1) * d]
            column_norm = torch.stack([(w_head @ values[kv, col]).norm() for col in ctx])
            row_norm = torch.stack([hidden[row].norm() for row in rows])
            weights = attention[head][list(rows)][:, list(ctx)]
            per_head.append((weights / row_norm[:, None] * column_norm[None, :]).max(dim=0).values)
        per_kv = [
            torch.stack(per_head[k * groups : (k + 1) * groups]).max(dim=0).values
            for k in range(len(per_head) // groups)
        ]
        all_targets.append(torch.stack(per_kv, dim=-1).log())
        all_states.append(hidden[list(ctx)])
    return torch.stack(all_states, dim=1), torch.stack(all_targets, dim=1)


def test_targets_equal_kvzip_plus_from_eager_attention(reference_model, tokenizer):
    text = tiny_texts(tokenizer)[1]
    expected_states, expected_targets = eager_reference_targets(text, tokenizer)
    n_context = expected_states.shape[0]
    collector = KVzapDataCollector(reference_model, tokenizer)  # sdpa model: the collector recomputes attention
    sample = collector.document_samples(text, n_context, torch.Generator().manual_seed(0))
    assert torch.equal(sample["position"], torch.arange(n_context))
    torch.testing.assert_close(sample["X"], expected_states, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sample["y"], expected_targets, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(sample["y"]).all() and (sample["y"] < 1).all()


def test_document_samples_are_a_seeded_subset(reference_model, tokenizer):
    text = tiny_texts(tokenizer)[2]
    collector = KVzapDataCollector(reference_model, tokenizer)
    full = collector.document_samples(text, 1, torch.Generator().manual_seed(0))
    n_context = repeat_prompt_tokenization(tokenizer, text)
    n_context = n_context.end_prompt - n_context.start_prompt
    everything = collector.document_samples(text, n_context, torch.Generator().manual_seed(0))
    some = collector.document_samples(text, 16, torch.Generator().manual_seed(3))
    again = collector.document_samples(text, 16, torch.Generator().manual_seed(3))
    assert full["X"].shape == (1, 6, 256) and some["y"].shape == (16, 6, 2)
    assert torch.equal(some["position"], again["position"])
    assert torch.equal(some["y"], everything["y"][some["position"]])
    assert torch.equal(some["X"], everything["X"][some["position"]])
    with pytest.raises(ValueError, match="fewer than n_tokens"):
        collector.document_samples(text, n_context + 1, torch.Generator().manual_seed(0))


def documents_of(tokenizer, tiny_text_file):
    return select_documents(load_local_documents(tiny_text_file), tokenizer, 60, 400, 10, 1)


def test_collection_resumes_to_the_same_samples(reference_model, tokenizer, tiny_text_file, tmp_path):
    documents = documents_of(tokenizer, tiny_text_file)
    assert list(documents["split"]) == ["test"] + ["train"] * 4
    whole = collect(
        reference_model, tokenizer, documents, tmp_path / "whole", n_tokens=8, docs_per_shard=2, progress=False
    )
    assert whole["complete"] and [s["n_docs"] for s in whole["shards"]] == [2, 2, 1]
    partial = collect(
        reference_model,
        tokenizer,
        documents,
        tmp_path / "resumed",
        n_tokens=8,
        docs_per_shard=2,
        max_documents=3,
        progress=False,
    )
    assert not partial["complete"] and sum(s["n_docs"] for s in partial["shards"]) == 3
    with pytest.raises(ValueError, match="incomplete"):
        load_layer(tmp_path / "resumed", 0)
    resumed = collect(
        reference_model, tokenizer, documents, tmp_path / "resumed", n_tokens=8, docs_per_shard=2, progress=False
    )
    assert resumed["complete"] and [s["n_docs"] for s in resumed["shards"]] == [2, 1, 2]
    for layer in range(6):
        for a, b in zip(load_layer(tmp_path / "whole", layer), load_layer(tmp_path / "resumed", layer)):
            assert torch.equal(a, b)
    X, y, doc = load_layer(tmp_path / "whole", 2)
    assert X.shape == (40, 256) and y.shape == (40, 2) and torch.equal(doc, torch.arange(5).repeat_interleave(8))
    shard = load_file(str(tmp_path / "whole" / "shard_00000.safetensors"))
    assert shard["X"].shape == (16, 6, 256) and torch.equal(shard["X"][:, 2], X[:16])
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert manifest["n_test_documents"] == 1 and manifest["n_tokens"] == 8
    # Another setting on the same directory is refused rather than mixed in.
    with pytest.raises(ValueError, match="other settings"):
        collect(reference_model, tokenizer, documents, tmp_path / "whole", n_tokens=4, docs_per_shard=2, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        collect(
            reference_model,
            tokenizer,
            documents.iloc[:4],
            tmp_path / "whole",
            n_tokens=8,
            docs_per_shard=2,
            progress=False,
        )


def test_local_documents_formats(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first doc line one\nline two\n\n  \nsecond doc\n", encoding="utf-8")
    assert list(load_local_documents(tmp_path / "a.txt")["text"]) == ["first doc line one\nline two", "second doc"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("one document\n\nwith a blank line", encoding="utf-8")
    (folder / "c.jsonl").write_text(json.dumps({"text": "from jsonl", "subset": "s"}) + "\n", encoding="utf-8")
    pd.DataFrame({"text": ["from parquet"]}).to_parquet(folder / "d.parquet")
    texts = list(load_local_documents(folder)["text"])
    assert texts == ["one document\n\nwith a blank line", "from jsonl", "from parquet"]


def test_bad_inputs_raise(tmp_path, tokenizer, reference_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_local_documents(tmp_path / "missing.txt")
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="Unsupported"):
        load_local_documents(tmp_path / "x.csv")
    (tmp_path / "y.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' column"):
        load_local_documents(tmp_path / "y.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no non-empty document"):
        load_local_documents(tmp_path / "empty.txt")
    frame = pd.DataFrame({"text": ["a short text", "another short one"]})
    with pytest.raises(ValueError, match="smaller than max_tokens"):
        select_documents(frame, tokenizer, 100, 100, 5, 1)
    with pytest.raises(ValueError, match="No training document"):
        select_documents(frame, tokenizer, 100, 200, 5, 1)
    with pytest.raises(ValueError, match="non-negative integer"):
        select_documents(frame, tokenizer, -1, 200, 5, 1)
    with pytest.raises(ValueError, match="'split' column"):
        select_documents(frame.assign(split=["test", "valid"]), tokenizer, 0, 200, 5, 1)
    with pytest.raises(ValueError, match="exactly twice"):
        repeat_prompt_tokenization(tokenizer, "Repeat the previous context exactly.")
    with pytest.raises(ValueError, match="non-empty string"):
        repeat_prompt_tokenization(tokenizer, "   ")
    documents = pd.DataFrame({"text": ["some text here"], "split": ["train"]})
    with pytest.raises(ValueError, match="n_tokens must be a positive integer"):
        collect(reference_model, tokenizer, documents, tmp_path / "d", n_tokens=0, progress=False)
    with pytest.raises(ValueError, match="test documents first"):
        collect(
            reference_model,
            tokenizer,
            documents.assign(split=["train"]).iloc[[0, 0]].assign(split=["train", "test"]),
            tmp_path / "d",
            n_tokens=1,
            progress=False,
        )
    with pytest.raises(FileNotFoundError, match="no KVzap collection"):
        load_layer(tmp_path / "nothing", 0)
