"""Language-model evaluations for `llmstages eval`: perplexity on held-out text, exact-match accuracy on tasks,
a reward model's accuracy on preference pairs, and sample generations.

    perplexity = exp(mean over tokens of -log p(token | the tokens before it, within a window of block_size))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llmstages.data.chat import Example, padded_batch
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model import GPT, generate


@torch.no_grad()
def perplexity(model: GPT, tok: Tokenizer, documents: Sequence[str], batch_size: int = 8) -> dict[str, float]:
    """Documents joined with EOS, cut into windows of the model's context; every token after the first of a
    window is predicted from the tokens before it in that window."""
    from llmstages.train.loop import count_targets, lm_loss

    if tok.eos_id is None:
        raise UserError("perplexity: the tokenizer has no EOS token to join documents with")
    ids = [t for d in documents for t in [*tok.encode(d), tok.eos_id]]
    T = model.config.block_size
    rows = [ids[s : s + T + 1] for s in range(0, max(len(ids) - 1, 0), T)]
    rows = [r for r in rows if len(r) > 1]
    if not rows:
        raise UserError("perplexity: no text to evaluate")
    total, count = 0.0, 0
    device = next(model.parameters()).device
    examples = [Example(r, r) for r in rows]  # every token a target
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in padded_batch(examples[s : s + batch_size], tok.pad_id).items()}
        loss, _ = lm_loss(model, batch)
        total, count = total + float(loss), count + count_targets(batch)
    return {"val_loss": total / count, "perplexity": math.exp(total / count), "perplexity_tokens": float(count)}


def builtin_heldout_text(seed: int = 0, size_mb: float = 1.5, val_fraction: float = 0.05) -> list[str]:
    """The built-in corpus's validation documents, the split pre-training holds out with the same settings."""
    from llmstages.data.builtin import builtin_corpus
    from llmstages.data.text import val_picker

    is_val = val_picker(val_fraction, seed)
    return [d for d in builtin_corpus(seed, size_mb) if is_val()]


def task_accuracy(model: GPT, tok: Tokenizer, paths: Sequence[str], seed: int = 0) -> dict[str, float]:
    """Exact match (first clause, and whole reply) on SFT-format files' last assistant turns, or on the built-in
    tasks about the held-out people when no file is given."""
    from llmstages.data.chat import read_conversations
    from llmstages.data.tasks import builtin_tasks
    from llmstages.stages.sft import builtin_items, conversation_item, exact_match

    if paths:
        items = [conversation_item(tok, msgs) for _, msgs in read_conversations(list(paths))]
    else:
        items = builtin_items(tok, builtin_tasks(seed, 8)["heldout"])
    if not items:
        raise UserError("--tasks: no conversation with an assistant turn to check")
    room = max(len(tok.encode(i.answer)) for i in items) + 2  # what exact_match generates
    fits = [i for i in items if len(i.prompt) + room <= model.config.block_size]
    if not fits:
        raise UserError(f"--tasks: every prompt is too long for the model's context of {model.config.block_size}")
    return {**exact_match(model, tok, fits), "tasks": float(len(fits)), "tasks_too_long": float(len(items) - len(fits))}


def heldout_questions(n: int, seed: int = 0) -> list[str]:
    """n built-in questions about the held-out people, spread over people and attributes (every 12th)."""
    from llmstages.train.rollout import builtin_prompts

    return [m[-1]["content"] for m in builtin_prompts(seed, 8)[1][::12][:n]]


def show(model: GPT, tok: Tokenizer, questions: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy replies to `questions` (user turns), one line each."""
    from llmstages.data.chat import prompt_ids

    ids = [prompt_ids([{"role": "user", "content": q}], tok) for q in questions]
    out = generate(model, ids, max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return [tok.decode(r[:n]).strip() for r, n in zip(out.tokens.tolist(), out.lengths.tolist())]
