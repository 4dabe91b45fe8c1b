"""Stage 3c, GRPO (Shao et al. 2024, DeepSeekMath): sample G replies per prompt, score them, and push the policy
towards replies that beat their group's mean, with a k3 KL penalty to the reference. No value model.

    llmstages grpo --config configs/grpo/lora.yaml [grpo.group_size=8 reward.fn=my_module:my_reward ...]

The reward is reward.fn, or the weighted sum of reward.fns (each logged as reward/NAME), or a reward model; a
prompt file's other columns (e.g. `answer`) reach the reward functions as keyword lists, each prompt's entries
repeated for its group_size replies (train/rollout.py).

Each optimizer step draws a fresh rollout from the current policy (one update per rollout, as TRL's default
num_iterations=1: the probability ratio is 1 at the update, and the clip only matters with several updates).
By default (grpo.loss_type=dapo) the loss is averaged over every response token of the step:
    A_i = (r_i - mean(r_group)) / std(r_group)
    loss = mean_t [ -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * k3(pi, ref)_t ]
grpo.loss_type, grpo.clip_high and grpo.advantage pick the rest of the family (losses.policy_loss and
losses.advantages: GRPO's per-reply mean, Dr. GRPO, BNPO, GSPO; DAPO's clip-higher; RLOO, REINFORCE++).
Rollouts are seeded by (seed, step), so a resumed run samples what the uninterrupted run sampled.
"""

from __future__ import annotations

import functools
import time

import torch

from llmstages import losses as L
from llmstages.config import GRPOArgs, GRPOConfig
from llmstages.data.lengths import fit_prompts
from llmstages.errors import UserError
from llmstages.model import GPT, save_model
from llmstages.model.generate import sample_replies
from llmstages.monitor.health import HealthMonitor
from llmstages.peft import trainable_parameters
from llmstages.train import distributed
from llmstages.train.frozen import base_weights
from llmstages.train.loop import EpochSampler, Loop, autocast, prepare_run_dir, start_run
from llmstages.train.rollout import (
    PolicySetup,
    evaluate_policy,
    load_policy,
    policy_logprobs,
    reference_logprobs,
    reply_rows,
)


def setup(cfg: GRPOConfig) -> tuple[PolicySetup, dict[str, int]]:
    """Check the config, load the policy, the reward and the prompts (each cut from the left to leave room for
    grpo.max_new_tokens in the model's context: data/lengths.py); writes nothing. Returns (the setup, how many
    training and evaluation prompts were cut)."""
    device, _ = start_run(cfg, "grpo")
    if cfg.grpo.group_size < 2:
        raise UserError(
            f"grpo.group_size must be at least 2 (advantages compare replies within a group), got {cfg.grpo.group_size}"
        )
    s = load_policy(cfg, device)
    context, key = s.model.config.block_size, "grpo.max_new_tokens"
    s.prompts, cut = fit_prompts(s.prompts, cfg.grpo.max_new_tokens, context, key)
    s.eval_ids, eval_cut = fit_prompts(s.eval_ids, cfg.grpo.max_new_tokens, context, key)
    return s, {"truncated_examples": cut, "truncated_eval_prompts": eval_cut}


def rollout(s: PolicySetup, cfg: GRPOConfig, sampler: EpochSampler, step: int) -> list[dict]:
    """Step `step`'s batch: group_size replies to each of its prompts, scored, with group-relative advantages and
    the old and reference log-probs. Seeded by (seed, step, rank): a resumed run samples the same."""
    g, d = cfg.grpo, distributed.current()
    t0 = time.perf_counter()
    idx = [i for i in sampler(step, 0) for _ in range(g.group_size)]
    gen = torch.Generator(device=s.device).manual_seed(cfg.seed * 1_000_003 + step + 7919 * d.dp_rank)
    s.model.eval()
    prompts = [s.prompts[i] for i in idx]
    # fsdp: sampling runs the model's parts token by token; it samples in the precision it trains in
    with distributed.gathered(s.model), autocast(s.device, cfg.train.precision):
        replies, responses, ended = sample_replies(s.model, s.tokenizer, prompts, g.max_new_tokens, g.temperature, gen)
    t_gen = time.perf_counter() - t0
    # each prompt's columns (e.g. its answer) repeated for each of its group_size replies
    total, each = s.reward_of.scored([s.texts[i] for i in idx], responses, ended, **s.columns_of(idx))
    rewards = torch.tensor(total, dtype=torch.float32)
    batch = reply_rows(prompts, replies, s.tokenizer.pad_id, s.device)
    batch["adv"] = L.advantages(rewards, g.group_size, g.advantage, scale=g.scale_advantages).to(s.device)
    with torch.no_grad(), autocast(s.device, cfg.train.precision):
        batch["old_logp"] = policy_logprobs(s.model, batch, g.temperature)
        batch["ref_logp"] = reference_logprobs(s, batch, g.temperature)
    s.model.train()
    groups = rewards.view(-1, g.group_size)
    batch["stats"] = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        **s.reward_of.stats(each),
        "zero_advantage_groups": float((groups.std(-1) == 0).float().mean()),
        "response_length": sum(map(len, replies)) / len(replies),
        "rollout_tokens_per_s": sum(map(len, replies)) / max(t_gen, 1e-9),
    }
    return [batch]


def grpo_step_loss(m: GPT, batch: dict, g: GRPOArgs) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of one rollout in its sum form; the loop divides by the step's policy_loss_normalizer."""
    tmask = (batch["targets"] != L.IGNORE_INDEX).float()
    logp = policy_logprobs(m, batch, g.temperature)
    if g.loss_type == "dapo" and g.clip_high is None:  # grpo_loss is this case term for term, in the order of
        # operations every earlier run (and the demo's measured targets) used
        loss, kl, clip_frac = L.grpo_loss(
            logp, batch["old_logp"], batch["ref_logp"], batch["adv"], tmask, g.clip, g.kl_beta
        )
        return loss, {**batch["stats"], "kl_k3": float(kl), "clip_fraction": float(clip_frac)}
    loss, stats = L.policy_loss(logp, batch["old_logp"], batch["adv"], tmask, g.loss_type, g.clip, g.clip_high,
                                ref_logp=batch["ref_logp"], beta=g.kl_beta, max_length=g.max_new_tokens,
                                reduction="sum")  # fmt: skip
    if "kl" in stats:
        stats["kl_k3"] = stats.pop("kl")
    return loss, {**batch["stats"], **{k: float(v) for k, v in stats.items()}}


def main(cfg: GRPOConfig, progress: bool = True) -> dict[str, float]:
    s, cut = setup(cfg)
    g = cfg.grpo
    prepare_run_dir(cfg, "grpo", s.model)
    sampler = EpochSampler(len(s.prompts), g.prompts_per_step, 1, cfg.seed)  # under ddp: per rank

    def evaluate(m: GPT) -> dict[str, float]:
        return evaluate_policy(m, s.tokenizer, s.eval_ids, s.eval_texts, s.reward_of, g.max_new_tokens, s.eval_columns)

    loop = Loop(
        model=s.model,
        args=cfg.train,
        run_dir=s.out,
        device=s.device,
        next_batches=functools.partial(rollout, s, cfg, sampler),
        loss_fn=functools.partial(grpo_step_loss, g=g),
        evaluate=evaluate,
        count_fn=lambda b: L.policy_loss_normalizer(b["targets"] != L.IGNORE_INDEX, g.loss_type, g.max_new_tokens),
        health=HealthMonitor(slowdown=0, stall=False),  # drawing a batch is sampling a rollout
        monitor=cfg.monitor,
        frozen_source=functools.partial(base_weights, cfg.model.path),
    )
    resumed = loop.resume() if cfg.resume else False
    trainable, total = trainable_parameters(s.model)
    if progress:
        print(
            f"grpo: {len(s.prompts)} prompts ({cut['truncated_examples']} cut from the left to leave room for "
            f"{g.max_new_tokens} new tokens), {g.prompts_per_step} x {g.group_size} samples a step; "
            f"{trainable:,} of {total:,} parameters trainable"
        )
    state = loop.run_logged(resumed, lambda: {**cut, **evaluate(s.model)}, progress)
    final = loop.final_model()  # rank 0: the whole model, gathered from its shards
    if final is not None:
        save_model(final, s.out / "final", s.tokenizer)
    return {"step": state.step, **loop.last_eval}
