"""Preference pairs sampled from a policy on the built-in world, scored by the world's oracle (the reward model's
and DPO's built-in data)."""

from __future__ import annotations

import torch

from llmstages.data.chat import prompt_ids
from llmstages.data.lengths import fit_prompts
from llmstages.data.oracle import oracle_reward
from llmstages.data.preference import PreferencePair
from llmstages.data.prompts import builtin_prompts
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model.generate import sample_replies
from llmstages.model.gpt import GPT


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
