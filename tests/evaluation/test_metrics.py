# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Every benchmark's metric on small hand-made predictions whose scores are worked out by hand."""

import json

import pandas as pd
import pytest

from evaluation.benchmarks.aime25.calculate_metrics import calculate_metrics as aime25_metrics
from evaluation.benchmarks.aime25.calculate_metrics import extract_boxed
from evaluation.benchmarks.infinite_bench import calculate_metrics as infinite_bench
from evaluation.benchmarks.longbench import calculate_metrics as longbench
from evaluation.benchmarks.longbenchv2.calculate_metrics import calculate_metrics as longbenchv2_metrics
from evaluation.benchmarks.loogle.calculate_metrics import calculate_metrics as loogle_metrics
from evaluation.benchmarks.loogle.calculate_metrics import parse_cloze
from evaluation.benchmarks.math500.calculate_metrics import calculate_metrics as math500_metrics
from evaluation.benchmarks.needle_in_haystack.calculate_metrics import calculate_metrics as needle_metrics
from evaluation.benchmarks.needle_in_haystack.calculate_metrics import summary_metrics as needle_summary
from evaluation.benchmarks.ruler.calculate_metrics import calculate_metrics as ruler_metrics
from evaluation.benchmarks.text_normalization import normalize_answer, qa_f1
from evaluation.benchmarks.zero_scrolls.calculate_metrics import calculate_metrics as zero_scrolls_metrics


def frame(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


# -- RULER ---------------------------------------------------------------------------------------------------------
def test_ruler_string_match_all_and_part():
    df = frame(
        task=["niah_single_1", "niah_single_1", "niah_single_1", "qa_1", "qa_1"],
        answer=[["123", "456"], ["123", "789"], ["1234"], ["paris", "Lyon"], ["Paris"]],
        predicted_answer=["The numbers are 123 and 456", "only 123", "\n12\x0034 ", "PARIS is the capital", "London"],
    )
    # niah: 1 + 0.5 + 1 (control characters removed) over 3 rows; qa: best reference, 1 + 0 over 2 rows.
    assert ruler_metrics(df) == {"niah_single_1": {"string_match": 83.33}, "qa_1": {"string_match": 50.0}}


# -- LongBench ----------------------------------------------------------------------------------------------------
def test_normalization_and_qa_f1():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    # prediction {eiffel, tower}, reference {eiffel, tower, in, paris}: precision 1, recall 1/2.
    assert qa_f1("The Eiffel Tower", "Eiffel Tower in Paris") == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "task, predictions, answers, classes, expected",
    [
        # best over references: F1("no idea", "idea") = 2/3
        ("narrativeqa", ["The Eiffel Tower", "no idea"], [["Eiffel Tower in Paris"], ["x", "idea"]], None, 66.67),
        # first line only for trec; "Location or Number" names two classes -> 1/2
        (
            "trec",
            ["Human\nLocation", "Location or Number"],
            [["Human"], ["Number"]],
            ["Human", "Location", "Number"],
            75.0,
        ),
        ("passage_retrieval_en", ["Paragraph 3", "Paragraph 2 and 3"], [["Paragraph 3"], ["Paragraph 3"]], None, 75.0),
        ("passage_count", ["There are 5 unique, not 4", "7"], [[5], [7]], None, 75.0),
        ("lcc", ["# comment\n    return x + 1", "x = 2"], [["    return x + 1"], ["abcd"]], None, 50.0),
        ("gov_report", ["the cat sat on the mat", ""], [["the cat sat on the mat"], ["a summary"]], None, 50.0),
        ("multifieldqa_zh", ["北京是中国的首都", "上海"], [["北京是中国的首都"], ["北京"]], None, 50.0),
    ],
)
def test_longbench_task_metrics(task, predictions, answers, classes, expected):
    df = frame(
        task=[task] * len(predictions),
        predicted_answer=predictions,
        answers=answers,
        all_classes=[classes] * len(predictions),
    )
    assert longbench.calculate_metrics(df) == pytest.approx(expected, abs=0.01)


def test_longbench_classification_ignores_classes_inside_the_right_one():
    # "ham" is a substring of the right class "hamster": it is not a competitor, so the score is 1, not 1/2.
    assert longbench.classification_score("a hamster", "hamster", all_classes=["ham", "hamster", "dog"]) == 1.0
    assert longbench.classification_score("a dog", "hamster", all_classes=["ham", "hamster", "dog"]) == 0.0


def test_longbench_e_buckets_by_length():
    df = frame(
        task=["hotpotqa_e"] * 4,
        predicted_answer=["\nParis", "Rome", "Paris", "Berlin"],
        answers=[["Paris"], ["Paris"], ["Paris"], ["Berlin"]],
        length=[1000, 3000, 5000, 9000],
        all_classes=[None] * 4,
    )
    assert longbench.calculate_metrics_e(df) == {"0-4k": 50.0, "4-8k": 100.0, "8k+": 100.0}


def test_longbench_refuses_several_tasks_and_unknown_tasks():
    df = frame(task=["trec", "lcc"], predicted_answer=["a", "b"], answers=[["a"], ["b"]])
    with pytest.raises(ValueError, match="one task at a time"):
        longbench.calculate_metrics(df)
    with pytest.raises(ValueError, match="Unknown LongBench task 'nope'"):
        longbench.calculate_metrics(frame(task=["nope"], predicted_answer=["a"], answers=[["a"]]))


# -- LongBench v2 ---------------------------------------------------------------------------------------------------
def test_longbench_v2_accuracy_overall_and_by_group():
    df = frame(
        predicted_answer=["The correct answer is (A)", "**The correct answer is B**", "I think C", None],
        answer=["A", "B", "D", "A"],
        difficulty=["easy", "hard", "hard", "hard"],
        length=["short", "short", "long", "long"],
    )
    assert longbenchv2_metrics(df) == {
        "average": 0.5,
        "easy": 1.0,
        "hard": pytest.approx(1 / 3),
        "long": 0.0,
        "short": 1.0,
    }


# -- InfiniteBench --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, prediction, label, expected",
    [
        ("kv_retrieval", 'The value is "abc-123".', ["abc-123"], 1.0),
        ("kv_retrieval", "abc-1234", ["abc-123"], 0.0),
        ("passkey", "The pass key is 71432.", ["71432"], 1.0),
        ("passkey", "12 then 71432", ["71432"], 0.0),
        ("number_string", "9876543210", ["9876543210"], 1.0),
        ("code_run", "The return value is: 42.", [42], 1.0),
        ("code_run", "-3", ["-3"], 1.0),
        ("code_run", "forty-two", [42], 0.0),
        ("code_debug", "B. func_b", ["func_b", "B"], 1.0),
        ("code_debug", "The correct option is: func_b", ["func_b", "B"], 1.0),
        ("code_debug", "answer: C", ["func_b", "B"], 0.0),
        ("math_find", "The answer is 17.5 or so", [17.5], 1.0),
        ("math_find", "3 apples", ["3"], 1.0),
        ("math_find", "none", ["3"], 0.0),
        ("math_calc", "1, 3, 6, 5, 11", [1, 3, 6, 10, 11], 0.6),
        ("longdialogue_qa_eng", "It is JOHN.", ["John"], 1.0),
        ("longdialogue_qa_eng", "Johnny", ["John"], 0.0),
        ("longbook_qa_eng", "The Eiffel Tower", ["Eiffel Tower in Paris"], 2 / 3),
        ("longbook_qa_chn", "北京", ["北京市"], 0.8),
        ("longbook_choice_eng", "B) Paris", ["Paris", "B"], 1.0),
        ("longbook_choice_eng", "The answer is: C", ["Paris", "B"], 0.0),
        ("longbook_choice_eng", "I would go with B here", ["Paris", "B"], 1.0),
        ("longbook_choice_eng", "Paris", ["Paris", "B"], 1.0),
        ("longbook_sum_eng", "the cat sat on the mat", ["the cat sat on the mat"], 1.0),
    ],
)
def test_infinite_bench_scorers(task, prediction, label, expected):
    assert infinite_bench.get_score_one(prediction, label, task) == pytest.approx(expected, abs=1e-6)


def test_infinite_bench_mean_per_task():
    one_task = frame(task=["passkey"] * 4, answer=[["1"], ["2"], ["3"], ["4"]], predicted_answer=["1", "2", "3", "x"])
    assert infinite_bench.calculate_metrics(one_task) == 0.75
    two_tasks = frame(
        task=["passkey", "passkey", "kv_retrieval"], answer=[["1"], ["2"], ["k"]], predicted_answer=["1", "0", "k"]
    )
    assert infinite_bench.calculate_metrics(two_tasks) == {"kv_retrieval": 1.0, "passkey": 0.5, "average": 0.75}
    with pytest.raises(ValueError, match="Unknown InfiniteBench task"):
        infinite_bench.get_score_one("x", ["x"], "nope")


# -- LooGLE ---------------------------------------------------------------------------------------------------------
def test_loogle_cloze_exact_and_partial_match():
    df = frame(
        task=["shortdep_cloze"] * 2,
        answer=[json.dumps({"<mask-0>": "Alice Smith", "<mask-1>": "Bob"}), json.dumps({"<mask-0>": "Carol"})],
        predicted_answer=['Answer: {"<mask-0>": "Alice Smith", "<mask-1>": "Robert Bob Jr"}', "not a dict"],
    )
    # exact: 1 of 3 masks; partial (a shared word): 2 of 3 masks.
    assert loogle_metrics(df) == {"shortdep_cloze": {"exact_match": 0.3333, "partial_match": 0.6667}}


def test_loogle_cloze_answers_are_parsed_without_eval():
    assert parse_cloze("{'<mask-0>': 'x'}") == {"<mask-0>": "x"}
    assert parse_cloze("__import__('os').system('true')") is None


def test_loogle_generation_metrics():
    df = frame(
        task=["shortdep_qa"] * 2,
        answer=["the cat sat on the mat", "a dog"],
        predicted_answer=["the cat sat on the mat", ""],
    )
    metrics = loogle_metrics(df)["shortdep_qa"]
    # Row 1 is a perfect copy, row 2 is empty (every metric 0). METEOR of 5 identical distinct words:
    # F-mean 1, one chunk over 5 matches -> penalty 0.5 * (1/5)^3 = 0.004 -> 0.996.
    assert metrics["bleu1"] == pytest.approx(0.5)
    assert metrics["bleu4"] == pytest.approx(0.5)
    assert metrics["rouge1"] == pytest.approx(0.5)
    assert metrics["rouge2"] == pytest.approx(0.5)
    assert metrics["rougeL"] == pytest.approx(0.5)
    assert metrics["meteor"] == pytest.approx(0.996 / 2)


def test_loogle_meteor_without_wordnet_warns_and_missing_nltk_data_raises(monkeypatch, caplog):
    """Without WordNet, METEOR runs on exact words and stems and says so; NLTK data missing in the middle of scoring
    raises instead of scoring the row 0."""
    import nltk.corpus

    from evaluation.benchmarks.loogle import calculate_metrics as loogle

    class NotInstalled:  # what nltk's lazy loader does when the data is missing
        def ensure_loaded(self):
            raise LookupError("Resource wordnet not found.")

    monkeypatch.setattr(nltk.corpus, "wordnet", NotInstalled())
    with caplog.at_level("WARNING", logger=loogle.logger.name):
        stand_in = loogle._wordnet()
    assert stand_in.synsets("cat") == [] and "no synonyms" in caplog.text
    assert loogle.meteor("the cat sat", "the cat sat", stand_in) > 0.9

    class BrokenWordNet:
        def synsets(self, word, pos=None):
            raise LookupError("Resource omw-1.4 not found.")

    with pytest.raises(LookupError, match="omw-1.4"):
        loogle.meteor("the cat sat", "a dog ran", BrokenWordNet())


# -- ZeroSCROLLS ----------------------------------------------------------------------------------------------------
def test_zero_scrolls_private_test_set_has_no_score():
    df = frame(task=["qasper", "quality"], answer=["", ""], predicted_answer=["x", "A"])
    assert zero_scrolls_metrics(df) == {}


def test_zero_scrolls_paper_metrics():
    df = frame(
        task=["quality", "quality", "space_digest", "book_sum_sort", "book_sum_sort", "qasper", "gov_report"],
        answer=["(B) the dog", "(C) a cat", "60%", "3, 1, 2", "1, 2", "cafe au lait", "the cat sat on the mat"],
        predicted_answer=[
            "The answer is (B)",
            "A",
            "40% are positive, 60% negative",  # 2 ** (-10 * 0.2) = 0.25
            "Order: 3, 2, 1",  # pairs (3,1) and (3,2) kept, (1,2) swapped -> 2/3
            "1",  # not a permutation -> 0
            "Café au lait",
            "the cat sat on the mat",
        ],
    )
    assert zero_scrolls_metrics(df) == {
        "book_sum_sort": 33.33,
        "gov_report": 100.0,
        "qasper": 100.0,
        "quality": 50.0,
        "space_digest": 25.0,
    }


# -- Needle in a haystack -------------------------------------------------------------------------------------------
def test_needle_rouge_per_depth():
    df = frame(
        needle=["The secret is 42."] * 3,
        needle_depth=[10, 10, 90],
        predicted_answer=["The secret is 42.", "The secret is unknown.", ""],
    )
    metrics = needle_summary(df)
    # rouge-l F1: 1, then LCS "the secret is" (3 of 4 tokens each way) = 0.75, then 0 for the empty answer.
    assert metrics["rouge-l"]["f"] == pytest.approx((1 + 0.75 + 0) / 3, abs=1e-6)
    assert metrics["by_depth"] == {"10": pytest.approx(0.875, abs=1e-6), "90": 0.0}
    assert len(metrics["rows"]) == 3
    assert needle_metrics(df) == metrics["rows"]  # metrics.json: upstream's list of per-row scores


# -- AIME 2025 and MATH-500 -----------------------------------------------------------------------------------------
def test_aime25_last_boxed_answer():
    df = frame(
        predicted_answer=["so \\boxed{42}", "\\boxed{1} then \\boxed{7}", "no box", "\\boxed{ 12 }"],
        answer=[42, 7, 3, 12],
    )
    assert aime25_metrics(df) == {"correct": 3, "answered": 3, "accuracy": 0.75, "total": 4}


def test_math500_balanced_braces():
    assert extract_boxed("x = \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{3") is None
    df = frame(
        predicted_answer=["\\boxed{\\frac{1}{2}}", "\\boxed{3", "\\boxed{\\sqrt{2}}"],
        answer=["\\frac{1}{2}", "3", "\\sqrt{3}"],
    )
    assert math500_metrics(df) == {"correct": 1, "answered": 3, "accuracy": pytest.approx(1 / 3), "total": 3}
