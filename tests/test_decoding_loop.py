# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""`greedy_generate` gives `model.generate`'s greedy tokens inside `with press(model)`, in place or not."""

import pytest
import torch

from kvpress import ComposedPress, KeyRerotationPress, KnormPress, PyramidKVPress, StreamingLLMPress
from kvpress.decoding_loop import greedy_generate
from tests.fixtures import get_model, random_input_ids

PRESSES = {
    "none": lambda: None,
    "knorm": lambda: KnormPress(0.5),
    "pyramidkv": lambda: PyramidKVPress(0.5, window_size=4),
    "budget": lambda: StreamingLLMPress(cache_budget=20, n_sink=2),
    "rerotation": lambda: KeyRerotationPress(KnormPress(0.5)),
    # a budget inside a ComposedPress acts during decoding too: the loop must keep the press on while it decodes
    "composed_budget": lambda: ComposedPress([KnormPress(0.3), StreamingLLMPress(cache_budget=20, n_sink=2)]),
}


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_equals_generate_under_the_press(name):
    model = get_model("llama")
    ids = random_input_ids(2, 40, seed=9)
    press = PRESSES[name]()
    with torch.no_grad(), press(model) if press is not None else torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for inplace in (True, False):
        got = greedy_generate(model, ids, press=PRESSES[name](), max_new_tokens=8, inplace=inplace)
        assert torch.equal(got, expected), (name, inplace)


def test_stops_at_eos_and_refuses_bad_input():
    model = get_model("llama")
    ids = random_input_ids(1, 20, seed=2)
    full = greedy_generate(model, ids, max_new_tokens=6)
    eos = int(full[0, 22])  # the third new token
    stopped = greedy_generate(model, ids, max_new_tokens=6, eos_token_id=eos)
    assert torch.equal(stopped, full[:, :23])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        greedy_generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="input_ids must be"):
        greedy_generate(model, ids[0])
