# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Options only some presses take are refused for the others, before anything runs: upstream ignores a threshold
given to KnormPress but names the results folder after it (`knorm__-4.00`) and drops the ratio that was applied from
config.yaml. With a list of presses, every press is checked before the first run starts."""

import pytest

import evaluation.evaluate as evaluate_module
from evaluation.evaluate import EvaluationRunner, load_config


@pytest.mark.parametrize(
    "press_name, options",
    [
        ("kvzap_mlp", dict(threshold=-4)),
        ("duo_attention_on_the_fly", dict(head_compression_ratio=0.5)),
        ("think", dict(key_channel_compression_ratio=0.5)),
        ("snap_think", dict(key_channel_compression_ratio=0.5)),
        ("decoding_knorm", dict(compression_interval=4, target_size=64, hidden_states_buffer_size=32)),
        ("cam_knorm", dict(target_size=64)),
    ],
)
def test_each_option_reaches_the_press_that_takes_it(press_name, options):
    press = EvaluationRunner(load_config(press_name=press_name, **options))._setup_press()
    for name, value in options.items():
        holders = [p for p in evaluate_module.nested_presses(press) if evaluate_module.takes_field(p, name)]
        assert holders and all(getattr(p, name) == value for p in holders), name


@pytest.mark.parametrize(
    "press_name, options, message",
    [
        ("knorm", dict(threshold=-4), "takes no threshold .* DMS/KVzap"),
        ("snapkv", dict(head_compression_ratio=0.5), "takes no head_compression_ratio .* DuoAttention"),
        ("tova", dict(key_channel_compression_ratio=0.25), "takes no key_channel_compression_ratio .* ThinK"),
        ("knorm", dict(target_size=64), "takes no target_size .* decoding presses"),
        ("h2o", dict(cache_budget=64, compression_interval=8), "takes no compression_interval"),
    ],
)
def test_an_option_no_press_of_the_run_takes_is_refused(tmp_path, press_name, options, message):
    config = load_config(press_name=press_name, output_dir=str(tmp_path), **options)
    with pytest.raises(ValueError, match=message):
        EvaluationRunner(config).run_evaluation()
    assert not any(tmp_path.iterdir())


def test_an_explicit_ratio_and_a_budget_are_refused_together():
    with pytest.raises(ValueError, match="Both --compression_ratio 0.3 and --cache_budget 64 were given; choose one"):
        load_config(press_name="knorm", compression_ratio=0.3, cache_budget=64)
    # The YAML's ratio is the default, not a choice: a budget replaces it.
    assert load_config(press_name="knorm", cache_budget=64).compression_ratio == 0.0


def test_a_list_of_presses_is_checked_before_the_first_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate_module.main(press_name=["no_press", "kvzap_mlp"], threshold=-4, output_dir=str(tmp_path))
    assert stopped.value.code == 1
    assert "Press 'no_press' takes no threshold" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # the first press did not run
