# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Left-padded batches (issue 22): every row gives, under a press, the greedy tokens (and logits) it gives alone; what
a press cannot do row by row is refused with a ValueError (kvpress/padding.py)."""

import contextlib

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from harness.reference_model import REFERENCE_MODEL_DIR
from kvpress import (
    AdaKVPress,
    BlockPress,
    CAMPress,
    ChunkKVPress,
    ChunkPress,
    ComposedPress,
    CriticalAdaKVPress,
    CriticalKVPress,
    DecodingPress,
    DMSPress,
    FinchPress,
    FullPress,
    H2OPress,
    KeyRerotationPress,
    KnormPress,
    KVComposePress,
    KVzipPress,
    LUKVPress,
    MergingPress,
    ObservedAttentionPress,
    PerLayerCompressionPress,
    PrefillDecodingPress,
    PyramidKVPress,
    RKVPress,
    SimLayerKVPress,
    SnapKVPress,
    StreamingLLMPress,
    ThinKPress,
)
from kvpress.padding import left_padding, padding_refusal
from kvpress.transformers_adapter import cache_kwargs
from tests.default_presses import default_presses
from tests.fixtures import compressed_layers, distinct_ids, get_model, load_tokenizer
from tests.presses.test_headwise_matrix import MockDuoAttentionPress, uniform_curve

LENGTHS = (37, 21, 9)  # three rows of different lengths, the longest first
NEW_TOKENS = 8
LOGITS_ATOL = 1e-4


def padded_batch(lengths=LENGTHS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Left-padded `(input_ids, attention_mask)` of rows of the given lengths (distinct ids: no score ties), and the
    rows alone."""
    rows = [distinct_ids(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # 0 is the fixtures' <pad>
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask, rows


def greedy(model, press, input_ids, attention_mask, new_tokens: int = NEW_TOKENS):
    """Greedy tokens `(B, new_tokens)` and logits `(B, new_tokens, vocab)` of `generate` inside `press`."""
    block = press(model) if press is not None else contextlib.nullcontext()
    with torch.no_grad(), block:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, input_ids.shape[1] :], torch.stack(out.logits, dim=1)


def assert_rows_as_alone(model, press, lengths=LENGTHS, seed: int = 0) -> None:
    input_ids, attention_mask, rows = padded_batch(lengths, seed)
    tokens, logits = greedy(model, press, input_ids, attention_mask)
    for i, row in enumerate(rows):
        alone_tokens, alone_logits = greedy(model, press, row[None], torch.ones(1, len(row), dtype=torch.long))
        assert tokens[i].tolist() == alone_tokens[0].tolist(), f"row {i} (length {len(row)})"
        torch.testing.assert_close(logits[i], alone_logits[0], atol=LOGITS_ATOL, rtol=0)


def _draws_unseeded_random_numbers(cls, kwargs) -> bool:
    """Scores from the global random generator (unseeded RandomPress, random leverage, the random sketch of
    LeverageScorePress and CompactorPress): a row alone draws other numbers than the same row in a batch."""
    if cls.__name__ in ("LeverageScorePress", "CompactorPress"):
        return True
    return (cls.__name__ == "RandomPress" and kwargs.get("seed") is None) or bool(kwargs.get("use_random_leverage"))


# Every uniform scorer of the shared matrix, easy and hard settings (deterministic ones).
SCORERS = [
    (case["cls"], kwargs)
    for case in default_presses
    for kwargs in case["kwargs"]
    if not _draws_unseeded_random_numbers(case["cls"], kwargs)
]


def _scorer_id(case) -> str:
    cls, kwargs = case
    return f"{cls.__name__}-{kwargs.get('compression_ratio')}"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("case", SCORERS, ids=[_scorer_id(c) for c in SCORERS])
def test_scorer_rows_match_rows_alone(arch, case):
    cls, kwargs = case
    assert_rows_as_alone(get_model(arch), cls(**kwargs))


def _layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


# Wrappers, head-wise presses and the other prefill presses that compress row by row.
SUPPORTED = {
    "adakv": lambda model, tmp: AdaKVPress(KnormPress(0.5)),
    "adakv_snapkv": lambda model, tmp: AdaKVPress(SnapKVPress(0.5, window_size=2)),
    "critical_adakv": lambda model, tmp: CriticalAdaKVPress(KnormPress(0.5)),
    "duo_attention": lambda model, tmp: MockDuoAttentionPress(head_compression_ratio=0.5),
    "lukv": lambda model, tmp: LUKVPress(KnormPress(), compression_ratio=0.5, budget_curve_path=uniform_curve(tmp)),
    "streaming_llm": lambda model, tmp: StreamingLLMPress(0.5),
    "pyramidkv": lambda model, tmp: PyramidKVPress(0.5, window_size=2),
    "h2o": lambda model, tmp: H2OPress(0.5),
    "observed_attention": lambda model, tmp: ObservedAttentionPress(0.5),
    "think": lambda model, tmp: ThinKPress(key_channel_compression_ratio=0.5, window_size=2),
    "simlayerkv": lambda model, tmp: SimLayerKVPress(lazy_threshold=0.5, n_initial=2, n_recent=4),
    "criticalkv": lambda model, tmp: CriticalKVPress(SnapKVPress(0.5, window_size=2)),
    "rerotation": lambda model, tmp: KeyRerotationPress(KnormPress(0.5)),
    "chunk": lambda model, tmp: ChunkPress(KnormPress(0.5), chunk_length=8),
    "chunkkv": lambda model, tmp: ChunkKVPress(KnormPress(0.5), chunk_length=4),
    "block": lambda model, tmp: BlockPress(KnormPress(0.5), block_size=8),
    "merging": lambda model, tmp: MergingPress(KnormPress(0.5)),
    "composed": lambda model, tmp: ComposedPress([KnormPress(0.3), StreamingLLMPress(0.4)]),
    "composed_rerotation": lambda model, tmp: ComposedPress(
        [SnapKVPress(0.3, window_size=2), KeyRerotationPress(KnormPress(0.3))]
    ),
    "per_layer": lambda model, tmp: PerLayerCompressionPress(
        KnormPress(), [0.2 + 0.6 * (i % 2) for i in range(_layers(model))]
    ),
    "full": lambda model, tmp: FullPress(),
}


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_press_rows_match_rows_alone(name, arch, attn_implementation, tmp_path):
    model = get_model(arch, attn_implementation)
    assert_rows_as_alone(model, SUPPORTED[name](model, tmp_path))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_each_row_keeps_its_own_share_of_its_own_tokens(ratio):
    """What a row keeps in a padded batch is what it keeps alone: `int(n_real * (1 - ratio))` real tokens, no padding,
    right-aligned after padding slots that attention never sees."""
    model = get_model("llama")
    press = KnormPress(ratio)
    input_ids, attention_mask, rows = padded_batch()
    cache = DynamicCache(config=model.config)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # what generate passes: each row from 0
    with torch.no_grad(), press(model):
        model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **cache_kwargs(model, cache)
        )
    kept = [int(n * (1 - ratio)) for n in LENGTHS]
    for layer_idx in compressed_layers(model):
        keys = cache.layers[layer_idx].keys
        assert keys.shape[2] == max(kept)
        for i, row in enumerate(rows):
            alone = DynamicCache(config=model.config)
            with torch.no_grad(), press(model):
                model(input_ids=row[None], **cache_kwargs(model, alone))
            torch.testing.assert_close(keys[i, :, max(kept) - kept[i] :], alone.layers[layer_idx].keys[0])
            torch.testing.assert_close(
                cache.layers[layer_idx].values[i, :, max(kept) - kept[i] :], alone.layers[layer_idx].values[0]
            )


def test_issue_reproduction_streaming_llm_long_and_short_rows():
    """The issue's reproduction: a long and a short prompt, left-padded by the tokenizer, StreamingLLMPress(0.5)."""
    model = get_model("llama")
    tokenizer = load_tokenizer()
    tokenizer.padding_side = "left"
    long, short = "The quick brown fox jumps over the lazy dog. " * 3, "Hello there, kv press!"
    encoded = tokenizer([long, short], padding=True, return_tensors="pt")
    assert int(encoded["attention_mask"][1].sum()) < encoded["attention_mask"].shape[1]  # the short row is padded
    tokens, logits = greedy(model, StreamingLLMPress(0.5), encoded["input_ids"], encoded["attention_mask"], 12)
    for i, text in enumerate([long, short]):
        alone = tokenizer([text], return_tensors="pt")
        alone_tokens, alone_logits = greedy(
            model, StreamingLLMPress(0.5), alone["input_ids"], alone["attention_mask"], 12
        )
        assert tokens[i].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(logits[i], alone_logits[0], atol=LOGITS_ATOL, rtol=0)


@pytest.fixture(scope="module")
def reference():
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    return model, tokenizer


REFERENCE_PRESSES = {
    "streaming_llm": lambda: StreamingLLMPress(0.5),
    "knorm": lambda: KnormPress(0.5),
    "snapkv": lambda: SnapKVPress(0.5, window_size=8),
    "adakv": lambda: AdaKVPress(SnapKVPress(0.5, window_size=8)),
    "rerotation": lambda: KeyRerotationPress(KnormPress(0.5)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PRESSES))
def test_reference_model_rows_match_rows_alone(reference, name):
    model, tokenizer = reference
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generator = np.random.default_rng(0)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    texts = [" ".join(generator.choice(words, n)) + ". The last word was" for n in (60, 31, 9)]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    assert len(set(lengths)) == 3
    press = REFERENCE_PRESSES[name]()
    pad = tokenizer.pad_token_id
    with torch.no_grad(), press(model):
        out = model.generate(
            **encoded,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
    width = encoded["input_ids"].shape[1]
    for i, text in enumerate(texts):
        alone = tokenizer([text], return_tensors="pt")
        with torch.no_grad(), press(model):
            one = model.generate(
                **alone,
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=pad,
                output_logits=True,
                return_dict_in_generate=True,
            )
        alone_tokens = one.sequences[0, alone["input_ids"].shape[1] :].tolist()
        assert out.sequences[i, width : width + len(alone_tokens)].tolist() == alone_tokens
        for step, step_logits in enumerate(one.logits):
            torch.testing.assert_close(out.logits[step][i], step_logits[0], atol=LOGITS_ATOL, rtol=0)


# ---- refused ---------------------------------------------------------------------------------------------------------


def _finch():
    press = FinchPress(0.5)
    press.delimiter_token_id = 3
    return press


REFUSED = {
    "cache_budget": lambda: KnormPress(cache_budget=8),
    "rkv_budget": lambda: RKVPress(cache_budget=16),
    "decoding": lambda: DecodingPress(KnormPress(), compression_interval=2, target_size=8),
    "prefill_decoding": lambda: PrefillDecodingPress(
        prefilling_press=KnormPress(0.5),
        decoding_press=DecodingPress(KnormPress(), compression_interval=2, target_size=8),
    ),
    "composed_with_budget": lambda: ComposedPress([StreamingLLMPress(0.5), KnormPress(cache_budget=8)]),
    "dms": lambda: DMSPress(KnormPress(), threshold=-0.5, sliding_window_size=4),
    "cam": lambda: CAMPress(KnormPress(), compression_interval=2, target_size=8),
    "kvzip": lambda: KVzipPress(0.5, tokenizer=load_tokenizer()),
    "kvcompose": lambda: KVComposePress(compression_ratio=0.5),
    "finch": _finch,
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_presses_that_cannot_compress_row_by_row_refuse_padding(name):
    model = get_model("llama")
    press = REFUSED[name]()
    assert padding_refusal(press) is not None
    input_ids, attention_mask, _ = padded_batch()
    with pytest.raises(ValueError, match="cannot compress a padded batch"):
        greedy(model, press, input_ids, attention_mask)


@pytest.mark.parametrize("name", ["cache_budget", "decoding"])
def test_refused_presses_still_take_batches_without_padding(name):
    model = get_model("llama")
    input_ids = torch.stack([distinct_ids(1, 20, seed=s)[0] for s in range(2)])
    tokens, _ = greedy(model, REFUSED[name](), input_ids, torch.ones_like(input_ids))
    assert tokens.shape == (2, NEW_TOKENS)


def test_models_with_sliding_window_layers_refuse_padding():
    model = get_model("gemma3_text")
    input_ids, attention_mask, _ = padded_batch()
    with pytest.raises(ValueError, match="sliding-window layers"):
        greedy(model, KnormPress(0.5), input_ids, attention_mask)


def test_right_padding_is_refused():
    model = get_model("llama")
    input_ids, attention_mask, _ = padded_batch()
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        greedy(model, KnormPress(0.5), input_ids.flip(1), attention_mask.flip(1))


@pytest.mark.parametrize(
    "mask, message",
    [
        ([[1, 1, 1, 1], [0, 1, 0, 1]], "padding inside a row"),
        ([[1, 1, 1, 1], [0, 0, 0, 0]], "no token"),
        ([[1, 1, 1, 1], [1, 1, 0, 0]], "Right padding"),
    ],
)
def test_bad_masks_are_named(mask, message):
    with pytest.raises(ValueError, match=message):
        left_padding(torch.tensor(mask))
    assert left_padding(torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]])).tolist() == [0, 1, 2]


def test_padding_among_new_tokens_after_a_padded_prefill_is_refused():
    model = get_model("llama")
    input_ids, attention_mask, _ = padded_batch()
    cache = DynamicCache(config=model.config)
    press = KnormPress(0.5)
    with torch.no_grad(), press(model):
        model(input_ids=input_ids, attention_mask=attention_mask, **cache_kwargs(model, cache))
        mask = torch.cat([attention_mask, torch.tensor([[1], [0], [1]])], dim=1)
        with pytest.raises(ValueError, match="must not be padding"):
            model(input_ids=input_ids[:, -1:], attention_mask=mask, **cache_kwargs(model, cache))


def test_unpadded_batch_is_compressed_as_before():
    """A batch without padding (all-ones mask, or none) takes the batched path: same cache as without a mask."""
    model = get_model("llama")
    input_ids = torch.stack([distinct_ids(1, 24, seed=s)[0] for s in range(3)])
    caches = []
    for mask in (None, torch.ones_like(input_ids)):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), KnormPress(0.5)(model):
            model(input_ids=input_ids, attention_mask=mask, **cache_kwargs(model, cache))
        caches.append(cache)
    for layer_idx in compressed_layers(model):
        assert caches[0].layers[layer_idx].keys.shape[2] == 12
        torch.testing.assert_close(caches[0].layers[layer_idx].keys, caches[1].layers[layer_idx].keys)
