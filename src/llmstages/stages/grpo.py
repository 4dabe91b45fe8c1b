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
import importlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmstages import losses as L
from llmstages.config import GRPOConfig, save_config
from llmstages.data.chat import Message, prompt_ids
from llmstages.data.preference import read_prompts
from llmstages.data.tasks import QUESTIONS, split_people
from llmstages.data.text import tokenizer_hash
from llmstages.errors import UserError
from llmstages.model import GPT, generate, load_model, load_tokenizer, save_model
from llmstages.monitor.metrics import MetricsLogger
from llmstages.peft import apply_peft, disable_adapters, merge_lora, peft_config, trainable_parameters
from llmstages.train.loop import EpochSampler, Loop, start_run

RewardFn = Callable[[list[str], list[str], list[bool]], list[float]]


def import_reward_fn(spec: str) -> RewardFn:
    """`module:function` -> the function; a clear error when it does not import."""
    if ":" not in spec:
        raise UserError(f"reward.fn '{spec}' must look like module:function")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"reward.fn '{spec}' does not import ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UserError(f"reward.fn '{spec}' is not callable")
    return fn


def reward_source(cfg: GRPOConfig, policy_tok, device) -> RewardFn:
    """The configured reward as f(prompts, responses, ended) -> scores: a callable or a reward model."""
    if not cfg.reward.model:
        if not cfg.reward.fn:
            raise UserError("set reward.fn (module:function) or reward.model (a reward-model directory)")
        return import_reward_fn(cfg.reward.fn)
    from llmstages.data.chat import tokenize_conversation
    from llmstages.model.heads import load_reward_model

    rm = load_reward_model(cfg.reward.model, device=device).eval()
    rm_tok = load_tokenizer(cfg.reward.model)
    if tokenizer_hash(rm_tok) != tokenizer_hash(policy_tok):
        raise UserError(f"reward.model {cfg.reward.model}: its tokenizer differs from the policy's")

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str], ended: list[bool]) -> list[float]:
        rows = [tokenize_conversation([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                      rm_tok).input_ids for p, r in zip(prompts, responses)]  # fmt: skip
        ids = torch.full((len(rows), max(map(len, rows))), rm_tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, row in enumerate(rows):
            ids[k, : len(row)] = torch.tensor(row)
            mask[k, : len(row)] = 1
        return rm(ids.to(device), mask.to(device)).float().cpu().tolist()

    return score


def builtin_prompts(seed: int, heldout: int) -> tuple[list[list[Message]], list[list[Message]]]:
    """Fact questions about the training people (for RL) and about held-out people (for evaluation)."""
    from llmstages.data.builtin import World

    train_people, held = split_people(World(seed), heldout)

    def qs(people):
        return [
            [{"role": "user", "content": q.format(n=p.name)}] for p in people for a in QUESTIONS for q in QUESTIONS[a]
        ]

    return qs(train_people), qs(held)


def main(cfg: GRPOConfig, progress: bool = True) -> dict[str, float]:
    out = Path(cfg.out_dir)
    device, _ = start_run(out, cfg.train, cfg.resume)
    g = cfg.grpo
    if g.group_size < 2:
        raise UserError(
            f"grpo.group_size must be at least 2 (advantages compare replies within a group), got {g.group_size}"
        )
    if not cfg.model.path:
        raise UserError("set model.path to the policy (usually the SFT model's final/ directory)")
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model.path)
    tok = load_tokenizer(cfg.model.path)
    reward_of = reward_source(cfg, tok, device)
    if cfg.data.path:
        train_prompts = [m for _, m in read_prompts(cfg.data.path)]
        eval_prompts = train_prompts[: min(64, len(train_prompts))]
    else:
        train_prompts, eval_prompts = builtin_prompts(cfg.seed, cfg.data.heldout_people)
    loaded = (peft_config(model) or {}).get("method")
    if loaded in ("lora", "dora"):
        merge_lora(model)  # the SFT model becomes the base and the reference
        loaded = None
    if loaded is None:
        for p in model.parameters():
            p.requires_grad_(True)
        apply_peft(model, cfg.peft.method, **cfg.peft.options())
    model = model.to(device)
    frozen = None if (loaded is None and peft_config(model) is not None) else copy.deepcopy(model).eval()
    if frozen is not None:
        frozen.requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    encoded = [prompt_ids(m, tok) for m in train_prompts]
    texts = [m[-1]["content"] for m in train_prompts]
    sampler = EpochSampler(len(train_prompts), g.prompts_per_step, 1, cfg.seed)

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
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        model.eval()
        out_gen = generate(model, [encoded[i] for i in idx], g.max_new_tokens, temperature=g.temperature,
                           eos_id=tok.eos_id, pad_id=tok.pad_id, generator=gen)  # fmt: skip
        t_gen = time.perf_counter() - t0
        rows, responses, ended = [], [], []
        for i, toks, n in zip(idx, out_gen.tokens.tolist(), out_gen.lengths.tolist()):
            resp = toks[:n]
            ended.append(bool(n) and resp[-1] == tok.eos_id)
            responses.append(tok.decode(resp))
            rows.append((encoded[i], resp))
        rewards = torch.tensor(reward_of([texts[i] for i in idx], responses, ended), dtype=torch.float32)
        adv = L.group_advantages(rewards, g.group_size, scale=g.scale_advantages)
        T = max(len(p) + len(r) for p, r in rows) - 1
        ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), T), L.IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for k, (p, r) in enumerate(rows):
            seq = p + r
            ids[k, : len(seq) - 1] = torch.tensor(seq[:-1])
            mask[k, : len(seq) - 1] = 1
            if r:
                targets[k, len(p) - 1 : len(seq) - 1] = torch.tensor(r)
        batch = {"input_ids": ids.to(device), "targets": targets.to(device), "mask": mask.to(device),
                 "adv": adv.to(device)}  # fmt: skip
        with torch.no_grad():
            batch["old_logp"] = logprobs(model, batch)
            batch["ref_logp"] = reference_logprobs(batch)
        model.train()
        groups = rewards.view(-1, g.group_size)
        batch["stats"] = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "zero_advantage_groups": float((groups.std(-1) == 0).float().mean()),
            "response_length": float(out_gen.lengths.float().mean()),
            "rollout_tokens_per_s": float(out_gen.lengths.sum()) / max(t_gen, 1e-9),
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
        stats = {**batch["stats"], "kl": float(L.masked_mean(kl.detach(), tmask)),
                 "clip_fraction": float(L.masked_mean(((ratio - 1).abs() > g.clip).float(), tmask))}  # fmt: skip
        return loss, stats

    eval_ids = [prompt_ids(m, tok) for m in eval_prompts]
    eval_texts = [m[-1]["content"] for m in eval_prompts]

    def evaluate(m: GPT) -> dict[str, float]:
        res = generate(m, eval_ids, g.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id)
        responses = [tok.decode(t[:n]) for t, n in zip(res.tokens.tolist(), res.lengths.tolist())]
        ended = [bool(n) and t[n - 1] == tok.eos_id for t, n in zip(res.tokens.tolist(), res.lengths.tolist())]
        scores = torch.tensor(reward_of(eval_texts, responses, ended))
        return {"eval_reward": float(scores.mean()), "eval_length": float(res.lengths.float().mean())}

    loop = Loop(model=model, args=cfg.train, run_dir=out, next_batches=rollout, device=device, loss_fn=loss_fn,
                count_fn=lambda b: int((b["targets"] != L.IGNORE_INDEX).sum()), evaluate=evaluate)  # fmt: skip
    resumed = loop.resume() if cfg.resume else False
    trainable, total = trainable_parameters(model)
    if progress:
        print(f"grpo: {len(train_prompts)} prompts, {g.prompts_per_step} x {g.group_size} samples a step; "
              f"{trainable:,} of {total:,} parameters trainable")  # fmt: skip
    log = MetricsLogger(out, resume_step=loop.state.step if resumed else None)
    if not resumed:
        model.eval()
        with torch.no_grad():
            log.log({"step": 0, "event": "start", **evaluate(model)})
        model.train()
    try:
        state = loop.run(log, progress=progress)
    finally:
        log.close()
    save_model(model, out / "final", tok)
    return {"step": state.step, **loop.last_eval}
