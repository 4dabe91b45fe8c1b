"""The built-in arithmetic problems: deterministic by world seed, correct, disjoint splits, word problems too."""

from __future__ import annotations

import re

import pytest

from llmstages.data.arithmetic import INSTRUCTION, arithmetic_problems
from llmstages.data.builtin import World
from llmstages.errors import UserError

PLAIN = re.compile(r"^(?:What is|Compute|Work out) (\d+) ([-+*]) (\d+)[?.] " + re.escape(INSTRUCTION) + "$")


def test_deterministic_by_world_seed_and_different_across_seeds():
    a = arithmetic_problems(3, 300, 64, digits=2)
    assert a == arithmetic_problems(3, 300, 64, digits=2)
    other = arithmetic_problems(4, 300, 64, digits=2)
    assert [p.question for p in other[0]] != [p.question for p in a[0]]
    assert [p.question for p in other[1]] != [p.question for p in a[1]]


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_every_answer_is_right_and_the_operands_have_at_most_the_digits(digits):
    train, held = arithmetic_problems(0, 60, 6, digits=digits)
    assert len(train) == 60 and len(held) == 6
    for p in train + held:
        assert p.answer == str(eval(f"{p.a} {p.op} {p.b}"))  # an independent computation
        assert 1 <= p.a < 10**digits and 1 <= p.b < 10**digits and int(p.answer) >= 0
        assert p.question.endswith(INSTRUCTION)
        if not p.word:  # a plain question states its operands and operation: recomputed from the text alone
            x, op, y = PLAIN.match(p.question).groups()
            assert (int(x), op, int(y)) == (p.a, p.op, p.b) and str(eval(f"{x} {op} {y}")) == p.answer


def test_splits_are_disjoint_even_across_phrasings_and_orders():
    train, held = arithmetic_problems(0, 2000, 64, digits=2)
    assert not {p.question for p in train} & {p.question for p in held}
    assert not {p.key for p in train} & {p.key for p in held}  # 3 + 5 and "5 and 3 more" are one problem
    assert len({p.key for p in train}) == len(train)  # no repeats either


def test_word_problems_name_the_worlds_people_and_their_answers_match():
    train, _ = arithmetic_problems(5, 400, 64, digits=3, word_share=1.0)
    names = {p.name for p in World(5).people}
    assert all(p.word for p in train)
    for p in train:
        assert p.answer == str(eval(f"{p.a} {p.op} {p.b}"))
        numbers = [int(x) for x in re.findall(r"\d+", p.question)]
        assert sorted(numbers) == sorted([p.a, p.b])  # the operands are the only numbers stated
        assert re.match(r"[A-Z][a-z]+", p.question).group() in names
    ops = {p.op for p in train}
    assert ops == {"+", "-", "*"}
    ada = next(p for p in train if p.op == "+" and "buys" in p.question)
    assert re.fullmatch(r"\w+ has \d+ \w+ and buys \d+ more\. How many \w+ does \w+ have now\? .*", ada.question)
    assert not any(p.word for p in arithmetic_problems(5, 100, 8, word_share=0.0)[0])


def test_asking_for_more_problems_than_the_digits_allow_is_refused():
    with pytest.raises(UserError, match="data.arithmetic_digits=1: at most 67 in all"):
        arithmetic_problems(0, 100, 64, digits=1)
