# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""FastKVzipPress: the gate's formula, gates loaded from local files, head-wise budgets, the pipeline."""

import copy
import functools
import math
import os

import pytest
import torch
from transformers import DynamicCache

from kvpress.pipeline import KVPressTextGenerationPipeline
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.fastkvzip_press import FastKVzipGate, FastKVzipPress, get_gate_id, load_fastkvzip
from kvpress.presses.knorm_press import KnormPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import (
    attention_modules,
    check_questions_leave_compressed_context,
    compressed_layers,
    get_model,
    load_saved_model,
    load_tokenizer,
    masked_bool,
    prefill_base_model,
    press_hooks,
    random_input_ids,
    record_layers,
    saved_model_dir,
    temp_dir,
)

CONTEXT_LEN = 40


def random_gates(model, seed: int = 0, output_dim: int = 16, sink: int = 16, dtype=torch.float32):
    """Untrained gates for every layer of `model`, every weight drawn at random (norm weights included)."""
    config = model.config.get_text_config()
    groups = config.num_attention_heads // config.num_key_value_heads
    generator = torch.Generator().manual_seed(seed)
    gates = []
    for index in range(config.num_hidden_layers):
        gate = FastKVzipGate(index, config.hidden_size, config.num_key_value_heads, groups, dtype, output_dim, sink)
        with torch.no_grad():
            for parameter in gate.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        gates.append(gate)
    return gates


def save_gates(gates, path: str) -> str:
    """Save gates with the file layout of the published ones: {"module": [state dict of each layer's gate]}."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"module": [gate.state_dict() for gate in gates]}, path)
    return path


@functools.lru_cache(maxsize=None)
def gates_repo_dir(arch: str = "llama") -> str:
    """A local directory laid out like the Hub repo Jang-Hyun/Fast-KVzip, holding gates for the saved tiny model."""
    model_dir = saved_model_dir(arch, with_chat_template=True)
    root = temp_dir(prefix="kvpress-fastkvzip-")
    save_gates(random_gates(get_model(arch)), os.path.join(root, *get_gate_id(model_dir).split("/")))
    return root


@functools.lru_cache(maxsize=None)
def gates_file(arch: str = "llama") -> str:
    root = temp_dir(prefix="kvpress-fastkvzip-file-")
    return save_gates(random_gates(get_model(arch), seed=1), os.path.join(root, "gates.pt"))


class RandomGatesFastKVzipPress(FastKVzipPress):
    """FastKVzipPress with untrained gates built for whatever model it is applied to (for the press matrix)."""

    def post_init_from_model(self, model):
        if self.gates is None:
            self.gates = random_gates(model)
        super().post_init_from_model(model)


def reference_gate_scores(gate: FastKVzipGate, hidden: torch.Tensor) -> torch.Tensor:
    """The gate's formula, written out in float64: mean over groups of 1 / (1 + sum_j exp(base_j - logit))."""
    p = {name: value.double() for name, value in gate.state_dict().items()}
    h = hidden.double()
    bsz, length, _ = h.shape
    nhead, ngroup, out, eps = gate.nhead, gate.ngroup, gate.output_dim, gate.q_norm.variance_epsilon

    def rms_norm(x, weight):
        return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight

    q = rms_norm(
        (h @ p["q_proj.weight"].T + p["q_proj.bias"]).view(bsz, length, nhead, ngroup, out), p["q_norm.weight"]
    )
    k = rms_norm((h @ p["k_proj.weight"].T).view(bsz, length, nhead, out), p["k_norm.weight"])
    scores = torch.empty(bsz, nhead, length, dtype=torch.float64)
    for b in range(bsz):
        for t in range(length):
            for head in range(nhead):
                per_group = []
                for g in range(ngroup):
                    logit = k[b, t, head] @ q[b, t, head, g] / math.sqrt(out) + p["b"][head, 0, g]
                    base = p["k_base"][head, 0] @ q[b, t, head, g] / math.sqrt(out)  # (sink,)
                    per_group.append(1 / (1 + torch.exp(base - logit).sum()))
                scores[b, head, t] = torch.stack(per_group).mean()
    return scores


@pytest.mark.parametrize("sink,dtype", [(16, torch.float32), (3, torch.float32), (16, torch.bfloat16)])
def test_gate_forward_equals_its_formula(sink, dtype):
    gate = random_gates(get_model("llama"), seed=5, sink=sink, dtype=dtype)[0]
    hidden = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(6))
    scores = gate(hidden)
    assert scores.shape == (2, 2, 6) and scores.dtype == torch.float32
    expected = reference_gate_scores(gate, hidden.to(dtype)).float()
    tolerance = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(scores, expected, **tolerance)
    torch.testing.assert_close(gate(hidden[0]), scores[:1])  # one sequence without a batch dimension


def test_gate_without_sinks_scores_one():
    gate = random_gates(get_model("llama"), sink=0)[0]
    assert torch.equal(gate(torch.randn(1, 5, 64)), torch.ones(1, 2, 5))


def test_gates_load_from_a_local_directory_or_file():
    model_dir = saved_model_dir("llama", with_chat_template=True)
    gate_id = get_gate_id(model_dir)
    assert gate_id == f"{os.path.basename(model_dir).lower()}/q2_dim16_sink16.pt"
    expected = random_gates(get_model("llama"))
    hidden = torch.randn(1, 7, 64)
    for gates in (
        load_fastkvzip(model_dir, "cpu", gates_path=gates_repo_dir("llama")),
        load_fastkvzip("", "cpu", gates_file()),
    ):
        assert len(gates) == 2 and (gates[0].nhead, gates[0].ngroup, gates[0].sink, gates[0].output_dim) == (
            2,
            2,
            16,
            16,
        )
    loaded = load_fastkvzip(model_dir, "cpu", gates_path=gates_repo_dir("llama"))
    for gate, reference in zip(loaded, expected):
        torch.testing.assert_close(gate(hidden), reference(hidden))
    # dimensions are read from the file: another sink count and output size
    path = save_gates(random_gates(get_model("llama"), output_dim=8, sink=4), os.path.join(temp_dir(), "g.pt"))
    gate = load_fastkvzip("", "cpu", gates_path=path)[0]
    assert (gate.output_dim, gate.sink) == (8, 4)


@pytest.mark.parametrize("window_ratio,window", [(0.02, 0), (0.1, 4)])
def test_scores_are_the_gate_outputs_with_sinks_and_window_kept(window_ratio, window):
    model = get_model("llama")
    input_ids = random_input_ids(2, CONTEXT_LEN, seed=7)
    press = FastKVzipPress(0.5, window_ratio=window_ratio, gates_path=gates_file())
    prefill_base_model(model, press, input_ids)
    calls = record_layers(model, input_ids)
    for layer_idx in compressed_layers(model):
        expected = press.gates[layer_idx](calls[layer_idx]["hidden_states"])
        got = press.score_val[layer_idx]
        assert torch.all(got[..., : press.n_sink] == 1.0)
        end = CONTEXT_LEN - window
        torch.testing.assert_close(got[..., press.n_sink : end], expected[..., press.n_sink : end])
        assert torch.all(got[..., end:] == 1.0)
        # a window of 0 tokens keeps no window: the gate's scores stay below 1 there (upstream set them all to 1)
        assert window > 0 or torch.all(got[..., press.n_sink :] < 1.0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("compression_ratio", [0.25, 0.75])
def test_head_wise_budgets_prune_the_lowest_scores(arch, layerwise, compression_ratio):
    model = get_model(arch)
    bsz, seq_len = 2, 64
    press = RandomGatesFastKVzipPress(compression_ratio, layerwise=layerwise)
    cache = prefill_base_model(model, press, random_input_ids(bsz, seq_len, seed=8))
    layers = compressed_layers(model)
    modules = attention_modules(model)
    masks = {i: masked_bool(modules[i], (bsz, 2, seq_len)) for i in layers}
    for i in layers:
        assert cache.layers[i].keys.shape[2] == seq_len  # head-wise: masked, not removed
    fractions = [masks[i].float().mean().item() for i in layers]
    assert abs(sum(fractions) / len(fractions) - compression_ratio) < 1e-2
    kept_per_head = torch.stack([(~masks[i]).sum(-1) for i in layers])
    assert kept_per_head.unique().numel() > 1, "heads (and layers) should get different budgets"

    window = int(seq_len * press.window_ratio)
    for b in range(bsz):
        if layerwise:
            for i in layers:
                assert masks[i][b].sum() == int(2 * seq_len * compression_ratio)
                scores = press.score_val[i][b]
                assert scores[masks[i][b]].max() <= scores[~masks[i][b]].min()
        else:
            masked = torch.cat([masks[i][b].flatten() for i in layers])
            scores = torch.cat([press.score_val[i][b].flatten() for i in layers])
            assert masked.sum() == int(len(layers) * 2 * seq_len * compression_ratio)
            assert scores[masked].max() <= scores[~masked].min()
        for i in layers:  # sinks and window kept
            assert not masks[i][b, :, : press.n_sink].any() and not masks[i][b, :, seq_len - window :].any()
    with torch.no_grad():
        out = model(input_ids=random_input_ids(bsz, 1, seed=9), **cache_kwargs(model, cache))
    assert torch.isfinite(out.logits).all()


def test_ratio_zero_scores_but_masks_nothing():
    model = get_model("llama")
    press = RandomGatesFastKVzipPress(0.0)
    prefill_base_model(model, press, random_input_ids(1, CONTEXT_LEN))
    assert all(press.score_val[i] is not None for i in compressed_layers(model))
    assert all(m.masked_key_indices is None for m in attention_modules(model))


def test_no_masks_when_the_block_raises():
    model = get_model("llama")
    press = RandomGatesFastKVzipPress(0.5)
    with pytest.raises(RuntimeError, match="boom"):
        run_press_then_fail(model, press)
    assert all(m.masked_key_indices is None for m in attention_modules(model))
    assert not any(press_hooks(m) for m in attention_modules(model))


def run_press_then_fail(model, press):
    with torch.no_grad(), press(model):
        model.model(
            input_ids=random_input_ids(1, CONTEXT_LEN), **cache_kwargs(model.model, DynamicCache(config=model.config))
        )
        raise RuntimeError("boom")


def test_clear_errors_for_missing_or_mismatched_gates():
    model = load_saved_model(saved_model_dir("llama", with_chat_template=True))
    with pytest.raises(RuntimeError, match="not released.*Jang-Hyun/Fast-KVzip.*gates_path"):
        with FastKVzipPress(0.5)(model):  # the Hub cannot be reached here
            pass
    with pytest.raises(RuntimeError, match="not released.*No Fast-KVzip gates"):
        with FastKVzipPress(0.5, gates_path=temp_dir())(model):
            pass
    other = random_gates(get_model("llama"))[:1]
    press = FastKVzipPress(0.5)
    press.gates = other
    with pytest.raises(ValueError, match="do not fit this model"):
        with press(model):
            pass


@pytest.mark.parametrize("kwargs", [{"compression_ratio": 1.0}, {"n_sink": -1}, {"window_ratio": 2.0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        FastKVzipPress(**kwargs)


def test_pipeline_answers_and_cache_unchanged_after_each_question():
    model = load_saved_model(saved_model_dir("llama", with_chat_template=True))
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(True), device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 2
    questions = ["Who?", "Why?"]  # short: see test_kvzip's pipeline test
    press = FastKVzipPress(0.5, gates_path=gates_repo_dir("llama"))  # found by the model's name, as on the Hub
    check_questions_leave_compressed_context(model, pipe, press, context, questions, max_new_tokens=3)


def test_cannot_be_composed():
    with pytest.raises(ValueError, match="cannot be composed"):
        ComposedPress([KnormPress(0.5), FastKVzipPress(0.5)])


def test_gate_scores_stay_float32_with_bfloat16_gates_and_model():
    """Kept as a difference: the gates' scores are float32 whatever the gate and model dtype (upstream returns them
    in the gates' dtype); bfloat16 scores in (0, 1] collapse many distinct values into ties for the bottom-k."""
    model = copy.deepcopy(get_model("llama")).to(torch.bfloat16)
    press = FastKVzipPress(0.5)
    press.gates = random_gates(model, seed=2, dtype=torch.bfloat16)
    with torch.no_grad(), press(model):
        model(random_input_ids(1, CONTEXT_LEN, seed=3), **cache_kwargs(model, DynamicCache(config=model.config)))
    scores = torch.stack([press.score_val[layer_idx] for layer_idx in compressed_layers(model)])
    assert scores.dtype == torch.float32
    assert scores.unique().numel() > scores.bfloat16().unique().numel()
