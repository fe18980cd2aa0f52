# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Press fields are checked when they are assigned, in the constructor and afterwards (issue 22: no silent wrong
answers): a ratio set after construction gets the constructor's error, numpy/torch scalars are numbers, and the
settings that used to do nothing or fail obscurely (NaN threshold, negative n_sink, empty ComposedPress, a seed that
is no integer) are refused with a clear message."""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch

import kvpress
from kvpress import (
    BasePress,
    ChunkPress,
    ComposedPress,
    CompressionRatioDecodingPress,
    DuoAttentionPress,
    ExpectedAttentionPress,
    KnormPress,
    PerLayerCompressionPress,
    RandomPress,
    StreamingLLMPress,
    ThinKPress,
)
from kvpress.presses.dms_press import DMSPress
from tests.fixtures import compressed_layers, get_model, prefill, random_input_ids

pytestmark = pytest.mark.core

SEQ_LEN = 32
BAD_RATIOS = [1.0, 1.5, -0.1, float("nan"), float("inf"), "0.5", True, None, np.bool_(False), torch.tensor([0.5])]


def error_of(action) -> Exception:
    with pytest.raises((ValueError, TypeError)) as info:
        action()
    return info.value


def kept_lengths(press, input_ids: torch.Tensor) -> list[int]:
    model = get_model("llama")
    cache = prefill(model, input_ids, press)
    return [cache.layers[i].keys.shape[2] for i in compressed_layers(model)]


@pytest.mark.parametrize("value", BAD_RATIOS, ids=repr)
def test_a_ratio_assigned_after_construction_gets_the_constructor_error(value):
    press = KnormPress(0.5)
    constructor_error = error_of(lambda: KnormPress(value))
    assignment_error = error_of(lambda: setattr(press, "compression_ratio", value))
    assert type(assignment_error) is type(constructor_error)
    assert str(assignment_error) == str(constructor_error)
    assert "compression_ratio must be a number in [0, 1)" in str(assignment_error)
    # the refused value was not stored: the press still removes half of the context
    assert press.compression_ratio == 0.5
    assert kept_lengths(press, random_input_ids(seq_len=SEQ_LEN)) == [SEQ_LEN // 2] * 2


def test_a_valid_ratio_assigned_after_construction_is_used():
    press = KnormPress(0.5)
    press.compression_ratio = 0.25
    assert kept_lengths(press, random_input_ids(seq_len=SEQ_LEN)) == [int(SEQ_LEN * 0.75)] * 2


def _ratio_owners() -> list[tuple[str, BasePress]]:
    """Every exported press that reads and writes a compression_ratio, built with its defaults (wrappers around a
    KnormPress)."""
    owners = []
    for name in kvpress.__all__:
        cls = getattr(kvpress, name)
        if not (inspect.isclass(cls) and issubclass(cls, BasePress)) or cls is ComposedPress:
            continue
        try:
            press = cls()
        except TypeError:
            try:
                press = cls(KnormPress(0.25))
            except TypeError:
                continue  # needs more than an inner press (PerLayerCompressionPress: tested below)
        try:
            ratio = press.compression_ratio
            press.compression_ratio = ratio
        except (AttributeError, ValueError):
            continue  # no ratio (DecodingPress), or a computed one that cannot be set (DMS, ThinK, Duo, ...)
        owners.append((name, press))
    return owners


RATIO_OWNERS = _ratio_owners()


def test_the_generic_check_covers_scorers_wrappers_and_other_presses():
    names = {name for name, _ in RATIO_OWNERS}
    expected = {"KnormPress", "SnapKVPress", "ChunkPress", "AdaKVPress", "CriticalKVPress", "FinchPress"}
    expected |= {"KVzipPress", "RestoreKVPress", "FastKVzipPress", "KVComposePress", "LUKVPress", "CompactorPress"}
    assert expected <= names


@pytest.mark.parametrize("name,press", RATIO_OWNERS, ids=[name for name, _ in RATIO_OWNERS])
@pytest.mark.parametrize("value", [1.0, 1.5, float("nan")], ids=repr)
def test_every_press_checks_a_ratio_assigned_after_construction(name, press, value):
    before = press.compression_ratio
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        press.compression_ratio = value
    assert press.compression_ratio == before
    press.compression_ratio = np.float32(0.5)
    assert press.compression_ratio == 0.5 and type(press.compression_ratio) is float


def test_a_wrapper_refuses_what_its_inner_press_refuses():
    inner = KnormPress(0.5)
    wrapper = ChunkPress(inner, chunk_length=8)
    error = error_of(lambda: setattr(wrapper, "compression_ratio", 1.5))
    assert str(error) == str(error_of(lambda: KnormPress(1.5)))
    assert inner.compression_ratio == 0.5


def test_computed_ratios_still_refuse_to_be_set():
    with pytest.raises(AttributeError, match="computed from the inner presses"):
        ComposedPress([KnormPress(0.5)]).compression_ratio = 0.5
    with pytest.raises(AttributeError, match="set key_channel_compression_ratio instead"):
        ThinKPress(0.5).compression_ratio = 0.5


@pytest.mark.parametrize(
    "make,name,allowed",
    [
        (lambda: ThinKPress(0.5), "key_channel_compression_ratio", "[0, 1)"),
        (lambda: DuoAttentionPress(0.5), "head_compression_ratio", "[0, 1]"),
        (lambda: CompressionRatioDecodingPress(KnormPress()), "target_compression_ratio", "[0, 1)"),
    ],
    ids=["ThinK", "DuoAttention", "CompressionRatioDecoding"],
)
def test_other_ratio_fields_are_checked_on_assignment(make, name, allowed):
    press = make()
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a number in {allowed}")):
        setattr(press, name, 1.5)
    assert getattr(press, name) == 0.5
    setattr(press, name, np.float64(0.25))
    assert getattr(press, name) == 0.25 and type(getattr(press, name)) is float


def test_per_layer_ratios_are_checked_when_assigned_and_when_the_hook_runs():
    press = PerLayerCompressionPress(KnormPress(), [0.5, np.float32(0.25)])
    assert press.compression_ratios == [0.5, 0.25] and all(type(r) is float for r in press.compression_ratios)
    with pytest.raises(ValueError, match=r"compression_ratios\[1\] must be a number in \[0, 1\]"):
        press.compression_ratios = [0.5, 1.5]
    assert press.compression_ratios == [0.5, 0.25]
    press.compression_ratios[1] = float("nan")  # an item replaced in place is caught by the hook
    with pytest.raises(ValueError, match=r"compression_ratios\[1\] must be a number in \[0, 1\], got nan"):
        kept_lengths(press, random_input_ids(seq_len=SEQ_LEN))


def test_per_layer_ratio_one_empties_its_layer_and_leaves_the_inner_press_checked():
    inner = KnormPress(0.0)
    press = PerLayerCompressionPress(inner, [0.5, 1.0])
    assert kept_lengths(press, random_input_ids(seq_len=SEQ_LEN)) == [SEQ_LEN // 2, 0]
    assert inner.compression_ratio == 0.0  # restored after each layer
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        inner.compression_ratio = 1.0  # the checks are back on after the hook


@pytest.mark.parametrize(
    "value",
    [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float16)],
    ids=["np.float32", "np.float64", "torch.float32", "torch.float16"],
)
def test_numpy_and_torch_scalars_are_ratios(value):
    press = KnormPress(value)
    assert press.compression_ratio == 0.5 and type(press.compression_ratio) is float
    ids = random_input_ids(seq_len=SEQ_LEN)
    model = get_model("llama")
    expected = prefill(model, ids, KnormPress(0.5))
    cache = prefill(model, ids, press)
    for i in compressed_layers(model):
        assert torch.equal(cache.layers[i].keys, expected.layers[i].keys)


def test_numpy_integer_ratio_zero_is_accepted():
    assert KnormPress(np.int64(0)).compression_ratio == 0.0


def test_dms_refuses_a_nan_threshold():
    with pytest.raises(ValueError, match="DMSPress.threshold must be a number, not NaN"):
        DMSPress(KnormPress(), threshold=float("nan"))
    press = DMSPress(KnormPress(), threshold=-1.0)
    with pytest.raises(ValueError, match="not NaN"):
        press.threshold = np.float32("nan")
    assert press.threshold == -1.0
    with pytest.raises(TypeError, match="DMSPress.threshold must be a number"):
        press.threshold = "low"
    press.threshold = np.float32(-2.0)
    assert press.threshold == -2.0 and type(press.threshold) is float


def test_dms_infinite_thresholds_mean_evict_all_or_nothing_outside_the_window():
    model = get_model("llama")
    ids = random_input_ids(seq_len=SEQ_LEN)
    window = 8
    for threshold, expected in ((float("inf"), SEQ_LEN - window), (float("-inf"), 0)):
        press = DMSPress(KnormPress(), threshold=threshold, sliding_window_size=window)
        prefill(model, ids, press)
        # every KV head masks the same `expected` entries of the SEQ_LEN cached ones
        assert press.compression_ratio == pytest.approx(expected / SEQ_LEN)


@pytest.mark.parametrize("cls", [StreamingLLMPress, ExpectedAttentionPress], ids=lambda cls: cls.__name__)
def test_negative_n_sink_is_refused(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}.n_sink must be an integer >= 0"):
        cls(0.5, n_sink=-1)
    press = cls(0.5, n_sink=2)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.n_sink must be an integer >= 0"):
        press.n_sink = -1
    with pytest.raises(ValueError, match="n_sink must be an integer"):
        press.n_sink = 1.5
    assert press.n_sink == 2
    press.n_sink = np.int64(3)
    assert press.n_sink == 3 and type(press.n_sink) is int


@pytest.mark.parametrize("n_sink", [0, 2])
def test_streaming_llm_keeps_its_sinks_and_the_most_recent_tokens(n_sink):
    press = StreamingLLMPress(0.5, n_sink=n_sink)  # 0 sinks stays allowed: only the most recent half is kept
    model = get_model("llama")
    ids = random_input_ids(seq_len=SEQ_LEN)
    cache = prefill(model, ids, press)
    full = prefill(model, ids)
    for i in compressed_layers(model):
        values = full.layers[i].values
        expected = torch.cat([values[:, :, :n_sink], values[:, :, n_sink + SEQ_LEN // 2 :]], dim=2)
        assert torch.equal(cache.layers[i].values, expected)


def test_composed_press_refuses_an_empty_list():
    with pytest.raises(ValueError, match="ComposedPress takes a non-empty list of presses"):
        ComposedPress([])
    press = ComposedPress((KnormPress(0.5),))
    assert isinstance(press.presses, list)
    with pytest.raises(ValueError, match="non-empty list"):
        press.presses = []
    with pytest.raises(TypeError, match=r"presses\[0\] is a str"):
        press.presses = ["knorm"]
    assert len(press.presses) == 1


@pytest.mark.parametrize("seed", ["x", 1.5, True, np.float64(2.0)], ids=repr)
def test_random_press_refuses_a_seed_that_is_no_integer(seed):
    with pytest.raises(TypeError, match="RandomPress.seed must be an integer .* or None"):
        RandomPress(0.5, seed=seed)
    press = RandomPress(0.5, seed=1)
    with pytest.raises(TypeError, match="RandomPress.seed must be an integer"):
        press.seed = seed
    assert press.seed == 1


def test_random_press_seed_none_and_numpy_integers_are_allowed():
    assert RandomPress(0.5).seed is None
    press = RandomPress(0.5, seed=np.int64(7))
    assert press.seed == 7 and type(press.seed) is int
    keys = torch.randn(1, 2, 10, 4)
    scores = press.score(torch.nn.Module(), None, keys, keys, None, {})
    assert torch.equal(scores, RandomPress(0.5, seed=7).score(torch.nn.Module(), None, keys, keys, None, {}))
    assert not math.isnan(float(scores.sum()))
