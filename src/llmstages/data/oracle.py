"""The built-in preference oracle: a programmatic judge of answers to the built-in world's fact questions.

It stands in for human labels (documented as such): it labels preference pairs, serves as the ground-truth
reward in evaluation, and is a `reward.fn` for PPO/GRPO (`llmstages.data.oracle:oracle_reward`). Scores:
+2 the stated value is the person's true one, +1 no hedge word ("or", "maybe", "really", "very", ...), +1 the
answer is exactly the value (the template), +1 the reply ended with EOS. Maximum 5.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

from llmstages.data.builtin import World
from llmstages.data.tasks import QUESTIONS, normalise

HEDGES = frozenset({"or", "maybe", "really", "very", "perhaps", "think", "other"})
MAX_SCORE = 5.0
PRINCIPLE_WORDS = ("really", "very")  # the built-in constitution's banned words (configs/cai/constitution_builtin.yaml)


@cache
def _question_patterns() -> list[tuple[str, re.Pattern]]:
    out = []
    for attribute, phrasings in QUESTIONS.items():
        for q in phrasings:
            out.append((attribute, re.compile(re.escape(q).replace(r"\{n\}", r"(?P<n>[A-Z][a-z]+)") + "$")))
    return out


def parse_question(prompt: str) -> tuple[str, str] | None:
    """(person's name, attribute) of a built-in fact question, or None for any other prompt."""
    text = prompt.strip()
    for attribute, rx in _question_patterns():
        m = rx.search(text)
        if m:
            return m.group("n"), attribute
    return None


def score(world: World, prompt: str, response: str, ended: bool = True) -> float:
    """The oracle's score of one reply (0 for prompts it does not know)."""
    parsed = parse_question(prompt)
    if parsed is None or parsed[0] not in world.by_name:
        return 0.0
    truth = world.by_name[parsed[0]].get(parsed[1]).lower()
    words = re.findall(r"[a-z]+", response.lower())
    total = 0.0
    total += 2.0 if truth in words else 0.0
    total += 1.0 if not HEDGES.intersection(words) else 0.0
    total += 1.0 if normalise(response) == truth else 0.0
    total += 1.0 if ended else 0.0
    return total


def oracle_reward(
    prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool], world_seed: int = 0
) -> list[float]:
    """The reward-function form PPO/GRPO call: one score per (prompt, response, ended-with-EOS), judged against
    built-in world `world_seed` (the stages hand it theirs)."""
    world = World(world_seed)
    return [score(world, p, r, e) for p, r, e in zip(prompts, responses, ended)]


def breaks_principles(response: str) -> bool:
    """Whether a reply breaks a principle of the built-in constitution, checked by rule: `concise` (the value
    alone: one word), `no_really`, `no_very`. The oracle's own score also checks the fact and the EOS; this is
    what the constitution asks for, measured outside the CAI loop."""
    words = re.findall(r"[a-z]+", response.lower())
    return len(words) != 1 or any(w in words for w in PRINCIPLE_WORDS)
