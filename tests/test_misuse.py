# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Misuse that used to give a silent wrong answer (issue 22) now raises, saying what was wrong and what to do."""

import ast
import io
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kvpress import ComposedPress, H2OPress, KnormPress, KVPressTextGenerationPipeline, StreamingLLMPress
from kvpress.presses.fastkvzip_press import FastKVzipPress, get_gate_weight, load_fastkvzip
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import get_model, load_tokenizer, press_hooks, random_input_ids
from tests.presses.test_fastkvzip import random_gates, save_gates

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTEXT_TOKENS = 252


def prefill_length(model, press_context, seq_len: int = CONTEXT_TOKENS) -> int:
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press_context:
        model.model(input_ids=random_input_ids(seq_len=seq_len), **cache_kwargs(model.model, cache))
    return cache.get_seq_length()


def no_press_hooks(model) -> bool:
    return all(not press_hooks(module) for module in model.modules())


# ---------------------------------------------------------------------------------------------------- nested presses


def test_a_press_entered_twice_on_one_model_is_refused_instead_of_compressing_twice():
    model = get_model("llama")
    press = KnormPress(0.5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        with pytest.raises(ValueError, match=r"KnormPress is already applied to this model") as refused:
            with press(model):
                pass
        # the outer press still applies, once: 252 tokens to 126 (nested, they made 63)
        model.model(input_ids=random_input_ids(seq_len=CONTEXT_TOKENS), **cache_kwargs(model.model, cache))
    assert cache.get_seq_length() == CONTEXT_TOKENS // 2
    assert "ComposedPress" in str(refused.value)
    assert no_press_hooks(model)


def test_another_press_inside_a_press_is_refused_and_names_the_active_one():
    model = get_model("llama")
    with KnormPress(0.5)(model):
        with pytest.raises(ValueError) as refused:
            with StreamingLLMPress(0.5)(model):
                pass
    message = str(refused.value)
    assert "StreamingLLMPress cannot be applied" in message and "KnormPress is already applied" in message
    assert "ComposedPress([" in message
    assert no_press_hooks(model)


def test_presses_entered_one_after_the_other_each_compress_once():
    model = get_model("llama")
    press = KnormPress(0.5)
    assert prefill_length(model, press(model)) == CONTEXT_TOKENS // 2
    assert prefill_length(model, press(model)) == CONTEXT_TOKENS // 2
    assert prefill_length(model, StreamingLLMPress(0.5)(model)) == CONTEXT_TOKENS // 2
    # after a refused nesting the model is free again
    with press(model):
        with pytest.raises(ValueError):
            with press(model):
                pass
    assert prefill_length(model, press(model)) == CONTEXT_TOKENS // 2
    # and after an error inside the block too
    with pytest.raises(RuntimeError, match="inside"):
        with press(model):
            raise RuntimeError("inside")
    assert prefill_length(model, press(model)) == CONTEXT_TOKENS // 2


def test_composed_press_is_the_way_to_chain_presses():
    model = get_model("llama")
    press = ComposedPress([KnormPress(0.5), KnormPress(0.5)])
    assert prefill_length(model, press(model)) == CONTEXT_TOKENS // 4
    assert no_press_hooks(model)


def test_timing_inside_a_press_is_refused_but_the_pipeline_times_after_the_prefill():
    model = get_model("llama")
    press = KnormPress(0.5)
    with press(model):
        with pytest.raises(ValueError, match="KnormPress is already applied"):
            with press.track_timing(model):
                pass
    press.latency = True
    try:
        pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(False), device="cpu")
        pipe("A context about a quick fox. " * 3, questions=["Who?", "Where?"], press=press, max_new_tokens=3)
        metrics = press.get_timing_metrics()
        assert metrics["total_prefill_tokens"] > 0 and metrics["total_decoding_tokens"] > 0
    finally:
        press.latency = False
        press.reset_timing()


def test_the_pipeline_refuses_to_run_inside_a_press_block():
    model = get_model("llama")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(False), device="cpu")
    press = KnormPress(0.5)
    with press(model):
        with pytest.raises(ValueError, match="KnormPress is already applied"):
            pipe("A context. " * 5, question="Who?", press=press, max_new_tokens=2)
    assert no_press_hooks(model)


# ------------------------------------------------------------------------------------------------- reused user cache


def test_a_cache_reused_for_a_second_context_is_refused():
    pipe = KVPressTextGenerationPipeline(model=get_model("llama"), tokenizer=load_tokenizer(False), device="cpu")
    press = KnormPress(0.5)
    first, second = "The first context is about a fox. " * 7, "The second one is about a dog. " * 7
    cache = DynamicCache()
    pipe(first, question="Who?", press=press, max_new_tokens=3, cache=cache)
    compressed = cache.get_seq_length()
    assert compressed > 0
    with pytest.raises(ValueError, match=r"already holds \d+ tokens") as refused:
        pipe(second, question="Who?", press=press, max_new_tokens=3, cache=cache)
    assert "fresh cache" in str(refused.value) and "None" in str(refused.value)
    assert cache.get_seq_length() == compressed  # left as the first call left it
    # a fresh cache (or None) per context gives the answer of the second context alone
    alone = pipe(second, question="Who?", press=press, max_new_tokens=3)["answer"]
    assert pipe(second, question="Who?", press=press, max_new_tokens=3, cache=DynamicCache())["answer"] == alone


# ------------------------------------------------------------------------------------------- pickles are not loaded


class NotATensor:
    """Any class: a file holding one needs a full pickle load (arbitrary code) to be read."""

    def __init__(self, value: int = 3):
        self.value = value


def pickled_gates_file(tmp_path) -> str:
    """Gates in the published layout plus an object that `torch.load(weights_only=True)` refuses."""
    gates = random_gates(get_model("llama"), seed=3)
    path = str(tmp_path / "pickled" / "gates.pt")
    os.makedirs(os.path.dirname(path))
    torch.save({"module": [gate.state_dict() for gate in gates], "extra": NotATensor()}, path)
    return path


def test_gates_that_need_a_pickle_load_are_refused(tmp_path):
    path = pickled_gates_file(tmp_path)
    with pytest.raises(ValueError, match="kvpress never does one") as refused:
        get_gate_weight("", path)
    assert "weights_only=True" in str(refused.value) and "convert it once" in str(refused.value)
    press = FastKVzipPress(compression_ratio=0.5, gates_path=path)
    with pytest.raises(ValueError, match="kvpress never does one") as refused:
        press.post_init_from_model(get_model("llama"))  # not "the gates are not released": they are, as a pickle
    assert type(refused.value).__name__ == "UnsafePickleError" and press.gates is None


def test_a_pickled_file_converted_as_the_error_says_loads(tmp_path):
    """The user converts a trusted pickle once, in their own session; kvpress then reads it weights-only."""
    path = pickled_gates_file(tmp_path)
    converted = str(tmp_path / "converted.pt")
    torch.save({"module": torch.load(path, weights_only=False)["module"]}, converted)  # the user's own step
    expected = random_gates(get_model("llama"), seed=3)
    state_dicts, _ = get_gate_weight("", converted)
    assert len(state_dicts) == len(expected)
    torch.testing.assert_close(state_dicts[1]["q_proj.weight"], expected[1].q_proj.weight)
    press = FastKVzipPress(compression_ratio=0.5, gates_path=converted)
    press.post_init_from_model(get_model("llama"))
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(press.gates[0](hidden), expected[0](hidden))


def test_plain_gate_files_load(tmp_path):
    expected = random_gates(get_model("llama"), seed=4)
    path = save_gates(expected, str(tmp_path / "plain" / "gates.pt"))
    gates = load_fastkvzip("", "cpu", gates_path=path)
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gates[1](hidden), expected[1](hidden))


def test_safetensors_gate_files_are_read_with_safetensors(tmp_path):
    from safetensors.torch import save_file

    expected = random_gates(get_model("llama"), seed=5)
    flat = {f"module.{i}.{name}": value for i, gate in enumerate(expected) for name, value in gate.state_dict().items()}
    path = str(tmp_path / "gates.safetensors")
    save_file(flat, path)
    gates = load_fastkvzip("", "cpu", gates_path=path)
    assert len(gates) == len(expected)
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gates[1](hidden), expected[1](hidden))
    save_file({"q_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"module\.<layer>\.<parameter>"):
        load_fastkvzip("", "cpu", gates_path=str(tmp_path / "bad.safetensors"))


def test_the_default_hub_gates_are_not_unpickled(tmp_path, monkeypatch):
    """The published files come from `hf_hub_download`; a file there that needs a pickle load is refused too."""
    import huggingface_hub

    from kvpress.presses import fastkvzip_press

    path = pickled_gates_file(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: path)
    monkeypatch.setattr(fastkvzip_press, "get_gate_id", lambda model_name: "model/q2_dim16_sink16.pt")
    with pytest.raises(ValueError, match="kvpress never does one"):
        get_gate_weight("some/model")


def test_train_resume_loads_without_unpickling(tmp_path):
    from reference.train import load_resume, parse_args, save_resume

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    args = parse_args(["--output_dir", str(tmp_path), "--tiny", "--milestone", "frequent_words=0.5@5"])
    save_resume(model, 7, 20, args, optimizer, seconds=1.5)
    state = load_resume(str(tmp_path / "resume"))  # weights_only=True
    assert (
        state["step"] == 7 and state["max_steps"] == 20 and state["args"]["milestone"] == [["frequent_words", 0.5, 5]]
    )
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    saved = torch.load(tmp_path / "resume" / "optimizer.pt", weights_only=True)
    assert saved["step"] == 7 and saved["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    # a checkpoint holding any other object is refused, not unpickled
    bad = tmp_path / "bad"
    bad.mkdir()
    buffer = io.BytesIO()
    torch.save({"model": {}, "step": 0, "extra": NotATensor()}, buffer)
    (bad / "part0").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="weights_only=True"):
        load_resume(str(bad))


def test_no_torch_load_unpickles():
    """Every `torch.load` of the library, the harnesses and the training script passes `weights_only=True`."""
    sources = [REPO_ROOT / "reference" / "train.py", *sorted((REPO_ROOT / "kvpress").rglob("*.py"))]
    sources += [*sorted((REPO_ROOT / "kvzap").rglob("*.py")), *sorted((REPO_ROOT / "reason").rglob("*.py"))]
    loads = 0
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                if getattr(node.func.value, "id", None) != "torch":  # type: ignore[attr-defined]
                    continue
                loads += 1
                flags = {keyword.arg: keyword.value for keyword in node.keywords}
                assert "weights_only" in flags, f"{path}: torch.load without weights_only"
                value = flags["weights_only"]
                assert isinstance(value, ast.Constant) and value.value is True, f"{path}: {ast.unparse(node)}"
    assert loads >= 2  # train.py's resume and FastKVzip's gates at least


# ----------------------------------------------------------------------------------- messages name the right press


def test_several_questions_with_a_budget_press_are_answered_each_from_the_context():
    pipe = KVPressTextGenerationPipeline(
        model=get_model("llama", "eager"), tokenizer=load_tokenizer(False), device="cpu"
    )
    context = "A long enough context about a quick brown fox. " * 4
    questions = ["Who jumps?", "What colour?", "Why?"]
    press = H2OPress(cache_budget=16)
    answers = pipe(context, questions=questions, press=press, max_new_tokens=4)["answers"]
    assert len(answers) == 3
    alone = [pipe(context, question=q, press=H2OPress(cache_budget=16), max_new_tokens=4)["answer"] for q in questions]
    assert answers == alone


def test_pipeline_messages_name_no_press_the_user_did_not_pass():
    """The pipeline's errors speak of the press the user passed (by its class), never of one class in particular."""
    source = (REPO_ROOT / "kvpress" / "pipeline.py").read_text()
    import kvpress

    press_names = [name for name in kvpress.__all__ if name.endswith("Press") and name != "BasePress"]
    messages = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Raise) and node.exc is not None]
    for node in messages:
        text = ast.unparse(node)
        named = [name for name in press_names if re.search(rf"\b{name}\b", text)]
        assert not named, f"pipeline.py line {node.lineno} names {named}: {text}"


def test_an_error_through_the_pipeline_names_the_budget_press_it_was_given():
    model = get_model("llama", "eager")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=load_tokenizer(False), device="cpu")
    with H2OPress(cache_budget=16)(model):
        with pytest.raises(ValueError) as refused:
            pipe("A context. " * 5, questions=["a?", "b?"], press=H2OPress(cache_budget=16), max_new_tokens=2)
    message = str(refused.value)
    assert "H2OPress cannot be applied" in message and "DecodingPress" not in message
