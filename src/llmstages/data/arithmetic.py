"""Built-in verifiable tasks: arithmetic problems with their answers, generated offline from the world seed.

The distribution (`arithmetic_problems`):

- An operation drawn uniformly from add (+), subtract (-) and multiply (*).
- Each operand gets a number of digits drawn uniformly from 1..`digits` (at most 3), then a value uniform among
  the numbers of that many digits (1..9 for one digit, 10..99 for two, 100..999 for three). For subtraction the
  larger operand comes first, so every answer is a whole number >= 0.
- A share `word_share` of the problems is phrased as a short word problem about one of the built-in world's people
  (its names for `world_seed`) and everyday objects ("Ada has 59 apples and buys 27 more. How many apples does Ada
  have now? Answer with the number only."); the others plainly ("What is 59 + 27? Answer with the number only.").
  Every question ends with the same instruction, so an answer-only reply is what is asked for.
- The held-out split is drawn first, then the training split, without repeating a problem: two problems are the
  same when they have the same operation and operands (in either order for + and *), whatever their phrasing, so
  no held-out question is asked in training in any wording, and no question appears twice.

One seed fixes everything: the same `world_seed` gives the same problems, in the same order, on every machine
(Python's `random`, no floating point). The answer is the integer as a string, the `answer` column that the
reward functions read (`llmstages.rewards:accuracy`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmstages.errors import UserError

MAX_DIGITS = 3
INSTRUCTION = "Answer with the number only."
OPERATIONS = ("+", "-", "*")
PLAIN = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Work out {a} {op} {b}.")
# (singular, plural) of the objects a word problem counts and of the containers a product fills.
OBJECTS = (
    ("apple", "apples"),
    ("pear", "pears"),
    ("egg", "eggs"),
    ("stamp", "stamps"),
    ("shell", "shells"),
    ("marble", "marbles"),
    ("book", "books"),
    ("coin", "coins"),
)
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"))
# Word problems by operation: {n} and {m} are two people, {a} and {b} the operands already written with their
# nouns ({a_obj}: "59 apples"), {objs} the plural object.
WORDS = {
    "+": (
        "{n} has {a_obj} and buys {b} more. How many {objs} does {n} have now?",
        "{n} picks {a_obj} in the morning and {b} in the afternoon. How many {objs} does {n} pick in all?",
        "{n} has {a_obj} and {m} gives {n} {b} more. How many {objs} does {n} have now?",
    ),
    "-": (
        "{n} has {a_obj} and gives {b} of them to {m}. How many {objs} does {n} have left?",
        "{n} had {a_obj} and lost {b} of them. How many {objs} does {n} have now?",
        "{n} collects {a_obj} and sells {b} of them. How many {objs} does {n} keep?",
    ),
    "*": (
        "{n} has {a_box} with {b_obj} in each. How many {objs} does {n} have?",
        "{n} fills {a_box} with {b_obj} each. How many {objs} is that in all?",
        "{n} buys {a_box} of {b_obj} each for {m}. How many {objs} does {m} get?",
    ),
}


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem: `question` is the prompt, `answer` the integer as a string."""

    a: int
    op: str
    b: int
    question: str
    answer: str
    word: bool

    @property
    def key(self) -> tuple[str, int, int]:
        """The problem whatever its phrasing: operation and operands (ordered for + and *, which commute)."""
        a, b = (min(self.a, self.b), max(self.a, self.b)) if self.op in "+*" else (self.a, self.b)
        return self.op, a, b


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _count(k: int, noun: tuple[str, str]) -> str:
    return f"{k} {noun[0] if k == 1 else noun[1]}"


def distinct_problems(digits: int) -> int:
    """How many distinct problems (keys) the distribution with `digits` can draw."""
    n = 10**digits - 1  # operands 1..n
    return n * (n + 1) // 2 * 3  # pairs a <= b, for each of +, * and (a >= b) for -


def _operand(rng: random.Random, digits: int) -> int:
    d = rng.randint(1, digits)
    return rng.randint(1 if d == 1 else 10 ** (d - 1), 10**d - 1)


def _problem(rng: random.Random, digits: int, word_share: float, names: list[str]) -> Problem:
    op = rng.choice(OPERATIONS)
    a, b = _operand(rng, digits), _operand(rng, digits)
    if op == "-" and b > a:
        a, b = b, a
    if rng.random() < word_share:
        n, m = rng.sample(names, 2)
        obj, box = rng.choice(OBJECTS), rng.choice(CONTAINERS)
        text = rng.choice(WORDS[op]).format(
            n=n, m=m, a=a, b=b, objs=obj[1], a_obj=_count(a, obj), b_obj=_count(b, obj), a_box=_count(a, box)
        )
        word = True
    else:
        text, word = rng.choice(PLAIN).format(a=a, op=op, b=b), False
    return Problem(a, op, b, f"{text} {INSTRUCTION}", str(solve(a, op, b)), word)


def arithmetic_problems(
    world_seed: int = 0, n_train: int = 2000, n_heldout: int = 64, digits: int = 2, word_share: float = 0.5
) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems) of the distribution in the module's docstring, fixed by `world_seed`.
    No problem is in both, nor twice in one; asking for more than the distribution holds is an error."""
    from llmstages.data.builtin import World

    if not 1 <= digits <= MAX_DIGITS:
        raise UserError(f"data.arithmetic_digits={digits}: must be in [1, {MAX_DIGITS}]")
    room = distinct_problems(digits)
    if n_train + n_heldout > room // 2:  # drawing without repeats stays quick below half the space
        raise UserError(
            f"{n_train} training and {n_heldout} held-out arithmetic problems with data.arithmetic_digits={digits}: "
            f"at most {room // 2} in all; lower data.arithmetic_train or raise data.arithmetic_digits"
        )
    names = [p.name for p in World(world_seed).people]
    rng = random.Random(world_seed * 1_000_003 + 24)
    seen: set[tuple[str, int, int]] = set()
    problems: list[Problem] = []
    while len(problems) < n_heldout + n_train:
        p = _problem(rng, digits, word_share, names)
        if p.key not in seen:
            seen.add(p.key)
            problems.append(p)
    return problems[n_heldout:], problems[:n_heldout]
