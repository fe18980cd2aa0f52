# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Generating one reasoning trace with a press on: prompt ids, `model.generate` with the fork's stopping rules, and
the cache size that was really kept.

The one idea: the press is applied with `with press(model):` around `model.generate` (so it compresses the prompt
and every decoding step), generation stops at EOS (every EOS id of the model), at `max_new_tokens`, or when the
trace ends in an n-gram repeated five times in a row (the fork's rule), and the kept cache is read from the cache
itself afterwards (the fork reported budget / total tokens, whatever the press kept).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from kvpress.transformers_adapter import cache_kwargs
from kvpress.utils import cache_layer_length

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_MODES = ("auto", True, False)


class RepeatedNGramStop(StoppingCriteria):
    """Stop a row once its generated tokens end in an n-gram (n in `ngram_min..ngram_max`) repeated `min_repeat`
    times in a row.

    The fork scanned the last 200 generated tokens for such a run at every step; since the check runs after every
    token, a run is found on the step it completes, which is when the trace ends with it, so checking the end is the
    same rule. The fork looked at batch row 0 only; here every row is checked and the batch stops when all rows
    stopped (a row that stopped is marked in `stopped`)."""

    def __init__(self, prompt_length: int, min_repeat: int = 5, ngram_min: int = 2, ngram_max: int = 10):
        if min_repeat < 2 or ngram_min < 1 or ngram_max < ngram_min:
            raise ValueError(
                f"need min_repeat >= 2 and 1 <= ngram_min <= ngram_max, got {min_repeat}, {ngram_min}, {ngram_max}."
            )
        self.prompt_length = prompt_length
        self.min_repeat = min_repeat
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.stopped: dict[int, tuple[int, int]] = {}  # row -> (n of the repeated n-gram, tokens generated)

    def repeated_ngram(self, tokens: Sequence[int]) -> Optional[int]:
        """The n of an n-gram that `tokens` ends with `min_repeat` times in a row, or None."""
        for n in range(self.ngram_min, self.ngram_max + 1):
            span = n * self.min_repeat
            if len(tokens) < span:
                break
            tail = list(tokens[-span:])
            if all(tail[i] == tail[i % n] for i in range(span)):
                return n
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = input_ids[:, self.prompt_length :].tolist()
        for row, tokens in enumerate(generated):
            if row in self.stopped:
                done[row] = True
                continue
            n = self.repeated_ngram(tokens)
            if n is not None:
                self.stopped[row] = (n, len(tokens))
                done[row] = True
                logger.info("Row %d stopped: a %d-gram repeated %d times in a row.", row, n, self.min_repeat)
        return done


def prompt_ids(tokenizer, prompt: str, chat_template="auto", max_context_length: Optional[int] = None) -> list[int]:
    """Token ids of `prompt`: through the tokenizer's chat template (as a user turn, with the generation prompt) when
    `chat_template` is True, or "auto" and the tokenizer has one; the raw text (the fork's behaviour) when False.

    `max_context_length` drops tokens from the middle of a longer prompt, so that its start and its instruction at the
    end survive (the fork kept the first N tokens, which cut the instruction)."""
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {chat_template!r}.")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template is True and not has_template:
        raise ValueError("chat_template=True, but the tokenizer has no chat template; pass --chat_template False.")
    if has_template and chat_template is not False:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if max_context_length is not None:
        if not isinstance(max_context_length, int) or max_context_length < 2:
            raise ValueError(f"max_context_length must be an integer >= 2, got {max_context_length!r}.")
        if len(ids) > max_context_length:
            head = max_context_length // 2
            tail = max_context_length - head
            logger.warning("Prompt of %d tokens cut to %d (its middle removed).", len(ids), max_context_length)
            ids = ids[:head] + ids[-tail:]
    return ids


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id: the generation config's (a list for many chat models) and the tokenizer's (the fork
    used the tokenizer's single id, so chat models ran on past their end-of-turn token)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    if not ids:
        raise ValueError("The model and tokenizer define no eos_token_id; generation would never stop at EOS.")
    return ids


def kept_cache_lengths(cache) -> list[int]:
    """Entries each layer of `cache` holds (per KV head)."""
    return [cache_layer_length(cache, layer_idx) for layer_idx in range(len(cache.layers))]


@torch.no_grad()
def generate_response(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    press=None,
    max_new_tokens: int = 2048,
    do_sampling: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    repetition_penalty: float = 1.2,
    eos_ids: Optional[list[int]] = None,
) -> list[dict]:
    """Generate after each prompt (token ids; several are left-padded into one batch) with `press` on.

    Returns, per prompt: the response text, its new token ids (up to and including EOS), why it stopped
    ("eos", "repetition" or "max_new_tokens"), and the kept cache: the mean and max entries over layers, read from
    the cache after generation (padding and the steps after the row finished not counted)."""
    if not prompts or any(len(ids) == 0 for ids in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    eos_ids = eos_ids if eos_ids is not None else eos_token_ids(model, tokenizer)
    pad_id = eos_ids[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    width = max(len(ids) for ids in prompts)
    pads = [width - len(ids) for ids in prompts]
    device = model.device
    input_ids = torch.tensor([[pad_id] * pad + list(ids) for pad, ids in zip(pads, prompts)], device=device)
    attention_mask = torch.tensor([[0] * pad + [1] * len(ids) for pad, ids in zip(pads, prompts)], device=device)
    stop = RepeatedNGramStop(width)
    sampling: dict = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if do_sampling:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty)
    cache = DynamicCache(config=model.config)
    with press(model) if press is not None else contextlib.nullcontext():
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([stop]),
            use_cache=True,
            **sampling,
            **cache_kwargs(model, cache),
        )
    steps = output.shape[1] - width
    lengths = kept_cache_lengths(cache)
    results = []
    for row, pad in enumerate(pads):
        tokens = output[row, width:].tolist()
        stop_reason = "max_new_tokens"
        end = next((i + 1 for i, token in enumerate(tokens) if token in eos_ids), None)
        if end is not None:
            stop_reason = "eos"
        elif row in stop.stopped:
            end, stop_reason = stop.stopped[row][1], "repetition"
        tokens = tokens[: end if end is not None else len(tokens)]
        unused = pad + (steps - len(tokens))  # entries of padding, and of the steps after this row finished
        kept = [length - unused for length in lengths]
        results.append(
            {
                "response": tokenizer.decode(tokens, skip_special_tokens=True),
                "output_ids": tokens,
                "stop_reason": stop_reason,
                "kept_cache_mean": sum(kept) / len(kept) if kept else 0.0,
                "kept_cache_max": max(kept) if kept else 0,
            }
        )
    return results
