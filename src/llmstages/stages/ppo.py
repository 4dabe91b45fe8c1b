"""Stage 3d, PPO with a critic (Schulman et al. 2017; the RLHF recipe of Ziegler et al. 2019, Ouyang et al. 2022).

    llmstages ppo --config configs/ppo/lora.yaml [ppo.kl_coef=0.1 ppo.critic=separate ...]

Per rollout: sample one reply per prompt with the KV cache; score it (a reward function or a reward model);
per-token rewards r_t = -kl_coef * (log pi_old - log ref)_t, plus the score on the reply's last token;
values from the value head; GAE (gamma, lambda) -> advantages (whitened) and returns. Then ppo_epochs passes of
`minibatches` optimizer steps each, every one minimising
    clipped policy loss + value_coef * clipped value loss - entropy_coef * entropy.
The critic is a value head on the policy's trunk (shared) or on a copy of the initial model (separate; over a
QLoRA policy's NF4 base, the base shared and its own adapters: `separate_critic`), with its own learning rate.
The reference is the policy with its adapters disabled, or a frozen copy. The current rollout is stored in each
checkpoint, so a run resumed in the middle of a rollout continues exactly.
Under data parallelism each rank samples its own rollout_size prompts and whitens its own advantages; the
value-head start and the KL controller use the whole rollout (a rollout of rollout_size x ranks, whitened in
parts: not the single-process run with the larger rollout, as in TRL and OpenRLHF).
"""

from __future__ import annotations

import copy
import functools
import itertools
import random
import time
from collections.abc import Iterator

import torch
from torch import nn

from llmstages import losses as L
from llmstages.config import PPOArgs, PPOConfig, to_dict
from llmstages.data.lengths import fit_prompts
from llmstages.errors import UserError
from llmstages.model import GPT
from llmstages.model.generate import sample_replies
from llmstages.model.heads import ScalarHead
from llmstages.monitor.health import HealthMonitor
from llmstages.peft import merge_lora, merged_for_sampling, trainable_parameters
from llmstages.peft.nf4 import NF4Weight
from llmstages.rl.rollout import (
    PolicySetup,
    evaluate_policy,
    load_policy,
    pack_rollout,
    reference_logprobs,
    reply_rows,
    unpack_rollout,
)
from llmstages.store import save_model
from llmstages.train import distributed
from llmstages.train.frozen import base_weights, quantized_weights
from llmstages.train.loop import EpochSampler, LoopState, Trainer, fit
from llmstages.train.prepare import prepare_model
from llmstages.train.start import autocast, prepare_run_dir, start_run

ROLLOUT_KEYS = ("input_ids", "targets", "mask", "old_logp", "old_values", "adv", "returns")


class ActorCritic(nn.Module):
    """The policy and a value head, on the policy's trunk or on a separate critic trunk."""

    def __init__(self, policy: GPT, critic: GPT | None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = ScalarHead(policy.config.d_model)

    def forward(
        self, batch: dict[str, torch.Tensor], temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi(target) (B, T), entropy (B, T), values (B, T)) at the sampling temperature; the policy's
        log-probs and entropies come from its hidden states in chunks (losses.head_logprobs), never whole logits."""
        h = self.policy.hidden_states(batch["input_ids"], mask=batch["mask"])
        hv = h if self.critic is None else self.critic.hidden_states(batch["input_ids"], mask=batch["mask"])
        logp, entropy = L.head_logprobs(h, self.policy.lm_head, batch["targets"], temperature)
        return logp, entropy, self.value_head(hv)


def _param_groups(ac: ActorCritic, cfg: PPOConfig) -> list[dict]:
    """The policy's trainable parameters at train.lr; the value head (and a separate critic) at ppo.value_lr."""
    policy = [p for p in ac.policy.parameters() if p.requires_grad]
    critic = [p for p in ac.critic.parameters() if p.requires_grad] if ac.critic is not None else []
    value = list(ac.value_head.parameters()) + critic
    scale = cfg.ppo.value_lr / cfg.train.lr if cfg.train.lr > 0 else 1.0
    groups = [
        {"params": policy, "weight_decay": cfg.train.weight_decay},
        {"params": value, "weight_decay": 0.0, "lr_scale": scale},
    ]
    return groups


def setup(cfg: PPOConfig) -> tuple[PolicySetup, ActorCritic, dict[str, int]]:
    """Check the config, load the policy, the reward and the prompts (each cut from the left to leave room for
    ppo.max_new_tokens in the model's context: data/lengths.py), and build policy + critic; writes nothing.
    Returns (the setup, policy + critic, how many training and evaluation prompts were cut)."""
    device, _ = start_run(cfg.run_args("ppo"))
    p = cfg.ppo
    if p.critic not in ("shared", "separate"):
        raise UserError(f"ppo.critic must be shared or separate, got '{p.critic}'")
    if p.rollout_size % p.minibatches:
        raise UserError(f"ppo.rollout_size={p.rollout_size} is not divisible by ppo.minibatches={p.minibatches}")
    if cfg.train.grad_accum != 1:
        raise UserError("PPO splits each rollout into ppo.minibatches; leave train.grad_accum at 1")
    s = load_policy(
        cfg.model.path, cfg.peft, cfg.data, cfg.reward, cfg.train, device, cfg.out_dir, cfg.seed, cfg.world_seed
    )
    context, key = s.model.config.block_size, "ppo.max_new_tokens"  # prompts cut from the left: data/lengths.py
    s.prompts, cut = fit_prompts(s.prompts, p.max_new_tokens, context, key)
    s.eval_ids, eval_cut = fit_prompts(s.eval_ids, p.max_new_tokens, context, key)
    if cut or eval_cut:
        print(
            f"ppo: {cut} of {len(s.prompts)} training and {eval_cut} of {len(s.eval_ids)} evaluation prompts cut "
            f"from the left to leave room for {p.max_new_tokens} new tokens in the model's context of {context}"
        )
    critic = separate_critic(s.model) if p.critic == "separate" else None
    cuts = {"truncated_examples": cut, "truncated_eval_prompts": eval_cut}
    return s, ActorCritic(s.model, critic).to(device), cuts


def separate_critic(policy: GPT) -> GPT:
    """A critic trunk that starts as the fine-tuned policy (whose fresh LoRA adds nothing yet). Over a dense base:
    a merged copy, trained whole. Over an NF4 base (QLoRA): the policy's frozen weights shared, not copied, with
    its own copy of the adapters, which the critic trains: it costs an adapter, not a second model in fp32."""
    if not quantized_weights(policy):
        return merge_lora(copy.deepcopy(policy)).requires_grad_(True)
    shared: dict[int, object] = {id(t): t for t in policy.parameters() if not t.requires_grad}
    shared |= {id(m): m for m in policy.modules() if isinstance(m, NF4Weight)}
    return copy.deepcopy(policy, memo=shared)


class Rollouts:
    """The rollout in progress, and the minibatches the loop trains on (`minibatches`).

    Every `ppo_epochs x minibatches` optimizer steps a new rollout is sampled from the current policy and scored;
    each step takes one minibatch of it (a fresh order each epoch, seeded by the rollout and epoch). The rollout
    goes into every checkpoint (`saved` / `restore`), and the KL controller's coefficient lives in `controller`,
    which the loop keeps in its state, so a run resumed in the middle of a rollout continues exactly.
    """

    def __init__(self, s: PolicySetup, ac: ActorCritic, cfg: PPOConfig) -> None:
        self.s, self.ac, self.p, self.seed = s, ac, cfg.ppo, cfg.seed
        self.precision = cfg.train.precision
        self.sampler = EpochSampler(len(s.prompts), self.p.rollout_size, 1, cfg.seed)  # under ddp: per rank
        self.updates = self.p.ppo_epochs * self.p.minibatches
        self.it = -1  # the rollout held (none yet)
        self.batch: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}
        self.controller: dict[str, float] = {"kl_coef": self.p.kl_coef}

    def minibatches(self, start: int) -> Iterator[list[dict]]:
        """PPO's loops from optimizer step `start` on: sample a rollout, then ppo_epochs passes over it, each in
        a fresh order (seeded by the rollout and the epoch) cut into ppo.minibatches minibatches, one optimizer
        step each. A run resumed in the middle of a rollout has it back from the checkpoint and skips the steps
        it took."""
        p, size = self.p, self.p.rollout_size // self.p.minibatches
        step = start - start % self.updates  # the first step of the rollout that `start` falls in
        for it in itertools.count(start // self.updates):
            if self.it != it:
                self.sample(it)
            for epoch in range(p.ppo_epochs):
                seed = self.seed * 1_000_003 + it * 7919 + epoch
                order = random.Random(seed).sample(range(p.rollout_size), p.rollout_size)
                for mb in range(p.minibatches):
                    if step >= start:
                        rows = torch.tensor(order[mb * size : (mb + 1) * size], device=self.s.device)
                        yield [{k: self.batch[k][rows] for k in ROLLOUT_KEYS}]
                    step += 1

    @torch.no_grad()
    def sample(self, it: int) -> None:
        """Rollout `it`: replies, scores, per-token rewards with the KL penalty, values, GAE."""
        ac = self.ac
        with distributed.gathered(ac):  # fsdp: sampling and scoring call the policy's parts directly
            value_start = self._sample(it)
        if value_start is not None:  # fsdp: the fill inside went to the gathered copy; the shards need it too
            ac.value_head.proj.bias.fill_(value_start)

    def _sample(self, it: int) -> float | None:
        s, ac, p, d = self.s, self.ac, self.p, distributed.current()
        t0 = time.perf_counter()
        idx = self.sampler(it, 0)
        prompts = [s.prompts[i] for i in idx]
        gen = torch.Generator(device=s.device).manual_seed(self.seed * 1_000_003 + it + 7919 * d.dp_rank)
        ac.eval()
        policy = s.model
        # the policy samples in the precision it trains in, its adapters merged where that is fp32
        with autocast(s.device, self.precision), merged_for_sampling(policy):
            replies, responses, ended = sample_replies(
                policy, s.tokenizer, prompts, p.max_new_tokens, p.temperature, gen
            )
        t_gen = time.perf_counter() - t0
        total, each = s.reward_of.scored([s.texts[i] for i in idx], responses, ended, **s.columns_of(idx))
        scores = torch.tensor(total, dtype=torch.float32)
        scores = scores - p.missing_eos_penalty * (~torch.tensor(ended)).float()
        value_start = None
        if it == 0:  # start the value head at the mean score, so early advantages are not all one sign
            value_start = d.dp_mean(float(scores.mean()))  # the same on every replica
            ac.value_head.proj.bias.fill_(value_start)
        batch = reply_rows(prompts, replies, s.tokenizer.pad_id, s.device)
        with autocast(s.device, self.precision):  # as the loss will compute them
            old_logp, _, values = ac(batch, p.temperature)
            ref_logp = reference_logprobs(s, batch, p.temperature)
        values = values.float()
        tmask = (batch["targets"] != L.IGNORE_INDEX).float()
        kl = (old_logp - ref_logp) * tmask
        kl_coef = self.controller.get("kl_coef", p.kl_coef)
        rewards = -kl_coef * kl
        last = torch.tensor([len(pr) + len(r) - 2 for pr, r in zip(prompts, replies)], device=s.device)
        rewards[torch.arange(len(idx), device=s.device), last] += scores.to(s.device)
        adv, returns = L.gae(rewards, values * tmask, tmask, p.gamma, p.lam)
        batch.update(old_logp=old_logp, old_values=values * tmask, adv=L.whiten(adv, tmask), returns=returns)
        mean_kl = d.dp_mean(float(L.masked_mean(kl, tmask)))  # k1 per token of the policy's own samples
        if p.target_kl > 0:  # adaptive controller (Ziegler et al. 2019)
            err = max(-0.2, min(0.2, mean_kl / p.target_kl - 1))
            self.controller["kl_coef"] = kl_coef * (1 + err * len(idx) * d.dp / p.kl_horizon)  # the whole rollout
        else:
            self.controller["kl_coef"] = kl_coef
        ac.train()
        n_tokens = sum(map(len, replies))
        self.it, self.batch = it, batch
        self.stats = {
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()),
            **s.reward_of.stats(each),  # each of reward.fns before the missing-EOS penalty
            "kl_k1": mean_kl,
            "kl_coef": kl_coef,
            "response_length": n_tokens / len(idx),
            "rollout_tokens_per_s": n_tokens / max(t_gen, 1e-9),
        }
        return value_start

    def saved(self, _state: object = None) -> dict[str, torch.Tensor]:
        """The rollout in progress as checkpoint tensors (the loop's `on_save`)."""
        if self.it < 0:
            return {}
        return pack_rollout(self.it, self.batch, self.stats, ROLLOUT_KEYS)

    def restore(self, extra: dict[str, torch.Tensor]) -> None:
        """Take back the rollout a checkpoint holds (nothing when it holds none)."""
        rollout = unpack_rollout(extra, ROLLOUT_KEYS, self.s.device)
        if rollout is not None:
            self.it, self.batch, self.stats = rollout


def ppo_loss(m: ActorCritic, b: dict, p: PPOArgs) -> tuple[torch.Tensor, dict[str, float]]:
    """clipped policy loss + value_coef x clipped value loss - entropy_coef x entropy, on one minibatch."""
    logp, entropy_t, values = m(b, p.temperature)
    tmask = (b["targets"] != L.IGNORE_INDEX).float()
    pg, clip_frac, approx_kl = L.ppo_policy_loss(logp, b["old_logp"], b["adv"], tmask, p.clip)
    vloss = L.ppo_value_loss(values, b["old_values"], b["returns"], tmask, p.value_clip)
    entropy = L.masked_mean(entropy_t, tmask)
    loss = pg + p.value_coef * vloss
    if p.entropy_coef:
        loss = loss - p.entropy_coef * entropy
    resid = L.masked_mean((b["returns"] - values.detach()) ** 2, tmask)
    var = L.masked_mean((b["returns"] - L.masked_mean(b["returns"], tmask)) ** 2, tmask)
    stats = {
        "policy_loss": float(pg.detach()),
        "value_loss": float(vloss.detach()),
        "entropy": float(entropy.detach()),
        "clip_fraction": float(clip_frac),
        "kl_old_new_k3": float(approx_kl),
        "explained_variance": float(1 - resid / var.clamp(min=1e-8)),
    }
    return loss, stats


def main(cfg: PPOConfig, progress: bool = True) -> dict[str, float]:
    s, ac, cuts = setup(cfg)
    p = cfg.ppo
    prepare_run_dir(cfg.run_args("ppo"), to_dict(cfg), ac)
    rollouts = Rollouts(s, ac, cfg)

    def evaluate(m: ActorCritic) -> dict[str, float]:
        return evaluate_policy(
            m.policy, s.tokenizer, s.eval_ids, s.eval_texts, s.reward_of, p.max_new_tokens, s.eval_columns
        )

    model = prepare_model(ac, cfg.train, frozen_source=functools.partial(base_weights, cfg.model.path))
    trainer = Trainer(
        model,
        cfg.train,
        s.out,
        device=s.device,
        param_groups=_param_groups(model.module, cfg),
        on_save=rollouts.saved,
        state=LoopState(extra=rollouts.controller),  # the KL coefficient, kept across resume
    )
    trainable, total = trainable_parameters(ac)
    if progress:
        print(
            f"ppo: {len(s.prompts)} prompts, rollouts of {p.rollout_size}, {rollouts.updates} updates each, "
            f"critic {p.critic}; {trainable:,} of {total:,} parameters trainable"
        )
    return fit(
        trainer,
        rollouts.minibatches,
        functools.partial(ppo_loss, p=p),
        lambda b: 1,
        evaluate=evaluate,
        first_record=lambda: {**cuts, **evaluate(ac)},
        stats=lambda: rollouts.stats,  # the rollout's rewards, KL and sampling speed
        save_final=lambda final: save_model(final.policy, s.out / "final", s.tokenizer),
        resume=cfg.resume,
        on_resume=rollouts.restore,  # the rollout in progress when the checkpoint was written
        health=HealthMonitor(slowdown=0, stall=False),  # drawing a batch is sampling a rollout
        monitor=cfg.monitor,
        progress=progress,
    )
