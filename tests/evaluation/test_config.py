# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Configuration: layering (defaults < YAML < flags), validation errors, results directory names, press setup."""

from pathlib import Path

import pytest
import yaml

import evaluation.evaluate as evaluate_module
from evaluation.evaluate import (
    DEFAULT_CONFIG_FILE,
    EvaluationConfig,
    EvaluationRunner,
    ProcessGroup,
    load_config,
    load_configs,
)
from evaluation.evaluate_registry import PressRegistry, PressSpec
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_flag_overrides_the_yaml_which_overrides_the_default(tmp_path):
    config_file = write_yaml(tmp_path / "c.yaml", {"press_name": "snapkv", "compression_ratio": 0.25, "fraction": 0.5})
    config = load_config(config_file, compression_ratio=0.75, fraction=None, dataset="ruler")
    assert config.compression_ratio == 0.75  # flag over YAML
    assert config.press_name == "snapkv"  # YAML over default ("knorm")
    assert config.fraction == 0.5  # a None flag does not override
    assert config.seed == 42 and config.max_samples is None  # defaults
    assert EvaluationConfig().press_name == "knorm" and EvaluationConfig().compression_ratio == 0.5


def test_the_shipped_yaml_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert DEFAULT_CONFIG_FILE.is_absolute() and DEFAULT_CONFIG_FILE.exists()
    configs = load_configs()
    shipped = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
    assert [config.press_name for config in configs] == shipped["press_name"]  # one run per listed press
    for config in configs:
        assert (config.dataset, config.model) == (shipped["dataset"], shipped["model"])
        assert config.model_kwargs == {"attn_implementation": None, "dtype": "auto"}
        assert config.data_dir == "niah_single_noise"  # the synthetic default task
    with pytest.raises(ValueError, match="press_name lists 4 presses .*use load_configs, or pass a single"):
        load_config()
    assert load_config(press_name="knorm").press_name == "knorm"


@pytest.mark.parametrize(
    "value, names",
    [("knorm", ["knorm"]), (["knorm", "snapkv"], ["knorm", "snapkv"]), ("knorm, snapkv", ["knorm", "snapkv"]),
     (("tova",), ["tova"])],
)  # fmt: skip
def test_press_name_takes_a_name_or_a_list(value, names):
    assert [config.press_name for config in load_configs(press_name=value)] == names


@pytest.mark.parametrize(
    "value, message",
    [([], "non-empty list"), (["knorm", "knorm"], "lists a press twice"), (["knorm", 3], "non-empty list of them"),
     (["knorm", "nope"], "Unknown press 'nope'")],
)  # fmt: skip
def test_bad_press_name_lists_are_refused_before_anything_runs(value, message):
    with pytest.raises(ValueError, match=message):
        load_configs(press_name=value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"press_name": "nope"}, r"Unknown press 'nope'; valid press names: .*knorm"),
        ({"dataset": "nope"}, r"Unknown dataset 'nope'; valid datasets: .*ruler"),
        ({"compression_ratio": 1.0}, r"compression_ratio must be a number in \[0, 1\), got 1.0"),
        ({"compression_ratio": -0.1}, r"compression_ratio must be a number in \[0, 1\)"),
        ({"compression_ratio": "half"}, r"compression_ratio must be a number in \[0, 1\), got 'half'"),
        ({"fraction": 0}, r"fraction must be in \(0, 1\]"),
        ({"key_channel_compression_ratio": 2}, r"key_channel_compression_ratio must be a number in \[0, 1\]"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be a positive integer"),
        ({"dataset": "needle_in_haystack"}, r"needs --needle_depth .* and --max_context_length"),
        ({"kv_cache": "paged"}, r"kv_cache must be one of dynamic, quantized, got 'paged'"),
        ({"bogus_option": 1}, r"Unknown option\(s\) bogus_option; valid options: dataset, data_dir"),
    ],
)
def test_bad_options_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, **overrides)


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_prints_the_error_and_exits_1(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_module.main(press_name="nope")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("Error: Unknown press 'nope'")


def test_no_press_forces_ratio_zero():
    assert EvaluationConfig(press_name="no_press", compression_ratio=0.9).compression_ratio == 0.0


def test_results_dir_is_a_function_of_the_options(tmp_path):
    config = EvaluationConfig(dataset="ruler", model="meta-llama/Meta-Llama-3.1-8B-Instruct", output_dir=str(tmp_path))
    expected = tmp_path / "ruler__4096__meta-llama--Meta-Llama-3.1-8B-Instruct__knorm__0.50"
    assert config.get_results_dir() == expected
    expected.mkdir()
    assert config.get_results_dir() == expected  # no numbered subfolder: reruns find their results
    options = EvaluationConfig(
        dataset="ruler",
        model="org/m",
        fraction=0.5,
        max_context_length=1000,
        query_aware=True,
        max_samples=8,
        seed=1,
        output_dir=str(tmp_path),
    )
    assert options.get_results_dir().name == (
        "ruler__4096__org--m__knorm__0.50__fraction0.500__max_context1000__query_aware__max_samples8__seed1"
    )
    threshold = EvaluationConfig(dataset="ruler", model="org/m", press_name="kvzap_mlp", threshold=-4)
    assert threshold.get_results_dir(tmp_path).name == "ruler__4096__org--m__kvzap_mlp__-4.00"
    local = EvaluationConfig(dataset="ruler", model="org/m", data_path="/data/my_rows.jsonl")
    assert local.get_results_dir(tmp_path).name == "ruler__my_rows__org--m__knorm__0.50"


def test_saved_config_drops_the_ratio_for_threshold_presses(tmp_path):
    EvaluationConfig(dataset="ruler", press_name="kvzap_mlp", threshold=-4).save_config(tmp_path / "a.yaml")
    saved = yaml.safe_load((tmp_path / "a.yaml").read_text())
    assert saved["threshold"] == -4 and "compression_ratio" not in saved and "head_compression_ratio" not in saved
    EvaluationConfig(dataset="ruler").save_config(tmp_path / "b.yaml")
    saved = yaml.safe_load((tmp_path / "b.yaml").read_text())
    assert saved["compression_ratio"] == 0.5 and "threshold" not in saved
    assert list(saved)[:5] == ["dataset", "data_dir", "model", "device", "press_name"]  # upstream's field order


def test_press_setup_sets_the_ratio_through_wrappers():
    runner = EvaluationRunner(
        EvaluationConfig(dataset="ruler", press_name="expected_attention", compression_ratio=0.25)
    )
    press = runner._setup_press()
    assert isinstance(press, AdaKVPress) and isinstance(press.press, ExpectedAttentionPress)
    assert press.press.compression_ratio == 0.25
    assert runner.config.press_init_command == repr(press)


def test_press_setup_sets_each_inner_ratio_of_a_composed_press(monkeypatch):
    inner = [PressSpec("knorm_press", "KnormPress"), PressSpec("snapkv_press", "SnapKVPress")]
    registry = PressRegistry({"knorm_then_snapkv": PressSpec("composed_press", "ComposedPress", (inner,))})
    monkeypatch.setattr(evaluate_module, "PRESS_REGISTRY", registry)
    runner = EvaluationRunner(EvaluationConfig(dataset="ruler", press_name="knorm_then_snapkv", compression_ratio=0.5))
    press = runner._setup_press()
    assert isinstance(press, ComposedPress)
    assert [p.compression_ratio for p in press.presses] == [0.5, 0.5]
    assert press.compression_ratio == pytest.approx(0.75)


def test_process_group_defaults_to_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = ProcessGroup.from_environment()
    assert (group.rank, group.world_size, group.is_main) == (0, 1, True)
