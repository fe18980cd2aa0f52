# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The evaluation CLI runs this project's decoding presses: `--cache_budget` with the reasoning fork's names (h2o,
rkv, rkv_lsh, snapkv_d, full) and with a ComposedPress holding a budget press, which acts during decoding as the
pipeline sees it, so every question of a shared context is answered in its own call."""

import json

import pandas as pd
import pytest
import yaml
from transformers import pipeline

import kvpress  # noqa: F401  (registers the pipeline)
from evaluation.evaluate import EvaluationConfig, EvaluationRunner, is_decoding_press, load_config
from evaluation.evaluate_registry import PRESS_REGISTRY, PRESS_SPECS, PressSpec
from kvpress import ComposedPress, H2OPress, KnormPress, SnapKVPress
from tests.fixtures import saved_model_dir

BUDGET = 24
# Two contexts, the first with three questions: a context-grouped run would make 2 calls, a decoding run 4.
ROWS = [
    {"context": "The magic number of the red door is 4821. " * 4, "question": "Red door number?", "answer": ["4821"]},
    {"context": "The magic number of the red door is 4821. " * 4, "question": "Which door?", "answer": ["red"]},
    {"context": "The magic number of the red door is 4821. " * 4, "question": "What is magic?", "answer": ["number"]},
    {"context": "Alice keeps the key under the blue stone. " * 4, "question": "Where is the key?", "answer": ["blue"]},
]
for row in ROWS:
    row.update(answer_prefix="Answer:", task="niah_single_1", max_new_tokens=6)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


@pytest.fixture(scope="module")
def model_dir():
    return saved_model_dir("llama")


class CountingRunner(EvaluationRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def answer_group(self, rows):
        self.calls += 1
        return super().answer_group(rows)


def run(tmp_path, data_file, model_dir, **options):
    config = EvaluationConfig(
        dataset="ruler",
        data_path=str(data_file),
        model=model_dir,
        output_dir=str(tmp_path),
        model_kwargs={"dtype": "float32"},
        progress=False,
        **options,
    )
    runner = CountingRunner(config)
    runner.run_evaluation()
    results_dir = config.get_results_dir()
    predictions = pd.read_csv(results_dir / "predictions.csv", keep_default_na=False)
    saved = yaml.safe_load((results_dir / "config.yaml").read_text())
    return runner, results_dir, dict(zip(predictions["row_id"], predictions["predicted_answer"])), saved


def one_by_one(model_dir, make_press) -> dict:
    """Each row answered alone by the pipeline with a fresh press: what a decoding run must give."""
    pipe = pipeline("kv-press-text-generation", model=model_dir, device="cpu", model_kwargs={"dtype": "float32"})
    answers = {}
    for row_id, row in enumerate(ROWS):
        output = pipe(
            row["context"],
            question=row["question"],
            answer_prefix=row["answer_prefix"],
            press=make_press(),
            max_new_tokens=row["max_new_tokens"],
        )
        answers[row_id] = output["answer"]
    return answers


def test_a_composed_budget_press_is_a_decoding_press_as_the_pipeline_sees_it():
    assert is_decoding_press(KnormPress(cache_budget=BUDGET))
    assert is_decoding_press(ComposedPress([KnormPress(cache_budget=BUDGET)]))
    assert is_decoding_press(ComposedPress([SnapKVPress(0.2), ComposedPress([H2OPress(cache_budget=BUDGET)])]))
    assert not is_decoding_press(ComposedPress([KnormPress(0.5), SnapKVPress(0.2)]))
    assert not is_decoding_press(KnormPress(0.5)) and not is_decoding_press(None)


def test_a_composed_budget_press_answers_each_question_of_a_shared_context(tmp_path, data_file, model_dir, monkeypatch):
    spec = PressSpec("composed_press", "ComposedPress", ([PressSpec("knorm_press", "KnormPress")],))
    monkeypatch.setitem(PRESS_SPECS, "composed_knorm", spec)
    runner, results_dir, predictions, saved = run(
        tmp_path, data_file, model_dir, press_name="composed_knorm", cache_budget=BUDGET
    )
    assert runner.calls == len(ROWS)  # one call per question, as upstream runs decoding presses
    assert results_dir.name.split("__")[4] == f"budget{BUDGET}"
    assert saved["cache_budget"] == BUDGET
    assert saved["press_init_command"] == repr(ComposedPress([KnormPress(cache_budget=BUDGET)]))
    assert predictions == one_by_one(model_dir, lambda: ComposedPress([KnormPress(cache_budget=BUDGET)]))


@pytest.mark.parametrize(
    "press_name, make_press",
    [
        ("h2o", lambda: H2OPress(cache_budget=BUDGET)),
        ("snapkv_d", lambda: SnapKVPress(cache_budget=BUDGET, window_size=8)),
    ],
)
def test_budget_presses_of_the_reasoning_fork_run_from_the_cli(
    tmp_path, data_file, model_dir, monkeypatch, press_name, make_press
):
    if press_name == "snapkv_d":  # a window that fits the tiny contexts under the budget
        monkeypatch.setitem(PRESS_SPECS, "snapkv_d", PressSpec("snapkv_press", "SnapKVPress", (), {"window_size": 8}))
    runner, _, predictions, saved = run(tmp_path, data_file, model_dir, press_name=press_name, cache_budget=BUDGET)
    assert runner.calls == len(ROWS)
    assert saved["press_init_command"] == repr(make_press())
    assert predictions == one_by_one(model_dir, make_press)


def test_the_budget_is_honoured_during_decoding(tmp_path, data_file, model_dir, monkeypatch):
    """The press the runner built holds every layer at the budget after answering (prefill and decoding)."""
    config = EvaluationConfig(
        dataset="ruler", data_path=str(data_file), model=model_dir, press_name="knorm", cache_budget=BUDGET
    )
    runner = EvaluationRunner(config)
    runner.press = runner._setup_press()
    runner.pipeline = runner._setup_model_pipeline()
    rows = runner._finish_rows(runner._load_rows())
    from transformers import DynamicCache

    cache = DynamicCache()
    monkeypatch.setattr(runner, "_make_cache", lambda: cache)
    runner.answer_group(rows.iloc[:1])
    context_tokens = len(runner.pipeline.tokenizer.encode(ROWS[0]["context"]))
    assert context_tokens > BUDGET
    assert cache.get_seq_length() == BUDGET


def test_every_reasoning_fork_name_takes_a_budget():
    for name in ("h2o", "rkv", "rkv_lsh", "snapkv_d", "knorm", "streaming_llm", "snap_think"):
        press = PRESS_REGISTRY.spec(name).with_cache_budget(64).build()
        assert is_decoding_press(press), name
    assert PRESS_REGISTRY.spec("full").build().compression_ratio == 0.0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(press_name="knorm", cache_budget=0), "cache_budget must be a positive integer"),
        (dict(press_name="knorm", cache_budget=-3), "cache_budget must be a positive integer"),
        (dict(press_name="knorm", cache_budget=2.5), "cache_budget must be a positive integer"),
        (dict(press_name="no_press", cache_budget=64), "no_press .* takes no cache_budget"),
    ],
)
def test_bad_budgets_are_refused_with_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        load_config(**options)


@pytest.mark.parametrize(
    "press_name, message",
    [
        ("decoding_knorm", "takes no cache_budget"),  # a wrapper that applies a ratio
        ("expected_attention", "takes no cache_budget"),  # AdaKV around ExpectedAttention
        ("kvzap_mlp_head", "cannot score the cache during decoding"),
    ],
)
def test_presses_that_cannot_take_a_budget_say_so_before_anything_runs(tmp_path, press_name, message):
    config = load_config(press_name=press_name, cache_budget=64, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        EvaluationRunner(config)._setup_press()
    assert not any(tmp_path.iterdir())


def test_full_with_a_budget_keeps_the_whole_cache():
    config = load_config(press_name="full", cache_budget=64)
    press = EvaluationRunner(config)._setup_press()
    assert type(press).__name__ == "FullPress" and press.compression_ratio == 0.0
    assert config.ratio_tag() == "budget64"
