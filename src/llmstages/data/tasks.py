"""Built-in instruction tasks drawn from the built-in world, each with its answer and an exact-match checker.

- facts: "Where does Ada live?" -> "Oakfield" (four attributes, several phrasings). The held-out split asks
  about people whose questions never appear in training; their facts were in the pre-training corpus.
- arithmetic: "What is two plus three?" -> "five".
- strings: copy, reverse or sort a short list of words.
- judging (for Constitutional AI later): "Does this answer use the word 'very'?" -> "Yes"/"No", and
  "Which answer is shorter, (A) or (B)?" -> "A"/"B", built from the same tables.

Answers are one to three words and the assistant turn ends with EOS, so exact match is meaningful early.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmstages.data.builtin import COLOURS, NUMBER_WORDS, PETS, World

QUESTIONS = {
    "town": ("Where does {n} live?", "In which town does {n} live?", "What is the town of {n}?"),
    "colour": ("What is the favourite colour of {n}?", "Which colour does {n} like best?",
               "What colour does {n} like?"),
    "pet": ("What pet does {n} have?", "Which animal does {n} keep?", "What is the pet of {n}?"),
    "job": ("What is the job of {n}?", "What does {n} work as?", "What is {n}'s job?"),
}  # fmt: skip
HEDGED_TAILS = ("very", "really")  # words a judging task asks about


@dataclass(frozen=True)
class Task:
    kind: str
    prompt: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]

    def check(self, response: str) -> bool:
        return normalise(response) == normalise(self.answer)


def normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").lower().split())


def split_people(world: World, heldout: int = 8) -> tuple[list, list]:
    """(train people, held-out people): the last `heldout` of the world's seed-shuffled order are held out."""
    return world.people[:-heldout], world.people[-heldout:]


def fact_tasks(people, rng: random.Random | None = None, all_phrasings: bool = True) -> list[Task]:
    out = []
    for p in people:
        for attribute, phrasings in QUESTIONS.items():
            chosen = phrasings if all_phrasings else (rng or random.Random(0)).sample(phrasings, 1)
            out += [Task(f"fact_{attribute}", q.format(n=p.name), p.get(attribute)) for q in chosen]
    return out


def arithmetic_tasks(rng: random.Random, n: int) -> list[Task]:
    out = []
    for _ in range(n):
        x, y = rng.randint(0, 5), rng.randint(0, 5)
        if rng.random() < 0.5:
            out.append(Task("arithmetic", f"What is {NUMBER_WORDS[x]} plus {NUMBER_WORDS[y]}?", NUMBER_WORDS[x + y]))
        else:
            hi, lo = max(x, y), min(x, y)
            out.append(
                Task("arithmetic", f"What is {NUMBER_WORDS[hi]} minus {NUMBER_WORDS[lo]}?", NUMBER_WORDS[hi - lo])
            )
    return out


def string_tasks(rng: random.Random, n: int) -> list[Task]:
    words = list(COLOURS) + list(PETS)
    out = []
    for _ in range(n):
        items = rng.sample(words, rng.randint(2, 3))
        kind = rng.choice(("copy", "reverse", "sort"))
        answer = {"copy": items, "reverse": items[::-1], "sort": sorted(items)}[kind]
        out.append(Task(kind, f"{kind.capitalize()} the words: {' '.join(items)}", " ".join(answer)))
    return out


def judge_tasks(world: World, rng: random.Random, n: int) -> list[Task]:
    """Yes/No "does the answer use the word W?" and A/B "which answer is shorter?" about fact answers."""
    out = []
    for _ in range(n):
        p = rng.choice(world.people)
        value = p.get(rng.choice(("town", "colour", "pet", "job")))
        if rng.random() < 0.5:
            word = rng.choice(HEDGED_TAILS)
            uses = rng.random() < 0.5
            answer = f"{value}, {word} much" if uses else f"{value}"
            out.append(
                Task("judge_word", f"Does the answer '{answer}' use the word '{word}'?", "Yes" if uses else "No")
            )
        else:
            short, long = value, f"{value}, I think, {rng.choice(HEDGED_TAILS)} much"
            first_short = rng.random() < 0.5
            a, b = (short, long) if first_short else (long, short)
            out.append(Task("judge_shorter", f"Which answer is shorter, (A) '{a}' or (B) '{b}'?",
                            "A" if first_short else "B"))  # fmt: skip
    return out


def builtin_tasks(seed: int = 0, heldout_people: int = 8, n_other: int = 300) -> dict[str, list[Task]]:
    """{"train": [...], "heldout": [...]}: fact questions split by person, other tasks split by drawing."""
    world = World(seed)
    train_people, held = split_people(world, heldout_people)
    rng = random.Random(seed + 17)
    train = fact_tasks(train_people)
    heldout = fact_tasks(held)
    others = (
        arithmetic_tasks(rng, n_other // 3) + string_tasks(rng, n_other // 3) + judge_tasks(world, rng, n_other // 3)
    )
    rng.shuffle(others)
    cut = len(others) * 4 // 5
    seen = {t.prompt for t in others[:cut]}
    train += others[:cut]
    heldout += [t for t in others[cut:] if t.prompt not in seen]
    rng.shuffle(train)
    return {"train": train, "heldout": heldout}
