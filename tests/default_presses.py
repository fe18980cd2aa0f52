# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The press matrix shared by tests: each press with an easy and a hard setting.

Local resources (Q-filters, attention statistics, KVzap models) are random ones built for the tiny test models and
loaded through the same path as the Hub ones.
"""

from kvpress import (
    CapPress,
    CompactorPress,
    CURPress,
    ExpectedAttentionPress,
    ExpectedAttentionStatsPress,
    H2OPress,
    KeyDiffPress,
    KnormPress,
    KVzapPress,
    LagKVPress,
    LeverageScorePress,
    NonCausalAttnPress,
    ObservedAttentionPress,
    QFilterPress,
    RandomPress,
    RKVLSHPress,
    RKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from tests.presses.test_ea_stats_qfilter import local_ea_stats_dir, local_qfilters_dir
from tests.presses.test_kvzap import untrained_kvzap_dir

# Score-based presses that need no attention weights and keep int(T * (1 - ratio)) tokens in every layer and head;
# the kwargs lists go from easy to hard.
default_presses = [
    {"cls": KnormPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8}]},
    {"cls": RandomPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8, "seed": 0}]},
    {"cls": StreamingLLMPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8}]},
    {
        "cls": SnapKVPress,
        "kwargs": [{"compression_ratio": 0.2, "window_size": 2}, {"compression_ratio": 0.8, "window_size": 2}],
    },
    {"cls": TOVAPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8}]},
    {
        "cls": ExpectedAttentionPress,
        "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8, "n_future_positions": 64}],
    },
    {
        "cls": LagKVPress,
        "kwargs": [
            {"compression_ratio": 0.2, "n_sink": 4, "lag_size": 8},
            {"compression_ratio": 0.8, "n_sink": 2, "lag_size": 4, "cross_scoring": True},
        ],
    },
    {"cls": KeyDiffPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8}]},
    {
        "cls": CURPress,
        "kwargs": [
            {"compression_ratio": 0.2},
            {"compression_ratio": 0.8, "leverage_type": "kv_avg", "use_random_leverage": True, "local_window_size": 8},
        ],
    },
    {
        "cls": LeverageScorePress,
        "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8, "sketch_dimension": 8}],
    },
    {"cls": NonCausalAttnPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8, "chunk_size": 16}]},
    {
        "cls": CompactorPress,
        "kwargs": [
            {"compression_ratio": 0.5, "sink_size_start": 1, "sink_size_end": 1},
            {"compression_ratio": 0.8, "sink_size_start": 0, "sink_size_end": 0, "chunk_size": 16},
        ],
    },
    {"cls": CapPress, "kwargs": [{"compression_ratio": 0.5}, {"compression_ratio": 0.8, "tau": 10.0}]},
    {
        "cls": QFilterPress,
        "kwargs": [
            {"compression_ratio": 0.2, "filters_path": local_qfilters_dir()},
            {"compression_ratio": 0.8, "filters_path": local_qfilters_dir()},
        ],
    },
    {
        "cls": ExpectedAttentionStatsPress,
        "kwargs": [
            {"compression_ratio": 0.2, "stats_folder": local_ea_stats_dir()},
            {"compression_ratio": 0.8, "stats_folder": local_ea_stats_dir(), "n_future_positions": 64},
        ],
    },
    {
        "cls": KVzapPress,
        "kwargs": [
            {"compression_ratio": 0.2, "model_type": "linear", "kvzap_model_path": untrained_kvzap_dir()},
            {"compression_ratio": 0.8, "model_type": "mlp", "kvzap_model_path": untrained_kvzap_dir()},
        ],
    },
]

default_presses += [
    # the reasoning fork's presses, with a compression ratio (their budgets are tested in tests/test_cache_budget.py)
    {"cls": RKVPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8, "window_size": 4}]},
    {"cls": RKVLSHPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8, "window_size": 4}]},
]

# Presses that need eager attention (attention weights).
eager_presses = [
    {"cls": ObservedAttentionPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8}]},
    {"cls": H2OPress, "kwargs": [{"compression_ratio": 0.2}, {"compression_ratio": 0.8}]},
]
