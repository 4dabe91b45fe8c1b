"""Judging a policy on held-out prompts: mean reward, win rate against a reference model, KL to it, length.

Both models sample `samples` replies per prompt at `temperature` (1.0: the models' own distributions, which is
what alignment changes). Sample k of the policy meets sample k of the reference for the same prompt:

    win_rate = P(r_policy > r_ref) + 0.5 * P(r_policy = r_ref)

With a bounded judge (the built-in oracle, maximum 5) a reference sample that already scores the maximum can only
be tied, so the best reachable win rate is `win_ceiling` = mean over reference samples of (0.5 if at the maximum
else 1); it is reported beside the win rate. The KL is the Monte Carlo estimate on the policy's own samples,

    KL(pi || pi_ref) ~= mean over samples of sum_t [log pi(y_t | .) - log pi_ref(y_t | .)]   (nats per reply)

and per token (the same sum divided by the reply lengths summed), as in the DPO paper's reward-KL frontier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmstages import losses as L
from llmstages.data.chat import Message, prompt_ids
from llmstages.data.lengths import fit_prompts
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model import GPT
from llmstages.model.generate import sample_many
from llmstages.rl.rollout import RewardFn, import_reward_fn, reply_rows, with_world


@dataclass
class Samples:
    """Replies to `prompts` (each repeated `samples` times, prompt-major) with their scores."""

    prompt_ids: list[list[int]]
    replies: list[list[int]]
    texts: list[str]
    ended: list[bool]
    scores: np.ndarray


@torch.no_grad()
def sample_and_score(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[list[Message]],
    reward_of: RewardFn,
    samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    seed: int = 0,
    batch_size: int = 256,
) -> Samples:
    """`samples` replies per prompt from `model` (seeded), scored by `reward_of`."""
    ids = [prompt_ids(m, tok) for m in prompts for _ in range(samples)]
    ids, _ = fit_prompts(ids, max_new_tokens, model.config.block_size, "max_new_tokens")  # cut from the left
    questions = [m[-1]["content"] for m in prompts for _ in range(samples)]
    replies, texts, ended = sample_many(model, tok, ids, max_new_tokens, temperature, seed, batch_size)
    scores = np.asarray(reward_of(questions, texts, ended), dtype=np.float64)
    return Samples(ids, replies, texts, ended, scores)


@torch.no_grad()
def reply_logprob(
    model: GPT, prompts: Sequence[list[int]], replies: Sequence[list[int]], pad_id: int, batch_size: int = 128
) -> torch.Tensor:
    """Summed log-prob of each reply given its prompt, shape (N,)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(prompts), batch_size):
        rows = reply_rows(prompts[s : s + batch_size], replies[s : s + batch_size], pad_id, device)
        logits = model(rows["input_ids"], mask=rows["mask"])
        out.append(L.sequence_logprobs(logits, rows["targets"])[0].float().cpu())
    model.train(was_training)
    return torch.cat(out)


def win_rate(policy_scores: np.ndarray, reference_scores: np.ndarray) -> float:
    """P(policy > reference) + 0.5 P(tie), sample against sample."""
    return float(np.mean((policy_scores > reference_scores) + 0.5 * (policy_scores == reference_scores)))


def pair_agreement(judged: np.ndarray, truth: np.ndarray, group: int) -> tuple[float, int]:
    """(accuracy, pairs): over every pair of replies to the same prompt (consecutive groups of `group`) that
    `truth` scores differently, how often `judged` orders them the same way; a tie of the judge counts half."""
    hits, pairs = 0.0, 0
    for g in range(0, len(truth), group):
        for i in range(g, g + group):
            for j in range(i + 1, g + group):
                if truth[i] != truth[j]:
                    pairs += 1
                    d = (judged[i] - judged[j]) * np.sign(truth[i] - truth[j])
                    hits += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return (hits / pairs if pairs else float("nan")), pairs


def compare(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[list[Message]],
    reward_of: RewardFn,
    reference: GPT | None = None,
    max_score: float | None = None,
    samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    seed: int = 0,
    judge: RewardFn | None = None,
    checks: Mapping[str, Callable[[str], bool]] | None = None,
) -> dict[str, float]:
    """The policy's reward and length; with a `reference` also its reward, the win rate and the KL; with a
    `max_score` (a bounded judge) the rate of replies below it (`violation_rate`) and the win-rate ceiling; with
    a `judge` (e.g. a reward model) how often it orders pairs of the policy's replies as `reward_of` does; for
    each of `checks` (name -> predicate on a reply) the share of replies it holds for (`{name}_rate`)."""
    pol = sample_and_score(model, tok, prompts, reward_of, samples, temperature, max_new_tokens, seed)
    lengths = np.asarray([len(r) for r in pol.replies], dtype=np.float64)
    out = {
        "reward": float(pol.scores.mean()),
        "reward_std": float(pol.scores.std()),
        "length": float(lengths.mean()),
        "samples": float(len(pol.texts)),
    }
    if max_score is not None:
        out["violation_rate"] = float(np.mean(pol.scores < max_score))
    for name, holds in (checks or {}).items():
        out[f"{name}_rate"] = float(np.mean([holds(t) for t in pol.texts]))
    if judge is not None:
        questions = [m[-1]["content"] for m in prompts for _ in range(samples)]
        judged = np.asarray(judge(questions, pol.texts, pol.ended), dtype=np.float64)
        out["judge_accuracy"], out["judge_pairs"] = pair_agreement(judged, pol.scores, samples)
    if reference is None:
        return out
    ref = sample_and_score(reference, tok, prompts, reward_of, samples, temperature, max_new_tokens, seed + 1)
    out.update(reference_reward=float(ref.scores.mean()), win_rate=win_rate(pol.scores, ref.scores))
    if max_score is not None:
        out["reference_violation_rate"] = float(np.mean(ref.scores < max_score))
        out["win_ceiling"] = float(np.mean(np.where(ref.scores >= max_score, 0.5, 1.0)))
    log_pi = reply_logprob(model, pol.prompt_ids, pol.replies, tok.pad_id)
    log_ref = reply_logprob(reference, pol.prompt_ids, pol.replies, tok.pad_id)
    diff = (log_pi - log_ref).numpy()
    out.update(kl=float(diff.mean()), kl_per_token=float(diff.sum() / max(lengths.sum(), 1.0)))
    return out


ORACLE = "llmstages.data.oracle:oracle_reward"


def evaluate_dir(
    model_dir: str,
    reference_dir: str | None = None,
    reward: str = ORACLE,
    data: Sequence[str] = (),
    samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    seed: int = 0,
    device: str = "cpu",
    judge: str | None = None,
    world_seed: int = 0,
) -> dict[str, float]:
    """`compare` from directories: `reward` and `judge` are `module:function` or a reward-model directory;
    `data` prompt files (empty: the built-in fact questions about world `world_seed`'s held-out people)."""
    from llmstages.config import RewardSourceArgs
    from llmstages.data.oracle import MAX_SCORE, breaks_principles
    from llmstages.data.preference import read_prompts
    from llmstages.data.prompts import builtin_prompts
    from llmstages.data.text import tokenizer_hash
    from llmstages.rl.rollout import reward_source
    from llmstages.store import load_model, load_tokenizer

    model = load_model(model_dir, device=device).eval()
    tok = load_tokenizer(model_dir)
    reference = None
    if reference_dir:
        reference = load_model(reference_dir, device=device).eval()
        if tokenizer_hash(load_tokenizer(reference_dir)) != tokenizer_hash(tok):
            raise UserError(f"--reference {reference_dir}: its tokenizer differs from the model's")

    def source(spec: str):
        is_dir = Path(spec).is_dir()
        args = RewardSourceArgs(fn=None if is_dir else spec, model=spec if is_dir else None)
        return reward_source(args, tok, device, world_seed)

    prompts = [m for _, m in read_prompts(list(data))] if data else builtin_prompts(world_seed, 8)[1]
    oracle = reward == ORACLE  # a bounded judge, and the built-in constitution's principles checked by rule
    return compare(
        model,
        tok,
        prompts,
        source(reward),
        reference,
        MAX_SCORE if oracle else None,
        samples,
        temperature,
        max_new_tokens,
        seed,
        source(judge) if judge else None,
        {"principle_violation": breaks_principles} if oracle else None,
    )


def label_agreement(paths: Sequence[str], reward: str = ORACLE, world_seed: int = 0) -> dict[str, float]:
    """How often a preference file's labels agree with a judge (by default the oracle; a reward-model directory
    gives that model's accuracy on the pairs), over the pairs the judge scores differently: `label_agreement`, with
    `label_pairs` such pairs of `labelled_pairs` in all."""
    from llmstages.data.preference import read_preferences

    if Path(reward).is_dir():  # a reward model: this is its accuracy on the file's pairs
        from llmstages.config import RewardSourceArgs
        from llmstages.rl.rollout import reward_source
        from llmstages.store import load_tokenizer

        score = reward_source(RewardSourceArgs(fn=None, model=reward), load_tokenizer(reward), "cpu")
    else:
        score = with_world(import_reward_fn(reward), world_seed)
    pairs = read_preferences(list(paths))
    prompts = [p.prompt[-1]["content"] for p in pairs]
    chosen = np.asarray(score(prompts, [p.chosen for p in pairs], [True] * len(pairs)), dtype=np.float64)
    rejected = np.asarray(score(prompts, [p.rejected for p in pairs], [True] * len(pairs)), dtype=np.float64)
    differ = chosen != rejected
    agree = float(np.mean(chosen[differ] > rejected[differ])) if differ.any() else float("nan")
    return {"label_agreement": agree, "label_pairs": float(differ.sum()), "labelled_pairs": float(len(pairs))}
