# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""CriticalKVPress and CriticalAdaKVPress: two-stage selection against a direct computation, head-wise budgets."""

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.criticalkv_press import CriticalAdaKVPress, CriticalKVPress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.transformers_adapter import cache_kwargs
from tests.fixtures import ARCHITECTURES, compressed_layers, get_model, prefill, random_input_ids

SEQ_LEN = 40


@dataclass
class FixedScorePress(ScorerPress):
    """Returns the scores it was given (positive, as attention-based scores are)."""

    fixed: torch.Tensor = field(default=None, repr=False)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return self.fixed


class FakeAttention(nn.Module):
    """Just what the CriticalKV presses read from an attention module."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int, seed: int = 0):
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
        self.head_dim = head_dim
        self.layer_idx = 0
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.o_proj.weight.copy_(torch.randn(hidden, num_heads * head_dim, generator=generator))


def reference_value_norms(values: torch.Tensor, o_proj_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """||W_o^h v||_1 for all query heads at once, averaged over each GQA group: (B, H_kv, T)."""
    bsz, num_kv_heads, k_len, head_dim = values.shape
    groups = num_heads // num_kv_heads
    w_o = o_proj_weight.T.reshape(num_heads, head_dim, -1)  # rows h*d..(h+1)*d of W_o^T read head h
    per_head = torch.einsum("bhtd,hde->bhte", values.repeat_interleave(groups, dim=1), w_o).abs().sum(-1)
    return per_head.reshape(bsz, num_kv_heads, groups, k_len).mean(dim=2)


def ranked(values: list[float]) -> list[int]:
    """Indices sorted by decreasing value."""
    return sorted(range(len(values)), key=lambda i: -values[i])


def reference_criticalkv_kept(scores, value_norms, ratio, first_stage_ratio, epsilon):
    """Kept token indices per (batch, head), sorted, following the CriticalKV description step by step."""
    bsz, num_kv_heads, k_len = scores.shape
    n_kept = int(k_len * (1 - ratio))
    n_first = int((1 - ratio) * k_len * first_stage_ratio)
    kept = torch.zeros(bsz, num_kv_heads, n_kept, dtype=torch.long)
    for b in range(bsz):
        for h in range(num_kv_heads):
            s = scores[b, h].tolist()
            first = ranked(s)[:n_first]
            weighted = [(s[t] + epsilon) * value_norms[b, h, t].item() for t in range(k_len)]
            rest = [t for t in ranked(weighted) if t not in first][: n_kept - n_first]
            kept[b, h] = torch.tensor(sorted(first + rest))
    return kept


def reference_critical_adakv_masked(scores, value_norms, ratio, alpha, first_stage_ratio, epsilon):
    """Bool (B, H_kv, T) of the entries CriticalAdaKV masks, budgets computed per batch item."""
    bsz, num_kv_heads, k_len = scores.shape
    n_kept = int(k_len * (1 - ratio))
    n_safe = int(n_kept * alpha)
    masked = torch.ones(bsz, num_kv_heads, k_len, dtype=torch.bool)
    for b in range(bsz):
        safe = [set(ranked(scores[b, h].tolist())[:n_safe]) for h in range(num_kv_heads)]
        entries = [
            (float("inf") if t in safe[h] else scores[b, h, t].item(), h, t)
            for h in range(num_kv_heads)
            for t in range(k_len)
        ]
        winners = sorted(entries, key=lambda e: -e[0])[: num_kv_heads * n_kept]
        budgets = [sum(1 for _, h, _ in winners if h == head) for head in range(num_kv_heads)]
        for h in range(num_kv_heads):
            n_first = int(budgets[h] * first_stage_ratio)
            others = [t for t in ranked(scores[b, h].tolist()) if t not in safe[h]]
            protected = safe[h] | set(others[: max(0, n_first - n_safe)])
            weighted = [(scores[b, h, t].item() + epsilon) * value_norms[b, h, t].item() for t in range(k_len)]
            rest = [t for t in ranked(weighted) if t not in protected][: budgets[h] - len(protected)]
            for t in protected | set(rest):
                masked[b, h, t] = False
    return masked


def constructed_inputs(seed=0, bsz=2, num_kv_heads=2, num_heads=4, k_len=24, head_dim=8, hidden=32):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(bsz, num_kv_heads, k_len, head_dim, generator=generator)
    values = torch.randn(bsz, num_kv_heads, k_len, head_dim, generator=generator) * torch.rand(
        bsz, num_kv_heads, k_len, 1, generator=generator
    )
    scores = torch.rand(bsz, num_kv_heads, k_len, generator=generator)
    module = FakeAttention(num_heads, num_kv_heads, head_dim, hidden, seed=seed)
    hidden_states = torch.randn(bsz, k_len, hidden, generator=generator)
    return module, hidden_states, keys, values, scores


def masked_bool(module, shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    batch_idx, head_idx, seq_idx = module.masked_key_indices
    mask[batch_idx.cpu(), head_idx.cpu(), seq_idx.cpu()] = True
    return mask


def attention_modules(model):
    language_model = getattr(model.model, "language_model", model.model)
    return [layer.self_attn for layer in language_model.layers]


# CriticalKVPress


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("first_stage_ratio", [0.0, 0.5, 1.0])
def test_criticalkv_two_stage_selection_matches_direct_computation(ratio, first_stage_ratio):
    module, hidden_states, keys, values, scores = constructed_inputs()
    epsilon = 1e-2
    press = CriticalKVPress(FixedScorePress(ratio, fixed=scores), epsilon=epsilon, first_stage_ratio=first_stage_ratio)
    out_keys, out_values = press.compress(module, hidden_states, keys, values, None, {})

    value_norms = reference_value_norms(values, module.o_proj.weight.detach(), num_heads=4)
    kept = reference_criticalkv_kept(scores, value_norms, ratio, first_stage_ratio, epsilon)
    expected_keys = keys.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
    expected_values = values.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1]))
    assert out_keys.shape[2] == int(24 * (1 - ratio))
    assert torch.equal(out_keys, expected_keys)
    assert torch.equal(out_values, expected_values)

    plain = scores.topk(kept.shape[-1], dim=-1).indices.sort(dim=-1).values
    if first_stage_ratio == 1.0:  # the inner press alone
        assert torch.equal(kept, plain)
    else:  # the value-weighted stage changes the selection
        assert not torch.equal(kept, plain)


def test_criticalkv_value_norms_equal_reference():
    module, _, _, values, _ = constructed_inputs(seed=3)
    expected = reference_value_norms(values, module.o_proj.weight.detach(), num_heads=4)
    torch.testing.assert_close(CriticalKVPress.vwl1norm(values, module), expected, rtol=1e-5, atol=1e-4)


def test_criticalkv_delegates_ratio_post_init_and_repr():
    @dataclass
    class RecordingKnorm(KnormPress):
        models: list = field(default_factory=list, repr=False)

        def post_init_from_model(self, model):
            self.models.append(model)

    inner = RecordingKnorm(0.3)
    press = CriticalKVPress(inner, epsilon=1e-3, first_stage_ratio=0.25)
    assert press.compression_ratio == 0.3
    press.compression_ratio = 0.6
    assert inner.compression_ratio == 0.6
    assert repr(press) == f"CriticalKVPress(press={inner!r}, epsilon=0.001, first_stage_ratio=0.25)"
    assert press == CriticalKVPress(RecordingKnorm(0.6), epsilon=1e-3, first_stage_ratio=0.25)
    assert press != CriticalKVPress(RecordingKnorm(0.6))
    model = get_model("llama")
    prefill(model, random_input_ids(1, 16), press)
    assert inner.models == [model]


def test_criticalkv_bad_input_and_vnorm_warning(caplog):
    with pytest.raises(TypeError, match="ScorerPress"):
        CriticalKVPress(ComposedPress([KnormPress(0.5)]))
    with pytest.raises(ValueError, match="first_stage_ratio"):
        CriticalKVPress(KnormPress(0.5), first_stage_ratio=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        CriticalKVPress(KnormPress(0.5), epsilon=-1.0)
    with caplog.at_level(logging.WARNING, logger="kvpress.presses.criticalkv_press"):
        CriticalKVPress(ExpectedAttentionPress(0.5))
        CriticalAdaKVPress(ExpectedAttentionPress(0.5))
        CriticalKVPress(ExpectedAttentionPress(0.5, use_vnorm=False))
    assert sum("use_vnorm should be disabled" in r.getMessage() for r in caplog.records) == 2


# CriticalAdaKVPress


@pytest.mark.parametrize("ratio", [0.3, 0.6])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.6])
def test_critical_adakv_masks_match_direct_computation(ratio, alpha):
    module, hidden_states, keys, values, scores = constructed_inputs(seed=1, k_len=30)
    epsilon, first_stage_ratio = 1e-2, 0.5
    press = CriticalAdaKVPress(
        FixedScorePress(ratio, fixed=scores), alpha_safeguard=alpha, epsilon=epsilon, first_stage_ratio=0.5
    )
    out_keys, out_values = press.compress(module, hidden_states, keys, values, None, {})
    assert out_keys is keys and out_values is values  # the cache stays dense

    value_norms = reference_value_norms(values, module.o_proj.weight.detach(), num_heads=4)
    expected = reference_critical_adakv_masked(scores, value_norms, ratio, alpha, first_stage_ratio, epsilon)
    masked = masked_bool(module, scores.shape)
    assert torch.equal(masked, expected)
    n_kept = int(30 * (1 - ratio))
    # every batch item keeps H_kv * n_kept entries in total, each head at least its safeguard
    assert ((~masked).sum(dim=(1, 2)) == 2 * n_kept).all()
    assert ((~masked).sum(dim=-1) >= int(n_kept * alpha)).all()


def test_critical_adakv_budgets_are_per_batch_item():
    """Batch items whose scores favour different heads get different head budgets (upstream sums over the batch)."""
    module, hidden_states, keys, values, _ = constructed_inputs(seed=2, k_len=20)
    scores = torch.rand(2, 2, 20)
    scores[0, 0] += 10  # item 0: head 0 wins the layer budget
    scores[1, 1] += 10  # item 1: head 1 does
    press = CriticalAdaKVPress(FixedScorePress(0.5, fixed=scores), alpha_safeguard=0.2)
    press.compress(module, hidden_states, keys, values, None, {})
    kept_per_head = (~masked_bool(module, scores.shape)).sum(dim=-1)
    n_kept, n_safe = 10, 2
    assert kept_per_head.tolist() == [[2 * n_kept - n_safe, n_safe], [n_safe, 2 * n_kept - n_safe]]


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6, 0.8])
def test_critical_adakv_masked_fraction_equals_ratio(ratio):
    model = get_model("llama")
    bsz, seq_len = 2, 128
    cache = prefill(model, random_input_ids(bsz, seq_len, seed=4), CriticalAdaKVPress(KnormPress(ratio)))
    n_kept = int(seq_len * (1 - ratio))
    fractions = []
    for layer_idx in compressed_layers(model):
        assert cache.layers[layer_idx].keys.shape[2] == seq_len
        masked = masked_bool(attention_modules(model)[layer_idx], (bsz, 2, seq_len))
        assert masked.sum().item() == bsz * 2 * (seq_len - n_kept)
        fractions.append(masked.float().mean().item())
    assert abs(sum(fractions) / len(fractions) - ratio) < 1e-2


def test_critical_adakv_masked_entries_get_zero_attention():
    model = get_model("qwen2", "eager")
    cache = prefill(model, random_input_ids(2, 48, seed=5), CriticalAdaKVPress(KnormPress(0.5)))
    layers = compressed_layers(model)
    masks = {i: masked_bool(attention_modules(model)[i], (2, 2, 48)) for i in layers}
    with torch.no_grad():
        out = model(random_input_ids(2, 1, seed=6), output_attentions=True, **cache_kwargs(model, cache))
    for layer_idx in layers:
        weights = out.attentions[layer_idx][:, :, -1, :48]
        masked = masks[layer_idx].repeat_interleave(2, dim=1)
        assert (weights[masked] == 0).all()
        assert (weights[~masked] > 0).all()


def test_critical_adakv_forwards_post_init_ratio_and_bad_input():
    @dataclass
    class RecordingKnorm(KnormPress):
        models: list = field(default_factory=list, repr=False)

        def post_init_from_model(self, model):
            self.models.append(model)

    inner = RecordingKnorm(0.4)
    press = CriticalAdaKVPress(inner)
    assert press.compression_ratio == 0.4
    press.compression_ratio = 0.0
    assert inner.compression_ratio == 0.0
    model = get_model("llama")
    cache = prefill(model, random_input_ids(1, 24), press)
    assert inner.models == [model]  # forwarded (upstream does not)
    assert all(getattr(m, "masked_key_indices", None) is None for m in attention_modules(model))
    assert cache.get_seq_length() == 24

    with pytest.raises(TypeError, match="ScorerPress"):
        CriticalAdaKVPress()
    with pytest.raises(TypeError, match="ScorerPress"):
        CriticalAdaKVPress(AdaKVPress(KnormPress(0.5)))
    with pytest.raises(ValueError, match="alpha_safeguard"):
        CriticalAdaKVPress(KnormPress(0.5), alpha_safeguard=-0.1)
    with pytest.raises(ValueError, match="first_stage_ratio"):
        CriticalAdaKVPress(KnormPress(0.5), first_stage_ratio=2)
    with pytest.raises(ValueError, match="cannot be composed"):
        ComposedPress([KnormPress(0.5), CriticalAdaKVPress(KnormPress(0.5))])


# every architecture, two inner presses


INNER = {"knorm": lambda r: KnormPress(r), "snapkv": lambda r: SnapKVPress(r, window_size=2)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("inner", list(INNER))
def test_criticalkv_on_every_architecture(arch, inner):
    model = get_model(arch)
    input_ids = random_input_ids(2, SEQ_LEN, seed=7)
    ratio = 0.5
    cache = prefill(model, input_ids, CriticalKVPress(INNER[inner](ratio)))
    n_kept = int(SEQ_LEN * (1 - ratio))
    full = prefill(model, input_ids) if inner == "knorm" else None
    for layer_idx in compressed_layers(model):
        keys = cache.layers[layer_idx].keys
        assert keys.shape[2] == n_kept
        if full is not None:  # the kept keys are the ones the direct computation selects
            module = attention_modules(model)[layer_idx]
            full_keys, full_values = full.layers[layer_idx].keys, full.layers[layer_idx].values
            num_heads = model.config.get_text_config().num_attention_heads
            norms = reference_value_norms(full_values, module.o_proj.weight.detach(), num_heads)
            kept = reference_criticalkv_kept(-full_keys.norm(dim=-1), norms, ratio, 0.5, 1e-4)
            assert torch.equal(keys, full_keys.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])))
    with torch.no_grad():
        logits = model(random_input_ids(2, 1, seed=8), **cache_kwargs(model, cache)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("inner", list(INNER))
def test_critical_adakv_on_every_architecture(arch, inner):
    model = get_model(arch)
    ratio = 0.5
    cache = prefill(model, random_input_ids(2, SEQ_LEN, seed=9), CriticalAdaKVPress(INNER[inner](ratio)))
    num_kv_heads = model.config.get_text_config().num_key_value_heads
    for layer_idx in compressed_layers(model):
        assert cache.layers[layer_idx].keys.shape[2] == SEQ_LEN
        masked = masked_bool(attention_modules(model)[layer_idx], (2, num_kv_heads, SEQ_LEN))
        assert masked.sum().item() == 2 * num_kv_heads * (SEQ_LEN - int(SEQ_LEN * (1 - ratio)))
    with torch.no_grad():
        logits = model(random_input_ids(2, 1, seed=10), **cache_kwargs(model, cache)).logits
    assert torch.isfinite(logits).all()


def test_criticalkv_with_a_budget_keeps_the_two_stage_selection_of_the_budget():
    """`CriticalKVPress(inner with cache_budget=B)`: B entries kept, B * first_stage_ratio of them by the inner
    score, the rest by the value-weighted score."""
    module, hidden_states, keys, values, scores = constructed_inputs()
    budget, epsilon = 12, 1e-2
    press = CriticalKVPress(FixedScorePress(fixed=scores, cache_budget=budget), epsilon=epsilon, first_stage_ratio=0.5)
    assert press.cache_budget == budget and press.acts_during_decoding
    weighted = press.score(module, hidden_states, keys, values, None, {})
    kept = weighted.topk(budget, dim=-1).indices.sort(dim=-1).values
    value_norms = reference_value_norms(values, module.o_proj.weight.detach(), num_heads=4)
    ratio = 1 - budget / keys.shape[2]  # the same kept count through the ratio formula
    assert torch.equal(kept, reference_criticalkv_kept(scores, value_norms, ratio, 0.5, epsilon))


def test_criticalkv_with_a_budget_through_generate():
    model = get_model("llama")
    press = CriticalKVPress(KnormPress(cache_budget=16))
    lengths = []
    handle = model.model.register_forward_hook(lambda m, a, out: lengths.append(out[0].shape[1]))
    with torch.no_grad(), press(model):
        out = model.generate(random_input_ids(1, 40), max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    handle.remove()
    from kvpress.transformers_adapter import output_cache

    cache = output_cache(out)
    assert [layer.keys.shape[2] for layer in cache.layers] == [16, 16]
    assert len(lengths) == 6  # prefill and 5 decoding steps, each pruned back to the budget


def test_criticalkv_refuses_a_budget_on_a_stateful_scorer():
    from kvpress.presses.h2o_press import H2OPress

    with pytest.raises(ValueError, match="cannot carry the cache_budget of H2OPress"):
        CriticalKVPress(H2OPress(cache_budget=16))
    CriticalKVPress(H2OPress(0.5))  # with a ratio it is fine


def test_criticalkv_takes_cache_budget_as_every_scorer():
    """`CriticalKVPress(press, cache_budget=B)` (keyword-only, as every scorer's budget) stores the budget on the
    inner press and keeps what `CriticalKVPress(press with cache_budget=B)` keeps, B entries at every step."""
    model = get_model("llama")
    caches = []
    for press in (CriticalKVPress(KnormPress(), cache_budget=16), CriticalKVPress(KnormPress(cache_budget=16))):
        assert press.cache_budget == 16 and press.press.cache_budget == 16 and press.acts_during_decoding
        with torch.no_grad(), press(model):
            out = model.generate(
                random_input_ids(1, 40), max_new_tokens=6, do_sample=False, return_dict_in_generate=True
            )
        from kvpress.transformers_adapter import output_cache

        caches.append([layer.keys.clone() for layer in output_cache(out).layers])
    assert [keys.shape[2] for keys in caches[0]] == [16, 16]
    for first, second in zip(*caches):
        assert torch.equal(first, second)
    inner = KnormPress(0.5)
    with pytest.raises(ValueError, match="both compression_ratio=0.5 and cache_budget=16"):
        CriticalKVPress(inner, cache_budget=16)
    assert inner.cache_budget == 0  # left as it was
    with pytest.raises(ValueError, match="already has cache_budget=8"):
        CriticalKVPress(KnormPress(cache_budget=8), cache_budget=16)
    with pytest.raises(TypeError):
        CriticalKVPress(KnormPress(), 1e-4, 0.5, 16)  # keyword-only
