# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The registries: every upstream name, lazy building, clear errors for unknown and not-yet-available names."""

import pytest

from evaluation.benchmarks.longbench import calculate_metrics as longbench_module
from evaluation.benchmarks.ruler import calculate_metrics as ruler_module
from evaluation.evaluate_registry import (
    DATASET_REGISTRY,
    PRESS_REGISTRY,
    SCORER_REGISTRY,
    NotAvailableError,
    PressNotAvailableError,
    PressRegistry,
    PressSpec,
    ScorerRegistry,
    UnknownNameError,
)
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.observed_attention_press import ObservedAttentionPress
from kvpress.presses.per_layer_compression_press import PerLayerCompressionPress
from kvpress.presses.random_press import RandomPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.streaming_llm_press import StreamingLLMPress
from kvpress.presses.tova_press import TOVAPress

UPSTREAM_PRESS_KEYS = """
adakv_snapkv block_keydiff chunkkv critical_adakv_expected_attention critical_adakv_snapkv critical_expected_attention
critical_snapkv cur duo_attention duo_attention_on_the_fly expected_attention fastkvzip finch keydiff kvcompose
kvcompose_unstructured kvzip kvzip_plus kvzap_linear kvzap_mlp kvzap_mlp_head kvzap_mlp_layer lagkv lukv knorm
observed_attention pyramidkv qfilter random RestoreKV RestoreKV_plus snap_think snapkv streaming_llm think tova
compactor adakv_compactor no_press cam_streaming_llm cam_knorm cam_adakv_snapkv cam_tova decoding_knorm
decoding_streaming_llm decoding_tova decoding_qfilter decoding_adakv_expected_attention_e2 decoding_adakv_snapkv
decoding_keydiff merging_knorm merging_snapkv merging_expected_attention merging_kvzap_mlp
""".split()
UPSTREAM_DATASETS = """loogle ruler zero_scrolls infinitebench longbench longbench-e longbench-v2 needle_in_haystack
aime25 math500""".split()


def test_every_upstream_key_is_registered():
    assert len(UPSTREAM_PRESS_KEYS) == 54
    assert set(UPSTREAM_PRESS_KEYS) <= set(PRESS_REGISTRY)
    assert set(UPSTREAM_DATASETS) | {"synthetic"} == set(DATASET_REGISTRY) == set(SCORER_REGISTRY)


@pytest.mark.parametrize(
    "name, press_class",
    [
        ("knorm", KnormPress),
        ("random", RandomPress),
        ("snapkv", SnapKVPress),
        ("streaming_llm", StreamingLLMPress),
        ("tova", TOVAPress),
        ("observed_attention", ObservedAttentionPress),
    ],
)
def test_plain_presses_are_built_fresh(name, press_class):
    press = PRESS_REGISTRY[name]
    assert type(press) is press_class
    assert press.compression_ratio == 0.0
    assert PRESS_REGISTRY[name] is not press  # no shared, mutated singleton


def test_wrapped_presses_keep_upstream_arguments():
    expected_attention = PRESS_REGISTRY["expected_attention"]
    assert isinstance(expected_attention, AdaKVPress)
    assert isinstance(expected_attention.press, ExpectedAttentionPress)
    assert expected_attention.press.epsilon == 1e-2
    adakv_snapkv = PRESS_REGISTRY["adakv_snapkv"]
    assert isinstance(adakv_snapkv, AdaKVPress) and type(adakv_snapkv.press) is SnapKVPress
    assert PRESS_REGISTRY["no_press"] is None
    assert repr(PRESS_REGISTRY.spec("expected_attention")) == "AdaKVPress(ExpectedAttentionPress(epsilon=0.01))"


def test_specs_build_composed_chunk_rerotation_and_per_layer_presses():
    knorm = PressSpec("knorm_press", "KnormPress", (), {"compression_ratio": 0.25})
    snapkv = PressSpec("snapkv_press", "SnapKVPress", (), {"window_size": 4})
    composed = PressSpec("composed_press", "ComposedPress", ([knorm, snapkv],)).build()
    assert isinstance(composed, ComposedPress)
    assert [type(p) for p in composed.presses] == [KnormPress, SnapKVPress]
    assert composed.presses[0].compression_ratio == 0.25 and composed.presses[1].window_size == 4
    chunk = PressSpec("chunk_press", "ChunkPress", (), {"press": knorm, "chunk_length": 8}).build()
    assert isinstance(chunk, ChunkPress) and chunk.chunk_length == 8 and type(chunk.press) is KnormPress
    rerotation = PressSpec("key_rerotation_press", "KeyRerotationPress", (knorm,)).build()
    assert isinstance(rerotation, KeyRerotationPress) and rerotation.compression_ratio == 0.25
    per_layer = PressSpec(
        "per_layer_compression_press",
        "PerLayerCompressionPress",
        (),
        {"press": knorm, "compression_ratios": [0.1, 0.2]},
    ).build()
    assert isinstance(per_layer, PerLayerCompressionPress) and per_layer.compression_ratios == [0.1, 0.2]
    assert repr(PressSpec("composed_press", "ComposedPress", ([knorm, snapkv],))) == (
        "ComposedPress([KnormPress(compression_ratio=0.25), SnapKVPress(window_size=4)])"
    )


def test_a_press_missing_in_this_version_fails_only_when_used():
    registry = PressRegistry(
        {
            "knorm": PressSpec("knorm_press", "KnormPress"),
            "ghost": PressSpec("ghost_press", "GhostPress"),
            "adakv_ghost": PressSpec("adakv_press", "AdaKVPress", (PressSpec("ghost_press", "GhostPress"),)),
            "no_class": PressSpec("knorm_press", "NoSuchPress"),
        }
    )
    assert registry.available() == ["knorm"]
    assert isinstance(registry["knorm"], KnormPress)
    with pytest.raises(PressNotAvailableError, match="press 'ghost' is not available in this version") as error:
        registry["ghost"]
    assert "kvpress.presses.ghost_press.GhostPress" in str(error.value) and "Available presses: knorm" in str(
        error.value
    )
    with pytest.raises(PressNotAvailableError, match="kvpress.presses.ghost_press.GhostPress"):
        registry["adakv_ghost"]
    with pytest.raises(PressNotAvailableError, match="kvpress.presses.knorm_press.NoSuchPress"):
        registry["no_class"]


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown press 'nope'; valid press names: .*knorm.*snapkv"):
        PRESS_REGISTRY["nope"]
    with pytest.raises(KeyError):  # still a mapping
        PRESS_REGISTRY["nope"]
    assert "nope" not in PRESS_REGISTRY and PRESS_REGISTRY.get("nope") is None
    with pytest.raises(UnknownNameError, match="Unknown dataset 'nope'; valid dataset names: aime25, infinitebench"):
        SCORER_REGISTRY["nope"]


def test_scorers_are_imported_on_use():
    assert SCORER_REGISTRY["ruler"] is ruler_module.calculate_metrics
    assert SCORER_REGISTRY["longbench-e"] is longbench_module.calculate_metrics_e
    with pytest.raises(NotAvailableError, match="metric of dataset 'future' is not available"):
        ScorerRegistry({"future": "future_benchmark.calculate_metrics:calculate_metrics"})["future"]
