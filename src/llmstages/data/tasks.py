"""Built-in instruction tasks drawn from the built-in world, each with its answer and an exact-match checker.

- facts: "Where does Ada live?" -> "Oakfield" (four attributes, several phrasings). The held-out split asks
  about people whose questions never appear in training; their facts were in the pre-training corpus.
- arithmetic: "What is two plus three?" -> "five".
- strings: copy, reverse or sort a short list of words.
- judging (the feedback Constitutional AI asks for): "Does the answer 'Oakfield, really' use the word
  'really'?" -> "Yes"/"No", "Which answer is shorter, (A) ... or (B) ...?" -> "A"/"B", built from the same
  tables (JUDGE_TEMPLATES), and "Answer with the value only: <fact question>" -> the value (PLAIN).

Answers are one to three words and the assistant turn ends with EOS, so exact match is meaningful early.

Answer styles (`styles=True`, the default): training fact replies come in three styles, so that the SFT model's
samples differ in ways the preference oracle scores and alignment has something to learn (shared notes: ~50%
oracle violations at temperature 1). 40% clean ("Oakfield"), 20% a polite tail ("Oakfield, as always"), 40% a
tail with a word the oracle bans ("Oakfield, really", "Oakfield, very nice"; the corpus's filler sentences use
them freely). Every tail word is a whole word of the pre-training corpus, so the tiny vocabulary does not split
it into fragments; a tail naming a second value ("Oakfield, or Ashford") was tried and taught the tiny model to
name wrong values (fact accuracy fell from ~75% to ~15%). Held-out references are the plain value, and
a reply counts as correct when its first clause (before a comma) is the value: style is alignment's business.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmstages.data.builtin import COLOURS, NUMBER_WORDS, PETS, World

QUESTIONS = {
    "town": ("Where does {n} live?", "In which town does {n} live?", "What is the town of {n}?"),
    "colour": (
        "What is the favourite colour of {n}?",
        "Which colour does {n} like best?",
        "What colour does {n} like?",
    ),
    "pet": ("What pet does {n} have?", "Which animal does {n} keep?", "What is the pet of {n}?"),
    "job": ("What is the job of {n}?", "What does {n} work as?", "What is {n}'s job?"),
}
POLITE_TAILS = ("as always", "a good one")
BANNED_TAILS = ("really", "very nice", "really good")
BANNED_WORDS = ("really", "very")  # the oracle's banned words in the styled replies; a judging task asks about them
STYLE_WEIGHTS = {"clean": 0.4, "polite": 0.2, "banned": 0.4}
STYLE_COPIES = 3  # each styled question appears this often, each copy in its own style


@dataclass(frozen=True)
class Task:
    """A prompt, its reference answer, and the reply trained on (the answer itself unless styled)."""

    kind: str
    prompt: str
    answer: str
    reply: str = ""

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.reply or self.answer}]

    def check(self, response: str) -> bool:
        """The reply's first clause is the answer (a styled tail after a comma does not make it wrong)."""
        return answer_part(response) == normalise(self.answer)


def normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").lower().split())


def answer_part(text: str) -> str:
    """The normalised first clause of a reply: "Oakfield, or Ashford" -> "oakfield"."""
    return normalise(text.split(",", 1)[0])


def styled_reply(value: str, rng: random.Random) -> str:
    """`value` in one of the answer styles, drawn with STYLE_WEIGHTS."""
    style = rng.choices(list(STYLE_WEIGHTS), list(STYLE_WEIGHTS.values()))[0]
    if style == "clean":
        return value
    if style == "polite":
        return f"{value}, {rng.choice(POLITE_TAILS)}"
    return f"{value}, {rng.choice(BANNED_TAILS)}"


def split_people(world: World, heldout: int = 8) -> tuple[list, list]:
    """(train people, held-out people): the last `heldout` of the world's seed-shuffled order are held out."""
    return world.people[:-heldout], world.people[-heldout:]


def plain_fact_tasks(people) -> list[Task]:
    """Fact questions behind the PLAIN instruction, answered with the value alone (clean style)."""
    return [Task("fact_plain", PLAIN.format(question=t.prompt), t.answer) for t in fact_tasks(people)]


def fact_tasks(people, rng: random.Random | None = None, styles: int = 0) -> list[Task]:
    """Every phrasing of every attribute question about `people`; with `styles` > 0, that many copies of each,
    every copy's reply in an independently drawn style."""
    rng = rng or random.Random(0)
    out = []
    for p in people:
        for attribute, phrasings in QUESTIONS.items():
            value = p.get(attribute)
            for q in phrasings:
                for _ in range(max(styles, 1)):
                    reply = styled_reply(value, rng) if styles else ""
                    out.append(Task(f"fact_{attribute}", q.format(n=p.name), value, reply))
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


# The judging and revising tasks, as templates; the built-in constitution (configs/cai/builtin.yaml) asks in
# exactly these words, so that the tiny model's feedback is a task it was fine-tuned on.
JUDGE_TEMPLATES = {
    "judge_word": "Does the answer '{response}' use the word '{word}'?",  # Yes / No
    "judge_short": "Is the answer '{response}' short?",  # Yes when it is the value alone
    "judge_shorter": "Which answer is shorter, (A) '{a}' or (B) '{b}'?",  # A / B
    "judge_clean": "Which answer does not use the word '{word}', (A) '{a}' or (B) '{b}'?",  # A / B
}
# The instruction that asks for the clean style; the built-in constitution's revision request. (Rewriting a given
# answer, "Shorten the answer 'Oakfield, really'", was tried: the tiny model cannot copy text from its prompt,
# as the copy tasks show, and stayed at ~10%.)
PLAIN = "Answer with the value only: {question}"


def answer_lines(copies: int = 200) -> list[str]:
    """Extra text for a tokenizer trained on the built-in corpus, so that every judging answer (Yes, No and the
    options A, B) is one token after the chat template's space, whatever names the world draws: Constitutional AI
    reads a preference from one next-token distribution. (A world without a name starting with B left " B"
    unmerged, measured.)"""
    return ["Answers: Yes No A B"] * copies


def judge_tasks(world: World, rng: random.Random, n: int) -> list[Task]:
    """`n` judging tasks about styled fact answers, the kinds of JUDGE_TEMPLATES in turn. Each judges or compares
    answers with the same value, so judging is about style, never about the facts."""
    out = []
    kinds = list(JUDGE_TEMPLATES)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        value = rng.choice(world.people).get(rng.choice(("town", "colour", "pet", "job")))
        polite, banned = f"{value}, {rng.choice(POLITE_TAILS)}", f"{value}, {rng.choice(BANNED_TAILS)}"
        answer = rng.choice((value, polite, banned))
        t = JUDGE_TEMPLATES[kind]
        if kind == "judge_word":
            word = rng.choice(BANNED_WORDS)
            uses = word in answer.split()
            out.append(Task(kind, t.format(response=answer, word=word), "Yes" if uses else "No"))
        elif kind == "judge_short":
            out.append(Task(kind, t.format(response=answer), "Yes" if answer == value else "No"))
        else:
            if kind == "judge_shorter":
                good, bad, word = value, rng.choice((polite, banned)), None
            else:
                bad = banned
                word = next(w for w in BANNED_WORDS if w in banned.split())
                good = rng.choice((value, polite))
            first_good = rng.random() < 0.5
            a, b = (good, bad) if first_good else (bad, good)
            out.append(Task(kind, t.format(a=a, b=b, word=word), "A" if first_good else "B"))
    return out


def builtin_tasks(
    seed: int = 0, heldout_people: int = 8, n_other: int = 200, n_judge: int = 1200, styles: bool = True
) -> dict[str, list[Task]]:
    """{"train": [...], "heldout": [...]}: fact questions split by person; `n_other` arithmetic and string tasks
    and `n_judge` judging tasks split by drawing (4/5 train). `styles`: training fact replies in the mixed
    answer styles (held-out references stay plain)."""
    world = World(seed)
    train_people, held = split_people(world, heldout_people)
    rng = random.Random(seed + 17)
    train = fact_tasks(train_people, random.Random(seed + 29), STYLE_COPIES if styles else 0)
    heldout = fact_tasks(held)
    if styles:  # the instruction that asks for the clean style (the built-in constitution's revision request)
        train += plain_fact_tasks(train_people)
        heldout += plain_fact_tasks(held)
    others = arithmetic_tasks(rng, n_other // 2) + string_tasks(rng, n_other // 2) + judge_tasks(world, rng, n_judge)
    rng.shuffle(others)
    cut = len(others) * 4 // 5
    seen = {t.prompt for t in others[:cut]}
    train += others[:cut]
    heldout += [t for t in others[cut:] if t.prompt not in seen]
    rng.shuffle(train)
    return {"train": train, "heldout": heldout}
