# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Synthetic long-context tasks in the style of RULER (https://arxiv.org/abs/2404.06654), generated offline.

The one idea: a row is a haystack of filler text (or a word list) sized to a number of tokens of a given tokenizer,
with the facts the question asks about placed inside it; everything comes from a seeded generator and the word
lists in `words.py`, so the same seed gives the same rows and nothing is downloaded.

Rows have the columns of the evaluation harness: `context`, `question`, `answer_prefix`, `answer` (every string
that must appear in the prediction), `max_new_tokens` and `task`. `context_length` counts the tokens of `context`
alone (without special tokens): the context has at most that many tokens and is filled as close to it as its units
allow. Every context ends with a newline and no question starts with a space, so `context + question` tokenizes
like the two parts apart (this is how a question-aware evaluation puts the question into the compressed context).

Tasks (`TASK_NAMES`):
- `niah_single_noise`, `niah_single_essay`, `niah_single_uuid`: one needle "One special magic number for <key> is:
  <value>." in a repeated-noise or essay-like haystack (7-digit numbers, or UUIDs); the question asks for its value.
- `niah_multikey`: four needles with different keys; the question asks for one of them.
- `niah_multivalue`: four needles with the same key; the question asks for all four values.
- `niah_multiquery`: four needles with different keys; the question asks for all four.
- `variable_tracking`: a chain "VAR A = 12345." ... "VAR B = VAR A." in a noise haystack; the question asks for every
  variable that ends up holding the value.
- `common_words`: a numbered word list in which ten words occur much more often than the rest; the question asks for
  those ten.
- `frequent_words`: coded words drawn from a Zipf distribution (exponent 2); the question asks for the three most
  frequent ones.

`needle_sweep_rows` gives the needle-in-a-haystack sweep: one needle at chosen depths of contexts of chosen lengths.
"""

from __future__ import annotations

import functools
import math
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from harness.reference_model import REFERENCE_MODEL_DIR
from harness.synthetic.words import (
    ADJECTIVES,
    ADVERBS,
    CODED_WORDS,
    LIST_WORDS,
    NOUNS,
    PEOPLE,
    PLACES,
    VARIABLE_NAMES,
    VERBS,
)

TASK_NAMES: tuple[str, ...] = (
    "niah_single_noise",
    "niah_single_essay",
    "niah_single_uuid",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
)
# The `task` of the rows made by `needle_sweep_rows`.
SWEEP_TASK = "needle_in_haystack"

NUM_NEEDLES = 4  # needles of the multi-key, multi-value and multi-query tasks
NUM_HOPS = 4  # variable tracking: a chain of NUM_HOPS + 1 variables
NUM_COMMON_WORDS = 10
NUM_FREQUENT_WORDS = 3
ZIPF_EXPONENT = 2.0
CODED_VOCABULARY = 100  # coded words drawn for one frequent-words row
# max_new_tokens = the tokens of the reference answer plus this margin.
ANSWER_TOKEN_MARGIN = 4

NOISE_SENTENCES: tuple[str, ...] = (
    "The river is wide.",
    "The hills are green.",
    "The wind is soft.",
    "We walk on and on.",
    "Back and forth we go.",
)
ESSAY_SENTENCES = 4000  # size of the essay pool
ESSAY_SEED = 20260503


@functools.lru_cache(maxsize=1)
def load_reference_tokenizer():
    """The tokenizer of the reference model (`reference/model/`), loaded offline."""
    from transformers import AutoTokenizer

    path = Path(REFERENCE_MODEL_DIR)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"No reference tokenizer in {path}; build one with `python reference/build_tokenizer.py --output_dir DIR` "
            "or pass a tokenizer to the task generators."
        )
    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Token counting


class TokenCounter:
    """Counts the tokens of texts for one tokenizer and caches the counts of haystack units (with a leading space)."""

    def __init__(self, tokenizer):
        if not hasattr(tokenizer, "encode"):
            raise TypeError(f"tokenizer must have an encode method (a transformers tokenizer), got {type(tokenizer)}.")
        self.tokenizer = tokenizer
        self.unit_counts: dict[str, int] = {}
        self._recent: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (the last few texts are cached: rows encode their context)."""
        ids = self._recent.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            if len(self._recent) >= 4:
                self._recent.pop(next(iter(self._recent)))
            self._recent[text] = ids
        return ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def unit_count(self, units: Sequence[str]) -> list[int]:
        """Tokens of `" " + unit` for each unit (cached)."""
        missing = [unit for unit in dict.fromkeys(units) if unit not in self.unit_counts]
        for unit in missing:
            self.unit_counts[unit] = self.count(" " + unit)
        return [self.unit_counts[unit] for unit in units]


_COUNTERS: dict[int, TokenCounter] = {}


def get_counter(tokenizer=None) -> TokenCounter:
    """The (cached) TokenCounter of `tokenizer`, or of the reference tokenizer when None."""
    if isinstance(tokenizer, TokenCounter):
        return tokenizer
    if tokenizer is None:
        tokenizer = load_reference_tokenizer()
    counter = _COUNTERS.get(id(tokenizer))
    if counter is None or counter.tokenizer is not tokenizer:
        if len(_COUNTERS) > 8:
            _COUNTERS.clear()
        counter = _COUNTERS[id(tokenizer)] = TokenCounter(tokenizer)
    return counter


# ---------------------------------------------------------------------------------------------------------------------
# Haystacks


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """A fixed pool of essay-like sentences built from a small grammar (the same on every machine)."""
    rng = random.Random(ESSAY_SEED)

    def a(words: Sequence[str]) -> str:
        return rng.choice(words)

    templates: list[Callable[[], str]] = [
        lambda: f"The {a(ADJECTIVES)} {a(PEOPLE)} {a(VERBS)} the {a(NOUNS)} {a(PLACES)} the {a(NOUNS)}.",
        lambda: f"{a(ADVERBS).capitalize()}, the {a(NOUNS)} {a(VERBS)} a {a(ADJECTIVES)} {a(NOUNS)}.",
        lambda: f"A {a(ADJECTIVES)} {a(NOUNS)} stood {a(PLACES)} the {a(ADJECTIVES)} {a(NOUNS)}.",
        lambda: f"Nobody {a(VERBS)} the {a(NOUNS)} of the {a(PEOPLE)}, and the {a(NOUNS)} stayed {a(ADJECTIVES)}.",
        lambda: f"In the {a(ADJECTIVES)} {a(NOUNS)}, a {a(PEOPLE)} {a(VERBS)} every {a(NOUNS)}.",
        lambda: f"The {a(NOUNS)} was {a(ADJECTIVES)} and the {a(NOUNS)} was {a(ADJECTIVES)}.",
        lambda: f"Each {a(PEOPLE)} {a(VERBS)} one {a(NOUNS)} {a(ADVERBS)}.",
        lambda: f"When the {a(NOUNS)} became {a(ADJECTIVES)}, the {a(PEOPLE)} {a(VERBS)} the {a(NOUNS)}.",
        lambda: f"Some say the {a(NOUNS)} {a(PLACES)} the {a(NOUNS)} is {a(ADJECTIVES)}.",
        lambda: f"Our {a(PEOPLE)} {a(ADVERBS)} {a(VERBS)} the {a(ADJECTIVES)} {a(NOUNS)}.",
    ]
    return tuple(rng.choice(templates)() for _ in range(ESSAY_SENTENCES))


def _haystack_units(kind: str, rng: random.Random, n: int) -> list[str]:
    if kind == "noise":
        return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]
    pool = essay_sentences()
    start = rng.randrange(len(pool))
    return [pool[(start + i) % len(pool)] for i in range(n)]


@dataclass
class _Needle:
    text: str
    depth: float  # fraction of the haystack tokens before it


@dataclass
class _Draft:
    """A row before its context is sized: the intro, the needles and how to phrase question and answer."""

    task: str
    intro: str
    haystack: str  # "noise" or "essay"
    needles: list[_Needle]
    question: str
    answer_prefix: str
    answer: list[str]
    target: str  # the answer text the reference model is trained to produce (before EOS)
    extra: dict[str, Any] = field(default_factory=dict)


def _assemble_haystack(draft: _Draft, units: list[str], counts: list[int]) -> str:
    """Insert the needles into the haystack units at their depths (in tokens) and join everything."""
    total = sum(counts)
    cumulative = [0]
    for count in counts:
        cumulative.append(cumulative[-1] + count)
    slots: dict[int, list[str]] = {}
    for needle in sorted(draft.needles, key=lambda needle: needle.depth):
        goal = needle.depth * total
        # The unit boundary nearest to the wanted depth.
        index = min(range(len(cumulative)), key=lambda i: (abs(cumulative[i] - goal), i))
        slots.setdefault(index, []).append(needle.text)
    pieces: list[str] = []
    for i in range(len(units) + 1):
        pieces.extend(slots.get(i, []))
        if i < len(units):
            pieces.append(units[i])
    return draft.intro + "\n" + " ".join(pieces) + "\n"


def _fit_haystack(draft: _Draft, counter: TokenCounter, context_length: int, rng: random.Random) -> str:
    """The longest haystack (in units) whose assembled context has at most `context_length` tokens."""
    fixed = counter.count(draft.intro + "\n") + sum(counter.unit_count([n.text for n in draft.needles])) + 2
    if fixed > context_length:
        raise ValueError(
            f"context_length={context_length} is too small for task {draft.task!r}: its instructions and needles "
            f"alone take {fixed} tokens; use a context_length of at least {fixed + 16}."
        )
    # The essay haystack starts at a random sentence: every size restarts from this state to draw the same start.
    state = rng.getstate()

    def units_for(n: int) -> list[str]:
        rng.setstate(state)
        return _haystack_units(draft.haystack, rng, n)

    # Estimate from the cached unit counts, then correct with exact counts of the assembled context.
    budget = context_length - fixed
    probe = units_for(max(8, budget))
    cumulative = 0
    n = 0
    for count in counter.unit_count(probe):
        if cumulative + count > budget:
            break
        cumulative += count
        n += 1

    def build(n: int) -> tuple[str, int]:
        units = units_for(n)
        text = _assemble_haystack(draft, units, counter.unit_count(units))
        return text, counter.count(text)

    text, tokens = build(n)
    while tokens > context_length and n > 0:
        n -= 1
        text, tokens = build(n)
    while True:  # grow while the next unit still fits (the estimate is usually exact)
        bigger, bigger_tokens = build(n + 1)
        if bigger_tokens > context_length:
            break
        n, text, tokens = n + 1, bigger, bigger_tokens
    return text


def _settle(
    task: str,
    make: Callable[[int], str],
    n: int,
    counter: TokenCounter,
    context_length: int,
    min_items: int,
    max_items: int,
) -> tuple[int, str]:
    """From an estimated item count n, the largest n in [min_items, max_items] whose text fits, by exact counts."""
    n = max(min(n, max_items), min_items)
    text = make(n)
    tokens = counter.count(text)
    while tokens > context_length:
        if n == min_items:
            raise ValueError(
                f"context_length={context_length} is too small for task {task!r}: the shortest list takes {tokens} "
                f"tokens; use a context_length of at least {tokens}."
            )
        per_item = max(tokens / n, 1.0)
        n = max(min_items, n - max(1, math.ceil((tokens - context_length) / per_item)))
        text = make(n)
        tokens = counter.count(text)
    while n < max_items:  # grow while one more item still fits (the estimate is usually exact)
        bigger = make(n + 1)
        if counter.count(bigger) > context_length:
            break
        n, text = n + 1, bigger
    return n, text


# ---------------------------------------------------------------------------------------------------------------------
# Task drafts


def _magic_value(rng: random.Random, kind: str) -> str:
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(rng: random.Random, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in keys:
            keys.append(key)
    return keys


def _distinct_values(rng: random.Random, kind: str, count: int) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = _magic_value(rng, kind)
        if value not in values:
            values.append(value)
    return values


def _niah_intro(kind: str) -> str:
    return (
        f"The text below hides a few special magic {kind}s among ordinary sentences. "
        "Keep them in mind: a question about them comes at the end."
    )


def _needle(key: str, value: str, kind: str) -> str:
    return f"One special magic {kind} for {key} is: {value}."


def _joined(values: Sequence[str]) -> str:
    return " " + ", ".join(values) + "."


def _restated(key: str, value: str) -> str:
    """The reference model's answer to a one-value question: it first restates the asked key in the words of the
    needle, then copies the value that follows them there ("... is wide-willow is: 1456079."). Restating turns key
    matching into plain copying (an induction head finds "wide-willow is:" in the text); the metric only looks for
    the value, so the extra words cost nothing."""
    return f" {key} is: {value}."


def _draft_niah(
    task: str, rng: random.Random, depths: Optional[Sequence[float]] = None, num_needles: int = NUM_NEEDLES
) -> _Draft:
    kind = "uuid" if task == "niah_single_uuid" else "number"
    haystack = "noise" if task == "niah_single_noise" else "essay"
    intro = _niah_intro(kind)

    def draft(needles: list[_Needle], subject: str, answer: list[str], target: Optional[str] = None) -> _Draft:
        # one value asked: "What is ... for K"; several: "What are all the ...s for K"
        what, noun, verb = ("What is", kind, "is") if len(answer) == 1 else ("What are all", f"{kind}s", "are")
        return _Draft(
            task=task,
            intro=intro,
            haystack=haystack,
            needles=needles,
            question=f"{what} the special magic {noun} for {subject} mentioned in the text above?",
            answer_prefix=f"The special magic {noun} for {subject} mentioned in the text above {verb}",
            answer=list(answer),
            target=target if target is not None else _joined(answer),
        )

    if task in ("niah_single_noise", "niah_single_essay", "niah_single_uuid", SWEEP_TASK):
        (key,) = _keys(rng, 1)
        (value,) = _distinct_values(rng, kind, 1)
        depth = rng.random() if depths is None else depths[0]
        return draft([_Needle(_needle(key, value, kind), depth)], key, [value], _restated(key, value))
    keys = _keys(rng, num_needles)
    values = _distinct_values(rng, kind, num_needles)
    needle_depths = sorted(rng.random() for _ in range(num_needles))
    if task == "niah_multikey":
        asked = rng.randrange(num_needles)
        order = list(range(num_needles))
        rng.shuffle(order)
        needles = [_Needle(_needle(keys[i], values[i], kind), needle_depths[j]) for j, i in enumerate(order)]
        return draft(needles, keys[asked], [values[asked]], _restated(keys[asked], values[asked]))
    if task == "niah_multivalue":
        key = keys[0]
        # Needle depths are sorted, so values appear in this order in the text.
        needles = [_Needle(_needle(key, value, kind), depth) for value, depth in zip(values, needle_depths)]
        return draft(needles, key, list(values))
    if task == "niah_multiquery":
        needles = [_Needle(_needle(k, v, kind), depth) for k, v, depth in zip(keys, values, needle_depths)]
        order = list(range(num_needles))
        rng.shuffle(order)
        asked_keys = [keys[i] for i in order]
        key_list = ", ".join(asked_keys[:-1]) + " and " + asked_keys[-1]
        # The metric ignores the order; the reference model lists the values in the order of the text.
        return draft(needles, key_list, [values[i] for i in order], _joined(values))
    raise ValueError(f"not a needle task: {task!r}")


def _draft_variable_tracking(rng: random.Random, num_chains: int = 1, num_hops: int = NUM_HOPS) -> _Draft:
    names = rng.sample(VARIABLE_NAMES, num_chains * (num_hops + 1))
    values: list[str] = []
    while len(values) < num_chains:
        value = str(rng.randint(10_000, 99_999))
        if value not in values:
            values.append(value)
    needles: list[_Needle] = []
    chains = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        chains.append(chain)
        depths = sorted(rng.random() for _ in chain)
        needles.append(_Needle(f"VAR {chain[0]} = {values[c]}.", depths[0]))
        for previous, name, depth in zip(chain, chain[1:], depths[1:]):
            needles.append(_Needle(f"VAR {name} = VAR {previous}.", depth))
    value, chain = values[0], chains[0]
    return _Draft(
        task="variable_tracking",
        intro=(
            "Memorize the variable assignments hidden in the text below. A line VAR X = Y gives X the value Y, "
            "which is a number or the value of another variable."
        ),
        haystack="noise",
        needles=needles,
        question=f"Which variables are assigned the value {value}, directly or through other variables, in the text "
        "above?",
        answer_prefix=f"Answer: following the assignments, {len(chain)} variables hold the value {value}. They are:",
        answer=list(chain),
        target=" " + " ".join(chain) + ".",
    )


def _common_words_list(rng_seed: str, n: int) -> tuple[list[str], list[str]]:
    """n list items: NUM_COMMON_WORDS words that each occur far more often than any other word."""
    rng = random.Random(rng_seed)
    common = rng.sample(LIST_WORDS, NUM_COMMON_WORDS)
    others = [word for word in LIST_WORDS if word not in common]
    rng.shuffle(others)
    common_frequency = max(2, round(n / (2 * NUM_COMMON_WORDS)))
    rest = max(n - NUM_COMMON_WORDS * common_frequency, 0)
    other_frequency = max(1, math.ceil(rest / len(others)))
    if other_frequency >= common_frequency:
        raise ValueError("common-words list too long for the word pool")  # cannot happen below ~1M tokens
    uncommon: list[str] = []
    for word in others:
        uncommon.extend([word] * other_frequency)
        if len(uncommon) >= rest:
            break
    items = common * common_frequency + uncommon[:rest]
    rng.shuffle(items)
    seen: dict[str, None] = {}
    for word in items:
        if word in common:
            seen.setdefault(word, None)
    return items, list(seen)


_COMMON_WORDS_INTRO = (
    "Below is a numbered list of words. Some words occur much more often than the others; keep track of them."
)
_FREQUENT_WORDS_INTRO = "Read the coded text below and count how often each coded word occurs."


def _common_words_context(items: Sequence[str]) -> str:
    return _COMMON_WORDS_INTRO + "\n" + " ".join(f"{i + 1}. {word}" for i, word in enumerate(items)) + "\n"


def _common_words(seed: str, counter: TokenCounter, context_length: int) -> tuple[str, list[str]]:
    """A common-words context of at most `context_length` tokens and its common words (in order of appearance)."""
    min_items = 2 * NUM_COMMON_WORDS + 1
    max_items = max(context_length // 2, min_items)  # an item "i. word" takes at least two tokens
    budget = context_length - counter.count(_COMMON_WORDS_INTRO + "\n") - 1
    word_tokens = sum(counter.unit_count(LIST_WORDS)) / len(LIST_WORDS)
    label_tokens = counter.unit_count([f"{i}." for i in range(1, max_items + 1)])
    used, n = 0.0, 0
    for count in label_tokens:
        if used + count + word_tokens > budget:
            break
        used += count + word_tokens
        n += 1
    n, context = _settle(
        "common_words",
        lambda k: _common_words_context(_common_words_list(seed, k)[0]),
        n,
        counter,
        context_length,
        min_items,
        max_items,
    )
    return context, _common_words_list(seed, n)[1]


def _top_words(words: Sequence[str], count: int) -> Optional[list[str]]:
    """The `count` most frequent words, or None when the top `count` is not strictly separated."""
    counts: dict[str, int] = {}
    for word in words:
        counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    top = [c for _, c in ranked[: count + 1]] + [0] * (count + 1)
    if all(top[i] > top[i + 1] for i in range(count)):
        return [word for word, _ in ranked[:count]]
    return None


def _frequent_words_context(words: Sequence[str]) -> str:
    return _FREQUENT_WORDS_INTRO + "\n" + " ".join(words) + "\n"


def _frequent_words(seed: str, counter: TokenCounter, context_length: int) -> tuple[str, list[str]]:
    """Coded words drawn from a Zipf distribution (exponent 2) filling `context_length` tokens, and the
    NUM_FREQUENT_WORDS most frequent ones (most frequent first). Draws again until that top is unambiguous."""
    min_items = 4 * NUM_FREQUENT_WORDS
    budget = context_length - counter.count(_FREQUENT_WORDS_INTRO + "\n") - 1
    weights = [1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(CODED_VOCABULARY)]
    for attempt in range(1000):
        rng = random.Random(f"{seed}|{attempt}")
        vocabulary = rng.sample(CODED_WORDS, CODED_VOCABULARY)
        words = rng.choices(vocabulary, weights=weights, k=max(budget, min_items))  # each word takes >= 1 token
        used, n = 0, 0
        for count in counter.unit_count(words):
            if used + count > budget:
                break
            used += count
            n += 1
        n, context = _settle(
            "frequent_words",
            lambda k: _frequent_words_context(words[:k]),
            n,
            counter,
            context_length,
            min_items,
            len(words),
        )
        top = _top_words(words[:n], NUM_FREQUENT_WORDS)
        if top is not None:
            return context, top
    raise ValueError(f"could not draw a frequent-words text of {context_length} tokens with a clear top 3")


# ---------------------------------------------------------------------------------------------------------------------
# Rows


def _row(draft: _Draft, context: str, counter: TokenCounter) -> dict:
    return {
        "context": context,
        "question": draft.question,
        "answer_prefix": draft.answer_prefix,
        "answer": list(draft.answer),
        "max_new_tokens": counter.count(draft.target) + ANSWER_TOKEN_MARGIN,
        "task": draft.task,
        "target": draft.target,
    }


def build_row(
    task: str, context_length: int, tokenizer=None, row_seed: str = "0", num_needles: Optional[int] = None
) -> dict:
    """One row of `task` with a context of at most `context_length` tokens, fully determined by `row_seed`.

    Besides the harness columns the row has `target`: the answer text (before EOS) the reference model is trained
    to write after `answer_prefix`. `num_needles` changes the number of needles of the multi-key, multi-value and
    multi-query tasks (NUM_NEEDLES by default; the reference model's training uses other counts as a drill).
    """
    if task not in TASK_NAMES:
        raise ValueError(f"Unknown synthetic task {task!r}; choose one of {', '.join(TASK_NAMES)}.")
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive number of tokens, got {context_length!r}.")
    if num_needles is not None:
        if task not in ("niah_multikey", "niah_multivalue", "niah_multiquery"):
            raise ValueError(
                f"num_needles applies to niah_multikey, niah_multivalue and niah_multiquery, not {task!r}."
            )
        if not isinstance(num_needles, int) or num_needles < 2:
            raise ValueError(f"num_needles must be an integer of at least 2, got {num_needles!r}.")
    counter = get_counter(tokenizer)
    rng = random.Random(f"{task}|{row_seed}")
    if task in ("common_words", "frequent_words"):
        seed = f"{task}|{row_seed}|list"
        if task == "common_words":
            context, words = _common_words(seed, counter, context_length)
            question = f"What are the {NUM_COMMON_WORDS} most frequent words in the list above?"
            answer_prefix = f"Answer: the {NUM_COMMON_WORDS} most frequent words in the list above are:"
        else:
            context, words = _frequent_words(seed, counter, context_length)
            question = f"What are the {NUM_FREQUENT_WORDS} most frequent coded words in the text above?"
            answer_prefix = f"Answer: the {NUM_FREQUENT_WORDS} most frequent coded words in the text above are:"
        draft = _Draft(task, "", "", [], question, answer_prefix, words, _joined(words))
        return _row(draft, context, counter)
    if task == "variable_tracking":
        draft = _draft_variable_tracking(rng)
    else:
        draft = _draft_niah(task, rng, num_needles=num_needles or NUM_NEEDLES)
    return _row(draft, _fit_haystack(draft, counter, context_length, rng), counter)


def _public(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "target"}


def generate_rows(task: str, num_samples: int, context_length: int, tokenizer=None, seed: int = 0) -> list[dict]:
    """`num_samples` rows of `task` whose contexts have at most `context_length` tokens of `tokenizer`.

    The tokenizer defaults to the reference model's. Rows depend only on (task, context_length, seed, row index) and
    on the tokenizer; the reference model was trained on rows from other seeds (see reference/train.py).
    """
    if task not in TASK_NAMES:
        raise ValueError(f"Unknown synthetic task {task!r}; choose one of {', '.join(TASK_NAMES)}.")
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}.")
    counter = get_counter(tokenizer)
    return [
        _public(build_row(task, context_length, counter, row_seed=f"eval|{seed}|{context_length}|{i}"))
        for i in range(num_samples)
    ]


def needle_sweep_rows(
    context_lengths: Sequence[int],
    depths: Sequence[float] = (0.05, 0.5, 0.95),
    num_samples: int = 1,
    tokenizer=None,
    seed: int = 0,
) -> list[dict]:
    """Needle-in-a-haystack sweep: one needle at each depth (a fraction of the context) of each context length.

    Rows have the harness columns plus `depth` and `context_length`; `task` is "needle_in_haystack".
    """
    for depth in depths:
        if not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"depths are fractions of the context between 0 and 1 (e.g. 0.05, 0.5), got {depth!r}.")
    for length in context_lengths:
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"context_lengths must be positive integers (tokens), got {length!r}.")
    counter = get_counter(tokenizer)
    rows = []
    for length in context_lengths:
        for depth in depths:
            for i in range(num_samples):
                rng = random.Random(f"{SWEEP_TASK}|sweep|{seed}|{length}|{depth}|{i}")
                draft = _draft_niah(SWEEP_TASK, rng, depths=[float(depth)])
                draft.haystack = "essay"
                row = _public(_row(draft, _fit_haystack(draft, counter, length, rng), counter))
                row.update(depth=float(depth), context_length=length)
                rows.append(row)
    return rows


@functools.lru_cache(maxsize=4)
def head_scoring_texts(count: int = 4, context_length: int = 1024, seed: int = 77) -> tuple[str, ...]:
    """Offline texts to score attention heads on (DuoAttention's on-the-fly scoring, `duo_attention_synthetic`):
    the contexts of `count` essay-haystack needle rows of `context_length` reference-tokenizer tokens."""
    rows = generate_rows("niah_single_essay", count, context_length, load_reference_tokenizer(), seed=seed)
    return tuple(row["context"] for row in rows)
