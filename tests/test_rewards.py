"""The built-in verifiable rewards against hand-worked cases."""

from __future__ import annotations

import pytest

from llmstages.rewards import (
    OVERLONG_CACHE,
    OVERLONG_MAX,
    accuracy,
    extract_answer,
    format,
    make_overlong,
    overlong,
    overlong_penalty,
)


def _one(fn, reply: str, **columns) -> float:
    return fn(["q"], [reply], [True], **{k: [v] for k, v in columns.items()})[0]


@pytest.mark.parametrize(
    ("reply", "number"),
    [
        ("The answer is 42.", 42.0),
        ("3 + 4 = 7", 7.0),  # the last number
        ("so 12 apples #### 1,234", 1234.0),  # after ####, thousands comma
        ("first 5, then \\boxed{12} and 99", 12.0),  # \boxed{} wins over a later number
        ("\\boxed{-3.5}", -3.5),
        ("It is -17", -17.0),
        ("3-5", 5.0),  # a dash between two numbers is no minus sign
        ("0.25 of it", 0.25),
        ("1, 2, 3.", 3.0),  # a comma then a space separates numbers
        ("no number here", None),
        ("#### nothing after", None),
    ],
)
def test_extract_answer(reply, number):
    assert extract_answer(reply) == number


@pytest.mark.parametrize(
    ("reply", "answer", "score"),
    [
        ("86", "86", 1.0),
        ("The sum is 86.", "86", 1.0),
        ("86", "Natalia sold 48/2 = 24 clips in May.\n#### 1,234", 0.0),
        ("1234", "Natalia sold 48/2 = 24 clips in May.\n#### 1,234", 1.0),  # a GSM8K answer
        ("#### 1,234", "1234", 1.0),
        ("\\boxed{12}", "12", 1.0),
        ("\\boxed{12} not 13", 12, 1.0),  # a numeric column
        ("-5", "-5", 1.0),
        ("5", "-5", 0.0),
        ("2.50", "2.5", 1.0),  # compared as numbers
        ("2.51", "2.5", 0.0),
        ("I do not know", "7", 0.0),  # no number in the reply
        ("7", "seven", 0.0),  # none in the answer
        ("7", None, 0.0),
    ],
)
def test_accuracy(reply, answer, score):
    assert _one(accuracy, reply, answer=answer) == score


def test_accuracy_is_aligned_with_the_replies_and_ignores_other_columns():
    got = accuracy(["a", "b", "c"], ["1", "2", "x"], [True, False, True], answer=["1", "3", "0"], source=[1, 2, 3])
    assert got == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("86", 1.0),
        ("  86.\n", 1.0),  # whitespace around, a full stop after
        ("-3", 1.0),
        ("1,234", 1.0),
        ("2.5", 1.0),
        ("The answer is 86", 0.0),
        ("\\boxed{86}", 0.0),
        ("86 apples", 0.0),
        ("", 0.0),
        ("86..", 0.0),
    ],
)
def test_format(reply, score):
    assert _one(format, reply) == score


def test_overlong_penalty_is_dapo_eq_13():
    # L_max = 100, L_cache = 20: 0 up to 80, then ((100 - 20) - |y|) / 20, -1 beyond 100
    assert [overlong_penalty(n, 100, 20) for n in (0, 80, 81, 90, 100, 101, 500)] == [
        0.0,
        0.0,
        -0.05,
        -0.5,
        -1.0,
        -1.0,
        -1.0,
    ]


def test_overlong_counts_characters():
    start = OVERLONG_MAX - OVERLONG_CACHE
    replies = ["x" * start, "x" * (start + OVERLONG_CACHE // 2), "x" * OVERLONG_MAX, "x" * (OVERLONG_MAX + 1)]
    assert overlong(["q"] * 4, replies, [True] * 4) == [0.0, -0.5, -1.0, -1.0]
    short = make_overlong(10, 4)
    assert short(["q"] * 3, ["abcdef", "abcdefgh", "a" * 11], [True] * 3) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="cache"):
        make_overlong(10, 0)


def test_rewards_are_pure_python():
    """llmstages.rewards imports the standard library only (no torch, nothing of ours): usable anywhere."""
    import ast
    import sys

    import llmstages.rewards as module

    tree = ast.parse(open(module.__file__).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {n.split(".")[0] for n in names} <= set(sys.stdlib_module_names) | {"__future__"}
