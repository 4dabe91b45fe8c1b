"""What a model knows of the built-in world: fact recall of a base model ("Ada lives in" -> Ada's town, plain
text) and fact accuracy of a chat model (greedy answers to the held-out people's fact questions)."""

from __future__ import annotations

import torch

from llmstages.data.builtin import World
from llmstages.data.tasks import fact_tasks, plain_fact_tasks, split_people
from llmstages.data.tokenizer import Tokenizer
from llmstages.model import GPT, generate

# One completion prompt per attribute; each is the start of a phrasing the corpus uses.
PROMPTS = {
    "town": "{n} lives in",
    "colour": "The favourite colour of {n} is",
    "pet": "The pet of {n} is a",
    "job": "{n} works as a",
}


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?").lower() if words else ""


@torch.no_grad()
def fact_recall(model: GPT, tok: Tokenizer, world: World, batch_size: int = 64) -> dict[str, float]:
    """Share of (person, attribute) facts whose greedy completion starts with the right value."""
    items = [(p, a) for p in world.people for a in PROMPTS]
    correct = {a: 0 for a in PROMPTS}
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [tok.encode(PROMPTS[a].format(n=p.name)) for p, a in chunk]
        out = generate(model, prompts, 3, temperature=0.0, pad_id=tok.pad_id)
        for (p, a), row in zip(chunk, out.tokens.tolist()):
            correct[a] += first_word(tok.decode(row)) == p.get(a).lower()
    n = len(world.people)
    result = {f"recall_{a}": c / n for a, c in correct.items()}
    result["recall"] = sum(correct.values()) / len(items)
    return result


def fact_accuracy(model: GPT, tok: Tokenizer, world_seed: int = 0, heldout: int = 8) -> float:
    """Share of the held-out people's fact questions whose greedy reply starts with the true value: every
    attribute and phrasing, asked plainly and behind the "value only" instruction (8 people: 192 questions), what
    alignment must not lose."""
    from llmstages.eval.lm import builtin_items, exact_match

    _, held = split_people(World(world_seed), heldout)
    tasks = fact_tasks(held) + plain_fact_tasks(held)
    return exact_match(model, tok, builtin_items(tok, tasks))["task_accuracy"]
