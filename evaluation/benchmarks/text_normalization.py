# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Answer normalisation and token-level F1 shared by the QA metrics (SQuAD, https://arxiv.org/abs/1606.05250).

The one idea: lowercase, drop punctuation and the articles a/an/the, collapse white space, then compare the bags of
tokens of the prediction and of the reference (F1 of their overlap). Chinese text is compared the same way on jieba
words or on characters, after removing Chinese and ASCII punctuation.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Full-width and CJK punctuation removed by the Chinese normalisation, on top of ASCII punctuation.
CHINESE_PUNCTUATION = (
    "\uff01\uff1f\uff61\u3002\uff02\uff03\uff04\uff05\uff06\uff07\uff08\uff09\uff0a\uff0b\uff0c\uff0d\uff0f\uff1a"
    "\uff1b\uff1c\uff1d\uff1e\uff20\uff3b\uff3c\uff3d\uff3e\uff3f\uff40\uff5b\uff5c\uff5d\uff5e\uff5f\uff60\uff62"
    "\uff63\uff64\u3001\u3003\u300b\u300c\u300d\u300e\u300f\u3010\u3011\u3014\u3015\u3016\u3017\u3018\u3019\u301a"
    "\u301b\u301c\u301d\u301e\u301f\u3030\u303e\u303f\u2013\u2014\u2018\u2019\u201b\u201c\u201d\u201e\u201f\u2026"
    "\u2027\ufe4f\ufe51\ufe54\u00b7"
)
_ASCII_PUNCTUATION = set(string.punctuation)
_ALL_PUNCTUATION = _ASCII_PUNCTUATION | set(CHINESE_PUNCTUATION)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(char for char in text if char not in _ASCII_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lowercase, no ASCII or Chinese punctuation, no white space at all."""
    text = text.lower()
    text = "".join(char for char in text if char not in _ALL_PUNCTUATION)
    return "".join(text.split())


def to_ascii(text: str) -> str:
    """Transliterate to ASCII (accents dropped), as ZeroSCROLLS does before its F1."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """F1 of the overlap of two bags of tokens (0 when either is empty or nothing is shared)."""
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """Token F1 after SQuAD normalisation."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def jieba_words(text: str) -> list[str]:
    """Chinese word segmentation (jieba, accurate mode); jieba is imported on first use, it loads a dictionary."""
    import jieba

    jieba.setLogLevel(60)
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_words(prediction: str, reference: str) -> float:
    """Chinese token F1 on jieba words, each normalised; empty words are dropped (LongBench's `qa_f1_zh_score`)."""
    prediction_tokens = [normalize_zh_answer(word) for word in jieba_words(prediction)]
    reference_tokens = [normalize_zh_answer(word) for word in jieba_words(reference)]
    return token_f1([t for t in prediction_tokens if t], [t for t in reference_tokens if t])


def qa_f1_zh_chars(prediction: str, reference: str) -> float:
    """Chinese token F1 on characters after normalisation (InfiniteBench's `longbook_qa_chn`)."""
    return token_f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(reference)))


def as_list(value) -> list:
    """A reference column value as a list: lists, tuples and numpy arrays (parquet, Arrow) are listed; a scalar or
    a string becomes a one-element list."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def mean(values: Iterable[float]) -> float:
    """Mean of a non-empty iterable (0.0 for an empty one, so a metric over no rows is defined)."""
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0
