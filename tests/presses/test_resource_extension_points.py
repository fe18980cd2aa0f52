# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Upstream's tests replace the resource loading of DuoAttention, KVzap and FastKVzip by subclassing them
(`load_attention_pattern`, `post_init_from_model`). The same extension points exist here, with upstream's names and
signatures, and they are the only place these presses load anything: the subclasses of `upstream_test_presses`,
written as upstream writes them, run offline, with every network access and every real loader made to fail, alone,
in the pipeline and inside wrappers, and they keep what their replaced resources say.
"""

import inspect
import socket

import numpy as np
import pytest
import torch

import kvpress.presses.duo_attention_press as duo
import kvpress.presses.fastkvzip_press as fastkvzip
import kvpress.presses.kvzap_press as kvzap
from kvpress import DMSPress, DuoAttentionPress, FastKVzipPress, KVPressTextGenerationPipeline, KVzapPress
from tests.fixtures import (
    KV_HEADS,
    attention_modules,
    compressed_layers,
    get_model,
    load_tokenizer,
    masked_bool,
    prefill,
    random_input_ids,
    record_layers,
)
from tests.presses.upstream_test_presses import TestDuoAttentionPress, TestFastKVzipPress, TestKVzapPress

SEQ_LEN = 48


class ResourceLoadedError(AssertionError):
    pass


def _refuse(what):
    def refuse(*args, **kwargs):
        raise ResourceLoadedError(f"{what} was called: a resource was loaded outside the extension point")

    return refuse


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No socket can connect, and every real loader of the three presses raises if it is reached."""
    monkeypatch.setattr(socket.socket, "connect", _refuse("socket.connect"))
    monkeypatch.setattr(duo, "read_attention_pattern", _refuse("DuoAttention's read_attention_pattern"))
    monkeypatch.setattr(duo, "duo_attention_on_the_fly", _refuse("duo_attention_on_the_fly"))
    monkeypatch.setattr(kvzap.KVzapModel, "from_pretrained", _refuse("KVzapModel.from_pretrained"))
    monkeypatch.setattr(fastkvzip, "load_fastkvzip", _refuse("load_fastkvzip"))
    monkeypatch.setattr(fastkvzip, "get_gate_weight", _refuse("get_gate_weight"))
    monkeypatch.setattr(fastkvzip, "get_gate_id", _refuse("get_gate_id"))
    duo.cache.clear()
    yield
    duo.cache.clear()


def test_the_extension_points_have_upstreams_names_and_signatures():
    assert isinstance(inspect.getattr_static(DuoAttentionPress, "load_attention_pattern"), staticmethod)
    assert list(inspect.signature(DuoAttentionPress.load_attention_pattern).parameters) == ["model"]
    for press_class in (DuoAttentionPress, KVzapPress, FastKVzipPress):
        assert list(inspect.signature(press_class.post_init_from_model).parameters) == ["self", "model"]


def test_the_real_loaders_are_refused_here(monkeypatch, tmp_path):
    """The fixture does make the presses' own loading fail (so the tests below show that it is never reached)."""
    model = get_model("llama")
    monkeypatch.setattr(model.config, "name_or_path", "local/tiny-llama")
    monkeypatch.setitem(duo.PATTERNS_DICT, "local/tiny-llama", str(tmp_path))
    for press in (DuoAttentionPress(0.5), KVzapPress(0.5), FastKVzipPress(0.5)):
        with pytest.raises(Exception) as raised:
            press.post_init_from_model(model)
        error, chain = raised.value, []
        while error is not None:
            chain.append(error)
            error = error.__cause__
        assert any(isinstance(error, ResourceLoadedError) for error in chain), chain


def test_duo_attention_subclass_masks_the_lowest_heads_of_its_pattern():
    model = get_model("llama")
    np.random.seed(0)
    press = TestDuoAttentionPress(head_compression_ratio=0.5)
    prefill(model, random_input_ids(1, SEQ_LEN), press)
    np.random.seed(0)
    scores = np.random.rand(model.config.num_hidden_layers, KV_HEADS)  # the same draw as the subclass made
    lowest = {divmod(int(i), KV_HEADS) for i in np.argsort(scores, axis=None)[: round(scores.size * 0.5)]}
    assert {tuple(pair) for pair in press.streaming_mask.nonzero().tolist()} == lowest
    assert (press.sink_size, press.recent_size) == (2, 2)
    for layer_idx, module in enumerate(attention_modules(model)):
        mask = masked_bool(module, (1, KV_HEADS, SEQ_LEN))
        for head in range(KV_HEADS):
            expected = torch.zeros(SEQ_LEN, dtype=torch.bool)
            if (layer_idx, head) in lowest:
                expected[2 : SEQ_LEN - 2] = True
            assert torch.equal(mask[0, head], expected)


def test_kvzap_subclass_keeps_the_top_scores_of_its_untrained_model():
    model = get_model("llama")
    input_ids = random_input_ids(1, SEQ_LEN, seed=2)
    press = TestKVzapPress(compression_ratio=0.5)
    cache = prefill(model, input_ids, press)
    calls = record_layers(model, input_ids)
    for layer_idx in compressed_layers(model):
        linear = press.kvzap_model.layers[layer_idx]
        hidden = calls[layer_idx]["hidden_states"][0]
        scores = (hidden @ linear.weight.T + linear.bias).T  # (H_kv, T): the surrogate's scores, by hand
        kept = scores.topk(SEQ_LEN // 2, dim=-1).indices.sort(dim=-1).values
        expected = calls[layer_idx]["keys"][0].gather(
            1, kept[..., None].expand(-1, -1, calls[layer_idx]["keys"].shape[-1])
        )
        torch.testing.assert_close(cache.layers[layer_idx].keys[0], expected)


def test_kvzap_subclass_inside_dms_uses_its_own_model():
    """KVzap's intended use, `DMSPress(KVzapPress(...), threshold=...)`: the wrapper forwards post_init_from_model
    to the subclass, whose untrained model sets what is masked."""
    model = get_model("llama")
    press = DMSPress(TestKVzapPress(), threshold=0.0)
    prefill(model, random_input_ids(1, SEQ_LEN, seed=3), press)
    assert isinstance(press.press.kvzap_model, kvzap.KVzapModel)


def test_fastkvzip_subclass_masks_the_lowest_gate_scores():
    model = get_model("llama")
    input_ids = random_input_ids(1, SEQ_LEN, seed=4)
    press = TestFastKVzipPress(compression_ratio=0.5, layerwise=True)
    prefill(model, input_ids, press)
    masks = [masked_bool(module, (1, KV_HEADS, SEQ_LEN))[0] for module in attention_modules(model)]
    calls = record_layers(model, input_ids)  # (a new prefill: it clears the masks read above)
    n_pruned = int(KV_HEADS * SEQ_LEN * 0.5)
    for layer_idx, mask in enumerate(masks):
        with torch.no_grad():
            scores = press.gates[layer_idx](calls[layer_idx]["hidden_states"])[0]  # (H_kv, T)
        scores[:, : press.n_sink] = 1.0  # the first n_sink tokens are always kept
        window = int(SEQ_LEN * press.window_ratio)
        if window:
            scores[:, -window:] = 1.0
        expected = torch.zeros(KV_HEADS * SEQ_LEN, dtype=torch.bool)
        expected[scores.flatten().topk(n_pruned, largest=False).indices] = True
        assert torch.equal(mask, expected.view(KV_HEADS, SEQ_LEN))


@pytest.mark.parametrize(
    "make_press",
    [
        lambda: TestDuoAttentionPress(head_compression_ratio=0.5),
        lambda: TestKVzapPress(compression_ratio=0.5),
        lambda: TestFastKVzipPress(compression_ratio=0.5),
    ],
    ids=["duo_attention", "kvzap", "fastkvzip"],
)
def test_subclasses_run_in_the_pipeline_offline(make_press):
    """The pipeline enters the press twice (prefill, then the questions): post_init_from_model runs each time and is
    still the only loader."""
    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(True), device="cpu")
    answers = pipe(
        "The quick brown fox jumps over the lazy dog. " * 3,
        questions=["Who jumps?", "Over what?"],
        press=make_press(),
        max_new_tokens=3,
    )
    assert len(answers["answers"]) == 2 and all(isinstance(answer, str) for answer in answers["answers"])


@pytest.mark.parametrize("dtype", ["float32", "torch.float32", None])
def test_fastkvzip_subclass_works_when_the_config_names_its_dtype(dtype, monkeypatch):
    """`model.config.dtype` holds a name (or nothing) once a config went through `to_dict`/`save_pretrained`;
    upstream's subclass passes it to `FastKVzipGate` as it is."""
    model = get_model("llama")
    monkeypatch.setattr(model.config, "dtype", dtype)
    press = TestFastKVzipPress(compression_ratio=0.5)
    prefill(model, random_input_ids(1, SEQ_LEN, seed=5), press)
    assert all(gate.q_proj.weight.dtype == torch.float32 for gate in press.gates)
    assert sum(int(masked_bool(m, (1, KV_HEADS, SEQ_LEN)).sum()) for m in attention_modules(model)) == int(
        2 * KV_HEADS * SEQ_LEN * 0.5
    )


def test_fastkvzip_gate_refuses_a_bad_dtype():
    with pytest.raises(ValueError, match="not a torch dtype name"):
        fastkvzip.FastKVzipGate(0, 64, 2, 2, "float31")
    with pytest.raises(TypeError, match="torch.dtype or its name"):
        fastkvzip.FastKVzipGate(0, 64, 2, 2, 32)
