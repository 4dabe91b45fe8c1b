"""Stage 3c, GRPO (Shao et al. 2024, DeepSeekMath): sample G replies per prompt, score them, and push the policy
towards replies that beat their group's mean, with a k3 KL penalty to the reference. No value model.

    llmstages grpo --config configs/grpo/lora.yaml [grpo.group_size=8 reward.fn=my_module:my_reward ...]

The reward is reward.fn, or the weighted sum of reward.fns (each logged as reward/NAME), or a reward model; a
prompt file's other columns (e.g. `answer`) reach the reward functions as keyword lists, each prompt's entries
repeated for its group_size replies (rl/rollout.py).

Each optimizer step draws a fresh rollout from the current policy (one update per rollout, as TRL's default
num_iterations=1: the probability ratio is 1 at the update, and the clip only matters with several updates);
grpo.iterations > 1 trains that many steps on each rollout (the rollout is in each checkpoint written in its
middle, so a resumed run continues it exactly).
By default (grpo.loss_type=dapo) the loss is averaged over every response token of the step:
    A_i = (r_i - mean(r_group)) / std(r_group)
    loss = mean_t [ -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * k3(pi, ref)_t ]
grpo.loss_type, grpo.clip_high and grpo.advantage pick the rest of the family (losses.policy_loss and
losses.advantages: GRPO's per-reply mean, Dr. GRPO, BNPO, GSPO; DAPO's clip-higher; RLOO, REINFORCE++).
DAPO's dynamic sampling (grpo.dynamic_sampling: groups whose rewards all equal are replaced by groups of further
prompts) and overlong filtering (grpo.overlong_filter: replies cut at max_new_tokens leave the loss) are options.
Rollouts are seeded by (seed, rollout), so a resumed run samples what the uninterrupted run sampled.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Iterator

import torch

from llmstages import losses as L
from llmstages.config import GRPOArgs, GRPOConfig, to_dict
from llmstages.data.lengths import fit_prompts
from llmstages.errors import UserError
from llmstages.model import GPT
from llmstages.model.generate import sample_replies
from llmstages.monitor.health import HealthMonitor
from llmstages.peft import merged_for_sampling, trainable_parameters
from llmstages.rl.rollout import (
    PolicySetup,
    evaluate_policy,
    load_policy,
    pack_rollout,
    policy_logprobs,
    reference_logprobs,
    reply_rows,
    unpack_rollout,
)
from llmstages.store import save_model
from llmstages.train import distributed
from llmstages.train.frozen import base_weights
from llmstages.train.loop import EpochSampler, LoopState, Trainer, fit
from llmstages.train.prepare import prepare_model
from llmstages.train.start import autocast, prepare_run_dir, start_run


def setup(cfg: GRPOConfig) -> tuple[PolicySetup, dict[str, int]]:
    """Check the config, load the policy, the reward and the prompts (each cut from the left to leave room for
    grpo.max_new_tokens in the model's context: data/lengths.py); writes nothing. Returns (the setup, how many
    training and evaluation prompts were cut)."""
    device, _ = start_run(cfg.run_args("grpo"))
    if cfg.grpo.group_size < 2:
        raise UserError(
            f"grpo.group_size must be at least 2 (advantages compare replies within a group), got {cfg.grpo.group_size}"
        )
    s = load_policy(
        cfg.model.path,
        cfg.peft,
        cfg.data,
        cfg.reward,
        cfg.train,
        device,
        cfg.out_dir,
        cfg.seed,
        cfg.world_seed,
        reference=cfg.grpo.kl_beta != 0,
    )
    context, key = s.model.config.block_size, "grpo.max_new_tokens"
    s.prompts, cut = fit_prompts(s.prompts, cfg.grpo.max_new_tokens, context, key)
    s.eval_ids, eval_cut = fit_prompts(s.eval_ids, cfg.grpo.max_new_tokens, context, key)
    return s, {"truncated_examples": cut, "truncated_eval_prompts": eval_cut}


ROLLOUT_KEYS = ("input_ids", "targets", "mask", "adv", "old_logp", "ref_logp")


class Rollouts:
    """The rollout in progress, and the batches the loop trains on (`batches`).

    Every grpo.iterations optimizer steps a new rollout is drawn from the current policy (`sample`); each step of
    it trains on the whole rollout, so from its second step on the ratio to the sampling policy moves from 1 and
    the clip binds. A checkpoint written in the middle of a rollout holds it (`saved` / `restore`: its sampling
    policy is gone by then, so it could not be drawn again), and the resumed run continues it exactly."""

    def __init__(self, s: PolicySetup, cfg: GRPOConfig) -> None:
        self.s, self.cfg, self.g = s, cfg, cfg.grpo
        g = self.g
        self.sampler = EpochSampler(len(s.prompts), g.prompts_per_step, 1, cfg.seed)  # under ddp: per rank
        # dynamic sampling's further rounds: their own shuffles (seeds above every run's seed), so round 0 draws
        # what a run without it draws
        rounds = max(g.max_sampling_rounds - 1, 1)
        self.more = EpochSampler(len(s.prompts), g.prompts_per_step, rounds, cfg.seed + 2**32)
        self.it = -1  # the rollout held (none yet)
        self.batch: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}
        self.t_gen = 0.0  # seconds spent sampling the current rollout

    def batches(self, start: int) -> Iterator[list[dict]]:
        """Each optimizer step's batch from step `start` on: rollout `it` is sampled from the current policy at
        its first step (a rollout a checkpoint held is continued), then trained on for grpo.iterations steps."""
        n = self.g.iterations
        for it in itertools.count(start // n):
            if self.it != it:
                self.sample(it)
            for _ in range(max(start - it * n, 0), n):
                yield [self.batch]

    def _round(self, idx: list[int], gen: torch.Generator) -> tuple[list, list, list[bool], torch.Tensor, dict]:
        """group_size replies to each prompt of `idx`: (prompts, replies, ended, rewards (N * G,), each reward
        function's scores); the sampling time is added to self.t_gen."""
        s, g = self.s, self.g
        t0 = time.perf_counter()
        idx = [i for i in idx for _ in range(g.group_size)]
        prompts = [s.prompts[i] for i in idx]
        # fsdp: sampling runs the model's parts token by token; it samples in the precision it trains in
        with distributed.gathered(s.model), autocast(s.device, self.cfg.train.precision), merged_for_sampling(s.model):
            replies, responses, ended = sample_replies(
                s.model, s.tokenizer, prompts, g.max_new_tokens, g.temperature, gen
            )
        self.t_gen += time.perf_counter() - t0
        # each prompt's columns (e.g. its answer) repeated for each of its group_size replies
        total, each = s.reward_of.scored([s.texts[i] for i in idx], responses, ended, **s.columns_of(idx))
        return prompts, replies, ended, torch.tensor(total, dtype=torch.float32), each

    def sample(self, it: int) -> None:
        """Rollout `it`: group_size replies to each of its prompts, scored, with advantages, the old log-probs
        (grpo.iterations > 1) and the reference log-probs (kl_beta != 0). Seeded by (seed, it, rank): a resumed
        run samples the same.

        With grpo.dynamic_sampling, groups whose rewards all equal (no signal: every advantage is 0) are dropped
        and further rounds of prompts_per_step prompts are drawn with the same generator until prompts_per_step
        groups have signal (the first ones kept), at most grpo.max_sampling_rounds rounds; short of that, the step
        trains on the groups it has (missing_groups logged), or on the first round's when none has signal. With
        grpo.overlong_filter, replies that reached max_new_tokens without an EOS keep their reward and their
        place in their group's advantages, and leave the loss (their targets are masked: none of their tokens
        counts)."""
        s, g, d = self.s, self.g, distributed.current()
        self.t_gen = 0.0
        gen = torch.Generator(device=s.device).manual_seed(self.cfg.seed * 1_000_003 + it + 7919 * d.dp_rank)
        s.model.eval()
        G = g.group_size
        rounds = [self._round(self.sampler(it, 0), gen)]
        kept: list[tuple[int, int]] = []  # (round, group) of the groups with signal, in the order drawn
        dropped = 0
        while g.dynamic_sampling:
            r = rounds[-1][3].view(-1, G)
            signal = (r.max(-1).values != r.min(-1).values).tolist()
            kept += [(len(rounds) - 1, k) for k, ok in enumerate(signal) if ok]
            dropped += signal.count(False)
            if len(kept) >= g.prompts_per_step or len(rounds) == g.max_sampling_rounds:
                break
            rounds.append(self._round(self.more(it, len(rounds) - 1), gen))
        if g.dynamic_sampling and kept:
            rows = [(r, k * G + j) for r, k in kept[: g.prompts_per_step] for j in range(G)]
            prompts, replies, ended = ([rounds[r][c][i] for r, i in rows] for c in range(3))
            rewards = torch.stack([rounds[r][3][i] for r, i in rows])
            each = {n: [rounds[r][4][n][i] for r, i in rows] for n in rounds[0][4]}
        else:
            prompts, replies, ended, rewards, each = rounds[0]
        batch = reply_rows(prompts, replies, s.tokenizer.pad_id, s.device)
        batch["adv"] = L.advantages(rewards, G, g.advantage, scale=g.scale_advantages).to(s.device)
        # One update per rollout: the sampling policy is the policy being trained, so its log-probs are the
        # loss's own, detached (grpo_step_loss), and no forward pass is spent on them; no KL term, no reference.
        with torch.no_grad(), autocast(s.device, self.cfg.train.precision):
            if g.iterations > 1:
                batch["old_logp"] = policy_logprobs(s.model, batch, g.temperature)
            if g.kl_beta != 0:
                batch["ref_logp"] = reference_logprobs(s, batch, g.temperature)
        s.model.train()
        groups = rewards.view(-1, G)
        n_sampled = sum(len(x) for rnd in rounds for x in rnd[1])
        stats = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **s.reward_of.stats(each),
            "zero_advantage_groups": float((groups.std(-1) == 0).float().mean()),
            "response_length": sum(map(len, replies)) / len(replies),
            "rollout_tokens_per_s": n_sampled / max(self.t_gen, 1e-9),
            "rollout_s": self.t_gen,
        }
        if g.dynamic_sampling:
            stats["dropped_groups"] = float(dropped)
            stats["sampling_rounds"] = float(len(rounds))
            stats["missing_groups"] = float(max(g.prompts_per_step - len(kept), 0))
        if g.overlong_filter:
            unfinished = torch.tensor([not e for e in ended], device=s.device)
            batch["targets"] = batch["targets"].masked_fill(unfinished[:, None], L.IGNORE_INDEX)
            stats["overlong_filtered"] = float(unfinished.float().mean())
        self.it, self.batch, self.stats = it, batch, stats

    def saved(self, state: LoopState) -> dict[str, torch.Tensor]:
        """The rollout, when the checkpoint falls in its middle (the loop's `on_save`); nothing at a boundary."""
        if self.it < 0 or state.step % self.g.iterations == 0:
            return {}
        return pack_rollout(self.it, self.batch, self.stats, [k for k in ROLLOUT_KEYS if k in self.batch])

    def restore(self, extra: dict[str, torch.Tensor]) -> None:
        """Take back the rollout a checkpoint holds (nothing when it holds none)."""
        rollout = unpack_rollout(extra, ROLLOUT_KEYS, self.s.device)
        if rollout is not None:
            self.it, self.batch, self.stats = rollout


def grpo_step_loss(m: GPT, batch: dict, g: GRPOArgs) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of one rollout in its sum form; the loop divides by the step's policy_loss_normalizer.
    A rollout without old log-probs (grpo.iterations 1) takes the policy's own, detached: the ratio is exactly 1
    and its gradient that of log pi; one without reference log-probs (kl_beta 0) has no KL term."""
    tmask = (batch["targets"] != L.IGNORE_INDEX).float()
    logp = policy_logprobs(m, batch, g.temperature)
    old = batch["old_logp"] if "old_logp" in batch else logp.detach()
    ref = batch.get("ref_logp")
    if g.loss_type == "dapo" and g.clip_high is None:  # grpo_loss is this case term for term, in the order of
        # operations every earlier run (and the demo's measured targets) used
        loss, kl, clip_frac = L.grpo_loss(
            logp, old, logp.detach() if ref is None else ref, batch["adv"], tmask, g.clip, g.kl_beta
        )
        kl_stat = {} if ref is None else {"kl_k3": float(kl)}
        return loss, {**kl_stat, "clip_fraction": float(clip_frac)}
    loss, stats = L.policy_loss(logp, old, batch["adv"], tmask, g.loss_type, g.clip, g.clip_high,
                                ref_logp=ref, beta=g.kl_beta, max_length=g.max_new_tokens,
                                reduction="sum")  # fmt: skip
    if "kl" in stats:
        stats["kl_k3"] = stats.pop("kl")
    return loss, {k: float(v) for k, v in stats.items()}


def main(cfg: GRPOConfig, progress: bool = True) -> dict[str, float]:
    s, cut = setup(cfg)
    g = cfg.grpo
    prepare_run_dir(cfg.run_args("grpo"), to_dict(cfg), s.model)
    rollouts = Rollouts(s, cfg)

    def evaluate(m: GPT) -> dict[str, float]:
        return evaluate_policy(m, s.tokenizer, s.eval_ids, s.eval_texts, s.reward_of, g.max_new_tokens, s.eval_columns)

    model = prepare_model(s.model, cfg.train, frozen_source=functools.partial(base_weights, cfg.model.path))
    trainer = Trainer(model, cfg.train, s.out, device=s.device, on_save=rollouts.saved)
    trainable, total = trainable_parameters(s.model)
    if progress:
        print(
            f"grpo: {len(s.prompts)} prompts ({cut['truncated_examples']} cut from the left to leave room for "
            f"{g.max_new_tokens} new tokens), {g.prompts_per_step} x {g.group_size} samples a step; "
            f"{trainable:,} of {total:,} parameters trainable"
        )
    return fit(
        trainer,
        rollouts.batches,
        functools.partial(grpo_step_loss, g=g),
        lambda b: L.policy_loss_normalizer(b["targets"] != L.IGNORE_INDEX, g.loss_type, g.max_new_tokens),
        evaluate=evaluate,
        first_record=lambda: {**cut, **evaluate(s.model)},
        stats=lambda: rollouts.stats,  # the rollout's rewards and sampling speed
        save_final=lambda final: save_model(final, s.out / "final", s.tokenizer),
        resume=cfg.resume,
        on_resume=rollouts.restore,  # the rollout in progress when the checkpoint was written
        health=HealthMonitor(slowdown=0, stall=False),  # drawing a batch is sampling a rollout
        monitor=cfg.monitor,
        progress=progress,
    )
