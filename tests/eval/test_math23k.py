"""Math23K extraction and comparison rules, one form and one edge at a time."""

from __future__ import annotations

import pytest

from chatglm_sft.eval.math23k import extract_answer, is_correct, parse_gold, score


@pytest.mark.parametrize(
    "response,expected",
    [
        ("答：3+5=8（个）", 8),  # the last marker is "="
        ("所以答案是42。", 42),
        ("答案：-3.5度", -3.5),
        ("x=−7", -7),  # U+2212 minus
        ("一共1,200元，答：1,200元", 1200),
        ("答：2又1/3小时", 7 / 3),
        ("答案：5(7/10)米", 5.7),
        ("答：（2）/（3）", 2 / 3),
        ("答：2/3", 2 / 3),
        ("答：25%", 0.25),
        ("答：２５％", 0.25),  # full-width
        ("第一步=3，第二步=4，最终答：7天", 7),  # the LAST marker wins
        ("答案是第3个选项，答：5", 5),
        ("有3个苹果和5个梨", 5),  # no marker: the last number
        ("答：0", 0),
        ("答案：0.125", 0.125),
        ("答=12/4", 3),
    ],
)
def test_extraction(response, expected):
    assert extract_answer(response) == pytest.approx(expected)


@pytest.mark.parametrize("response", ["没有数字", "", "答：不知道", "x=a/b", "3个，答："])
def test_no_number_after_the_last_marker_is_none(response):
    assert extract_answer(response) is None


def test_first_number_after_the_marker_even_after_words():
    assert extract_answer("答案是：无解，3个，共5种") == 3


@pytest.mark.parametrize(
    "gold,expected",
    [
        ("880", 880),
        ("5.5", 5.5),
        ("((2)/(3))", 2 / 3),
        ("5((7)/(10))", 5.7),
        ("25%", 0.25),
        ("-((1)/(2))", -0.5),
        (12, 12),
        ("1,200", 1200),
    ],
)
def test_gold_forms(gold, expected):
    assert parse_gold(gold) == pytest.approx(expected)


def test_comparison_tolerance():
    assert is_correct(2 / 3 + 5e-5, 2 / 3)
    assert not is_correct(0.6667 + 1e-3, 2 / 3)
    assert is_correct(1e-7, 0) and not is_correct(1e-5, 0)
    assert is_correct(880.05, 880) and not is_correct(880.2, 880)
    assert not is_correct(None, 1)


def test_score_counts_every_record():
    rows = [
        {"response": "答：8", "ans": "8"},
        {"response": "答：2又1/3", "ans": "2((1)/(3))"},
        {"response": "不知道", "ans": "5"},
        {"response": "答：25%", "ans": "25%"},
    ]
    metrics, details = score(rows)
    assert metrics == {"accuracy": 0.75, "correct": 3, "total": 4}
    assert [d["correct"] for d in details] == [True, True, False, True]
