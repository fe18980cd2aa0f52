# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Reading the answer out of a model's reasoning trace, and comparing it with the gold answer.

The one idea: one set of extractors and normalisers for every dataset, written against the formats models really
produce (`\\boxed{...}` with nested braces and `\\text{...}`, "The answer is 42.", several boxes, LaTeX fractions),
fixing the fork's bugs: its `\\text{}` unwrap never ran (a missing `re` import), its "answer is" extraction cut
decimals at the first ".", its math scorers compared raw strings, and its DROP scorer compared the prediction with
single characters of the gold list's repr.
"""

from __future__ import annotations

import math
import re
import string
from fractions import Fraction
from typing import Iterable, Optional, Sequence

BOX_COMMANDS = ("\\boxed", "\\fbox")
TEXT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\textrm", "\\operatorname")
# Phrases after which a model states its answer, most specific first (the fork's list).
ANSWER_FLAGS = ("final answer is", "correct answer is", "answer should be", "answer is", "answer:")


def _matching_brace(text: str, open_index: int) -> Optional[int]:
    """Index of the `}` closing the `{` at `open_index` (backslash-escaped braces skipped), or None."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text) and text[index + 1] in "{}":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` (and `\\fbox{...}`) of `text`, in order, nested braces kept whole.

    `\\boxed 5` (no braces) gives "5"; an unclosed box is ignored."""
    contents = []
    pattern = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
    for match in pattern.finditer(text):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            close = _matching_brace(text, rest)
            if close is not None:
                contents.append(text[rest + 1 : close])
        elif rest > match.end():
            word = re.match(r"[^\s$]+", text[rest:])
            if word:
                contents.append(word.group(0))
    return contents


def unwrap_text(text: str) -> str:
    """`text` with every `\\text{X}` (and `\\textbf`, `\\mathrm`, ...) replaced by X, nested ones included."""
    pattern = re.compile("(" + "|".join(re.escape(c) for c in TEXT_COMMANDS) + r")\s*\{")
    while True:
        match = pattern.search(text)
        if match is None:
            return text
        close = _matching_brace(text, match.end() - 1)
        if close is None:
            return text
        text = text[: match.start()] + text[match.end() : close] + text[close + 1 :]


def last_boxed(text: str) -> Optional[str]:
    """The content of the last box, `\\text{}` unwrapped and stripped, or None when there is no box."""
    contents = boxed_contents(text)
    if not contents:
        return None
    return unwrap_text(contents[-1]).strip()


def _strip_sentence_end(text: str) -> str:
    """Cut `text` at its first sentence end (a "." followed by a space or the end), keeping decimals like 3.5."""
    text = text.strip()
    match = re.search(r"\.(\s|$)", text)
    if match:
        text = text[: match.start()]
    return text.strip().strip("*").strip()


def answer_after_flag(text: str, flags: Sequence[str] = ANSWER_FLAGS) -> Optional[str]:
    """What follows the last occurrence of the first flag found ("The answer is 42." -> "42"), on its line, up to
    the end of its sentence; None when no flag occurs. Case is kept (the fork lowercased the answer)."""
    lowered = text.lower()
    for flag in flags:
        position = lowered.rfind(flag)
        if position < 0:
            continue
        after = text[position + len(flag) :].lstrip(" :*")
        line = after.split("\n", 1)[0]
        boxed = last_boxed(line)
        answer = boxed if boxed is not None else _strip_sentence_end(line)
        answer = answer.strip().strip("$").strip()
        if answer:
            return answer
    return None


def extract_answer(response: str) -> str:
    """The default extractor: the last box, else the text after an answer phrase, else the whole response when it
    is a single number or word, else ""."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}.")
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    flagged = answer_after_flag(response)
    if flagged is not None:
        return flagged
    stripped = response.strip().rstrip(".").strip()
    if parse_number(stripped) is not None or re.fullmatch(r"[A-Za-z]+", stripped):
        return stripped
    return ""


# ---------------------------------------------------------------------------------------------------------------
# math answers


def _fix_fracs(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{b}` -> `\\frac{1}{b}` (single-character arguments get braces)."""

    def one(match: re.Match) -> str:
        first, second = match.group(1), match.group(2)
        return "\\frac{" + first + "}{" + second + "}"

    text = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])", one, text)
    text = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*\{", lambda m: "\\frac{" + m.group(1) + "}{", text)
    return re.sub(
        r"\\frac\s*\{([^{}]*)\}\s*([0-9a-zA-Z])", lambda m: "\\frac{" + m.group(1) + "}{" + m.group(2) + "}", text
    )


def normalize_math(answer: str) -> str:
    """A canonical string for a math answer: no `$`, spaces, `\\left`/`\\right`, `\\!`/`\\,` spacing, degree signs,
    `\\%`, units in `\\text{}` unwrapped, `\\dfrac`/`\\tfrac` -> `\\frac`, thousands separators and trailing `.0`
    removed from numbers, a leading "x =" dropped."""
    if not isinstance(answer, str):
        answer = str(answer)
    text = unwrap_text(answer.strip())
    text = text.replace("$", "").replace("\\$", "")
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\displaystyle"):
        text = text.replace(token, "")
    text = re.sub(r"\^\s*\{?\\circ\}?", "", text).replace("°", "")
    text = text.replace("\\%", "").replace("%", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\s+", "", text)
    text = re.sub(r"^[a-zA-Z]=(?!=)", "", text)  # "x=5" -> "5"
    text = text.rstrip(".")
    text = _fix_fracs(text)
    text = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", text)  # 1,000 -> 1000
    number = parse_number(text)
    if number is not None:
        return _format_number(number)
    return text


def _format_number(value: float) -> str:
    if math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def parse_number(text: str) -> Optional[float]:
    """The value of a plain number ("42", "-3.50", "1,000", "1/2") or a LaTeX fraction (`\\frac{1}{2}`,
    `-\\dfrac{3}{4}`); None otherwise."""
    if not isinstance(text, str):
        return None
    text = text.strip().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace(" ", "")
    text = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", text)
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        return float(text)
    fraction = re.fullmatch(r"([-+]?)\\frac\{([-+]?\d+\.?\d*)\}\{([-+]?\d+\.?\d*)\}", text)
    if fraction is None:
        fraction = re.fullmatch(r"([-+]?)(\d+\.?\d*)/(\d+\.?\d*)", text)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        if float(denominator) == 0:
            return None
        value = float(Fraction(numerator) / Fraction(denominator))
        return -value if sign == "-" else value
    return None


def math_equal(prediction: str, gold: str, rel_tol: float = 1e-6) -> bool:
    """Whether two math answers agree: equal as numbers (`\\dfrac{1}{2}` = `0.5` = `1/2`, `42.0` = `42`), or equal
    after `normalize_math`."""
    if prediction is None or gold is None:
        return False
    left, right = normalize_math(str(prediction)), normalize_math(str(gold))
    if not left:
        return False
    left_number, right_number = parse_number(left), parse_number(right)
    if left_number is not None and right_number is not None:
        return math.isclose(left_number, right_number, rel_tol=rel_tol, abs_tol=1e-9)
    return left == right


# ---------------------------------------------------------------------------------------------------------------
# labels: multiple choice and true/false


def extract_label(response: str, labels: Sequence[str]) -> str:
    """The choice a response gives, as one of `labels` ("A"-"E", or "1"-"4"), matched case-insensitively; "" when
    none. Reads the last box ("\\boxed{\\text{B}}", "\\boxed{(B) Paris}", "\\boxed{Option 2}"), else the text after
    an answer phrase, else a response that is only a label."""
    candidates = []
    boxed = last_boxed(response)
    if boxed is not None:
        candidates.append(boxed)
    flagged = answer_after_flag(response)
    if flagged is not None:
        candidates.append(flagged)
    candidates.append(response.strip())
    for candidate in candidates:
        label = _label_of(candidate, labels)
        if label:
            return label
    return ""


def _label_of(text: str, labels: Sequence[str]) -> str:
    text = text.strip().strip("$*").strip()
    text = re.sub(r"^(option|choice|answer)\s*[:#]?\s*", "", text, flags=re.IGNORECASE)
    by_lower = {label.lower(): label for label in labels}
    match = re.match(r"^\(?([A-Za-z0-9]+)\)?(?:[.):,]|\s|$)", text)
    if match and match.group(1).lower() in by_lower:
        return by_lower[match.group(1).lower()]
    return ""


def extract_boolean(response: str, allowed: Sequence[str]) -> str:
    """ "true", "false" or (when allowed) "uncertain" from a response, lowercased; "yes"/"no" read as true/false.

    Reads the first of the first three words of the last box, else of the text after an answer phrase, else a
    response that is one word; "" when none."""
    synonyms = {"yes": "true", "no": "false", "unknown": "uncertain"}
    candidates = [text for text in (last_boxed(response), answer_after_flag(response)) if text is not None]
    for candidate in candidates:
        for word in re.findall(r"[a-z]+", candidate.lower())[:3]:
            word = synonyms.get(word, word)
            if word in allowed:
                return word
    words = re.findall(r"[a-z]+", response.lower())
    if len(words) == 1 and synonyms.get(words[0], words[0]) in allowed:
        return synonyms.get(words[0], words[0])
    return ""


# ---------------------------------------------------------------------------------------------------------------
# DROP: exact match and F1 over answer spans


def normalize_span(text: str) -> str:
    """DROP/SQuAD answer normalisation: lowercase, no punctuation, no articles, single spaces, numbers canonical."""
    text = unwrap_text(str(text)).lower()
    tokens = []
    for token in re.split(r"[\s\-]+", text):
        number = parse_number(token.replace(",", "")) if re.search(r"\d", token) else None
        if number is None:
            token = "".join(char for char in token if char not in string.punctuation)
        else:
            token = _format_number(number)
        if token and token not in ("a", "an", "the"):
            tokens.append(token)
    return " ".join(tokens)


def _numbers(text: str) -> set[str]:
    return {token for token in text.split() if parse_number(token) is not None}


def _span_f1(prediction: str, gold: str) -> float:
    predicted_tokens, gold_tokens = prediction.split(), gold.split()
    if not predicted_tokens and not gold_tokens:
        return 1.0
    if not predicted_tokens or not gold_tokens:
        return 0.0
    gold_numbers = _numbers(gold)
    if gold_numbers and _numbers(prediction) and not gold_numbers & _numbers(prediction):
        return 0.0  # DROP's rule: a span with the wrong number scores nothing
    common = 0
    remaining = list(gold_tokens)
    for token in predicted_tokens:
        if token in remaining:
            remaining.remove(token)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def split_spans(prediction: str, n_gold: int) -> list[str]:
    """A prediction as a list of spans: split on ",", ";" and " and " when the gold answer has several spans."""
    if n_gold <= 1:
        return [prediction]
    parts = re.split(r"\s*(?:,|;|\band\b|\n)\s*", prediction)
    return [part for part in parts if part.strip()] or [prediction]


def _best_alignment(matrix: list[list[float]]) -> float:
    """The largest sum of scores over one-to-one pairings of rows and columns (exhaustive: DROP has few spans)."""
    rows = len(matrix)
    columns = len(matrix[0]) if matrix else 0
    best = 0.0

    def search(row: int, used: frozenset, total: float) -> None:
        nonlocal best
        if row == rows:
            best = max(best, total)
            return
        search(row + 1, used, total)
        for column in range(columns):
            if column not in used:
                search(row + 1, used | {column}, total + matrix[row][column])

    search(0, frozenset(), 0.0)
    return best


def drop_scores(prediction: str, gold_spans: Iterable[str]) -> dict:
    """`{"exact_match": 0/1, "f1": ...}` of a prediction against the gold spans of a DROP question.

    Exact match: the normalised prediction spans are the normalised gold spans (as sets). F1: spans paired one to
    one to maximise the sum of token F1s, divided by the larger number of spans (DROP's bag alignment)."""
    gold = [normalize_span(span) for span in gold_spans]
    gold = [span for span in gold if span] or [""]
    predicted = [normalize_span(span) for span in split_spans(str(prediction), len(gold))]
    predicted = [span for span in predicted if span] or [""]
    exact = float(set(predicted) == set(gold))
    matrix = [[_span_f1(p, g) for g in gold] for p in predicted]
    f1 = _best_alignment(matrix) / max(len(gold), len(predicted))
    return {"exact_match": exact, "f1": round(f1, 6)}
