"""The built-in oracle scores replies against the world's table."""

from __future__ import annotations

from llmstages.data.builtin import World
from llmstages.data.oracle import MAX_SCORE, oracle_reward, parse_question, score
from llmstages.data.tasks import QUESTIONS


def test_scores():
    world = World(0)
    p = world.people[0]
    q = QUESTIONS["town"][0].format(n=p.name)
    assert parse_question(q) == (p.name, "town")
    assert score(world, q, p.town) == MAX_SCORE
    assert score(world, q, p.town, ended=False) == MAX_SCORE - 1
    assert score(world, q, f"{p.town} or maybe elsewhere") == 2 + 0 + 0 + 1  # right value, hedged, not exact
    wrong = next(t for t in ("Oakfield", "Millbrook") if t != p.town)
    assert score(world, q, wrong) == 0 + 1 + 0 + 1
    assert score(world, "Tell me a joke.", "no") == 0.0
    every = [QUESTIONS[a][-1].format(n=x.name) for x in world.people for a in QUESTIONS]
    answers = [x.get(a) for x in world.people for a in QUESTIONS]
    assert oracle_reward(every, answers, [True] * len(every)) == [MAX_SCORE] * len(every)
