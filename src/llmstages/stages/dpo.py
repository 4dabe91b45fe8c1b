"""Stage 3a, direct preference optimisation: DPO and its relatives on (prompt, chosen, rejected) pairs.

    llmstages dpo --config configs/dpo/lora.yaml [dpo.loss=ipo dpo.beta=0.5 ref.precompute=true ...]

setup: load the policy, tokenize the pairs (only the final reply is scored: prompt tokens masked), split off
       validation pairs; nothing is written until that has passed.
main:  the reference is the policy with its adapters disabled (LoRA/adapters: no second copy), a frozen copy
       (full fine-tuning), or log-probs computed once up front (ref.precompute=true). Chosen and rejected go
       through the model in one concatenated forward; the loss comes from losses.py, picked by name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from llmstages import losses as L
from llmstages.config import DPOConfig
from llmstages.data.preference import pair_batch, split_pairs, tokenize_pair
from llmstages.errors import UserError
from llmstages.model import GPT, load_model_and_tokenizer, save_model
from llmstages.peft import disable_adapters, prepare_policy, trainable_parameters
from llmstages.train.loop import EpochSampler, Loop, prepare_run_dir, start_run
from llmstages.train.rollout import builtin_preference_pairs

REFERENCE_FREE = ("simpo", "orpo")
LOSSES = ("dpo", "cdpo", "ipo", "simpo", "orpo")


def sequence_scores(model: GPT, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's reply, reply length) for the 2B rows of a pair batch."""
    logits = model(batch["input_ids"], mask=batch["mask"])
    return L.sequence_logprobs(logits, batch["targets"])


def make_loss(cfg: DPOConfig) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The configured loss as f(pol_w, pol_l, ref_w, ref_l, len_w, len_l, nll_w, eps) -> (loss, r_w, r_l); `eps`
    is cDPO's per-pair flip probability, 1 - the pair's `probability` (soft labels), else dpo.label_smoothing."""
    d = cfg.dpo
    table = {
        "dpo": lambda pw, pl, rw, rl, lw, ll, nll, eps: L.dpo_loss(pw, pl, rw, rl, d.beta),
        "cdpo": lambda pw, pl, rw, rl, lw, ll, nll, eps: L.dpo_loss(pw, pl, rw, rl, d.beta, eps),
        "ipo": lambda pw, pl, rw, rl, lw, ll, nll, eps: L.ipo_loss(pw, pl, rw, rl, d.beta, lw, ll),
        "simpo": lambda pw, pl, rw, rl, lw, ll, nll, eps: L.simpo_loss(pw, pl, lw, ll, d.beta, d.simpo_gamma),
        "orpo": lambda pw, pl, rw, rl, lw, ll, nll, eps: L.orpo_loss(pw, pl, lw, ll, nll, d.orpo_lambda),
    }  # fmt: skip
    if d.loss not in table:
        raise UserError(f"dpo.loss must be one of {', '.join(LOSSES)}, got '{d.loss}'")
    return table[d.loss]


def main(cfg: DPOConfig, progress: bool = True) -> dict[str, float]:
    out = Path(cfg.out_dir)
    device, _ = start_run(cfg, "dpo")
    if not cfg.model.path:
        raise UserError("set model.path to the policy to align (usually the SFT model's final/ directory)")
    loss_of = make_loss(cfg)
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg.model.path)
    builtin = (
        None
        if cfg.data.path
        else builtin_preference_pairs(model, tok, cfg.world_seed, cfg.seed, samples=cfg.data.samples)
    )  # oracle-labelled samples
    train_pairs, val_pairs = split_pairs(cfg.data, cfg.seed, builtin)
    if not train_pairs:
        raise UserError("no preference pair left for training")
    train = [tokenize_pair(p, tok, i, cfg.train.seq_len) for i, p in enumerate(train_pairs)]
    val = [tokenize_pair(p, tok, i, cfg.train.seq_len) for i, p in enumerate(val_pairs)]
    uses_adapters = prepare_policy(model, cfg.peft.method, **cfg.peft.options())  # a LoRA SFT model is merged
    prepare_run_dir(cfg, "dpo", model)
    model = model.to(device)

    # The reference: adapters off, a frozen copy, or nothing (reference-free losses, or precomputed).
    frozen = None
    if cfg.dpo.loss not in REFERENCE_FREE and not uses_adapters:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def reference_scores(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if frozen is not None:
            return sequence_scores(frozen, batch)[0]
        was_training = model.training
        model.eval()
        with disable_adapters(model):
            scores = sequence_scores(model, batch)[0]
        model.train(was_training)
        return scores

    pad = tok.pad_id
    to_device = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    precomputed: dict[str, torch.Tensor] = {}
    if cfg.ref.precompute and cfg.dpo.loss not in REFERENCE_FREE:
        for name, pairs in (("train", train), ("val", val)):
            table = torch.zeros(len(pairs), 2)
            for s in range(0, len(pairs), cfg.train.batch_size):
                b = to_device(pair_batch(pairs[s : s + cfg.train.batch_size], pad))
                table[b["index"].cpu()] = reference_scores(b).view(2, -1).t().cpu()
            precomputed[name] = table
        frozen = None  # the copy is no longer needed

    def score(m: GPT, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, dict[str, float]]:
        n = batch["index"].numel()
        logp, lengths = sequence_scores(m, batch)
        pol_w, pol_l, len_w, len_l = logp[:n], logp[n:], lengths[:n].float(), lengths[n:].float()
        if cfg.dpo.loss in REFERENCE_FREE:
            ref_w = ref_l = torch.zeros_like(pol_w)
        elif split in precomputed:
            ref = precomputed[split][batch["index"].cpu()].to(logp.device)
            ref_w, ref_l = ref[:, 0], ref[:, 1]
        else:
            ref = reference_scores(batch)
            ref_w, ref_l = ref[:n], ref[n:]
        prob = batch["probability"].to(logp.device)
        eps = torch.where(prob.isnan(), torch.full_like(prob, cfg.dpo.label_smoothing), 1 - prob)
        loss, r_w, r_l = loss_of(pol_w, pol_l, ref_w, ref_l, len_w, len_l, -pol_w / len_w, eps)
        if cfg.dpo.rpo_alpha > 0 and cfg.dpo.loss != "orpo":  # ORPO has its own NLL term
            loss = loss + cfg.dpo.rpo_alpha * (-pol_w / len_w).mean()
        margin = r_w - r_l
        # log pi/ref per token of the dataset's replies: the margin's parts. Not a KL (these replies are not the
        # policy's samples): it goes negative as DPO pushes the rejected replies down.
        ratio_w = (pol_w - ref_w).detach().sum() / len_w.sum()
        ratio_l = (pol_l - ref_l).detach().sum() / len_l.sum()
        stats = {
            "rewards/chosen": float(r_w.mean()), "rewards/rejected": float(r_l.mean()), "margin": float(margin.mean()),
            "accuracy": float((margin > 0).float().mean()), "logratio/chosen": float(ratio_w),
            "logratio/rejected": float(ratio_l),
        }  # fmt: skip
        return loss * n, stats

    sampler = EpochSampler(len(train), cfg.train.batch_size, cfg.train.grad_accum, cfg.seed)

    def next_batches(step: int) -> list[dict[str, torch.Tensor]]:
        return [to_device(pair_batch([train[i] for i in sampler(step, m)], pad)) for m in range(cfg.train.grad_accum)]

    def evaluate(m: GPT) -> dict[str, float]:
        if not val:
            return {}
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for s in range(0, len(val), cfg.train.batch_size):
            chunk = val[s : s + cfg.train.batch_size]
            loss, stats = score(m, to_device(pair_batch(chunk, pad)), "val")
            loss_sum += float(loss)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * len(chunk)
        return {"val_loss": loss_sum / len(val), **{f"val_{k}": v / len(val) for k, v in totals.items()}}

    loop = Loop(model=model, args=cfg.train, run_dir=out, next_batches=next_batches, device=device,
                loss_fn=lambda m, b: score(m, b, "train"), count_fn=lambda b: int(b["index"].numel()),
                evaluate=evaluate,
                monitor=cfg.monitor)  # fmt: skip
    resumed = loop.resume() if cfg.resume else False
    trainable, total = trainable_parameters(model)
    if progress:
        if cfg.dpo.loss in REFERENCE_FREE:
            ref = "none"
        else:
            ref = "precomputed" if precomputed else "adapters disabled" if frozen is None else "frozen copy"
        print(f"dpo: {len(train)} pairs ({len(val)} held out), loss {cfg.dpo.loss}, beta {cfg.dpo.beta}, "
              f"reference: {ref}; {trainable:,} of {total:,} parameters trainable")  # fmt: skip
    state = loop.run_logged(resumed, lambda: {"pairs": len(train), **evaluate(model)}, progress)
    final = loop.final_model()  # rank 0: the whole model, gathered from its shards
    if final is not None:
        save_model(final, out / "final", tok)
    return {"step": state.step, **loop.last_eval}
