"""Stage 3c, GRPO (Shao et al. 2024, DeepSeekMath): sample G replies per prompt, score them, and push the policy
towards replies that beat their group's mean, with a k3 KL penalty to the reference. No value model.

    llmstages grpo --config configs/grpo/lora.yaml [grpo.group_size=8 reward.fn=my_module:my_reward ...]

Each optimizer step draws a fresh rollout from the current policy (one update per rollout, as TRL's default
num_iterations=1: the probability ratio is 1 at the update, and the clip only matters with several updates).
The loss is averaged over every response token of the step:
    A_i = (r_i - mean(r_group)) / std(r_group)
    loss = mean_t [ -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * k3(pi, ref)_t ]
Rollouts are seeded by (seed, step), so a resumed run samples what the uninterrupted run sampled.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from llmstages import losses as L
from llmstages.config import GRPOConfig
from llmstages.data.chat import prompt_ids
from llmstages.errors import UserError
from llmstages.model import GPT, load_model_and_tokenizer, save_model
from llmstages.monitor.health import HealthMonitor
from llmstages.peft import disable_adapters, prepare_policy, trainable_parameters
from llmstages.train import distributed
from llmstages.train.loop import EpochSampler, Loop, prepare_run_dir, start_run
from llmstages.train.rollout import evaluate_policy, prompt_sets, reply_rows, reward_source, sample_replies


def main(cfg: GRPOConfig, progress: bool = True) -> dict[str, float]:
    out = Path(cfg.out_dir)
    device, _ = start_run(cfg, "grpo")
    g = cfg.grpo
    if g.group_size < 2:
        raise UserError(
            f"grpo.group_size must be at least 2 (advantages compare replies within a group), got {g.group_size}"
        )
    if not cfg.model.path:
        raise UserError("set model.path to the policy (usually the SFT model's final/ directory)")
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg.model.path)
    reward_of = reward_source(cfg.reward, tok, device, cfg.world_seed)
    train_prompts, eval_prompts = prompt_sets(cfg.data, cfg.world_seed)
    by_disabling = prepare_policy(model, cfg.peft.method, **cfg.peft.options())  # a LoRA SFT model is merged
    model = model.to(device)
    frozen = None if by_disabling else copy.deepcopy(model).eval().requires_grad_(False)
    prepare_run_dir(cfg, "grpo", model)
    encoded = [prompt_ids(m, tok) for m in train_prompts]
    texts = [m[-1]["content"] for m in train_prompts]
    sampler = EpochSampler(len(train_prompts), g.prompts_per_step, 1, cfg.seed)  # under ddp: per rank
    d = distributed.current()

    def logprobs(m: GPT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = m(batch["input_ids"], mask=batch["mask"])
        return L.token_logprobs(logits / g.temperature, batch["targets"])

    @torch.no_grad()
    def reference_logprobs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if frozen is not None:
            return logprobs(frozen, batch)
        with disable_adapters(model):
            return logprobs(model, batch)

    def rollout(step: int) -> list[dict]:
        t0 = time.perf_counter()
        idx = [i for i in sampler(step, 0) for _ in range(g.group_size)]
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step + 7919 * d.dp_rank)
        model.eval()
        prompts = [encoded[i] for i in idx]
        with distributed.gathered(model):  # fsdp: sampling runs the model's parts token by token
            replies, responses, ended = sample_replies(model, tok, prompts, g.max_new_tokens, g.temperature, gen)
        t_gen = time.perf_counter() - t0
        rewards = torch.tensor(reward_of([texts[i] for i in idx], responses, ended), dtype=torch.float32)
        batch = reply_rows(prompts, replies, tok.pad_id, device)
        batch["adv"] = L.group_advantages(rewards, g.group_size, scale=g.scale_advantages).to(device)
        with torch.no_grad():
            batch["old_logp"] = logprobs(model, batch)
            batch["ref_logp"] = reference_logprobs(batch)
        model.train()
        groups = rewards.view(-1, g.group_size)
        batch["stats"] = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "zero_advantage_groups": float((groups.std(-1) == 0).float().mean()),
            "response_length": sum(map(len, replies)) / len(replies),
            "rollout_tokens_per_s": sum(map(len, replies)) / max(t_gen, 1e-9),
        }  # fmt: skip
        return [batch]

    def loss_fn(m: GPT, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        tmask = (batch["targets"] != L.IGNORE_INDEX).float()
        logp = logprobs(m, batch)
        ratio = torch.exp(logp - batch["old_logp"])
        a = batch["adv"][:, None]
        pg = -torch.min(ratio * a, ratio.clamp(1 - g.clip, 1 + g.clip) * a)
        kl = L.kl_estimate(logp, batch["ref_logp"], "k3")
        loss = ((pg + g.kl_beta * kl) * tmask).sum()
        stats = {**batch["stats"], "kl_k3": float(L.masked_mean(kl.detach(), tmask)),
                 "clip_fraction": float(L.masked_mean(((ratio - 1).abs() > g.clip).float(), tmask))}  # fmt: skip
        return loss, stats

    eval_ids = [prompt_ids(m, tok) for m in eval_prompts]
    eval_texts = [m[-1]["content"] for m in eval_prompts]

    def evaluate(m: GPT) -> dict[str, float]:
        return evaluate_policy(m, tok, eval_ids, eval_texts, reward_of, g.max_new_tokens)

    loop = Loop(model=model, args=cfg.train, run_dir=out, next_batches=rollout, device=device, loss_fn=loss_fn,
                health=HealthMonitor(slowdown=0, stall=False),  # drawing a batch is sampling a rollout
                count_fn=lambda b: int((b["targets"] != L.IGNORE_INDEX).sum()), evaluate=evaluate,
                monitor=cfg.monitor)  # fmt: skip
    resumed = loop.resume() if cfg.resume else False
    trainable, total = trainable_parameters(model)
    if progress:
        print(f"grpo: {len(train_prompts)} prompts, {g.prompts_per_step} x {g.group_size} samples a step; "
              f"{trainable:,} of {total:,} parameters trainable")  # fmt: skip
    state = loop.run_logged(resumed, lambda: evaluate(model), progress)
    final = loop.final_model()  # rank 0: the whole model, gathered from its shards
    if final is not None:
        save_model(final, out / "final", tok)
    return {"step": state.step, **loop.last_eval}
