"""Built-in prompts and preference pairs for the alignment stages: fact questions about the world's training
people (RL prompts, and pairs sampled from a model and ranked by the oracle) and about its held-out people
(evaluation), arithmetic problems with their answers (data/arithmetic.py), or the user's prompt files."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from llmstages.data.chat import Message
from llmstages.data.tasks import QUESTIONS, split_people
from llmstages.errors import UserError


def builtin_prompts(world_seed: int, heldout: int) -> tuple[list[list[Message]], list[list[Message]]]:
    """Fact questions about the training people (for RL) and about held-out people (for evaluation)."""
    from llmstages.data.builtin import World

    train_people, held = split_people(World(world_seed), heldout)

    def qs(people):
        return [
            [{"role": "user", "content": q.format(n=p.name)}] for p in people for a in QUESTIONS for q in QUESTIONS[a]
        ]

    return qs(train_people), qs(held)


def prompt_sets(data, world_seed: int) -> tuple[list[list[Message]], list[list[Message]]]:
    """(training prompts, evaluation prompts) from `data` (PromptDataArgs): the user's prompt files (evaluated on
    their first 64) or the built-in prompts of world `world_seed` chosen by `data.builtin` (fact questions:
    training people / held-out people; arithmetic: its training / held-out problems)."""
    if data.path:
        from llmstages.data.preference import read_prompts

        prompts = [m for _, m in read_prompts(data.path, data.columns)]
        return prompts, prompts[:64]
    if data.builtin == "arithmetic":
        train, held = arithmetic_rows(data, world_seed)
        return train.prompts, held.prompts
    return builtin_prompts(world_seed, data.heldout_people)


RESERVED_COLUMNS = ("prompts", "responses", "ended", "world_seed")
"""Names a reward function's own arguments take: a prompt file's column cannot have them."""
EVAL_PROMPTS = 64
"""The most prompts an RL stage's evaluation scores."""


@dataclass
class PromptRows:
    """Prompts and their columns: `columns[name][i]` is prompt i's field `name` (None where its row has none)."""

    prompts: list[list[Message]]
    columns: dict[str, list[object]] = field(default_factory=dict)

    def take(self, idx: list[int]) -> PromptRows:
        return PromptRows([self.prompts[i] for i in idx], {k: [v[i] for i in idx] for k, v in self.columns.items()})


def read_prompt_table(paths: list[str], columns: dict[str, str]) -> PromptRows:
    """The user's prompt files as PromptRows; a column named as a reward function's own argument is refused."""
    from llmstages.data.preference import read_prompt_rows

    rows = read_prompt_rows(paths, columns)
    names = list(dict.fromkeys(k for _, _, extra in rows for k in extra))
    for where, _, extra in rows:
        clash = [k for k in extra if k in RESERVED_COLUMNS]
        if clash:
            raise UserError(
                f"{where}: the column '{clash[0]}' has the name of a reward function's own argument "
                f"({', '.join(RESERVED_COLUMNS)}); rename it"
            )
    return PromptRows([m for _, m, _ in rows], {k: [extra.get(k) for _, _, extra in rows] for k in names})


def arithmetic_rows(data, world_seed: int) -> tuple[PromptRows, PromptRows]:
    """The built-in arithmetic problems of `world_seed` (data/arithmetic.py, sized by `data`'s arithmetic_* keys):
    (training rows, EVAL_PROMPTS held-out rows), each with its `answer` column."""
    from llmstages.data.arithmetic import arithmetic_problems

    train, held = arithmetic_problems(
        world_seed, data.arithmetic_train, EVAL_PROMPTS, data.arithmetic_digits, data.arithmetic_words
    )

    def rows(problems) -> PromptRows:
        return PromptRows(
            [[{"role": "user", "content": p.question}] for p in problems], {"answer": [p.answer for p in problems]}
        )

    return rows(train), rows(held)


def prompt_split(data, world_seed: int, seed: int) -> tuple[PromptRows, PromptRows]:
    """(training prompts, evaluation prompts) of an RL stage from `data` (PromptDataArgs), with their columns.

    The user's prompt files: a share `data.val_fraction` of their rows, drawn with `seed`, is held out (training
    never sees it) and the evaluation scores its first EVAL_PROMPTS; the training rows keep the files' order. With
    val_fraction 0 the evaluation scores the first EVAL_PROMPTS training prompts. The built-in prompts of world
    `world_seed` (`data.builtin`): the fact questions of the training people and of the held-out people (no
    columns), or the arithmetic problems' training and held-out splits (an `answer` column)."""
    if not data.path and data.builtin == "arithmetic":
        return arithmetic_rows(data, world_seed)
    if not data.path:
        train, held = builtin_prompts(world_seed, data.heldout_people)
        return PromptRows(train), PromptRows(held)
    rows = read_prompt_table(data.path, data.columns)
    n = len(rows.prompts)
    if data.val_fraction <= 0:
        return rows, rows.take(list(range(min(n, EVAL_PROMPTS))))
    n_val = max(1, round(n * data.val_fraction))
    if n_val >= n:
        raise UserError(
            f"data.val_fraction={data.val_fraction} holds out all {n} prompts of {', '.join(map(str, data.path))}; "
            "lower it (or 0: no held-out prompts)"
        )
    held = sorted(random.Random(seed).sample(range(n), n_val))
    is_held = set(held)
    return rows.take([i for i in range(n) if i not in is_held]), rows.take(held[:EVAL_PROMPTS])
