# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Needle in a haystack (https://github.com/gkamradt/LLMTest_NeedleInAHaystack): build the rows.

The one idea: a long essay (the haystack) is cut to fit the context budget, a short fact (the needle) is inserted at
a chosen depth (percent of the haystack's tokens) and the model is asked about it; one row per depth.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import pandas as pd

CONTEXT_WRAPPER = "This is a very long story book: <book> {context} </book>."
# Tokens kept free for the wrapper, the question and the chat template.
RESERVED_TOKENS = 150


def insert_needle_in_haystack(
    df: pd.DataFrame,
    tokenizer,
    max_context_length: int,
    needle_depth: Union[int, Sequence[int]],
    context_wrapper: str = CONTEXT_WRAPPER,
    needle_text: Optional[str] = None,
    answer_prefix: Optional[str] = None,
    question_text: Optional[str] = None,
) -> pd.DataFrame:
    """One row per depth: row 0's haystack truncated to `max_context_length - len(needle) - 150` tokens, the needle
    inserted at `int(n_tokens * depth / 100)` and the text wrapped in `context_wrapper`.

    Returns the columns `context`, `needle`, `needle_depth`, `question`, `answer_prefix`, `max_new_tokens`.
    """
    if not isinstance(max_context_length, int) or max_context_length < 1:
        raise ValueError(
            f"needle_in_haystack needs max_context_length (a positive integer), got {max_context_length!r}."
        )
    depths = [needle_depth] if isinstance(needle_depth, (int, float)) else list(needle_depth)
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 100:
            raise ValueError(f"needle_depth values are percentages in [0, 100], got {depth!r}.")
    if "context" not in df.columns or len(df) == 0:
        raise ValueError("needle_in_haystack needs at least one row with a `context` column (the haystack).")
    first = df.iloc[0]
    needle = needle_text if needle_text is not None else first["needle"]
    question = question_text if question_text is not None else first["question"]
    prefix = answer_prefix if answer_prefix is not None else first.get("answer_prefix", "")

    needle_ids = tokenizer.encode(needle, add_special_tokens=False)
    budget = max_context_length - len(needle_ids) - RESERVED_TOKENS
    if budget <= 0:
        raise ValueError(
            f"max_context_length={max_context_length} leaves no room for the haystack: the needle takes "
            f"{len(needle_ids)} tokens and {RESERVED_TOKENS} are reserved for the prompt; use a larger value."
        )
    haystack_ids = tokenizer.encode(first["context"], add_special_tokens=False)[:budget]

    rows = []
    for depth in depths:
        position = int(len(haystack_ids) * depth / 100)
        ids = haystack_ids[:position] + needle_ids + haystack_ids[position:]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        rows.append(
            {
                "context": context_wrapper.format(context=text),
                "needle": needle,
                "needle_depth": depth,
                "question": question,
                "answer_prefix": prefix,
                "max_new_tokens": first.get("max_new_tokens", None),
            }
        )
    return pd.DataFrame(rows)
