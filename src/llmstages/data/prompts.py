"""Built-in prompts and preference pairs for the alignment stages: fact questions about the world's training
people (RL prompts, and pairs sampled from a model and ranked by the oracle) and about its held-out people
(evaluation), or the user's prompt files."""

from __future__ import annotations

import torch

from llmstages.data.chat import Message, prompt_ids
from llmstages.data.lengths import fit_prompts
from llmstages.data.oracle import oracle_reward
from llmstages.data.preference import PreferencePair
from llmstages.data.tasks import QUESTIONS, split_people
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model.generate import sample_replies
from llmstages.model.gpt import GPT


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
    their first 64) or the built-in fact questions of world `world_seed` (training people / held-out people)."""
    if data.path:
        from llmstages.data.preference import read_prompts

        prompts = [m for _, m in read_prompts(data.path, data.columns)]
        return prompts, prompts[:64]
    return builtin_prompts(world_seed, data.heldout_people)


@torch.no_grad()
def builtin_preference_pairs(
    model: GPT,
    tok: Tokenizer,
    world_seed: int = 0,
    seed: int = 0,
    heldout_people: int = 8,
    samples: int = 2,
    max_new_tokens: int = 8,
    temperature: float = 1.0,
) -> list:
    """Preference pairs on built-in world `world_seed`: `samples` replies of `model` per training fact question
    (sampled with `seed`); every two distinct replies that the oracle scores differently become (chosen,
    rejected); ties are skipped."""

    prompts, _ = builtin_prompts(world_seed, heldout_people)
    ids = [prompt_ids(m, tok) for m in prompts for _ in range(samples)]
    ids, _ = fit_prompts(ids, max_new_tokens, model.config.block_size, "max_new_tokens")  # room for the replies
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed * 1_000_003 + 17)
    was_training = model.training
    model.eval()
    _, responses, ended = sample_replies(model, tok, ids, max_new_tokens, temperature, gen)
    model.train(was_training)
    texts = [m[-1]["content"] for m in prompts for _ in range(samples)]
    scores = oracle_reward(texts, responses, ended, world_seed)
    pairs = []
    for k, m in enumerate(prompts):
        seen = set()
        for i in range(k * samples, (k + 1) * samples):
            for j in range(k * samples, (k + 1) * samples):
                hi, lo = responses[i].strip(), responses[j].strip()
                if scores[i] > scores[j] and hi != lo and lo and (hi, lo) not in seen:
                    seen.add((hi, lo))
                    pairs.append(PreferencePair(tuple(m), hi, lo, f"builtin:{k}"))
    if not pairs:
        raise UserError(
            "the model's replies to the built-in questions all tie under the oracle: no pairs to learn from"
        )
    return pairs
