"""Language-model evaluations for `llmstages eval`: perplexity on held-out text, exact-match accuracy on tasks,
a reward model's accuracy on preference pairs, and sample generations.

    perplexity = exp(mean over tokens of -log p(token | the tokens before it, within a window of block_size))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmstages.data.chat import Example, padded_batch, prompt_ids
from llmstages.data.lengths import GenerationFit, fit_generation
from llmstages.data.tasks import Task, answer_part, normalise
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model import GPT, generate


@dataclass
class EvalItem:
    """A held-out prompt (token ids up to the assistant turn), its reference answer and its kind."""

    prompt: list[int]
    answer: str
    kind: str


def builtin_items(tok: Tokenizer, held: list[Task]) -> list[EvalItem]:
    """Exact-match items of built-in held-out tasks: the user turn as the prompt, the task's answer."""
    return [EvalItem(prompt_ids(t.messages()[:1], tok), t.answer, t.kind) for t in held]


def conversation_item(tok: Tokenizer, msgs: list[dict]) -> EvalItem:
    """An exact-match item of a conversation: everything before its last assistant turn, and that turn."""
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return EvalItem(prompt_ids(msgs[:last], tok), msgs[last]["content"], "user")


def fit_items(
    items: list[EvalItem], tok: Tokenizer, context: int, max_new_tokens: int | None = None
) -> tuple[list[EvalItem], GenerationFit]:
    """The items with their prompts fitted to `context` together with the new tokens exact match generates
    (`max_new_tokens`, by default the longest answer + 2), by data/lengths.py's policy: prompts cut from the left,
    fewer new tokens only when a prompt would keep less than half the context; (items, the fitted generation)."""
    asked = max_new_tokens or max(len(tok.encode(i.answer)) for i in items) + 2
    gen = fit_generation([i.prompt for i in items], asked, context)
    return [EvalItem(p, i.answer, i.kind) for p, i in zip(gen.prompts, items)], gen


@torch.no_grad()
def exact_match(
    model: GPT, tok: Tokenizer, items: list[EvalItem], batch_size: int = 64, max_new_tokens: int | None = None
) -> dict[str, float]:
    """Greedy answers to held-out prompts against the references, overall and per task kind: correct when the
    reply's first clause is the reference (`task_accuracy`), exact when the whole reply is (`exact_reply`).
    Prompts too long for the model's context are fitted to it (`fit_items`)."""
    if not items:
        return {}
    hits: dict[str, list[int]] = {}
    exact: list[int] = []
    items, gen = fit_items(items, tok, model.config.block_size, max_new_tokens)
    max_new = gen.max_new_tokens
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        out = generate(model, [i.prompt for i in chunk], max_new, eos_id=tok.eos_id, pad_id=tok.pad_id)
        for item, row, n in zip(chunk, out.tokens.tolist(), out.lengths.tolist()):
            answer = tok.decode(row[:n])
            hits.setdefault(item.kind, []).append(int(answer_part(answer) == normalise(item.answer)))
            exact.append(int(normalise(answer) == normalise(item.answer)))
    result = {
        "task_accuracy": float(np.mean([h for v in hits.values() for h in v])),
        "exact_reply": float(np.mean(exact)),
    }
    result.update({f"accuracy/{k}": float(np.mean(v)) for k, v in sorted(hits.items())})
    return result


@torch.no_grad()
def perplexity(model: GPT, tok: Tokenizer, documents: Sequence[str], batch_size: int = 8) -> dict[str, float]:
    """Documents joined with EOS, cut into windows of the model's context; every token after the first of a
    window is predicted from the tokens before it in that window."""
    from llmstages.losses import count_targets, lm_loss

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


def builtin_heldout_text(world_seed: int = 0, size_mb: float = 1.5, val_fraction: float = 0.05) -> list[str]:
    """The built-in corpus's validation documents, the split pre-training holds out with the same settings."""
    from llmstages.data.builtin import builtin_corpus
    from llmstages.data.text import val_picker

    is_val = val_picker(val_fraction, world_seed)
    return [d for d in builtin_corpus(world_seed, size_mb) if is_val()]


def task_accuracy(model: GPT, tok: Tokenizer, paths: Sequence[str], world_seed: int = 0) -> dict[str, float]:
    """Exact match (first clause, and whole reply) on SFT-format files' last assistant turns, or on the built-in
    tasks about the held-out people when no file is given."""
    from llmstages.data.chat import read_conversations
    from llmstages.data.tasks import builtin_tasks

    if paths:
        items = [conversation_item(tok, msgs) for _, msgs in read_conversations(list(paths))]
    else:
        items = builtin_items(tok, builtin_tasks(world_seed, 8)["heldout"])
    if not items:
        raise UserError("--tasks: no conversation with an assistant turn to check")
    items, gen = fit_items(items, tok, model.config.block_size)
    result = exact_match(model, tok, items, max_new_tokens=gen.max_new_tokens)
    return {**result, "tasks": float(len(items)), "tasks_truncated": float(gen.cut)}


def heldout_questions(n: int, world_seed: int = 0) -> list[str]:
    """n built-in questions about the held-out people, spread over people and attributes (every 12th)."""
    from llmstages.data.prompts import builtin_prompts

    return [m[-1]["content"] for m in builtin_prompts(world_seed, 8)[1][::12][:n]]


def show(model: GPT, tok: Tokenizer, questions: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy replies to `questions` (user turns), one line each."""
    from llmstages.data.chat import prompt_ids

    ids = [prompt_ids([{"role": "user", "content": q}], tok) for q in questions]
    gen = fit_generation(ids, max_new_tokens, model.config.block_size)
    out = generate(model, gen.prompts, gen.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return [tok.decode(r[:n]).strip() for r, n in zip(out.tokens.tolist(), out.lengths.tolist())]
