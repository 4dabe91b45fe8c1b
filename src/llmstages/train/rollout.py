"""Plumbing shared by the RL stages (GRPO, PPO): the policy they start from, reward sources, and turning
(prompt, reply) pairs into training rows whose targets are the reply tokens only."""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmstages import losses as L
from llmstages.config import RewardSourceArgs
from llmstages.data.chat import prompt_ids
from llmstages.data.prompts import prompt_sets
from llmstages.data.text import tokenizer_hash
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model import GPT, load_model_and_tokenizer, load_tokenizer
from llmstages.model.generate import sample_replies
from llmstages.peft import disable_adapters, prepare_policy
from llmstages.train.frozen import hold_frozen
from llmstages.train.loop import compile_blocks

RewardFn = Callable[[list[str], list[str], list[bool]], list[float]]


def import_reward_fn(spec: str) -> RewardFn:
    """`module:function` -> the function; a clear error when it does not import."""
    if ":" not in spec:
        raise UserError(f"reward.fn '{spec}' must look like module:function")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except SystemExit as e:  # the module ends the process when imported
        raise UserError(f"reward.fn '{spec}' does not import (its module called sys.exit({e.code!r}))") from None
    except Exception as e:  # noqa: BLE001 - missing, or failing as it is imported (a syntax error, ...)
        raise UserError(f"reward.fn '{spec}' does not import ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UserError(f"reward.fn '{spec}' is not callable")
    return fn


def with_world(fn: RewardFn, world_seed: int) -> RewardFn:
    """`fn` with its `world_seed` keyword bound, when it has one (the built-in oracle judges one world)."""
    try:
        takes = "world_seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        takes = False
    return functools.partial(fn, world_seed=world_seed) if takes else fn


def checked(fn: RewardFn, name: str) -> RewardFn:
    """`fn` whose faults are reported as its own: an exception it raises (sys.exit too), or a result that is not
    one finite number per reply, is a UserError naming the function and what it returned."""

    def call(prompts: list[str], responses: list[str], ended: list[bool]) -> list[float]:
        try:
            scores = fn(prompts, responses, ended)
        except SystemExit as e:  # would end the run with nothing said
            raise UserError(f"reward function {name} called sys.exit({e.code!r}); it must return scores") from None
        except Exception as e:  # noqa: BLE001 - the user's function failed; say so instead of a traceback
            raise UserError(f"reward function {name} raised {type(e).__name__}: {e}") from None
        try:
            values = [float(s) for s in scores]
            bad = [s for s in scores if isinstance(s, bool | str) or not math.isfinite(float(s))]
        except (TypeError, ValueError):
            values, bad = [], [scores]
        if bad or len(values) != len(responses):
            got = repr(scores)[:120]
            raise UserError(
                f"reward function {name} must return one finite number per reply ({len(responses)}), returned {got}"
            )
        return values

    return call


def reward_source(reward: RewardSourceArgs, policy_tok: Tokenizer, device, world_seed: int = 0) -> RewardFn:
    """The configured reward as f(prompts, responses, ended) -> scores: a callable or a reward model. A function
    with a `world_seed` keyword (the built-in oracle) is handed the run's world seed; it is called once on a
    sample here, so that a broken function stops the run before anything is written."""
    if not reward.model:
        if not reward.fn:
            raise UserError("set reward.fn (module:function) or reward.model (a reward-model directory)")
        fn = checked(with_world(import_reward_fn(reward.fn), world_seed), f"reward.fn={reward.fn}")
        fn(["Where does Ada live?", "Where does Ada live?"], ["Oakfield", ""], [True, False])
        return fn
    from llmstages.data.chat import right_pad, tokenize_conversation
    from llmstages.data.lengths import kept_lengths
    from llmstages.losses import IGNORE_INDEX
    from llmstages.model.heads import load_reward_model

    rm = load_reward_model(reward.model, device=device).eval()
    rm_tok = load_tokenizer(reward.model)
    if tokenizer_hash(rm_tok) != tokenizer_hash(policy_tok):
        raise UserError(f"reward.model {reward.model}: its tokenizer differs from the policy's")

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str], ended: list[bool]) -> list[float]:
        rows = []
        for p, r, end in zip(prompts, responses, ended):
            ex = tokenize_conversation([{"role": "user", "content": p}, {"role": "assistant", "content": r}], rm_tok)
            row = ex.input_ids if end else ex.input_ids[:-1]  # an unfinished reply has no EOS
            start = next((i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX), len(row))  # the reply's
            keep_p, keep_r = kept_lengths(start, len(row) - start, rm.config.block_size)  # data/lengths.py
            rows.append(row[start - keep_p : start + keep_r])
        ids, mask = right_pad(rows, rm_tok.pad_id)
        return rm(ids.to(device), mask.to(device)).float().cpu().tolist()

    return score


def reply_rows(prompts: Sequence[list[int]], replies: Sequence[list[int]], pad_id: int, device) -> dict:
    """Right-padded rows prompt + reply (last token dropped: inputs), targets = the reply tokens at the
    positions that predict them, IGNORE_INDEX elsewhere."""
    T = max(len(p) + len(r) for p, r in zip(prompts, replies)) - 1
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    targets = torch.full((len(prompts), T), L.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for k, (p, r) in enumerate(zip(prompts, replies)):
        seq = list(p) + list(r)
        ids[k, : len(seq) - 1] = torch.tensor(seq[:-1])
        mask[k, : len(seq) - 1] = 1
        if r:
            targets[k, len(p) - 1 : len(seq) - 1] = torch.tensor(r)
    return {"input_ids": ids.to(device), "targets": targets.to(device), "mask": mask.to(device)}


@torch.no_grad()
def evaluate_policy(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[list[int]],
    texts: Sequence[str],
    reward_of: RewardFn,
    max_new_tokens: int,
) -> dict[str, float]:
    """Greedy replies to held-out prompts: mean reward and mean length."""
    replies, responses, ended = sample_replies(model, tok, prompts, max_new_tokens, 0.0)
    scores = reward_of(list(texts), responses, ended)
    return {"eval_reward": float(sum(scores) / len(scores)), "eval_length": sum(map(len, replies)) / len(replies)}


@dataclass
class PolicySetup:
    """What PPO and GRPO start from, loaded and checked (nothing written)."""

    out: Path
    device: torch.device
    model: GPT
    """The policy, PEFT applied (a LoRA it carried merged first)."""
    tokenizer: Tokenizer
    reference: GPT | None
    """A frozen copy of the initial policy; None: the policy with its adapters disabled."""
    reward_of: RewardFn
    prompts: list[list[int]]
    texts: list[str]
    eval_ids: list[list[int]]
    eval_texts: list[str]


def load_policy(cfg: Any, device: torch.device) -> PolicySetup:
    """The policy of an RL stage config (model, peft, reward, data, seed, world_seed) on `device`, its reference,
    its reward (called once on a sample) and its training and evaluation prompts."""
    if not cfg.model.path:
        raise UserError("set model.path to the policy (usually the SFT model's final/ directory)")
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg.model.path)
    reward_of = reward_source(cfg.reward, tok, device, cfg.world_seed)
    train_prompts, eval_prompts = prompt_sets(cfg.data, cfg.world_seed)
    by_disabling = prepare_policy(model, cfg.peft.method, **cfg.peft.options())
    model = model.to(device)
    frozen = None if by_disabling else copy.deepcopy(model).eval().requires_grad_(False)
    if frozen is not None:  # read only under autocast (the rollouts, the loop): held in its dtype
        hold_frozen(frozen, cfg.train.precision)
        if cfg.train.compile:
            compile_blocks(frozen)
    ids = [prompt_ids(m, tok) for m in train_prompts]
    eval_ids = [prompt_ids(m, tok) for m in eval_prompts]
    texts, eval_texts = [m[-1]["content"] for m in train_prompts], [m[-1]["content"] for m in eval_prompts]
    return PolicySetup(Path(cfg.out_dir), device, model, tok, frozen, reward_of, ids, texts, eval_ids, eval_texts)


def policy_logprobs(m: GPT, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) at the sampling temperature, (B, T), from the hidden states in chunks (no whole logits)."""
    hidden = m.hidden_states(batch["input_ids"], mask=batch["mask"])
    return L.head_logprobs(hidden, m.lm_head, batch["targets"], temperature)[0]


@torch.no_grad()
def reference_logprobs(s: PolicySetup, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """The reference policy's log-probs of the targets: the frozen copy, or the policy with its adapters disabled."""
    if s.reference is not None:
        return policy_logprobs(s.reference, batch, temperature)
    with disable_adapters(s.model):
        return policy_logprobs(s.model, batch, temperature)
