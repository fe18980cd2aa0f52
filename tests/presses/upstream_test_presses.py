# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Press subclasses written the way upstream's test suite writes them (from the spec's description of its mocks):
each replaces the press's resource loading through the upstream extension point, and nothing else.

- `TestDuoAttentionPress`: a static `load_attention_pattern(model)` returning `(2, 2, np.random.rand(L, H_kv))`;
- `TestKVzapPress`: `post_init_from_model` builds an untrained linear `KVzapModel` (hidden size in, one score per KV
  head out, one module per layer);
- `TestFastKVzipPress`: `post_init_from_model` builds random, untrained gates with the model config's sizes and
  dtype.

This module is not collected by pytest (its name does not start with `test_`), as upstream keeps such presses out of
its test files; `__test__ = False` tells pytest that the `Test...` classes are no test classes when imported.
"""

import numpy as np

from kvpress import DuoAttentionPress, FastKVzipPress, KVzapPress
from kvpress.presses.fastkvzip_press import FastKVzipGate
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel


class TestDuoAttentionPress(DuoAttentionPress):
    __test__ = False

    @staticmethod
    def load_attention_pattern(model):
        n_layers, n_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
        return 2, 2, np.random.rand(n_layers, n_heads)


class TestKVzapPress(KVzapPress):
    __test__ = False

    def post_init_from_model(self, model):
        config = KVzapConfig(
            input_dim=model.config.hidden_size,
            output_dim=model.config.num_key_value_heads,
            n_modules=model.config.num_hidden_layers,
        )
        self.kvzap_model = KVzapModel(config)


class TestFastKVzipPress(FastKVzipPress):
    __test__ = False

    def post_init_from_model(self, model):
        config = model.config
        ngroup = config.num_attention_heads // config.num_key_value_heads
        self.gates = [
            FastKVzipGate(index, config.hidden_size, config.num_key_value_heads, ngroup, config.dtype).to(model.device)
            for index in range(config.num_hidden_layers)
        ]
