"""Plumbing shared by the RL stages (GRPO, PPO): the policy they start from, reward sources, and turning
(prompt, reply) pairs into training rows whose targets are the reply tokens only."""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmstages import losses as L
from llmstages.config import PeftArgs, PromptDataArgs, RewardSourceArgs, TrainArgs
from llmstages.data.chat import prompt_ids
from llmstages.data.prompts import prompt_split
from llmstages.data.text import tokenizer_hash
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model import GPT
from llmstages.model.generate import sample_replies
from llmstages.peft import disable_adapters, prepare_policy
from llmstages.store import load_model_and_tokenizer, load_tokenizer
from llmstages.train.frozen import hold_frozen
from llmstages.train.prepare import compile_blocks

RewardFn = Callable[..., list[float]]
"""f(prompts, responses, ended, **columns) -> one score per reply."""


def import_reward_fn(spec: str, key: str = "reward.fn") -> RewardFn:
    """`module:function` -> the function; a clear error, naming the setting `key`, when it does not import."""
    if ":" not in spec:
        raise UserError(f"{key} '{spec}' must look like module:function")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except SystemExit as e:  # the module ends the process when imported
        raise UserError(f"{key} '{spec}' does not import (its module called sys.exit({e.code!r}))") from None
    except Exception as e:  # noqa: BLE001 - missing, or failing as it is imported (a syntax error, ...)
        raise UserError(f"{key} '{spec}' does not import ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UserError(f"{key} '{spec}' is not callable")
    return fn


def _parameters(fn: Callable) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        return None


def with_world(fn: RewardFn, world_seed: int) -> RewardFn:
    """`fn` with its `world_seed` keyword bound, when it has one (the built-in oracle judges one world)."""
    params = _parameters(fn)
    takes = params is not None and "world_seed" in params
    return functools.partial(fn, world_seed=world_seed) if takes else fn


def column_filter(fn: Callable, columns: Sequence[str], name: str) -> Callable[[dict], dict]:
    """Which of the prompts' `columns` `fn` is handed: all when it takes **kwargs, else those it names (a function
    without them keeps working). A parameter it requires that is neither its first three (prompts, responses,
    ended) nor a column is a UserError naming it."""
    params = _parameters(fn)
    if params is None:
        return lambda cols: {}
    named, kind = list(params.values()), inspect.Parameter
    positional = [p for p in named if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
    rest = positional[3:] + [p for p in named if p.kind is kind.KEYWORD_ONLY]  # past prompts, responses, ended
    for p in rest:
        if p.default is inspect.Parameter.empty and p.name not in columns and p.name != "world_seed":
            have = ", ".join(columns) or "none"
            raise UserError(
                f"reward function {name} needs the column '{p.name}', which the prompts do not have (their columns: "
                f"{have})"
            )
    if any(p.kind is kind.VAR_KEYWORD for p in named):
        return lambda cols: cols
    wanted = {p.name for p in rest if p.kind is not kind.POSITIONAL_ONLY}
    return lambda cols: {k: v for k, v in cols.items() if k in wanted}


def checked(fn: RewardFn, name: str) -> RewardFn:
    """`fn` whose faults are reported as its own: an exception it raises (sys.exit too), or a result that is not
    one finite number per reply, is a UserError naming the function and what it returned."""

    def call(prompts: list[str], responses: list[str], ended: list[bool], **columns: list) -> list[float]:
        try:
            scores = fn(prompts, responses, ended, **columns)
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


@dataclass
class Reward:
    """The configured reward: the weighted sum of its parts. Called as f(prompts, responses, ended, **columns) ->
    totals; `scored` also gives each part's own scores (logged as reward/NAME when `named`)."""

    parts: list[tuple[str, float, RewardFn, Callable[[dict], dict]]]
    """(name, weight, the checked function, which columns it is handed)."""
    named: bool = False

    def scored(
        self, prompts: list[str], responses: list[str], ended: list[bool], **columns: list
    ) -> tuple[list[float], dict[str, list[float]]]:
        total, each = [0.0] * len(responses), {}
        for name, weight, fn, pick in self.parts:
            each[name] = fn(prompts, responses, ended, **pick(columns))
            total = [t + weight * v for t, v in zip(total, each[name])]
        return total, each

    def __call__(self, prompts: list[str], responses: list[str], ended: list[bool], **columns: list) -> list[float]:
        return self.scored(prompts, responses, ended, **columns)[0]

    def stats(self, each: dict[str, list[float]]) -> dict[str, float]:
        """Each part's mean score, as reward/NAME (nothing for a single reward.fn or a reward model)."""
        return {f"reward/{k}": sum(v) / len(v) for k, v in each.items()} if self.named else {}


def _reward_fns(reward: RewardSourceArgs, world_seed: int, columns: Sequence[str]) -> Reward:
    """reward.fns with their weights (or the one reward.fn), imported and checked."""
    if reward.fns:
        if reward.weights and len(reward.weights) != len(reward.fns):
            raise UserError(
                f"reward.weights has {len(reward.weights)} entries for {len(reward.fns)} reward.fns; give one for "
                "each (or none: all 1.0)"
            )
        weights = [float(w) for w in reward.weights] or [1.0] * len(reward.fns)
        if not all(math.isfinite(w) for w in weights):
            raise UserError(f"reward.weights must be finite numbers, got {reward.weights}")
        specs, key = list(reward.fns), "reward.fns"
    else:
        if reward.weights:
            raise UserError("reward.weights weighs reward.fns; set reward.fns (or leave reward.weights empty)")
        specs, weights, key = [reward.fn], [1.0], "reward.fn"
    parts, names = [], set()
    for spec, weight in zip(specs, weights):
        fn = import_reward_fn(spec, key)
        name = spec.split(":", 1)[1]
        if name in names:
            raise UserError(f"reward.fns names two functions {name}: each is logged as reward/NAME; rename one")
        names.add(name)
        label = f"{key}={spec}" if key == "reward.fn" else f"{name} ({spec})"
        bound = with_world(fn, world_seed)
        parts.append((name, weight, checked(bound, label), column_filter(bound, columns, label)))
    return Reward(parts, named=bool(reward.fns))


def reward_source(
    reward: RewardSourceArgs,
    policy_tok: Tokenizer,
    device,
    world_seed: int = 0,
    sample: tuple[str, dict[str, object]] = ("Where does Ada live?", {}),
) -> Reward:
    """The configured reward as f(prompts, responses, ended, **columns) -> scores: reward functions (reward.fns
    weighted, or reward.fn) or a reward model. A function with a `world_seed` keyword (the built-in oracle) is
    handed the run's world seed. The functions are called once on `sample` (a prompt and its columns) here, so
    that a broken function stops the run before anything is written."""
    if reward.fns and reward.model:
        raise UserError("set reward.fns or reward.model, not both (a reward model replaces the reward functions)")
    if not reward.model:
        if not reward.fn and not reward.fns:
            raise UserError("set reward.fn or reward.fns (module:function) or reward.model (a reward-model directory)")
        fns = _reward_fns(reward, world_seed, list(sample[1]))
        prompt, row = sample
        fns([prompt, prompt], ["Oakfield", ""], [True, False], **{k: [v, v] for k, v in row.items()})
        return fns
    from llmstages.data.chat import right_pad, tokenize_conversation
    from llmstages.data.lengths import kept_lengths
    from llmstages.losses import IGNORE_INDEX
    from llmstages.store.heads import load_reward_model

    rm = load_reward_model(reward.model, device=device).eval()
    rm_tok = load_tokenizer(reward.model)
    if tokenizer_hash(rm_tok) != tokenizer_hash(policy_tok):
        raise UserError(f"reward.model {reward.model}: its tokenizer differs from the policy's")

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str], ended: list[bool], **_: list) -> list[float]:
        rows = []
        for p, r, end in zip(prompts, responses, ended):
            ex = tokenize_conversation([{"role": "user", "content": p}, {"role": "assistant", "content": r}], rm_tok)
            row = ex.input_ids if end else ex.input_ids[:-1]  # an unfinished reply has no EOS
            start = next((i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX), len(row))  # the reply's
            keep_p, keep_r = kept_lengths(start, len(row) - start, rm.config.block_size)  # data/lengths.py
            rows.append(row[start - keep_p : start + keep_r])
        ids, mask = right_pad(rows, rm_tok.pad_id)
        return rm(ids.to(device), mask.to(device)).float().cpu().tolist()

    return Reward([("reward_model", 1.0, score, lambda cols: {})])


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
    columns: dict[str, list] | None = None,
) -> dict[str, float]:
    """Greedy replies to held-out prompts (their `columns` to the reward): mean reward and mean length."""
    replies, responses, ended = sample_replies(model, tok, prompts, max_new_tokens, 0.0)
    scores = reward_of(list(texts), responses, ended, **(columns or {}))
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
    """A frozen copy of the initial policy; None: the policy with its adapters disabled (or no reference, when
    the stage needs none: load_policy(reference=False))."""
    reward_of: Reward
    prompts: list[list[int]]
    texts: list[str]
    eval_ids: list[list[int]]
    eval_texts: list[str]
    columns: dict[str, list] = field(default_factory=dict)
    """The training prompts' columns for the reward (data/prompts.py PromptRows), aligned with `prompts`."""
    eval_columns: dict[str, list] = field(default_factory=dict)

    def columns_of(self, idx: Sequence[int]) -> dict[str, list]:
        """The columns of training prompts `idx`, one entry per index (repeated indices repeat them)."""
        return {k: [v[i] for i in idx] for k, v in self.columns.items()}


def load_policy(
    model_path: str | None,
    peft: PeftArgs,
    data: PromptDataArgs,
    reward: RewardSourceArgs,
    train: TrainArgs,
    device: torch.device,
    out_dir: str,
    seed: int = 0,
    world_seed: int = 0,
    reference: bool = True,
) -> PolicySetup:
    """The policy at `model_path` with `peft` applied, on `device`; its reference (`reference` False: none, not even
    a frozen copy; a frozen copy held in `train.precision` and compiled with `train.compile`); its reward (called
    once on a sample); and its training and evaluation prompts from `data` (split with `seed`, the built-in ones
    of world `world_seed`)."""
    if not model_path:
        raise UserError("set model.path to the policy (usually the SFT model's final/ directory)")
    r = reward
    if not data.path and data.builtin == "arithmetic" and not (r.fns or r.model) and "oracle" in (r.fn or ""):
        raise UserError(
            "data.builtin=arithmetic: the built-in oracle (reward.fn) judges fact questions, not sums; set "
            "reward.fns=[llmstages.rewards:accuracy,llmstages.rewards:format] (or your own functions of `answer`)"
        )
    torch.manual_seed(seed)
    model, tok = load_model_and_tokenizer(model_path, quantize_base=peft.quantize_base)
    train_rows, held = prompt_split(data, world_seed, seed)
    train_prompts, eval_prompts = train_rows.prompts, held.prompts
    first = (train_prompts[0][-1]["content"], {k: v[0] for k, v in train_rows.columns.items()})
    reward_of = reward_source(reward, tok, device, world_seed, sample=first)
    by_disabling = prepare_policy(model, peft.method, **peft.options())
    model = model.to(device)
    frozen = None if by_disabling or not reference else copy.deepcopy(model).eval().requires_grad_(False)
    if frozen is not None:  # read only under autocast (the rollouts, the loop): held in its dtype
        hold_frozen(frozen, train.precision)
        if train.compile:
            compile_blocks(frozen)
    ids = [prompt_ids(m, tok) for m in train_prompts]
    eval_ids = [prompt_ids(m, tok) for m in eval_prompts]
    texts, eval_texts = [m[-1]["content"] for m in train_prompts], [m[-1]["content"] for m in eval_prompts]
    return PolicySetup(
        Path(out_dir), device, model, tok, frozen, reward_of, ids, texts, eval_ids, eval_texts,
        train_rows.columns, held.columns,
    )  # fmt: skip


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


def pack_rollout(it: int, batch: dict[str, torch.Tensor], stats: dict[str, float], keys: Sequence[str]) -> dict:
    """A rollout in progress as checkpoint tensors (PPO's and GRPO's `on_save`): the update it is at, the batch's
    `keys` and its statistics, in float64: they are logged again after a resume and must read as the uninterrupted
    run's do."""
    saved = {f"rollout.{k}": batch[k] for k in keys}
    saved.update({f"rollout_stats.{k}": torch.tensor([v], dtype=torch.float64) for k, v in stats.items()})
    return {"rollout_it": torch.tensor([it]), **saved}


def unpack_rollout(extra: dict[str, torch.Tensor], keys: Sequence[str], device) -> tuple[int, dict, dict] | None:
    """(update, batch, statistics) of the rollout a checkpoint holds (pack_rollout), or None when it holds none.
    The batch has those of `keys` that were packed."""
    if "rollout_it" not in extra:
        return None
    batch = {k: extra[f"rollout.{k}"].to(device) for k in keys if f"rollout.{k}" in extra}
    stats = {k.split(".", 1)[1]: float(v) for k, v in extra.items() if k.startswith("rollout_stats.")}
    return int(extra["rollout_it"]), batch, stats
