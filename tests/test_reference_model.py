# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The shipped reference model (reference/model/): it loads offline, retrieves from held-out synthetic rows with the
full cache, and compression visibly changes its accuracy (RULER-style tasks, https://arxiv.org/abs/2404.06654).

Held-out rows: `generate_rows` seeds rows "eval|<seed>|...", the training script "train|<seed>|..." (disjoint).
These tests take about three minutes of CPU (about 80 rows of 1024 tokens through the pipeline).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, pipeline

import kvpress  # noqa: F401  (registers the pipeline)
from evaluation.benchmarks.synthetic.tasks import TASK_NAMES, generate_rows
from kvpress.presses.random_press import RandomPress
from kvpress.presses.snapkv_press import SnapKVPress
from reference import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from reference.evaluate import accuracy, predict

ROWS_PER_TASK = 6
SEED = 1
NIAH_SINGLE = ("niah_single_noise", "niah_single_essay", "niah_single_uuid")


@pytest.fixture(scope="module", autouse=True)
def offline():
    previous = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def pipe():
    return pipeline("kv-press-text-generation", model=str(REFERENCE_MODEL_DIR), device="cpu")


@pytest.fixture(scope="module")
def rows(pipe):
    return {
        task: generate_rows(task, ROWS_PER_TASK, TRAINED_CONTEXT_LENGTH, pipe.tokenizer, seed=SEED)
        for task in TASK_NAMES
    }


@pytest.fixture(scope="module")
def full_cache(pipe, rows):
    """Accuracy per task with the full cache (no press)."""
    all_rows = [row for task in TASK_NAMES for row in rows[task]]
    return accuracy(all_rows, predict(pipe, all_rows))


def test_loads_offline_as_a_small_gqa_llama():
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    config = model.config
    assert config.num_attention_heads > config.num_key_value_heads >= 2 and config.head_dim == 64
    assert config.vocab_size >= len(tokenizer) and tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


def test_pipeline_answers_a_needle_question(pipe):
    assert pipe.model.dtype == torch.float32
    row = generate_rows("niah_single_noise", 1, 512, pipe.tokenizer, seed=99)[0]
    answer = pipe(row["context"], question=row["question"], answer_prefix=row["answer_prefix"], max_new_tokens=16)
    assert answer["answer"].strip() == row["answer"][0] + "."


def test_full_cache_needle_in_a_haystack_single(full_cache):
    pooled = sum(full_cache[task] for task in NIAH_SINGLE) / len(NIAH_SINGLE)
    assert pooled >= 95.0, {task: full_cache[task] for task in NIAH_SINGLE}


@pytest.mark.parametrize("task", ["niah_multivalue", "niah_multiquery", "variable_tracking", "common_words"])
def test_full_cache_other_families(full_cache, task):
    assert full_cache[task] >= 80.0, full_cache


@pytest.mark.xfail(
    strict=True,
    reason="known gap: the shipped model did not learn key matching for one-key questions (about chance, 25%, "
    "on held-out rows; reference/README.md)",
)
def test_full_cache_multikey_reaches_95(full_cache):
    assert full_cache["niah_multikey"] >= 95.0, full_cache


@pytest.mark.xfail(
    strict=True,
    reason="known gap: the shipped model finds the two most frequent coded words but rarely the third (about 67%)",
)
def test_full_cache_frequent_words_reaches_80(full_cache):
    assert full_cache["frequent_words"] >= 80.0, full_cache


def _accuracy(pipe, rows, press, question_aware=False) -> float:
    return accuracy(rows, predict(pipe, rows, press=press, question_aware=question_aware))["all"]


def test_random_press_at_ratio_0_9_loses_the_needle(pipe, rows, full_cache):
    essay = rows["niah_single_essay"]
    assert full_cache["niah_single_essay"] == 100.0
    assert _accuracy(pipe, essay, RandomPress(compression_ratio=0.9, seed=0)) <= 20.0


def test_question_aware_snapkv_keeps_the_needle_better_than_random_at_ratio_0_5(pipe, rows):
    # Measured (reference/results/quality.json): at 0.5 question-aware SnapKV keeps most needles and RandomPress
    # none. At 0.9 neither does on these rows (both near 0%), so the claim is tested where it holds.
    essay = rows["niah_single_essay"]
    snapkv = _accuracy(pipe, essay, SnapKVPress(compression_ratio=0.5), question_aware=True)
    random = _accuracy(pipe, essay, RandomPress(compression_ratio=0.5, seed=0), question_aware=True)
    assert snapkv >= random + 30.0, (snapkv, random)


def test_key_outlier_press_keeps_the_needle_at_ratio_0_9(pipe, rows):
    # What does hold at 0.9: needles are outlier keys in a repetitive haystack, and KeyDiff (keys least similar to
    # the mean key) keeps them while RandomPress loses them.
    from kvpress.presses.keydiff_press import KeyDiffPress

    essay = rows["niah_single_essay"]
    assert _accuracy(pipe, essay, KeyDiffPress(compression_ratio=0.9)) >= 70.0


def test_training_batches_mask_exactly_the_answer_and_the_context():
    from reference.train import make_batch, parse_args

    args = parse_args(
        [
            "--output_dir",
            "unused",
            "--tokens_per_batch",
            "1200",
            "--context_length",
            "256",
            "--start_context_length",
            "200",
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    batch = make_batch(7, args, tokenizer)
    again = make_batch(7, args, tokenizer)
    assert all(torch.equal(batch[key], again[key]) for key in batch)  # a function of (seed, index) only
    ids, answer_mask, context_mask = batch["input_ids"], batch["answer_mask"], batch["context_mask"]
    assert ids.shape[0] >= 2 and answer_mask.shape == context_mask.shape == (ids.shape[0], ids.shape[1] - 1)
    for i in range(ids.shape[0]):
        targets = ids[i, 1:]
        answer = tokenizer.decode(targets[answer_mask[i]])
        assert answer.endswith("</s>") and answer.count("</s>") == 1
        context = tokenizer.decode(ids[i, : int(context_mask[i].sum()) + 1])
        assert context.startswith("<s>") and context.endswith("\n")  # bos + the whole context, nothing more
        prompt = tokenizer.decode(ids[i, int(context_mask[i].sum()) + 1 : int(answer_mask[i].nonzero()[0]) + 1])
        assert prompt.startswith(("What", "Which")) and "\n" in prompt  # question + "\n" + answer_prefix
        assert not (answer_mask[i] & context_mask[i]).any()
