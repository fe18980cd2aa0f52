# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""LooGLE metrics (https://arxiv.org/abs/2311.04939): n-gram similarity for QA and summaries, entity match for cloze.

The one idea: free-form answers are compared with the reference by BLEU-1/4, ROUGE-1/2/L recall and METEOR (and
BERTScore when it can run); cloze answers are JSON dicts from mask names to entities, scored by exact and partial
(any shared word) match per mask.

Offline by design: METEOR uses exact and Porter-stem matches, plus WordNet synonyms only when the WordNet data is
already installed (nothing is downloaded); cloze answers are parsed as JSON or Python literals, never `eval`-ed.
"""

from __future__ import annotations

import ast
import json
import logging
import warnings
from typing import Optional

import pandas as pd

from evaluation.benchmarks.text_normalization import mean

logger = logging.getLogger(__name__)


class _NoSynonyms:
    """Stands in for WordNet when its data is not installed: METEOR then matches exact words and stems only."""

    def synsets(self, word, pos=None):
        return []


def _wordnet():
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        logger.warning(
            "WordNet data is not installed: METEOR matches exact words and stems only (no synonyms), so it can score "
            "lower than upstream's; install it with `python -m nltk.downloader wordnet` for comparable numbers."
        )
        return _NoSynonyms()


def _words(text: str) -> list[str]:
    return text.replace("\n", " ").split()


def _unique_in_order(words: list[str]) -> list[str]:
    return list(dict.fromkeys(words))


def bleu_scores(reference: str, hypothesis: str) -> tuple[float, float]:
    """Sentence BLEU-1 and BLEU-4 (nltk, no smoothing); 0 when undefined."""
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            bleu1 = sentence_bleu([_words(reference)], _words(hypothesis), weights=(1, 0, 0, 0))
            bleu4 = sentence_bleu([_words(reference)], _words(hypothesis), weights=(0, 0, 0, 1))
        except (ZeroDivisionError, ValueError, KeyError):
            return 0.0, 0.0
    return float(bleu1), float(bleu4)


def rouge_recalls(reference: str, hypothesis: str) -> tuple[float, float, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L recall (the `rouge` package); 0 when undefined (e.g. an empty hypothesis)."""
    from rouge import Rouge

    try:
        scores = Rouge().get_scores(hyps=[hypothesis], refs=[reference])[0]
    except (ValueError, RecursionError):
        return 0.0, 0.0, 0.0
    return float(scores["rouge-1"]["r"]), float(scores["rouge-2"]["r"]), float(scores["rouge-l"]["r"])


def meteor(reference: str, hypothesis: str, wordnet=None) -> float:
    """METEOR on the distinct words of each text (in their order of appearance)."""
    from nltk.translate.meteor_score import single_meteor_score

    wordnet = wordnet if wordnet is not None else _wordnet()
    try:
        return float(
            single_meteor_score(
                _unique_in_order(_words(reference)), _unique_in_order(_words(hypothesis)), wordnet=wordnet
            )
        )
    except (ZeroDivisionError, ValueError):  # undefined (e.g. an empty hypothesis); missing NLTK data raises
        return 0.0


def bert_scores(references: list[str], hypotheses: list[str]) -> Optional[float]:
    """Mean BERTScore F1 when the `bert_score` package and its model are available locally, else None."""
    try:
        from bert_score import score
    except ImportError:
        return None
    try:
        return float(score(hypotheses, references, lang="en")[2].mean())
    except Exception as error:  # noqa: BLE001 - an offline machine fails in many ways (no model, no network)
        logger.warning("BERTScore skipped: %s", error)
        return None


def parse_cloze(text) -> Optional[dict]:
    """A cloze answer as a dict: JSON or a Python literal, else the outermost `{...}` of the text; None otherwise."""
    if isinstance(text, dict):
        return text
    if not isinstance(text, str):
        return None
    candidates = [text.strip()]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(candidate)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, dict):
                return value
    return None


def cloze_matches(reference, hypothesis) -> tuple[int, int, int]:
    """(exact matches, partial matches, number of masks) of one cloze answer."""
    reference_dict = parse_cloze(reference)
    if reference_dict is None:
        raise ValueError(f"A LooGLE cloze reference must be a JSON dict of mask -> entity, got {reference!r}.")
    hypothesis_dict = parse_cloze(hypothesis) or {}
    exact = partial = 0
    for key, expected in reference_dict.items():
        if key not in hypothesis_dict:
            continue
        predicted = str(hypothesis_dict[key]).strip()
        exact += int(predicted == str(expected).strip())
        partial += int(bool(set(predicted.split()) & set(str(expected).split())))
    return exact, partial, len(reference_dict)


def cloze_metrics(references: list, hypotheses: list) -> dict:
    """`exact_match` and `partial_match`: matched masks over all masks (4 decimals)."""
    counts = [cloze_matches(r, h) for r, h in zip(references, hypotheses)]
    total = sum(count[2] for count in counts)
    return {
        "exact_match": round(sum(count[0] for count in counts) / total, 4) if total else 0.0,
        "partial_match": round(sum(count[1] for count in counts) / total, 4) if total else 0.0,
    }


def generation_metrics(references: list, hypotheses: list) -> dict:
    """Means of BLEU-1/4, ROUGE-1/2/L recall and METEOR (and BERTScore F1 when available)."""
    references = [r if isinstance(r, str) else "<NONE>" for r in references]
    hypotheses = [h if isinstance(h, str) else "<NONE>" for h in hypotheses]
    wordnet = _wordnet()
    bleu = [bleu_scores(r, h) for r, h in zip(references, hypotheses)]
    rouge = [rouge_recalls(r, h) for r, h in zip(references, hypotheses)]
    metrics = {
        "bleu1": mean(b[0] for b in bleu),
        "bleu4": mean(b[1] for b in bleu),
        "rouge1": mean(r[0] for r in rouge),
        "rouge2": mean(r[1] for r in rouge),
        "rougeL": mean(r[2] for r in rouge),
        "meteor": mean(meteor(r, h, wordnet) for r, h in zip(references, hypotheses)),
    }
    bert = bert_scores(references, hypotheses)
    if bert is not None:
        metrics["bert"] = bert
    return metrics


def calculate_metrics(df: pd.DataFrame) -> dict:
    """Metrics per task (`task` column): cloze tasks get exact/partial match, the others the generation metrics."""
    metrics = {}
    for task, rows in df.groupby("task", sort=True):
        references, hypotheses = list(rows["answer"]), list(rows["predicted_answer"])
        if "cloze" in str(task):
            metrics[str(task)] = cloze_metrics(references, hypotheses)
        else:
            metrics[str(task)] = generation_metrics(references, hypotheses)
    return metrics
