# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Telemetry: exact prefill/decoding token counts for every kind of press, zero metrics when off, reset, the
pipeline, the progress callback and the eviction-log writer."""

import csv

import pytest
import torch

from kvpress.pipeline import KVPressTextGenerationPipeline
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.full_press import FullPress
from kvpress.presses.h2o_press import H2OPress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.per_layer_compression_press import PerLayerCompressionPress
from kvpress.presses.rkv_press import RKVPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.timing import (
    EVICTION_LOG_COLUMNS,
    TIMING_METRIC_KEYS,
    attention_loss_rows,
    telemetry_of,
    write_eviction_rows,
)
from tests.fixtures import PAD_ID, get_model, is_press_hook, load_tokenizer, random_input_ids

PROMPT, NEW_TOKENS = 16, 6


def generate(model, press, batch_size=1, new_tokens=NEW_TOKENS):
    with torch.no_grad(), press(model):
        return model.generate(
            random_input_ids(batch_size, PROMPT),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD_ID,
        )


PRESSES = [
    ("knorm_ratio", lambda: KnormPress(0.5), "sdpa"),
    ("knorm_budget", lambda: KnormPress(cache_budget=8), "sdpa"),
    ("snapkv_budget", lambda: SnapKVPress(cache_budget=8, window_size=4), "sdpa"),
    ("rkv", lambda: RKVPress(cache_budget=8, window_size=4, compress_interval=2), "sdpa"),
    ("h2o", lambda: H2OPress(cache_budget=8), "eager"),
    ("full", FullPress, "sdpa"),
    ("composed", lambda: ComposedPress([KnormPress(0.5), SnapKVPress(0.5, window_size=2)]), "sdpa"),
    ("adakv", lambda: AdaKVPress(KnormPress(0.5)), "sdpa"),
    ("rerotation", lambda: KeyRerotationPress(KnormPress(0.5)), "sdpa"),
    ("chunk", lambda: ChunkPress(KnormPress(0.5), chunk_length=8), "sdpa"),
    ("per_layer", lambda: PerLayerCompressionPress(KnormPress(), [0.25, 0.5]), "sdpa"),
]


@pytest.mark.parametrize("name,make_press,attn", PRESSES, ids=[p[0] for p in PRESSES])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_every_press_counts_prefill_and_decoding_tokens_exactly(name, make_press, attn, batch_size):
    model = get_model("llama", attn)
    press = make_press()
    press.latency = True
    generate(model, press, batch_size)
    metrics = press.get_timing_metrics()
    assert tuple(metrics) == TIMING_METRIC_KEYS
    assert metrics["total_prefill_tokens"] == batch_size * PROMPT
    # generate feeds every new token but the last one back through the model
    assert metrics["total_decoding_tokens"] == batch_size * (NEW_TOKENS - 1)
    assert metrics["prefill_time"] > 0 and metrics["decoding_time"] > 0
    assert metrics["total_time"] == pytest.approx(metrics["prefill_time"] + metrics["decoding_time"])
    expected_throughput = metrics["total_decoding_tokens"] / metrics["decoding_time"]
    assert metrics["output_tokens_per_second"] == pytest.approx(expected_throughput)
    if not torch.cuda.is_available():
        assert metrics["peak_memory_bytes"] == 0


def test_metrics_are_zero_and_outputs_unchanged_when_off():
    model = get_model("llama")
    press = KnormPress(cache_budget=8)
    assert press.latency is False
    quiet = generate(model, press)
    assert press.get_timing_metrics() == {key: 0 for key in TIMING_METRIC_KEYS}
    press.latency = True
    timed = generate(model, press)
    assert torch.equal(quiet, timed)  # telemetry never changes what the model does
    assert press.get_timing_metrics()["total_prefill_tokens"] == PROMPT


def test_counters_accumulate_until_reset():
    model = get_model("llama")
    press = KnormPress(0.5)
    press.latency = True
    generate(model, press)
    generate(model, press)
    metrics = press.get_timing_metrics()
    assert metrics["total_prefill_tokens"] == 2 * PROMPT and metrics["total_decoding_tokens"] == 2 * (NEW_TOKENS - 1)
    press.reset_timing()
    assert press.get_timing_metrics() == {key: 0 for key in TIMING_METRIC_KEYS}
    assert press.latency is True  # reset keeps telemetry on
    generate(model, press)
    assert press.get_timing_metrics()["total_prefill_tokens"] == PROMPT


def test_tokens_are_counted_once_per_forward_when_the_first_layer_is_not_hooked():
    model = get_model("gemma3_text")  # layer 0 is a sliding-window layer, never hooked
    press = KnormPress(cache_budget=8)
    press.latency = True
    generate(model, press)
    metrics = press.get_timing_metrics()
    assert (metrics["total_prefill_tokens"], metrics["total_decoding_tokens"]) == (PROMPT, NEW_TOKENS - 1)


def test_telemetry_is_per_press_and_not_a_dataclass_field():
    first, second = KnormPress(0.5), KnormPress(0.5)
    first.latency = True
    assert second.latency is False
    assert first == second  # telemetry state does not take part in equality
    assert "latency" not in repr(first)


@pytest.mark.parametrize("make_press", [lambda: KnormPress(0.5), lambda: KnormPress(cache_budget=10), FullPress])
def test_pipeline_counts_context_question_and_answer_tokens(make_press, monkeypatch):
    model = get_model("llama")
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)  # generate exactly max_new_tokens
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(False), device="cpu")
    press = make_press()
    press.latency = True
    context, question, max_new_tokens = "The quick brown fox jumps over the lazy dog.", "Who?", 7
    pipe(context, question=question, press=press, max_new_tokens=max_new_tokens)
    inputs = pipe.preprocess(context, [question], "", 10_000)
    n_context, n_question = inputs["context_ids"].shape[1], inputs["questions_ids"][0].shape[1]
    metrics = press.get_timing_metrics()
    assert metrics["total_prefill_tokens"] == n_context
    assert metrics["total_decoding_tokens"] == n_question + max_new_tokens - 1


def test_pipeline_without_latency_registers_no_decoding_hooks(monkeypatch):
    model = get_model("llama")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(False), device="cpu")
    hooked_calls = []
    original = KVPressTextGenerationPipeline.generate_answer

    def spy(self, *args, **kwargs):
        hooked_calls.append(
            sum(is_press_hook(h) for layer in model.model.layers for h in layer.self_attn._forward_hooks.values())
        )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KVPressTextGenerationPipeline, "generate_answer", spy)
    press = KnormPress(0.5)
    pipe("Some context here.", question="Q?", press=press, max_new_tokens=2)
    press.latency = True
    pipe("Some context here.", question="Q?", press=press, max_new_tokens=2)
    assert hooked_calls == [0, 2]  # telemetry-only hooks while answering, only when latency is on


def test_progress_callback_reports_the_counts():
    model = get_model("llama")
    press = KnormPress(cache_budget=8)
    calls = []
    press.progress_update = lambda prefill, decoding, phase, label: calls.append((prefill, decoding, phase, label))
    press.progress_label = "sample-0"
    press.latency = True
    generate(model, press, new_tokens=3)
    assert calls == [
        (PROMPT, 0, "prefill", "sample-0"),
        (PROMPT, 1, "decoding", "sample-0"),
        (PROMPT, 2, "decoding", "sample-0"),
    ]


def test_cpu_runs_report_no_peak_memory():
    telemetry = telemetry_of(KnormPress())
    telemetry.enabled = True
    assert telemetry.metrics()["peak_memory_bytes"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_is_reported():
    model = get_model("llama").cuda()
    try:
        press = KnormPress(cache_budget=8)
        press.latency = True
        press.reset_timing()
        with torch.no_grad(), press(model):
            model.generate(random_input_ids(1, PROMPT).cuda(), max_new_tokens=3, min_new_tokens=3, pad_token_id=PAD_ID)
        assert press.get_timing_metrics()["peak_memory_bytes"] > 0
    finally:
        model.cpu()


def test_attention_loss_rows_and_csv_writer(tmp_path):
    # 4 query heads (2 per KV head), 2 observation rows, 3 candidates
    observation = torch.tensor(
        [
            [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]],
            [[0.0, 1.0, 0.0], [0.3, 0.3, 0.4]],
            [[0.2, 0.2, 0.6], [0.5, 0.5, 0.0]],
            [[0.9, 0.1, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    evicted = torch.tensor([[True, False, False], [False, False, True]])
    positions = torch.tensor([[3, 5, 9], [3, 6, 9]])
    rows = attention_loss_rows(7, 1, observation, evicted, kv_len_pre=11, n_kept=10, positions=positions)
    assert [row[:6] for row in rows] == [[7, 1, h, 11, 10, 1] for h in range(4)]
    assert [(row[6], row[7], row[8]) for row in rows] == [
        ("2.000000", "0.600000", "3"),
        ("2.000000", "0.300000", "3"),
        ("2.000000", "0.600000", "9"),
        ("2.000000", "1.000000", "9"),
    ]
    path = tmp_path / "nested" / "log.csv"
    write_eviction_rows(path, rows[:2])
    write_eviction_rows(path, rows[2:])
    with open(path, newline="") as handle:
        written = list(csv.reader(handle))
    assert tuple(written[0]) == EVICTION_LOG_COLUMNS  # one header, then every row
    assert written[1:] == [[str(v) for v in row] for row in rows]
