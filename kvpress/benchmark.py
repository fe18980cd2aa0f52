# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Speed and memory of presses, measured side by side: `python -m kvpress.benchmark --help`.

For every (press, context length) it prefills random tokens with the press, then decodes greedily with the
project's decoding loop (the pipeline's: one forward per token on the compressed cache), and records time to first
token, prefill seconds, decode ms/token and tokens/s, peak GPU memory during prefill and during decode, the KV bytes
resident after prefill, the achieved compression ratio (resident bytes, and entries left unmasked for head-wise
presses), and the memory-bandwidth floor of a decode step (weights + resident KV over the copy bandwidth measured in
the same run) with the ratio to it. A row `generate` times vanilla `model.generate` without a press.

Each finished run is appended to `<output_dir>/results.jsonl` at once; a rerun skips the runs already there (delete
the file or pass `--force` to measure again). A run that runs out of memory is a row with its error. The table is
printed at the end and `plots.png` drawn when matplotlib is installed.

Models: a Hub id, a local directory, or a named random-weight shape built from its config (`llama3.1-8b`,
`qwen3-8b`, and `tiny` for CPU smoke runs), so no weights are needed to measure speed and memory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, PreTrainedModel, Qwen3Config

import kvpress
from kvpress.chunk_attention import serves_model
from kvpress.chunked_prefill import check_chunk_size, chunked_prefill, require_chunked_prefill_support
from kvpress.decode_profile import profile_steps as run_profile
from kvpress.decoding_loop import next_greedy_token
from kvpress.float32_attention import repeat_kv_heads_in_float32
from kvpress.graphed_decoding import GraphedDecodeStep, graphable
from kvpress.headwise_masks import get_masks
from kvpress.inplace_cache import InPlaceCache, can_decode_in_place
from kvpress.presses.base_press import BasePress
from kvpress.ragged_attention import effective_backend
from kvpress.ragged_cache import (
    RaggedCache,
    RaggedLayer,
    decoding_eviction_problem,
    forget_applied_masks,
    ragged_problem,
    release_dense_layers,
)
from kvpress.ragged_prefill import compacts_during_prefill, ragged_prefill
from kvpress.resources import text_config, weights_digest
from kvpress.utils import get_language_model

logger = logging.getLogger(__name__)

SHAPES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama3.1-8b": lambda: LlamaConfig(  # type: ignore[call-arg]
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=1 << 20,
    ),
    "qwen3-8b": lambda: Qwen3Config(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=1 << 20,
    ),
    "tiny": lambda: LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1 << 16,
    ),
}


@dataclass(frozen=True)
class PressRequest:
    """One entry of `--presses`: a name (`none`, `generate`, an evaluation-registry name or a kvpress class name)
    with a compression ratio and/or field settings, written `name[:ratio][:field=value...]`."""

    text: str
    name: str
    ratio: Optional[float]
    fields: tuple

    @classmethod
    def parse(cls, text: str) -> "PressRequest":
        name, *parts = text.strip().split(":")
        if not name:
            raise ValueError(f"Empty press name in {text!r}; write name[:ratio][:field=value], e.g. knorm:0.5.")
        ratio, fields = None, []
        for part in parts:
            if "=" in part:
                key, value = part.split("=", 1)
                fields.append((key, _number(value)))
            else:
                try:
                    ratio = float(part)
                except ValueError:
                    raise ValueError(f"{part!r} in {text!r} is neither a ratio nor field=value.") from None
        if name in ("none", "generate") and (ratio is not None or fields):
            raise ValueError(f"{name!r} takes no settings, got {text!r}.")
        return cls(text.strip(), name, ratio, tuple(fields))

    def build(self) -> Optional[BasePress]:
        if self.name in ("none", "generate"):
            return None
        press = _press_by_name(self.name)
        if self.ratio is not None:
            press.compression_ratio = self.ratio  # type: ignore[attr-defined]
        for key, value in self.fields:
            if key == "budget":
                key = "cache_budget"
            if not hasattr(press, key):
                raise ValueError(f"{type(press).__name__} has no field {key!r} (from {self.text!r}).")
            setattr(press, key, value)
        return press


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _press_by_name(name: str) -> BasePress:
    """A fresh press: a press-registry name (when the `harness` package is importable, i.e. from a checkout of the
    repository root) or a kvpress class name such as `KnormPress`."""
    cls = getattr(kvpress, name, None)
    if isinstance(cls, type) and issubclass(cls, BasePress):
        return cls()
    try:
        from harness.press_registry import PRESS_REGISTRY
    except ImportError:
        raise ValueError(
            f"Unknown press {name!r}: pass a kvpress class name (e.g. KnormPress), or run from the repository root "
            "to use the evaluation registry's names (e.g. knorm, snapkv, h2o)."
        ) from None
    press = PRESS_REGISTRY[name]
    if press is None:
        raise ValueError(f"{name!r} is the registry's no-press entry: use `none`.")
    return press


def load_model(name: str, device: str, dtype: torch.dtype, attn_implementation: str, trust_remote_code: bool):
    """A named random-weight shape, or a model from the Hub or a local directory."""
    if name in SHAPES:
        config = SHAPES[name]()
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        ).to(device)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), measured now; 0 without CUDA."""
    if device.type != "cuda":
        return 0.0
    source = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    _sync(device)
    seconds = time.perf_counter() - start
    del source, target
    return 2 * n_bytes * repeats / seconds


def kv_statistics(cache, model: PreTrainedModel) -> dict:
    """KV bytes resident in `cache` and its entries (kept, and not masked by head-wise presses), all layers."""
    resident, entries, unmasked = 0, 0, 0
    attentions = {layer.self_attn.layer_idx: layer.self_attn for layer in get_language_model(model).layers}
    for layer_idx, layer in enumerate(cache.layers):
        if isinstance(layer, RaggedLayer):  # only the kept entries are stored (spare rows for decoding included)
            resident += layer.kv_bytes()
            entries += layer.used_rows()
            unmasked += layer.used_rows()
            continue
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            continue
        resident += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        n = keys.shape[0] * keys.shape[1] * keys.shape[2]
        entries += n
        masked = get_masks(attentions[layer_idx]) if layer_idx in attentions else None
        unmasked += n - (int(masked[0].numel()) if masked is not None else 0)
    return {"kv_bytes": resident, "kv_entries": entries, "kv_unmasked_entries": unmasked}


def dense_bytes_of(cache) -> int:
    """Bytes the dense cache of the same prefill holds (every ragged layer at its logical length, other layers as
    they are): the ragged loop's `kv_bytes_dense_prefill` when its layers were compacted during the prefill."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            width = (
                layer.keys.shape[-1] * layer.keys.element_size() + layer.values.shape[-1] * layer.values.element_size()
            )
            total += layer.num_segments * layer.logical_length * width
        elif isinstance(getattr(layer, "keys", None), torch.Tensor):
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def full_kv_bytes(model: PreTrainedModel, batch: int, length: int) -> int:
    """Bytes of an uncompressed cache of `length` tokens (sliding-window layers hold at most their window)."""
    config = text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or length
    element = torch.finfo(model.dtype).bits // 8
    per_token = 2 * batch * config.num_key_value_heads * head_dim * element
    return sum(per_token * (min(length, window) if kind == "sliding_attention" else length) for kind in layer_types)


def parameter_bytes(model: PreTrainedModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


DECODE_LOOPS = ("dynamic", "inplace", "graph", "compiled", "autotuned", "ragged", "ragged_graph")
RAGGED_LOOPS = ("ragged", "ragged_graph")  # the ragged cache, eager steps or replayed from a CUDA graph
# untimed decoding steps of the ragged loop: at least this many (FlexAttention compiles on the first ones, then once
# more for dynamic shapes), and more while a step still compiles something, up to the maximum
RAGGED_WARMUP_STEPS = 2
RAGGED_MAX_WARMUP_STEPS = 8
# decode loops replayed from a CUDA graph, and the `torch.compile` mode each compiles the step with first
GRAPH_LOOPS = {"graph": None, "compiled": "default", "autotuned": "max-autotune-no-cudagraphs"}


DECODE_BLOCK_STEPS = 16  # the timed steps are also timed in blocks of this many (one device sync per block)


def compile_count() -> Optional[int]:
    """Graphs torch.compile has built in this process so far (None where torch keeps no such counter)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return int(counters["stats"]["unique_graphs"])


def timed_steps(step: Callable[[], Any], steps: int, device: torch.device) -> tuple[float, list[float]]:
    """Run `step` `steps` times; return the seconds in all and the ms per step of each block of `DECODE_BLOCK_STEPS`
    (the last block may be shorter). One row's blocks show whether a slow row was slow throughout (the host) or in
    one block (a recompilation, a pause): its mean alone cannot tell."""
    blocks: list[float] = []
    start = block_start = time.perf_counter()
    for index in range(steps):
        step()
        done = index + 1
        if done % DECODE_BLOCK_STEPS == 0 or done == steps:
            _sync(device)
            now = time.perf_counter()
            blocks.append(1000 * (now - block_start) / (done - DECODE_BLOCK_STEPS * len(blocks)))
            block_start = now
    return time.perf_counter() - start, blocks


def ragged_warmup(step: Callable[[], Any]) -> int:
    """Run the ragged loop's untimed steps: `RAGGED_WARMUP_STEPS`, then more while the last one compiled a graph (up
    to `RAGGED_MAX_WARMUP_STEPS`), so that no compilation lands in the timed steps. Returns the steps run."""
    done = 0
    while done < RAGGED_MAX_WARMUP_STEPS:
        before = compile_count()
        step()
        done += 1
        if done >= RAGGED_WARMUP_STEPS and (before is None or compile_count() == before):
            break
    return done


def reserve_ragged_rows(cache: Any, steps: int) -> None:
    """Give every ragged layer of `cache` room for `steps` more tokens now, untimed (other caches: nothing)."""
    for layer in cache.ragged_layers() if isinstance(cache, RaggedCache) else []:
        layer.reserve(steps)


class NotApplicable(ValueError):
    """A decoding loop that cannot serve this press or model (the row records why)."""


def leaves_no_cache_attached(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function(model, ...)`, leaving `model` attached to no cache whatever it raised: a cache left attached to the
    model's modules (a loop refused after its conversion, an out-of-memory error) would stay resident through the next
    row and count in its peaks (seen on an H100: the refused graph loop's 4 GiB in-place copy of AdaKV's masked cache
    in the next row's prefill and decode peaks)."""

    @functools.wraps(function)
    def wrapper(model: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(model, *args, **kwargs)
        finally:
            InPlaceCache.detach(model)
            RaggedCache.detach(model)

    return wrapper


@torch.no_grad()
@leaves_no_cache_attached
def run_press(
    model: PreTrainedModel,
    request: PressRequest,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    loop: str = "dynamic",
    prefill_chunk_size: Optional[int] = None,
    profile_steps: int = 0,
) -> dict[str, Any]:
    """Prefill `input_ids` with the press, then decode greedily; times and memory of both phases.

    `loop`: `dynamic` is the copying loop (a DynamicCache that concatenates every step, as upstream), `inplace` the
    preallocated in-place cache (`kvpress.inplace_cache`), `graph` the same with each step replayed from a CUDA graph
    (`kvpress.graphed_decoding`), `compiled` / `autotuned` the graph of the step compiled first by `torch.compile`
    (default mode / max-autotune without its own graphs), `ragged` the per-head variable-length cache
    (`kvpress.ragged_cache`: only the entries each head kept, for head-wise presses, and head-wise eviction while
    decoding; `kv_bytes` is then what it holds after the conversion, and untimed steps first compile its
    FlexAttention kernel until a step compiles nothing: `ragged_warmup`, `ragged_warmup_s`, `ragged_warmup_steps`),
    `ragged_graph` the same with each step then replayed from a CUDA graph (batch 1, CUDA; capture in
    `graph_capture_s`).
    `prefill_chunk_size`: the context is prefilled that many tokens at a time, the press compressing after each chunk
    (`kvpress.chunked_prefill`); only the last position's logits are computed either way. `profile_steps`: that many
    more steps after the timed ones, under `torch.profiler` (`kvpress.decode_profile`; the row's `decode_profile`), in
    none of the timings."""
    device = input_ids.device
    press = request.build()
    if request.name == "generate":
        return _run_generate(model, input_ids, max_new_tokens)
    batch, context_length = input_ids.shape
    decoding = press is not None and press.acts_during_decoding
    if loop == "ragged_graph" and (decoding or batch != 1 or device.type != "cuda"):
        raise NotApplicable("the ragged_graph loop serves CUDA, batch 1 and presses that do not act during decoding")
    # spare rows for the warm-up and timed steps; the profiled steps get theirs just before they run (below), so the
    # resident bytes measured stay those of a run without a profile (the in-place buffers hold the profiled steps)
    ragged_extra = max_new_tokens + RAGGED_WARMUP_STEPS + 2
    # the ragged loop compacts each layer as soon as its press ran (kvpress.ragged_prefill), so the prefill never holds
    # every layer's dense cache; presses with passes of their own convert after the prefill
    compact = loop in RAGGED_LOOPS and compacts_during_prefill(
        press, press if decoding else None, prefill_chunk_size, context_length
    )
    cache: Any = RaggedCache(config=model.config) if compact else DynamicCache(config=model.config)
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    with ragged_prefill(model, ragged_extra, cache, keep_masks=decoding) if compact else contextlib.nullcontext():
        logits = chunked_prefill(model, input_ids, cache, press=press, chunk_size=prefill_chunk_size)
    if logits is None:  # pragma: no cover - chunked_prefill returns logits unless told not to
        raise RuntimeError("chunked_prefill returned no logits")
    token = logits[:, -1:].argmax(-1)
    _sync(device)
    prefill = time.perf_counter() - start
    peak_prefill = _peak(device)
    stats = kv_statistics(cache, model)

    decode_cache: Any = cache
    step_fn = None
    capture = 0.0
    warmup = 0.0
    warmup_steps = 0
    if loop in RAGGED_LOOPS:
        problem = decoding_eviction_problem(press) if decoding else None
        if problem is not None:
            raise NotApplicable(f"the ragged loop does not apply to a press acting during decoding: {problem}")
        if compact:
            dense_prefill_bytes = dense_bytes_of(cache)
        else:
            problem = ragged_problem(cache)
            if problem is not None:
                raise NotApplicable(f"the ragged loop does not apply: {problem}")
            decode_cache = RaggedCache.from_cache(cache, model, extra_tokens=ragged_extra)
            dense_prefill_bytes = stats["kv_bytes"]
            release_dense_layers(cache)
        if not decoding:  # a press evicting while decoding reads its masks back; others need them no more
            forget_applied_masks(model)
        del cache
        stats = {
            **kv_statistics(decode_cache, model),
            "kv_bytes_dense_prefill": dense_prefill_bytes,
            "ragged_prefill": "per_layer" if compact else "after_prefill",
        }
    elif loop != "dynamic":
        if not can_decode_in_place(model, cache):
            raise NotApplicable(f"the {loop} loop does not apply to this cache (sliding-window, quantized or empty)")
        if decoding and loop in GRAPH_LOOPS:
            raise NotApplicable(f"the {loop} loop does not apply to a press acting during decoding (host decisions)")
        # a press acting during decoding evicts inside the in-place buffers
        decode_cache = InPlaceCache.from_cache(cache, extra_tokens=max_new_tokens + profile_steps + 2, model=model)
        del cache
        if loop in GRAPH_LOOPS:
            if not graphable(model, decode_cache):
                raise NotApplicable(f"the {loop} loop needs CUDA and no head-wise masks")
            start = time.perf_counter()
            step_fn = GraphedDecodeStep(model, decode_cache, batch_size=batch, compile_mode=GRAPH_LOOPS[loop])
            _sync(device)
            capture = time.perf_counter() - start
    position = context_length  # of the next token

    def step() -> None:
        nonlocal token, position
        positions = torch.full((batch, 1), position, device=device)
        token = next_greedy_token(model, decode_cache, token, positions, step_fn)
        position += 1

    profile = None
    _reset_peak(device)
    start = time.perf_counter()
    with press(model) if decoding else contextlib.nullcontext():
        if loop in RAGGED_LOOPS:
            warmup_steps = ragged_warmup(step)
            if loop == "ragged_graph":
                # every row the graph will write, reserved before capture: a growth would replace its buffers
                reserve_ragged_rows(decode_cache, max_new_tokens + profile_steps + 4)
                if not graphable(model, decode_cache):
                    raise NotApplicable("the ragged_graph loop needs CUDA and the flex or triton ragged backend")
                captured = time.perf_counter()
                step_fn = GraphedDecodeStep(model, decode_cache, batch_size=batch)
                _sync(device)
                capture = time.perf_counter() - captured
            else:
                reserve_ragged_rows(decode_cache, max_new_tokens - 1)  # the timed steps append without growing
            _sync(device)
            warmup = time.perf_counter() - start
            _reset_peak(device)  # as for the graph loops, whose capture runs before: the steady decode's peak
            start = time.perf_counter()
        compiles = compile_count()
        _, blocks = timed_steps(step, max_new_tokens - 1, device)
        decode = time.perf_counter() - start  # from `start`, as before (entering the press's context included)
        compiles_after = compile_count()
        peak_decode = _peak(device)
        after = kv_statistics(decode_cache, model)
        if profile_steps:
            # room first, untimed: a profiled step that outran the spare rows would grow every layer (a copy of
            # the whole cache) and show that copy as its kernels (H100, 2026-12-07: 2.3 of 14.5 ms per step at 32k)
            reserve_ragged_rows(decode_cache, profile_steps)
            profile = run_profile(step, profile_steps, device)
    steps = max(1, max_new_tokens - 1)
    return {
        "graph_capture_s": capture,
        "prefill_s": prefill,
        "ttft_s": prefill,
        "decode_ms_per_token": 1000 * decode / steps,
        "tokens_per_s": batch * steps / decode if decode > 0 else 0.0,
        "peak_prefill_bytes": peak_prefill,
        "peak_decode_bytes": peak_decode,
        **stats,
        "kv_bytes_after_decode": after["kv_bytes"],
        "decode_block_ms_per_token": [round(value, 3) for value in blocks],
        "decode_median_block_ms_per_token": statistics.median(blocks) if blocks else None,
        "compiles_during_decode": (
            compiles_after - compiles if compiles is not None and compiles_after is not None else None
        ),
        **(
            {
                "ragged_backend": effective_backend(device),
                "ragged_warmup_s": warmup,
                "ragged_warmup_steps": warmup_steps,
                "kv_entries_after_decode": after["kv_entries"],  # rows in use: evictions while decoding freed some
            }
            if loop in RAGGED_LOOPS
            else {}
        ),
        **({"decode_profile": profile} if profile is not None else {}),
    }


def _run_generate(model: PreTrainedModel, input_ids: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
    """Vanilla `model.generate` (no press): its prefill is timed with one new token, decoding with the rest."""
    device = input_ids.device
    batch = input_ids.shape[0]
    timings = {}
    for n_new in (1, max_new_tokens):
        _sync(device)
        _reset_peak(device)
        start = time.perf_counter()
        out = model.generate(
            input_ids,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        _sync(device)
        timings[n_new] = (time.perf_counter() - start, _peak(device), out)
    prefill, peak_prefill, _ = timings[1]
    total, peak, out = timings[max_new_tokens]
    steps = max(1, max_new_tokens - 1)
    decode = max(total - prefill, 0.0)
    from kvpress.transformers_adapter import output_cache

    stats = kv_statistics(output_cache(out), model)
    return {
        "prefill_s": prefill,
        "ttft_s": prefill,
        "decode_ms_per_token": 1000 * decode / steps,
        "tokens_per_s": batch * steps / decode if decode > 0 else 0.0,
        "peak_prefill_bytes": peak_prefill,
        "peak_decode_bytes": peak,
        **stats,
        "kv_bytes_after_decode": stats["kv_bytes"],
    }


def run_key(row: dict) -> tuple:
    return (
        row["model"],
        row["press"],
        row.get("decode_loop", "dynamic"),
        row["context_length"],
        row["batch_size"],
        row["max_new_tokens"],
        row.get("cudnn_sdp", True),
        row.get("prefill_chunk_size"),
    )


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("Ignoring a truncated line of %s (a run killed while writing).", path)
    return rows


def append_row(path: Path, row: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()


def format_table(rows: list[dict]) -> str:
    columns = [
        ("press", "press", "{}"),
        ("loop", "decode_loop", "{}"),
        ("ctx", "context_length", "{}"),
        ("bsz", "batch_size", "{}"),
        ("chunk", "prefill_chunk_size", "{}"),
        ("prefill s", "prefill_s", "{:.3f}"),
        ("decode ms/tok", "decode_ms_per_token", "{:.2f}"),
        ("median block ms/tok", "decode_median_block_ms_per_token", "{:.2f}"),
        ("compiles", "compiles_during_decode", "{}"),
        ("tok/s", "tokens_per_s", "{:.1f}"),
        ("floor ms", "floor_ms", "{:.2f}"),
        ("x floor", "ratio_to_floor", "{:.2f}"),
        ("kernel ms/tok", "kernel_ms_per_token", "{:.2f}"),
        ("KV GiB", "kv_gib", "{:.3f}"),
        ("ratio", "achieved_ratio", "{:.3f}"),
        ("eff. ratio", "effective_ratio", "{:.3f}"),
        ("peak prefill GiB", "peak_prefill_gib", "{:.2f}"),
        ("prefill above weights GiB", "peak_prefill_above_weights_gib", "{:.2f}"),
        ("peak decode GiB", "peak_decode_gib", "{:.2f}"),
    ]
    lines = [" | ".join(title for title, _, _ in columns)]
    for row in rows:
        if row.get("error"):
            lines.append(
                f"{row['press']} | {row.get('decode_loop', '-')} | {row['context_length']} | {row['batch_size']} | "
                f"error: {row['error']}"
            )
            continue
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append(
                "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)
            )
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def derive(row: dict, full_kv_bytes: Optional[float], weights: int, bandwidth: float) -> dict:
    """Ratios of a measured row: achieved compression, floor of a decode step and the ratio to it, GiB columns."""
    gib = float(1 << 30)
    row["kv_gib"] = row["kv_bytes"] / gib
    row["peak_prefill_gib"] = row["peak_prefill_bytes"] / gib
    row["peak_decode_gib"] = row["peak_decode_bytes"] / gib
    row["peak_prefill_above_weights_gib"] = max(row["peak_prefill_bytes"] - weights, 0) / gib
    if full_kv_bytes:
        row["achieved_ratio"] = 1 - row["kv_bytes"] / full_kv_bytes
        unmasked = row["kv_unmasked_entries"] / max(row["kv_entries"], 1)
        row["effective_ratio"] = 1 - (1 - row["achieved_ratio"]) * unmasked
    if bandwidth > 0:
        mean_kv = (row["kv_bytes"] + row["kv_bytes_after_decode"]) / 2
        row["floor_ms"] = 1000 * (weights + mean_kv) / bandwidth
        row["ratio_to_floor"] = row["decode_ms_per_token"] / row["floor_ms"]
    if row.get("decode_profile"):  # the profiled steps' GPU kernel time (None on CPU)
        row["kernel_ms_per_token"] = row["decode_profile"]["kernel_ms_per_step"]
    return row


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no plot drawn")
        return None
    good = [row for row in rows if not row.get("error")]
    if not good:
        return None
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for press in sorted({row["press"] for row in good}):
        mine = sorted((row for row in good if row["press"] == press), key=lambda row: row["context_length"])
        lengths = [row["context_length"] for row in mine]
        axes[0].plot(lengths, [row["decode_ms_per_token"] for row in mine], marker="o", label=press)
        axes[1].plot(lengths, [row["peak_decode_gib"] for row in mine], marker="o", label=press)
        axes[2].plot(lengths, [row["kv_gib"] for row in mine], marker="o", label=press)
    for axis, title in zip(axes, ("decode ms/token", "peak decode memory (GiB)", "KV resident after prefill (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context length (tokens)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def environment(device: torch.device, bandwidth: float) -> dict:
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "cudnn_sdp": bool(torch.backends.cuda.cudnn_sdp_enabled()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


NEEDLE_DEPTHS = (0.05, 0.5, 0.95)
# `--needle_modes`: question-agnostic (the context is compressed before the question is seen, the pipeline's default)
# and question-aware (the question is appended to the context and compressed with it).
NEEDLE_MODES = ("agnostic", "aware")
# `--model` aliases of the project's reference models (resolved by `resolve_model`, from a checkout of the repository).
REFERENCE_ALIASES = ("reference", "reference-32k")


def resolve_model(name: str) -> str:
    """The directory of a reference-model alias (`reference`: the shipped 1k model, `reference-32k`: the 32k one), or
    `name` unchanged. FileNotFoundError (saying how to build it) when the 32k checkpoint is not there."""
    if name not in REFERENCE_ALIASES:
        return name
    try:
        from harness import reference_model
    except ImportError:
        raise ValueError(
            f"--model {name} is a reference model of the repository: run from its root (the `harness` package), or "
            "pass the model's directory."
        ) from None
    if name == "reference-32k":
        return str(reference_model.long_context_model_dir())
    return str(reference_model.REFERENCE_MODEL_DIR)


def needle_rows(context_lengths: list[int], depths: tuple[float, ...], samples: int, tokenizer) -> list[dict]:
    """Needle-in-a-haystack rows (the synthetic tasks' sweep: one needle at each depth of each length)."""
    from harness.synthetic.tasks import needle_sweep_rows

    return needle_sweep_rows(context_lengths, depths=depths, num_samples=samples, tokenizer=tokenizer)


def needle_key(row: dict) -> tuple:
    """What identifies a needle cell in `needle.jsonl` (rows written before `mode` existed are question-agnostic)."""
    return (
        row["model"],
        row["press"],
        row.get("mode", "agnostic"),
        row["context_length"],
        row["depth"],
        row["samples"],
        row.get("dtype"),
        row.get("model_sha256"),  # a cell of another checkpoint (same alias or path) is measured again
    )


def _read_needle_rows(path: Path) -> dict[tuple, dict]:
    """The finished cells of `path`. A line cut short by a killed run is dropped from the file (so the rows appended
    next start on a line of their own); a cell written twice keeps its first row."""
    done: dict[tuple, dict] = {}
    if not path.exists():
        return done
    text = path.read_text()
    rows = read_rows(path)
    for row in rows:
        done.setdefault(needle_key(row), row)
    if text and (not text.endswith("\n") or len(done) != len([line for line in text.splitlines() if line.strip()])):
        # rewritten beside the file, then moved over it: a kill while rewriting cannot lose the finished cells
        rewritten = path.with_name(f".{path.name}.rewrite")
        rewritten.write_text("".join(json.dumps(row) + "\n" for row in done.values()))
        os.replace(rewritten, path)
    return done


def run_needle(
    model: PreTrainedModel,
    tokenizer,
    requests: list["PressRequest"],
    rows: list[dict],
    results_path: Path,
    model_name: str,
    modes: tuple[str, ...] = ("agnostic",),
    model_sha256: Optional[str] = None,
) -> list[dict]:
    """Answer every needle row with every press, in every mode, through the pipeline (a fresh press per row); one
    result row per (press, mode, context length, depth), appended to `results_path` as soon as its cell is done, so
    a rerun (after a kill, or with more presses) measures only the cells not there yet."""
    from harness.synthetic.scoring import row_score
    from kvpress.pipeline import KVPressTextGenerationPipeline

    unknown = [mode for mode in modes if mode not in NEEDLE_MODES]
    if unknown or not modes:
        raise ValueError(f"needle modes must be some of {', '.join(NEEDLE_MODES)}, got {list(modes)}.")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device=model.device)
    done = _read_needle_rows(results_path)
    groups: dict[tuple[int, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["context_length"], row["depth"]), []).append(row)
    dtype = str(model.dtype).replace("torch.", "")
    results = []
    runs = [
        (request, mode, key) for key in groups for mode in modes for request in requests if request.name != "generate"
    ]
    for request, mode, (length, depth) in tqdm(runs, desc="needle", unit="cell"):
        cell = groups[(length, depth)]
        result: dict[str, Any] = {
            "model": model_name,
            "press": request.text,
            "mode": mode,
            "context_length": length,
            "depth": depth,
            "samples": len(cell),
            "dtype": dtype,
        }
        if model_sha256 is not None:
            result["model_sha256"] = model_sha256
        previous = done.get(needle_key(result))
        if previous is not None:
            results.append(previous)
            continue
        scores, start = [], time.perf_counter()
        try:
            for row in cell:
                if mode == "aware":
                    context, question = row["context"] + row["question"], ""
                else:
                    context, question = row["context"], row["question"]
                answer = pipe(
                    context,
                    question=question,
                    answer_prefix=row.get("answer_prefix", ""),
                    press=request.build(),
                    max_new_tokens=int(row.get("max_new_tokens", 16)),
                )["answer"]
                scores.append(row_score(answer, row["answer"]))
            result["accuracy"] = 100.0 * sum(scores) / len(scores)
        except torch.cuda.OutOfMemoryError as error:
            result.update(accuracy=None, error=f"out of memory: {str(error).splitlines()[0]}")
        finally:
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        result["seconds"] = round(time.perf_counter() - start, 3)
        append_row(results_path, result)
        done[needle_key(result)] = result
        results.append(result)
    return results


def format_needle_table(rows: list[dict]) -> str:
    """Accuracy per press (rows) and (context length, depth) (columns), one table per mode, with each press's mean
    over the cells; `oom` marks a cell that ran out of memory, `-` one not measured."""
    columns = sorted({(r["context_length"], r["depth"]) for r in rows})
    modes = [mode for mode in NEEDLE_MODES if any(r.get("mode", "agnostic") == mode for r in rows)]
    presses = list(dict.fromkeys(r["press"] for r in rows))
    by_key = {(r["press"], r.get("mode", "agnostic"), r["context_length"], r["depth"]): r for r in rows}
    tables = []
    for mode in modes:
        title = "question-agnostic" if mode == "agnostic" else "question-aware"
        header = f"press ({title}) | " + " | ".join(f"{length} @ {depth:.0%}" for length, depth in columns) + " | mean"
        lines = [header, "|".join(["---"] * (len(columns) + 2))]
        for press in presses:
            cells, values = [], []
            for column in columns:
                row = by_key.get((press, mode, *column))
                if row is None:
                    cells.append("-")
                elif row.get("accuracy") is None:
                    cells.append("oom")
                else:
                    cells.append(f"{row['accuracy']:.0f}")
                    values.append(row["accuracy"])
            mean = f"{sum(values) / len(values):.1f}" if values and len(values) == len(columns) else "-"
            lines.append(f"{press} | " + " | ".join(cells) + f" | {mean}")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help=f"Hub id, local directory, a shape ({', '.join(SHAPES)}), or a reference model of the repository: "
        "`reference` (reference/model, reads 1024 tokens), `reference-32k` (reference/model-32k, 32768)",
    )
    parser.add_argument("--presses", default="none,generate,knorm:0.5", help="e.g. none,knorm:0.5,h2o:budget=256")
    parser.add_argument("--context_lengths", default="256", help="comma-separated, e.g. 8192,32768")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument(
        "--profile_steps",
        type=int,
        default=0,
        help="after the timed decoding, this many more steps under torch.profiler: kernel time and count per step "
        "against wall time per step, and the top kernels (the row's decode_profile; a rerun keeps rows already "
        "measured, with or without a profile)",
    )
    parser.add_argument(
        "--decode_loops",
        default="dynamic,inplace",
        help=f"comma-separated, of {', '.join(DECODE_LOOPS)} (graph, compiled, autotuned, ragged_graph: CUDA only); "
        "`generate` rows run once",
    )
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument(
        "--prefill_chunk_size",
        type=int,
        default=None,
        help="prefill the context this many tokens at a time, compressing after each chunk (default: one forward)",
    )
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output_dir", default="benchmark_results")
    parser.add_argument("--trust_remote_code", action="store_true", help="only for models with their own code")
    parser.add_argument("--force", action="store_true", help="measure again runs already in results.jsonl")
    parser.add_argument(
        "--needle",
        action="store_true",
        help="needle-in-a-haystack accuracy instead of speed: the needle at --needle_depths of each context length, "
        "answered through the pipeline with and without each press (use a model that can do the task, e.g. "
        "reference/model offline)",
    )
    parser.add_argument(
        "--needle_depths",
        default=",".join(str(d) for d in NEEDLE_DEPTHS),
        help="where the needle sits, as fractions of the haystack's tokens",
    )
    parser.add_argument("--needle_samples", type=int, default=5, help="needles per (context length, depth)")
    parser.add_argument(
        "--needle_modes",
        default="agnostic",
        help="comma-separated, of agnostic (the context is compressed before the question is seen) and aware (the "
        "question is appended to the context and compressed with it)",
    )
    parser.add_argument(
        "--disable_cudnn_sdp",
        action="store_true",
        help="turn PyTorch's cuDNN attention backend off (it builds a new plan for every new KV length)",
    )
    args = parser.parse_args(argv)

    if args.max_new_tokens < 2:
        parser.error("--max_new_tokens must be at least 2 (one prefill token and one decoding step)")
    if args.batch_size < 1:
        parser.error("--batch_size must be positive")
    if args.profile_steps < 0:
        parser.error(f"--profile_steps must be 0 (no profile) or more, got {args.profile_steps}")
    try:
        check_chunk_size(args.prefill_chunk_size, "--prefill_chunk_size")
    except ValueError as error:
        parser.error(str(error))
    try:
        lengths = [int(value) for value in args.context_lengths.split(",") if value.strip()]
    except ValueError:
        parser.error(f"--context_lengths must be comma-separated integers, got {args.context_lengths!r}")
    if not lengths or min(lengths) < 2:
        parser.error("--context_lengths needs positive lengths of at least 2 tokens")
    try:
        requests = [PressRequest.parse(text) for text in args.presses.split(",") if text.strip()]
        for request in requests:
            built = request.build()  # every name and setting is checked before anything runs
            if built is not None and args.prefill_chunk_size is not None:
                require_chunked_prefill_support(built)
    except (ValueError, KeyError, TypeError) as error:
        parser.error(f"--presses: {error}")

    if args.disable_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    loops = [loop.strip() for loop in args.decode_loops.split(",") if loop.strip()]
    unknown = [loop for loop in loops if loop not in DECODE_LOOPS]
    if unknown or not loops:
        parser.error(f"--decode_loops: unknown {unknown}; allowed: {', '.join(DECODE_LOOPS)}")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32}.get(args.dtype) or getattr(
        torch, args.dtype
    )
    try:
        args.model_path = resolve_model(args.model)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.needle:
        _check_needle_flags(parser, args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "results.jsonl"
    if args.force and results_path.exists():
        results_path.unlink()
    done = {run_key(row): row for row in read_rows(results_path)}

    model = load_model(args.model_path, str(device), dtype, args.attn_implementation, args.trust_remote_code)
    if args.needle:
        return _needle_main(parser, args, model, requests, lengths, output_dir)
    vocab = text_config(model).vocab_size
    bandwidth = copy_bandwidth(device)
    weights = parameter_bytes(model)
    env = environment(device, bandwidth)
    logger.info("environment: %s", env)

    runs = [
        (request, length, loop)
        for length in lengths
        for request in requests
        for loop in (["generate"] if request.name == "generate" else loops)
    ]
    rows = []
    for request, length, loop in tqdm(runs, desc="benchmark", unit="run"):
        key = (
            args.model,
            request.text,
            loop,
            length,
            args.batch_size,
            args.max_new_tokens,
            env["cudnn_sdp"],
            args.prefill_chunk_size,
        )
        if key in done:
            rows.append(done[key])
            continue
        generator = torch.Generator().manual_seed(length)
        input_ids = torch.randint(4, vocab, (args.batch_size, length), generator=generator).to(device)
        row: dict[str, Any] = {
            "model": args.model,
            "press": request.text,
            "decode_loop": loop,
            "context_length": length,
            "batch_size": args.batch_size,
            "prefill_chunk_size": None if request.name == "generate" else args.prefill_chunk_size,
            # the chunks' attention: lower-right causal SDPA without a mask (kvpress.chunk_attention), or masked
            "chunk_attention": (
                None
                if request.name == "generate" or args.prefill_chunk_size is None
                else ("lower-right sdpa" if serves_model(model) else "masked")
            ),
            "max_new_tokens": args.max_new_tokens,
            "attn_implementation": args.attn_implementation,
            "dtype": str(dtype).replace("torch.", ""),
            "weights_bytes": weights,
            **env,
        }
        try:
            measured = run_press(
                model, request, input_ids, args.max_new_tokens, loop, args.prefill_chunk_size, args.profile_steps
            )
            # generate's cache also holds the new tokens (all but the last)
            cached = length + (args.max_new_tokens - 1 if request.name == "generate" else 0)
            full = full_kv_bytes(model, args.batch_size, cached)
            row.update(derive(measured, full, weights, bandwidth))
        except torch.cuda.OutOfMemoryError as error:
            row["error"] = f"out of memory: {str(error).splitlines()[0]}"
        except NotApplicable as error:
            row["error"] = f"not applicable: {error}"
        finally:
            del input_ids
            if device.type == "cuda":
                torch.cuda.empty_cache()
        append_row(results_path, row)
        rows.append(row)

    header = (
        f"{args.model} on {env.get('gpu', env['device'])}, torch {env['torch']}, transformers {env['transformers']}"
    )
    if bandwidth:
        header += f"; copy bandwidth {bandwidth / 1e12:.2f} TB/s, weights {weights / (1 << 30):.2f} GiB"
    table = header + "\n" + format_table(rows) + "\n"
    sys.stdout.write(table)  # the CLI's report
    (output_dir / "table.txt").write_text(table)
    plot(rows, output_dir / "plots.png")
    return rows


def _check_needle_flags(parser, args) -> None:
    """The needle flags, checked before the model is loaded; sets `args.depths` and `args.modes`."""
    if args.model in SHAPES:
        parser.error("--needle needs a model that can find a needle (a Hub id or local directory), not a random shape")
    try:
        args.depths = tuple(float(value) for value in args.needle_depths.split(",") if value.strip())
    except ValueError:
        parser.error(f"--needle_depths must be comma-separated fractions, got {args.needle_depths!r}")
    if not args.depths or not all(0.0 <= depth <= 1.0 for depth in args.depths):
        parser.error(f"--needle_depths must be fractions between 0 and 1, got {args.needle_depths!r}")
    if args.needle_samples < 1:
        parser.error("--needle_samples must be positive")
    args.modes = tuple(dict.fromkeys(mode.strip() for mode in args.needle_modes.split(",") if mode.strip()))
    unknown = [mode for mode in args.modes if mode not in NEEDLE_MODES]
    if unknown or not args.modes:
        parser.error(f"--needle_modes: unknown {unknown}; allowed: {', '.join(NEEDLE_MODES)}")


def _needle_main(parser, args, model, requests, lengths, output_dir: Path) -> list[dict]:
    """`--needle`: the sweep's rows for the model's tokenizer, every cell answered (or read back), then the table
    (`needle.txt`, printed) and every row with the run's settings (`needle.json`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    # float32 on CUDA: SDPA's memory-efficient kernel instead of the math kernel, whose scores grow with the square of
    # the length (43 GiB a process at 32k for the 32k reference model); the same attention up to rounding
    repeated = model.device.type == "cuda" and model.dtype == torch.float32 and repeat_kv_heads_in_float32()
    needles = needle_rows(lengths, args.depths, args.needle_samples, tokenizer)
    results_path = output_dir / "needle.jsonl"
    if args.force and results_path.exists():
        results_path.unlink()
    digest = weights_digest(args.model_path)
    rows = run_needle(model, tokenizer, requests, needles, results_path, args.model, args.modes, digest)
    header = f"needle accuracy (%), {args.model}, {args.needle_samples} needles per cell"
    table = f"{header}\n{format_needle_table(rows)}\n"
    sys.stdout.write(table)  # the CLI's report
    (output_dir / "needle.txt").write_text(table)
    summary = {
        "model": args.model,
        "model_path": args.model_path,
        "model_sha256": digest,
        "float32_kv_heads_repeated": bool(repeated),
        "context_lengths": lengths,
        "depths": list(args.depths),
        "samples": args.needle_samples,
        "modes": list(args.modes),
        "presses": [request.text for request in requests if request.name != "generate"],
        "environment": {k: v for k, v in environment(model.device, 0.0).items() if not k.startswith("copy_")},
        "rows": rows,
    }
    (output_dir / "needle.json").write_text(json.dumps(summary, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
