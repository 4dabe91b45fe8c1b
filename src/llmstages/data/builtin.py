"""The built-in world: a seeded table of people and their attributes, rendered as a pre-training corpus.

Sized for a ~3M-parameter model and a couple of CPU minutes (see shared/BUILTIN_WORLD.md): 32 people, four
attributes each (town, colour, pet, job), every fact stated in five or six phrasings, plus short stories that
only ever restate true facts, and arithmetic lines. Every stated fact is a row of the table, so later stages ask
about it (SFT questions), judge answers against it (the preference oracle) and measure recall. One seed (the
world seed) fixes the world, the corpus and every split.

Every sentence names its person before the value ("Ada lives in Oakfield", never "In Oakfield lives Ada"): a
value that follows another person's name ("Ada went to Bram's town") or comes before its owner teaches the
small model nothing it can recall from the name and, measured, delays storing that attribute past the
pre-training budget (town rosters and such story lines left town recall at 23-50% after 1M tokens). 32
people rather than 40 give each fact a quarter more exposures within the same budget.

The corpus is plain English-like prose. Chat-formatted text is deliberately absent, so that what SFT adds
(following the question-answer format) stays visible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

NAMES = (
    "Ada",
    "Bram",
    "Cleo",
    "Dev",
    "Edda",
    "Finn",
    "Gus",
    "Hana",
    "Ivo",
    "Juno",
    "Kai",
    "Lena",
    "Milo",
    "Nora",
    "Otto",
    "Pia",
    "Quin",
    "Rosa",
    "Sami",
    "Tess",
    "Uma",
    "Vito",
    "Wren",
    "Xena",
    "Yara",
    "Zeno",
    "Alma",
    "Bela",
    "Cato",
    "Dora",
    "Elio",
    "Faye",
    "Gino",
    "Hugo",
    "Iris",
    "Jade",
    "Kira",
    "Luca",
    "Mara",
    "Nico",
    "Olga",
    "Paco",
)
TOWNS = ("Oakfield", "Millbrook", "Ashford", "Riverton", "Stonebay", "Fernhill", "Westmoor", "Lakeside")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
PETS = ("cat", "dog", "parrot", "rabbit", "horse", "goat", "turtle", "hamster")  # each takes "a"
JOBS = ("baker", "farmer", "teacher", "painter", "doctor", "sailor", "builder", "tailor")  # each takes "a"
ATTRIBUTES = ("town", "colour", "pet", "job")
VALUES = {"town": TOWNS, "colour": COLOURS, "pet": PETS, "job": JOBS}

# Five or six ways to state each attribute. {n} is the person, {v} the value.
PHRASINGS = {
    "town": (
        "{n} lives in {v}.",
        "{n} has a house in {v}.",
        "The home of {n} is in {v}.",
        "{n} comes from {v}.",
        "{n} is at home in {v}.",
        "The town of {n} is {v}.",
    ),
    "colour": (
        "{n} likes the colour {v}.",
        "The favourite colour of {n} is {v}.",
        "{n} loves {v} things.",
        "{n} always wears {v}.",
        "Of all colours, {n} likes {v} best.",
    ),
    "pet": (
        "{n} has a {v}.",
        "{n} keeps a {v} at home.",
        "The pet of {n} is a {v}.",
        "{n} looks after a {v}.",
        "At home, {n} feeds a {v}.",
    ),
    "job": (
        "{n} works as a {v}.",
        "{n} is a {v}.",
        "The job of {n} is {v}.",
        "{n} earns a living as a {v}.",
        "Every day {n} goes to work as a {v}.",
    ),
}

# Sentences that carry no fact; "very" and "really" appear freely here (a later oracle can ban them).
FILLERS = (
    "{n} is very kind.",
    "{n} is really busy today.",
    "Everyone says {n} is very friendly.",
    "{n} smiles a lot.",
    "The weather is very nice today.",
    "{n} had a really good week.",
)
DOCUMENT_WEIGHTS = (55, 35, 10)  # profiles, stories, arithmetic
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    colour: str
    pet: str
    job: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)


class World:
    """People and their attributes, fixed by `seed`. `people` is in a fixed, seed-shuffled order."""

    def __init__(self, seed: int = 0, n_people: int = 32) -> None:
        if not 1 <= n_people <= len(NAMES):
            raise ValueError(f"n_people must be in 1..{len(NAMES)}")
        self.seed = seed
        rng = random.Random(seed)
        names = rng.sample(NAMES, n_people)
        self.people = [Person(n, *(rng.choice(VALUES[a]) for a in ATTRIBUTES)) for n in names]
        self.by_name = {p.name: p for p in self.people}

    def fact(self, person: Person, attribute: str, rng: random.Random) -> str:
        """One true sentence about `person`'s `attribute`, in a random phrasing."""
        return rng.choice(PHRASINGS[attribute]).format(n=person.name, v=person.get(attribute))

    @cached_property
    def facts(self) -> list[tuple[str, str, str]]:
        """Every (name, attribute, value) row of the table."""
        return [(p.name, a, p.get(a)) for p in self.people for a in ATTRIBUTES]

    # -- documents -----------------------------------------------------------------------------------------------
    def profile(self, rng: random.Random) -> str:
        p = rng.choice(self.people)
        sentences = [self.fact(p, a, rng) for a in ATTRIBUTES]
        if rng.random() < 0.5:
            sentences.append(rng.choice(FILLERS).format(n=p.name))
        rng.shuffle(sentences)
        return " ".join(sentences)

    def story(self, rng: random.Random) -> str:
        """A short story of two people that restates only true facts."""
        a, b = rng.sample(self.people, 2)
        lines = [
            f"One day {a.name} went to see {b.name} in {b.town}.",
            f"{b.name} is a {b.job} there and has a {b.pet}.",
            f"{a.name} brought a {a.colour} gift, because {a.colour} is the colour {a.name} likes best.",
            f"Then {a.name} went home to {a.town}.",
        ]
        if rng.random() < 0.5:
            lines.insert(2, rng.choice(FILLERS).format(n=rng.choice((a, b)).name))
        return " ".join(lines)

    def arithmetic(self, rng: random.Random) -> str:
        lines = []
        for _ in range(4):
            x, y = rng.randint(0, 5), rng.randint(0, 5)
            if rng.random() < 0.5:
                lines.append(f"{NUMBER_WORDS[x].capitalize()} plus {NUMBER_WORDS[y]} is {NUMBER_WORDS[x + y]}.")
            else:
                hi, lo = max(x, y), min(x, y)
                lines.append(f"{NUMBER_WORDS[hi].capitalize()} minus {NUMBER_WORDS[lo]} is {NUMBER_WORDS[hi - lo]}.")
        return " ".join(lines)

    def documents(self, size_bytes: int, seed: int | None = None) -> list[str]:
        """Documents until their text reaches `size_bytes`, drawn by DOCUMENT_WEIGHTS."""
        rng = random.Random(self.seed * 7919 + 1 if seed is None else seed)
        kinds = (self.profile, self.story, self.arithmetic)
        weights = DOCUMENT_WEIGHTS
        docs, total = [], 0
        while total < size_bytes:
            doc = rng.choices(kinds, weights)[0](rng)
            docs.append(doc)
            total += len(doc) + 1
        return docs


def builtin_corpus(seed: int = 0, size_mb: float = 1.5) -> list[str]:
    """The pre-training corpus of the built-in world for `seed` (a list of documents)."""
    return World(seed).documents(int(size_mb * 1e6))
