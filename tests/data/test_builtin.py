"""The built-in world: deterministic, and every sentence it writes about a person is true."""

from __future__ import annotations

import re

from llmstages.data.builtin import ATTRIBUTES, PHRASINGS, World, builtin_corpus


def test_same_seed_same_world_and_corpus():
    assert World(3).people == World(3).people
    assert builtin_corpus(3, 0.05) == builtin_corpus(3, 0.05)
    assert builtin_corpus(3, 0.05) != builtin_corpus(4, 0.05)


def test_world_seeds_give_different_fact_tables():
    tables = {seed: World(seed).facts for seed in (0, 1, 2)}
    assert World(1).facts == tables[1]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        differ = sum(x != y for x, y in zip(sorted(tables[a]), sorted(tables[b])))
        assert differ > len(tables[a]) // 2, (a, b, differ)  # most rows differ, not just the order of people


def test_every_fact_sentence_is_true():
    world = World(0)
    patterns = []
    for attribute in ATTRIBUTES:
        for phrasing in PHRASINGS[attribute]:
            rx = (
                re.escape(phrasing)
                .replace(r"\{n\}", r"(?P<n>[A-Z][a-z]+)")
                .replace(r"\{v\}", r"(?P<v>[a-z]+|[A-Z][a-z]+)")
            )
            patterns.append((attribute, re.compile(rx)))
    checked = 0
    for doc in builtin_corpus(0, 0.2):
        for sentence in re.findall(r"[^.]+\.", doc):
            for attribute, rx in patterns:
                m = rx.fullmatch(sentence.strip())
                if m and m.group("n") in world.by_name:
                    assert world.by_name[m.group("n")].get(attribute) == m.group("v"), sentence
                    checked += 1
    assert checked > 1000


def test_every_fact_is_stated():
    world = World(0)
    text = " ".join(builtin_corpus(0, 1.5))
    for name, attribute, value in world.facts:  # each fact is stated in at least one of its phrasings
        assert any(p.format(n=name, v=value) in text for p in PHRASINGS[attribute]), (name, attribute)
