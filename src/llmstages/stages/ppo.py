"""Stage 3d, PPO with a critic (Schulman et al. 2017; the RLHF recipe of Ziegler et al. 2019, Ouyang et al. 2022).

    llmstages ppo --config configs/ppo/lora.yaml [ppo.kl_coef=0.1 ppo.critic=separate ...]

Per rollout: sample one reply per prompt with the KV cache; score it (a reward function or a reward model);
per-token rewards r_t = -kl_coef * (log pi_old - log ref)_t, plus the score on the reply's last token;
values from the value head; GAE (gamma, lambda) -> advantages (whitened) and returns. Then ppo_epochs passes of
`minibatches` optimizer steps each, every one minimising
    clipped policy loss + value_coef * clipped value loss - entropy_coef * entropy.
The critic is a value head on the policy's trunk (shared) or on a copy of the initial model (separate), with
its own learning rate. The reference is the policy with its adapters disabled, or a frozen copy. The current
rollout is stored in each checkpoint, so a run resumed in the middle of a rollout continues exactly.
Under data parallelism each rank samples its own rollout_size prompts and whitens its own advantages; the
value-head start and the KL controller use the whole rollout (a rollout of rollout_size x ranks, whitened in
parts: not the single-process run with the larger rollout, as in TRL and OpenRLHF).
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch
from torch import nn

from llmstages import losses as L
from llmstages.config import PPOConfig
from llmstages.data.chat import prompt_ids
from llmstages.errors import UserError
from llmstages.model import GPT, load_model_and_tokenizer, save_model
from llmstages.model.heads import ScalarHead
from llmstages.monitor.health import HealthMonitor
from llmstages.peft import disable_adapters, merge_lora, prepare_policy, trainable_parameters
from llmstages.train import distributed
from llmstages.train.loop import EpochSampler, Loop, prepare_run_dir, start_run
from llmstages.train.rollout import evaluate_policy, prompt_sets, reply_rows, reward_source, sample_replies

ROLLOUT_KEYS = ("input_ids", "targets", "mask", "old_logp", "old_values", "adv", "returns")


class ActorCritic(nn.Module):
    """The policy and a value head, on the policy's trunk or on a separate critic trunk."""

    def __init__(self, policy: GPT, critic: GPT | None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = ScalarHead(policy.config.d_model)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, V), values (B, T))."""
        h = self.policy.hidden_states(batch["input_ids"], mask=batch["mask"])
        hv = h if self.critic is None else self.critic.hidden_states(batch["input_ids"], mask=batch["mask"])
        return self.policy.lm_head(h), self.value_head(hv)


def _param_groups(ac: ActorCritic, cfg: PPOConfig) -> list[dict]:
    """The policy's trainable parameters at train.lr; the value head (and a separate critic) at ppo.value_lr."""
    policy = [p for p in ac.policy.parameters() if p.requires_grad]
    value = list(ac.value_head.parameters()) + (list(ac.critic.parameters()) if ac.critic is not None else [])
    scale = cfg.ppo.value_lr / cfg.train.lr if cfg.train.lr > 0 else 1.0
    groups = [{"params": policy, "weight_decay": cfg.train.weight_decay},
              {"params": value, "weight_decay": 0.0, "lr_scale": scale}]  # fmt: skip
    return groups


def main(cfg: PPOConfig, progress: bool = True) -> dict[str, float]:
    out = Path(cfg.out_dir)
    device, _ = start_run(cfg, "ppo")
    p = cfg.ppo
    if p.critic not in ("shared", "separate"):
        raise UserError(f"ppo.critic must be shared or separate, got '{p.critic}'")
    if p.rollout_size % p.minibatches:
        raise UserError(f"ppo.rollout_size={p.rollout_size} is not divisible by ppo.minibatches={p.minibatches}")
    if cfg.train.grad_accum != 1:
        raise UserError("PPO splits each rollout into ppo.minibatches; leave train.grad_accum at 1")
    if not cfg.model.path:
        raise UserError("set model.path to the policy (usually the SFT model's final/ directory)")
    torch.manual_seed(cfg.seed)
    policy, tok = load_model_and_tokenizer(cfg.model.path)
    reward_of = reward_source(cfg.reward, tok, device, cfg.world_seed)
    train_prompts, eval_prompts = prompt_sets(cfg.data, cfg.world_seed)
    by_disabling = prepare_policy(policy, cfg.peft.method, **cfg.peft.options())  # a LoRA SFT model is merged
    # A separate critic starts as the fine-tuned model: a merged copy of the policy (fresh LoRA adds nothing yet).
    critic = merge_lora(copy.deepcopy(policy)).requires_grad_(True) if p.critic == "separate" else None
    frozen = None if by_disabling else copy.deepcopy(policy).eval().requires_grad_(False).to(device)
    ac = ActorCritic(policy, critic).to(device)
    prepare_run_dir(cfg, "ppo", ac)

    encoded = [prompt_ids(m, tok) for m in train_prompts]
    texts = [m[-1]["content"] for m in train_prompts]
    eval_ids = [prompt_ids(m, tok) for m in eval_prompts]
    eval_texts = [m[-1]["content"] for m in eval_prompts]
    sampler = EpochSampler(len(encoded), p.rollout_size, 1, cfg.seed)  # under ddp: rollout_size prompts per rank
    d = distributed.current()
    updates = p.ppo_epochs * p.minibatches
    cache: dict = {"it": -1}

    def logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return L.token_logprobs(logits / p.temperature, targets)

    @torch.no_grad()
    def make_rollout(it: int, state_extra: dict) -> dict:
        with distributed.gathered(ac):  # fsdp: sampling and scoring call the policy's parts directly
            rollout = _make_rollout(it, state_extra)
        if it == 0:  # fsdp: the fill inside went to the gathered copy; the shards need it too
            ac.value_head.proj.bias.fill_(rollout.pop("value_start"))
        return rollout

    def _make_rollout(it: int, state_extra: dict) -> dict:
        t0 = time.perf_counter()
        idx = sampler(it, 0)
        prompts = [encoded[i] for i in idx]
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + it + 7919 * d.dp_rank)
        ac.eval()
        replies, responses, ended = sample_replies(policy, tok, prompts, p.max_new_tokens, p.temperature, gen)
        t_gen = time.perf_counter() - t0
        scores = torch.tensor(reward_of([texts[i] for i in idx], responses, ended), dtype=torch.float32)
        scores = scores - p.missing_eos_penalty * (~torch.tensor(ended)).float()
        if it == 0:  # start the value head at the mean score, so early advantages are not all one sign
            value_start = d.dp_mean(float(scores.mean()))  # the same on every replica
            ac.value_head.proj.bias.fill_(value_start)
        batch = reply_rows(prompts, replies, tok.pad_id, device)
        logits, values = ac(batch)
        old_logp = logprobs_of(logits, batch["targets"])
        if frozen is not None:
            ref_logp = logprobs_of(frozen(batch["input_ids"], mask=batch["mask"]), batch["targets"])
        else:
            with disable_adapters(policy):
                ref_logp = logprobs_of(policy(batch["input_ids"], mask=batch["mask"]), batch["targets"])
        tmask = (batch["targets"] != L.IGNORE_INDEX).float()
        kl = (old_logp - ref_logp) * tmask
        kl_coef = state_extra.get("kl_coef", p.kl_coef)
        rewards = -kl_coef * kl
        last = torch.tensor([len(pr) + len(r) - 2 for pr, r in zip(prompts, replies)], device=device)
        rewards[torch.arange(len(idx), device=device), last] += scores.to(device)
        adv, returns = L.gae(rewards, values * tmask, tmask, p.gamma, p.lam)
        batch.update(old_logp=old_logp, old_values=values * tmask, adv=L.whiten(adv, tmask), returns=returns)
        mean_kl = d.dp_mean(float(L.masked_mean(kl, tmask)))  # k1 per token of the policy's own samples
        if p.target_kl > 0:  # adaptive controller (Ziegler et al. 2019)
            err = max(-0.2, min(0.2, mean_kl / p.target_kl - 1))
            state_extra["kl_coef"] = kl_coef * (1 + err * len(idx) * d.dp / p.kl_horizon)  # the whole rollout
        else:
            state_extra["kl_coef"] = kl_coef
        ac.train()
        n_tokens = sum(map(len, replies))
        stats = {
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()), "kl_k1": mean_kl,
            "kl_coef": kl_coef, "response_length": n_tokens / len(idx),
            "rollout_tokens_per_s": n_tokens / max(t_gen, 1e-9),
        }  # fmt: skip
        out = {"it": it, "batch": batch, "stats": stats}
        return {**out, "value_start": value_start} if it == 0 else out

    loop_ref: dict = {}

    def next_batches(step: int) -> list[dict]:
        it, j = divmod(step, updates)
        if cache["it"] != it:
            cache.update(make_rollout(it, loop_ref["loop"].state.extra))
        epoch, mb = divmod(j, p.minibatches)
        order = random.Random(cfg.seed * 1_000_003 + it * 7919 + epoch).sample(range(p.rollout_size), p.rollout_size)
        size = p.rollout_size // p.minibatches
        sel = torch.tensor(order[mb * size : (mb + 1) * size], device=device)
        return [{**{k: cache["batch"][k][sel] for k in ROLLOUT_KEYS}, "stats": cache["stats"]}]

    def loss_fn(m: ActorCritic, b: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits, values = m(b)
        tmask = (b["targets"] != L.IGNORE_INDEX).float()
        logp = logprobs_of(logits, b["targets"])
        pg, clip_frac, approx_kl = L.ppo_policy_loss(logp, b["old_logp"], b["adv"], tmask, p.clip)
        vloss = L.ppo_value_loss(values, b["old_values"], b["returns"], tmask, p.value_clip)
        entropy = L.masked_mean(L.entropy_from_logits(logits.detach() / p.temperature), tmask)
        loss = pg + p.value_coef * vloss
        if p.entropy_coef:
            loss = loss - p.entropy_coef * L.masked_mean(L.entropy_from_logits(logits / p.temperature), tmask)
        resid = L.masked_mean((b["returns"] - values.detach()) ** 2, tmask)
        var = L.masked_mean((b["returns"] - L.masked_mean(b["returns"], tmask)) ** 2, tmask)
        stats = {
            "policy_loss": float(pg.detach()), "value_loss": float(vloss.detach()), "entropy": float(entropy),
            "clip_fraction": float(clip_frac), "kl_old_new_k3": float(approx_kl),
            "explained_variance": float(1 - resid / var.clamp(min=1e-8)),
        }  # fmt: skip
        return loss, {**b["stats"], **stats}

    def on_save(state) -> dict[str, torch.Tensor]:
        if cache["it"] < 0:
            return {}
        saved = {f"rollout.{k}": cache["batch"][k] for k in ROLLOUT_KEYS}
        saved.update({f"rollout_stats.{k}": torch.tensor([v]) for k, v in cache["stats"].items()})
        return {"rollout_it": torch.tensor([cache["it"]]), **saved}

    def evaluate(m: ActorCritic) -> dict[str, float]:
        return evaluate_policy(m.policy, tok, eval_ids, eval_texts, reward_of, p.max_new_tokens)

    loop = Loop(model=ac, args=cfg.train, run_dir=out, next_batches=next_batches, device=device, loss_fn=loss_fn,
                health=HealthMonitor(slowdown=0, stall=False),  # drawing a batch is sampling a rollout
                count_fn=lambda b: 1, param_groups_fn=lambda m: _param_groups(m, cfg), on_save=on_save,
                evaluate=evaluate,
                monitor=cfg.monitor)  # fmt: skip
    loop_ref["loop"] = loop
    resumed = loop.resume() if cfg.resume else False
    if resumed and "rollout_it" in loop.resumed_extra:
        ex = loop.resumed_extra  # the rollout in progress when the checkpoint was written
        stats = {k.split(".", 1)[1]: float(v) for k, v in ex.items() if k.startswith("rollout_stats.")}
        cache.update(
            it=int(ex["rollout_it"]), batch={k: ex[f"rollout.{k}"].to(device) for k in ROLLOUT_KEYS}, stats=stats
        )
    trainable, total = trainable_parameters(ac)
    if progress:
        print(f"ppo: {len(encoded)} prompts, rollouts of {p.rollout_size}, {updates} updates each, critic "
              f"{p.critic}; {trainable:,} of {total:,} parameters trainable")  # fmt: skip
    state = loop.run_logged(resumed, lambda: evaluate(ac), progress)
    final = loop.final_model()  # rank 0: the whole model, gathered from its shards
    if final is not None:
        save_model(final.policy, out / "final", tok)
    return {"step": state.step, **loop.last_eval}
