# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The score of one answer to a synthetic task: RULER's string matching (https://arxiv.org/abs/2404.06654).

The one idea: an answer is as right as the fraction of its expected strings that appear in the prediction
(case-insensitive, after stripping control characters). The benchmark metric
(`evaluation/benchmarks/synthetic/calculate_metrics.py`) averages it per task; `reference/` checks checkpoints with it.
"""

from __future__ import annotations

import re
from typing import Any

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")


def clean_prediction(prediction: Any) -> str:
    """Strip, drop control characters (newlines included) and strip again; a missing prediction becomes ''."""
    if not isinstance(prediction, str):
        return ""
    return _CONTROL_CHARACTERS.sub("", prediction.strip()).strip()


def _references(answer: Any) -> list[str]:
    if isinstance(answer, str):
        return [answer]
    references = [str(reference) for reference in list(answer)]
    if not references:
        raise ValueError("a row has an empty `answer`: it must hold at least one expected string.")
    return references


def row_score(prediction: Any, answer: Any) -> float:
    """The fraction (0 to 1) of the expected strings of `answer` found in `prediction`, case-insensitive."""
    text = clean_prediction(prediction).lower()
    references = _references(answer)
    return sum(reference.lower() in text for reference in references) / len(references)
