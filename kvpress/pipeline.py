# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The "kv-press-text-generation" pipeline: compress a context once, then answer one or several questions."""

from __future__ import annotations

import contextlib
import logging
import numbers
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, Cache, DynamicCache, Pipeline, QuantizedCache
from transformers.pipelines import PIPELINE_REGISTRY

from kvpress.chunked_prefill import check_chunk_size, chunked_prefill
from kvpress.graphed_decoding import COMPILE_MODES, GraphedDecodeStep, graphable
from kvpress.inplace_cache import InPlaceCache, can_decode_in_place
from kvpress.press_state import restore_press_state, snapshot_press_state
from kvpress.presses.base_press import BasePress
from kvpress.ragged_cache import RaggedCache, forget_applied_masks, ragged_cache_for
from kvpress.ragged_prefill import compacts_during_prefill, ragged_prefill
from kvpress.transformers_adapter import cache_kwargs
from kvpress.utils import restore_cache, snapshot_cache, write_keys_and_values

logger = logging.getLogger(__name__)


def _is_decoding_press(press: Optional[BasePress]) -> bool:
    """Presses that act on the question and answer tokens rather than (only) on the context: decoding presses
    (`acts_during_decoding`, e.g. DecodingPress or a press with a `cache_budget`), or a ComposedPress holding one."""
    if press is None:
        return False
    if press.acts_during_decoding:
        return True
    inner = getattr(press, "presses", None)
    return isinstance(inner, (list, tuple)) and any(_is_decoding_press(p) for p in inner)


def _is_positive_integer(value) -> bool:
    """A positive int, numpy integers included (booleans are not numbers of tokens)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _uses_rerotated_positions(press: Optional[BasePress]) -> bool:
    """Presses that re-rotate kept keys to positions 0..n_kept-1, so generation continues at n_kept."""
    return press is not None and press.rerotates_kept_keys


class KVPressTextGenerationPipeline(Pipeline):
    """Compress a context with a press, then answer questions about it with greedy decoding.

    The context is prefilled (and compressed) once; each question is appended to the compressed cache, answered,
    and removed again, so several questions share one compression. With `prefill_chunk_size`, the context is
    prefilled that many tokens at a time and the press compresses after each chunk (`kvpress.chunked_prefill`).

    Call as `pipe(context, question=..., questions=[...], answer_prefix=..., press=..., max_new_tokens=...,
    max_context_length=..., enable_thinking=..., cache=..., prefill_chunk_size=..., inplace_decoding=...,
    cuda_graph=..., compile_mode=..., ragged_cache=...)`. Returns `{"answer": str}` for a single question and
    `{"answers": [str, ...]}` when `questions` is given. The context may also be passed as `context=...`.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __call__(self, inputs=None, *args, context: Optional[str] = None, **kwargs):
        """`pipe(context, question=...)` or, as upstream's docstring and many user scripts call it,
        `pipe(context=..., question=...)`."""
        if context is not None:
            if inputs is not None:
                raise ValueError("Pass the context once: positionally or as context=..., not both.")
            inputs = context
        if inputs is None:
            raise ValueError("The pipeline needs a context: pipe(context, question=...) or pipe(context=..., ...).")
        return super().__call__(inputs, *args, **kwargs)

    def _sanitize_parameters(
        self,
        question: Optional[str] = None,
        questions: Optional[list[str]] = None,
        answer_prefix: Optional[str] = None,
        press: Optional[BasePress] = None,
        max_new_tokens: int = 50,
        max_context_length: Optional[int] = None,
        enable_thinking: bool = False,
        cache: Optional[Cache] = None,
        inplace_decoding: bool = True,
        cuda_graph: bool = False,
        prefill_chunk_size: Optional[int] = None,
        ragged_cache: bool = False,
        compile_mode: Optional[str] = None,
        **kwargs,
    ):
        if question is not None and questions is not None:
            raise ValueError("Either question or questions should be provided, not both.")
        if questions is not None and (isinstance(questions, str) or len(questions) == 0):
            raise ValueError("questions must be a non-empty list of strings; use question=... for a single one.")
        texts = [("question", question), ("answer_prefix", answer_prefix)]
        texts += [(f"questions[{index}]", text) for index, text in enumerate(questions or [])]
        for name, text in texts:
            if text is not None and not isinstance(text, str):
                raise TypeError(f"{name} must be a string, got {type(text).__name__} {text!r}.")
        if press is not None and not isinstance(press, BasePress):
            raise TypeError(f"press must be a kvpress BasePress instance or None, got {type(press).__name__}.")
        if not _is_positive_integer(max_new_tokens):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        max_new_tokens = int(max_new_tokens)
        if max_context_length is not None:
            if not _is_positive_integer(max_context_length):
                raise ValueError(f"max_context_length must be a positive integer or None, got {max_context_length!r}.")
            max_context_length = int(max_context_length)
        if not isinstance(enable_thinking, bool):
            raise TypeError(f"enable_thinking must be True or False, got {enable_thinking!r}.")
        if cache is not None and not isinstance(cache, (DynamicCache, QuantizedCache)):
            raise TypeError(
                "cache must be a DynamicCache or a QuantizedCache (presses resize the cache), "
                f"got {type(cache).__name__}."
            )
        if kwargs:
            logger.warning("Ignoring unknown arguments of the kv-press-text-generation pipeline: %s", sorted(kwargs))

        answer_prefix = answer_prefix or ""
        postprocess_kwargs = {"single_question": questions is None}
        questions = questions or ([question] if question else [""])
        if max_context_length is None:
            max_context_length = min(self.tokenizer.model_max_length, int(1e10))
        preprocess_kwargs = {
            "questions": questions,
            "answer_prefix": answer_prefix,
            "max_context_length": max_context_length,
            "enable_thinking": enable_thinking,
        }
        for name, flag in (
            ("inplace_decoding", inplace_decoding),
            ("cuda_graph", cuda_graph),
            ("ragged_cache", ragged_cache),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        if compile_mode is not None and (compile_mode not in COMPILE_MODES or not cuda_graph):
            raise ValueError(
                f"compile_mode compiles the CUDA-graph decoding step: pass cuda_graph=True and one of "
                f"{', '.join(COMPILE_MODES)} (or None), got compile_mode={compile_mode!r}, cuda_graph={cuda_graph!r}."
            )
        forward_kwargs = {
            "press": press,
            "max_new_tokens": max_new_tokens,
            "cache": cache,
            "inplace_decoding": inplace_decoding,
            "cuda_graph": cuda_graph,
            "prefill_chunk_size": check_chunk_size(prefill_chunk_size),
            "ragged_cache": ragged_cache,
            "compile_mode": compile_mode,
        }
        return preprocess_kwargs, forward_kwargs, postprocess_kwargs

    def preprocess(
        self,
        context: str,
        questions: list[str],
        answer_prefix: str,
        max_context_length: int,
        enable_thinking: bool = False,
    ):
        if not isinstance(context, str):
            raise TypeError(f"The context must be a string, got {type(context).__name__} {context!r}.")
        if len(context) == 0:
            raise ValueError(
                "The context is empty: the pipeline compresses a context, so pass a non-empty string "
                "(use a single space ' ' to ask a question with no context)."
            )
        if self.tokenizer.chat_template is None:
            bos_token = getattr(self.tokenizer, "bos_token", None) or ""
            context = bos_token + context
            question_suffix = "\n"
        else:
            # Split the templated text around a marker that cannot occur in the context.
            separator = "#" * (len(context) + 10)
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": context + separator}],
                add_generation_prompt=True,
                tokenize=False,
                enable_thinking=enable_thinking,
            )
            context, question_suffix = text.split(separator)

        questions = [question + question_suffix + answer_prefix for question in questions]
        context_ids = self.tokenizer.encode(context, return_tensors="pt", add_special_tokens=False)
        questions_ids = [
            self.tokenizer.encode(question, return_tensors="pt", add_special_tokens=False) for question in questions
        ]
        if context_ids.shape[1] > max_context_length:
            logger.warning(
                f"Context length has been truncated from {context_ids.shape[1]} to {max_context_length} tokens."
            )
            context_ids = context_ids[:, :max_context_length]
        return {"context_ids": context_ids, "questions_ids": questions_ids}

    def _forward(
        self,
        input_tensors: dict,
        max_new_tokens: int = 50,
        press: Optional[BasePress] = None,
        cache: Optional[Cache] = None,
        inplace_decoding: bool = True,
        cuda_graph: bool = False,
        prefill_chunk_size: Optional[int] = None,
        ragged_cache: bool = False,
        compile_mode: Optional[str] = None,
    ):
        context_ids = input_tensors["context_ids"].to(self.model.device)
        context_length = context_ids.shape[1]
        if cache is not None and cache.get_seq_length() > 0:
            # The context would be appended, uncompressed, after what the cache holds (an earlier context): the answer
            # would then be about both contexts.
            raise ValueError(
                f"The cache passed to the pipeline already holds {cache.get_seq_length()} tokens (of an earlier "
                "context): the pipeline prefills and compresses each context into an empty cache. Pass a fresh cache "
                "(e.g. DynamicCache()) for every context, or cache=None to let the pipeline create one."
            )
        own_cache = cache is None  # a cache the pipeline made: its dense layers can go once copied (ragged)
        decoding = _is_decoding_press(press)
        questions = input_tensors["questions_ids"]
        extra = max(q.shape[1] for q in questions) + max_new_tokens
        # ragged_cache: each layer is compacted into the ragged cache as soon as its press hooks ran, so the dense
        # caches of all layers never coexist (kvpress.ragged_prefill); otherwise it is copied after the prefill.
        compact = ragged_cache and compacts_during_prefill(
            press, press if decoding else None, prefill_chunk_size, context_length, own_cache
        )
        prefill_context: contextlib.AbstractContextManager = contextlib.nullcontext()
        if compact:
            cache = RaggedCache(config=self.model.config)
            prefill_context = ragged_prefill(self.model, extra + 2, cache, keep_masks=decoding)
        elif cache is None:
            # With the config, the cache knows which layers use sliding-window attention (Gemma3), so that the
            # attention masks are sized from the layers that presses compress.
            cache = DynamicCache(config=self.model.config)

        # Prefill the context (in chunks with prefill_chunk_size); the press compresses the cache of each layer as it
        # goes.
        with prefill_context:
            chunked_prefill(self.model, context_ids, cache, press, prefill_chunk_size, return_logits=False)
        logger.debug(f"Context Length: {context_length}")
        logger.debug(f"Compressed Context Length: {cache.get_seq_length()}")
        # RestoreKV appends its learned restore tokens after the context: questions continue after them.
        context_length += int(getattr(press, "num_restore_tokens", 0) or 0)

        if decoding:
            decoding_context = press(self.model)
        elif press is not None and press.latency:
            # The press does not act while answering, but its telemetry still counts the answer's tokens.
            decoding_context = press.track_timing(self.model)
        else:
            decoding_context = contextlib.nullcontext()
        if _uses_rerotated_positions(press):
            context_length = cache.get_seq_length()
        ragged = None
        if compact:
            ragged = cache  # type: ignore[assignment]
        elif ragged_cache:
            ragged = ragged_cache_for(self.model, cache, press if decoding else None, extra + 2, own_cache)
            if ragged is not None and own_cache and not decoding:
                forget_applied_masks(self.model)  # a cache the user passed keeps its masks
        if ragged is not None:
            # Only the entries each head kept are copied (kvpress.ragged_cache); answers are appended in place, and a
            # press acting during decoding evicts head by head inside the segments (rolled back for each question).
            state = ragged.state()
            try:
                graph = {"decode_step": self._ragged_graph_step(ragged, decoding, compile_mode)} if cuda_graph else {}
                with decoding_context:
                    press_snapshot = snapshot_press_state(press, self.model) if decoding else None
                    answers = []
                    for index, question_ids in enumerate(questions):
                        ragged.rollback(state, release=index == len(questions) - 1)
                        if press_snapshot is not None and index > 0:
                            restore_press_state(press_snapshot, self.model)
                        question_ids = question_ids.to(self.model.device)
                        answers.append(
                            self.generate_answer(question_ids, ragged, context_length, max_new_tokens, **graph)
                        )
            finally:
                RaggedCache.detach(self.model)
            return answers
        if inplace_decoding and can_decode_in_place(self.model, cache):
            # The compressed cache is copied once into preallocated buffers; the answers are written in place and the
            # user's cache keeps the compressed context, as with the rollback below. A press acting during decoding
            # evicts inside the buffers (not graphable: its evictions are decided on the host).
            answer_cache = InPlaceCache.from_cache(cache, extra_tokens=extra + 2, model=self.model)
            lengths = answer_cache.lengths()
            try:
                step = None
                if cuda_graph and not decoding and graphable(self.model, answer_cache):
                    step = GraphedDecodeStep(self.model, answer_cache, compile_mode=compile_mode)
                elif cuda_graph:
                    logger.info(
                        "cuda_graph: not applicable here (no CUDA, head-wise masks, or a press acting during "
                        "decoding); decoding without it"
                    )
                with decoding_context:
                    press_snapshot = snapshot_press_state(press, self.model) if decoding else None
                    answers = []
                    for index, question_ids in enumerate(questions):
                        if decoding and index > 0:
                            # eviction rewrote the buffers: start again from the compressed context
                            answer_cache = InPlaceCache.from_cache(cache, extra_tokens=extra + 2, model=self.model)
                            restore_press_state(press_snapshot, self.model)
                        answer_cache.rollback(lengths)
                        question_ids = question_ids.to(self.model.device)
                        graph = {"decode_step": step} if step is not None else {}
                        answers.append(
                            self.generate_answer(question_ids, answer_cache, context_length, max_new_tokens, **graph)
                        )
                    if decoding:
                        # as with the dynamic cache, the user's cache is left as decoding compressed it (after the
                        # last question)
                        for layer_idx, layer in enumerate(answer_cache.layers):
                            keys, values = layer.valid_keys.clone(), layer.valid_values.clone()  # type: ignore
                            write_keys_and_values(cache, layer_idx, keys, values)
            finally:
                InPlaceCache.detach(self.model)
            return answers

        answers = []
        with decoding_context:
            # Every question is answered from the compressed context: the cache (and a decoding press's state) is
            # rolled back before each question after the first.
            context_snapshot = snapshot_cache(cache)
            press_snapshot = snapshot_press_state(press, self.model) if decoding else None
            for index, question_ids in enumerate(questions):
                if index > 0:
                    restore_cache(cache, context_snapshot)
                    if press_snapshot is not None:
                        restore_press_state(press_snapshot, self.model)
                answers.append(
                    self.generate_answer(question_ids.to(self.model.device), cache, context_length, max_new_tokens)
                )
            if not decoding:
                # The answer is removed again; a decoding press's cache is left as decoding compressed it (after the
                # last question), as upstream leaves it, so that it can be inspected.
                restore_cache(cache, context_snapshot)
        return answers

    def _ragged_graph_step(
        self, ragged: RaggedCache, decoding: bool, compile_mode: Optional[str]
    ) -> Optional[GraphedDecodeStep]:
        """The CUDA-graph decoding step over `ragged` (captured once, replayed for every question: the questions'
        tokens and answers are appended in place, in the spare rows reserved for them), or None, said in the log,
        where it does not apply."""
        if decoding or not graphable(self.model, ragged):  # the pipeline's cache holds one context: batch 1
            logger.info(
                "cuda_graph: not applicable to this ragged cache (no CUDA, a backend other than flex or triton, a "
                "press acting during decoding, or head-wise masks kept for a cache you passed); decoding without it"
            )
            return None
        if compile_mode is not None:
            logger.info("compile_mode: the ragged cache's graph step is not compiled (its attention kernel is)")
        return GraphedDecodeStep(self.model, ragged)

    def generate_answer(
        self,
        question_ids: torch.Tensor,
        cache: Cache,
        context_length: int,
        max_new_tokens: int,
        decode_step: Optional[GraphedDecodeStep] = None,
    ) -> str:
        """Greedy decoding of one answer. The question continues at position `context_length` (logical positions).
        With `decode_step` (a CUDA graph over an in-place or ragged cache), each new token is one graph replay."""
        position_ids = torch.arange(context_length, context_length + question_ids.shape[1], device=self.model.device)
        position_ids = position_ids.unsqueeze(0)
        with_cache = cache_kwargs(self.model, cache)
        outputs = self.model(input_ids=question_ids, position_ids=position_ids, logits_to_keep=1, **with_cache)
        position_ids = position_ids[:, -1:] + 1
        generated = [outputs.logits[0, -1].argmax()]

        eos_token_ids = self.model.generation_config.eos_token_id
        if eos_token_ids is None:
            eos_token_ids = []
        elif not isinstance(eos_token_ids, list):
            eos_token_ids = [eos_token_ids]
        for step in range(max_new_tokens - 1):
            if decode_step is not None:
                logits = decode_step(generated[-1].view(1, 1), position_ids + step)
            else:
                logits = self.model(
                    input_ids=generated[-1].view(1, 1), position_ids=position_ids + step, logits_to_keep=1, **with_cache
                ).logits
            generated.append(logits[0, -1].argmax())
            if generated[-1].item() in eos_token_ids:
                break
        answer: str = self.tokenizer.decode(torch.stack(generated), skip_special_tokens=True)
        return answer

    def postprocess(self, model_outputs, single_question: bool):
        if single_question:
            return {"answer": model_outputs[0]}
        return {"answers": model_outputs}


PIPELINE_REGISTRY.register_pipeline(
    "kv-press-text-generation",
    pipeline_class=KVPressTextGenerationPipeline,
    pt_model=AutoModelForCausalLM,
)
