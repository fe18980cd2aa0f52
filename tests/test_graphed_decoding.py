# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The CUDA-graph decoding step gives the answers of the eager loops (GPU only; `python tests/test_graphed_decoding.py`
runs the same checks without pytest on the GPU machine). On CPU only the refusal is checked."""

import pytest
import torch
import transformers.masking_utils
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvpress import AdaKVPress, CannotCompressError, KnormPress, KVPressTextGenerationPipeline, PyramidKVPress
from kvpress.graphed_decoding import GraphedDecodeStep, graphable
from kvpress.inplace_cache import InPlaceCache
from kvpress.presses.snapkv_press import SnapKVPress

CONTEXT = "The special magic number for wide-willow is: 1456079. " + "The grass is green and the sky is blue. " * 30
QUESTIONS = ["What is the special magic number for wide-willow?", "What colour is the grass?"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_refused_without_cuda_or_with_headwise_masks():
    from tests.fixtures import get_model, prefill, random_input_ids

    model = get_model("llama")
    cache = prefill(model, random_input_ids(1, 10))
    inplace = InPlaceCache.from_cache(cache, extra_tokens=4)
    assert not graphable(model, inplace)
    with pytest.raises(CannotCompressError, match="needs an in-place cache on a CUDA device"):
        GraphedDecodeStep(model, inplace)


@needs_cuda
def test_graph_answers_equal_the_eager_loops():
    from harness.reference_model import REFERENCE_MODEL_DIR  # the shipped offline model (a local directory)

    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cuda")
    presses = {
        "none": lambda: None,
        "knorm": lambda: KnormPress(0.5),
        "pyramidkv": lambda: PyramidKVPress(0.5),
        "adakv": lambda: AdaKVPress(SnapKVPress(0.5)),  # head-wise: falls back to the eager in-place loop
    }
    for name, make in presses.items():
        answers = {}
        for mode in ("dynamic", "inplace", "graph"):
            options = {"inplace_decoding": mode != "dynamic", "cuda_graph": mode == "graph"}
            answers[mode] = pipe(CONTEXT, questions=QUESTIONS, press=make(), max_new_tokens=12, **options)["answers"]
        assert answers["graph"] == answers["inplace"] == answers["dynamic"], (name, answers)


@needs_cuda
def test_compiled_graph_tokens_equal_the_eager_loop():
    from harness.reference_model import REFERENCE_MODEL_DIR
    from kvpress import greedy_generate

    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    input_ids = tokenizer(CONTEXT + QUESTIONS[0], return_tensors="pt").input_ids.cuda()
    for make in (lambda: None, lambda: KnormPress(0.5), lambda: PyramidKVPress(0.5)):
        eager = greedy_generate(model, input_ids, make(), max_new_tokens=12, inplace=True)
        compiled = greedy_generate(
            model, input_ids, make(), max_new_tokens=12, inplace=True, cuda_graph=True, compile_mode="default"
        )
        assert torch.equal(eager, compiled), (make(), eager[0, -12:], compiled[0, -12:])


def _ragged_tokens(model, input_ids, graph: bool, steps: int = 12) -> list[int]:
    """Greedy tokens after an AdaKV(SnapKV) 0.5 prefill, decoded over the ragged cache, eagerly or from a graph."""
    from transformers import DynamicCache

    from kvpress.decoding_loop import next_greedy_token
    from kvpress.headwise_masks import clear_masks
    from kvpress.ragged_cache import RaggedCache
    from kvpress.transformers_adapter import cache_kwargs
    from kvpress.utils import get_language_model

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), AdaKVPress(SnapKVPress(0.5))(model):
        logits = model(input_ids, **cache_kwargs(model, cache)).logits
    ragged = RaggedCache.from_cache(cache, model, extra_tokens=steps + 8)
    for layer in get_language_model(model).layers:
        clear_masks(layer.self_attn)  # applied: the ragged layers hold only the kept entries
    token, position, tokens = logits[:, -1:].argmax(-1), input_ids.shape[1], []
    try:
        step = GraphedDecodeStep(model, ragged) if graph else None
        with torch.no_grad():
            for _ in range(steps):
                positions = torch.full((1, 1), position, device=input_ids.device)
                token = next_greedy_token(model, ragged, token, positions, step)
                tokens.append(int(token))
                position += 1
    finally:
        RaggedCache.detach(model)
    return tokens


def test_a_ragged_cache_is_refused_off_cuda_and_in_the_benchmark(tmp_path):
    from kvpress.benchmark import main
    from kvpress.ragged_cache import RaggedCache
    from tests.fixtures import get_model, prefill, random_input_ids

    model = get_model("llama")
    ragged = RaggedCache.from_cache(prefill(model, random_input_ids(1, 10)), model, extra_tokens=4)
    try:
        assert not graphable(model, ragged)
        with pytest.raises(CannotCompressError, match="or a ragged cache of ragged layers only on a CUDA device"):
            GraphedDecodeStep(model, ragged)
    finally:
        RaggedCache.detach(model)
    args = ["--model", "tiny", "--context_lengths", "64", "--max_new_tokens", "3", "--output_dir", str(tmp_path)]
    (row,) = main([*args, "--device", "cpu", "--presses", "adakv_snapkv:0.5", "--decode_loops", "ragged_graph"])
    assert row["error"].startswith("not applicable") and "ragged_graph loop serves CUDA, batch 1" in row["error"]


@needs_cuda
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_ragged_graph_tokens_equal_the_eager_ragged_loop(backend):
    from harness.reference_model import REFERENCE_MODEL_DIR
    from kvpress.ragged_attention import set_ragged_backend

    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    input_ids = tokenizer(CONTEXT + QUESTIONS[0], return_tensors="pt").input_ids.cuda()
    set_ragged_backend("reference")
    try:
        reference = _ragged_tokens(model, input_ids, graph=False)
        set_ragged_backend(backend)
        eager = _ragged_tokens(model, input_ids, graph=False)
        assert eager == reference  # the backend's eager steps decode what the exact path decodes
        assert _ragged_tokens(model, input_ids, graph=True) == eager
    finally:
        set_ragged_backend("auto")


@needs_cuda
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_pipeline_ragged_graph_answers_equal_the_eager_ragged_loop(backend, monkeypatch):
    """`ragged_cache=True, cuda_graph=True`: the step is captured once over the ragged cache and replayed for every
    token of both questions; the answers are those of the eager ragged loop and of the masking path."""
    import kvpress.pipeline as pipeline_module
    from harness.reference_model import REFERENCE_MODEL_DIR
    from kvpress.ragged_attention import set_ragged_backend

    replays = []

    class CountingStep(GraphedDecodeStep):
        def __call__(self, token, position_ids):
            replays.append(1)
            return super().__call__(token, position_ids)

    monkeypatch.setattr(pipeline_module, "GraphedDecodeStep", CountingStep)
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cuda")
    set_ragged_backend(backend)
    try:
        answers = {}
        for mode in ("masked", "ragged", "ragged_graph"):
            options = {"ragged_cache": mode != "masked", "cuda_graph": mode == "ragged_graph"}
            press = AdaKVPress(SnapKVPress(0.5))
            answers[mode] = pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=12, **options)["answers"]
    finally:
        set_ragged_backend("auto")
    assert answers["ragged_graph"] == answers["ragged"] == answers["masked"], answers
    assert len(replays) >= len(QUESTIONS)  # the graph answered (at least one replay per question)


if __name__ == "__main__":
    test_graph_answers_equal_the_eager_loops()
    test_compiled_graph_tokens_equal_the_eager_loop()
    test_ragged_graph_tokens_equal_the_eager_ragged_loop("flex")
    test_ragged_graph_tokens_equal_the_eager_ragged_loop("triton")
    print("graph answers equal the eager loops")


def test_pipeline_ragged_graph_is_said_not_applicable_off_cuda(caplog):
    import logging

    from tests.fixtures import get_model, load_tokenizer

    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(False), device="cpu")
    answers = {}
    with caplog.at_level(logging.INFO, logger="kvpress.pipeline"):
        for graph in (False, True):
            press = AdaKVPress(SnapKVPress(0.5))
            out = pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=4, ragged_cache=True, cuda_graph=graph)
            answers[graph] = out["answers"]
    assert "cuda_graph: not applicable to this ragged cache" in caplog.text
    assert answers[True] == answers[False]


def test_compile_mode_is_checked():
    from tests.fixtures import get_model, load_tokenizer

    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(False), device="cpu")
    with pytest.raises(ValueError, match="pass cuda_graph=True and one of default, max-autotune-no-cudagraphs"):
        pipe(CONTEXT, question=QUESTIONS[0], compile_mode="default")
    with pytest.raises(ValueError, match="got compile_mode='fast'"):
        pipe(CONTEXT, question=QUESTIONS[0], cuda_graph=True, compile_mode="fast")
    with pytest.raises(ValueError, match="compile_mode must be None or one of"):
        GraphedDecodeStep(pipe.model, None, compile_mode="fast")  # type: ignore[arg-type]


def test_capture_builds_no_mask_and_keeps_the_logits(monkeypatch):
    """Warm-up and capture of a ragged step run with the attention named kvpress_ragged: transformers then builds no
    mask (under stream capture it would build one of the capture's width), and the step's logits are unchanged."""
    import kvpress.attention_patch as attention_patch_module
    import kvpress.ragged_attention as ragged_attention_module
    from kvpress.graphed_decoding import without_mask_building
    from kvpress.ragged_cache import RaggedCache
    from kvpress.resources import text_config
    from kvpress.transformers_adapter import cache_kwargs
    from tests.fixtures import get_model, prefill, random_input_ids

    model = get_model("llama")
    previous = text_config(model)._attn_implementation
    masks = []
    run = ragged_attention_module.run_ragged_attention

    def spy(layer, query, attention_mask, scaling, softcap):
        masks.append(attention_mask)
        return run(layer, query, attention_mask, scaling, softcap)

    for module in (ragged_attention_module, attention_patch_module):  # the two callers of run_ragged_attention
        monkeypatch.setattr(module, "run_ragged_attention", spy)
    # what transformers sees under stream capture: tracing, so it never skips the mask of a padding-free batch
    monkeypatch.setattr(transformers.masking_utils, "is_tracing", lambda *args: True)
    step = {
        "input_ids": torch.tensor([[7]]),
        "position_ids": torch.tensor([[10]]),
        "attention_mask": torch.ones(1, 11, dtype=torch.long),
    }
    ragged = RaggedCache.from_cache(prefill(model, random_input_ids(1, 10)), model, extra_tokens=4)
    try:
        lengths = ragged.state()
        with torch.no_grad():
            masks.clear()
            expected = model(**step, **cache_kwargs(model, ragged)).logits
            built = list(masks)
            ragged.rollback(lengths)
            masks.clear()
            with without_mask_building(model):
                assert text_config(model)._attn_implementation == "kvpress_ragged"
                got = model(**step, **cache_kwargs(model, ragged)).logits
    finally:
        RaggedCache.detach(model)
    assert text_config(model)._attn_implementation == previous
    assert len(built) == len(masks) == model.config.num_hidden_layers
    assert all(isinstance(mask, torch.Tensor) for mask in built)  # what a capture would have frozen at one width
    assert all(mask is None for mask in masks)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
