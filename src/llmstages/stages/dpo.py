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
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from llmstages import losses as L
from llmstages.config import DPOArgs, DPOConfig
from llmstages.data.lengths import Tally, train_window
from llmstages.data.preference import Pair, pair_batch, split_pairs, tokenize_pairs
from llmstages.data.prompts import builtin_preference_pairs
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model import GPT, load_model_and_tokenizer, save_model
from llmstages.peft import disable_adapters, prepare_policy, trainable_parameters
from llmstages.train.frozen import base_weights, hold_frozen
from llmstages.train.loop import EpochSampler, Loop, compile_blocks, prepare_run_dir, start_run
from llmstages.train.rollout import policy_logprobs

REFERENCE_FREE = ("simpo", "orpo")
LOSSES = ("dpo", "cdpo", "ipo", "simpo", "orpo")


@dataclass
class Setup:
    out: Path
    device: torch.device
    model: GPT
    tokenizer: Tokenizer
    train: list[Pair]
    val: list[Pair]
    uses_adapters: bool
    """The policy trains adapters: the reference is the policy with them disabled (no second copy)."""
    fit: Tally
    """Pairs cut or dropped to fit the window (data/lengths.py), training and held-out together."""


def setup(cfg: DPOConfig) -> Setup:
    """Check the config, load the policy and the pairs (sampled and oracle-labelled for the built-in world),
    tokenize them and apply PEFT; writes nothing."""
    device, _ = start_run(cfg, "dpo")
    if not cfg.model.path:
        raise UserError("set model.path to the policy to align (usually the SFT model's final/ directory)")
    if cfg.dpo.loss not in LOSSES:
        raise UserError(f"dpo.loss must be one of {', '.join(LOSSES)}, got '{cfg.dpo.loss}'")
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg.model.path)
    builtin = None
    if not cfg.data.path:
        builtin = builtin_preference_pairs(model, tok, cfg.world_seed, cfg.seed, samples=cfg.data.samples)
    train_pairs, val_pairs = split_pairs(cfg.data, cfg.seed, builtin)
    if not train_pairs:
        raise UserError("no preference pair left for training")
    limit, name = train_window(cfg.train.seq_len, model.config.block_size, shifted=True)
    train, fit = tokenize_pairs(train_pairs, tok, limit, name, cfg.data.max_dropped)  # too long: cut or dropped
    val, val_fit = tokenize_pairs(val_pairs, tok, limit, name, cfg.data.max_dropped)
    uses_adapters = prepare_policy(model, cfg.peft.method, **cfg.peft.options())  # a LoRA SFT model is merged
    return Setup(Path(cfg.out_dir), device, model, tok, train, val, uses_adapters, fit + val_fit)


def sequence_scores(model: GPT, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's reply, reply length) for the 2B rows of a pair batch; the reply tokens'
    log-probs come from the hidden states in chunks (losses.head_logprobs), never the whole logits."""
    return policy_logprobs(model, batch).sum(-1), (batch["targets"] != L.IGNORE_INDEX).sum(-1)


class Reference:
    """log pi_ref of each pair's two replies: from the policy with its adapters disabled, a frozen copy of the
    initial policy (full fine-tuning), a table computed once up front (ref.precompute), or zeros (SimPO, ORPO)."""

    def __init__(self, s: Setup, cfg: DPOConfig) -> None:
        self.policy, self.free = s.model, cfg.dpo.loss in REFERENCE_FREE
        self.frozen = None
        if not self.free and not s.uses_adapters:
            self.frozen = copy.deepcopy(s.model).eval().requires_grad_(False)
        self.table: dict[str, torch.Tensor] = {}
        if cfg.ref.precompute and not self.free:
            for split, pairs in (("train", s.train), ("val", s.val)):
                self.table[split] = torch.zeros(len(pairs), 2)
                for i in range(0, len(pairs), cfg.train.batch_size):
                    b = to_device(pair_batch(pairs[i : i + cfg.train.batch_size], s.tokenizer.pad_id), s.device)
                    self.table[split][b["index"].cpu()] = self.computed(b).view(2, -1).t().cpu()
            self.frozen = None  # the copy is no longer needed
        if self.frozen is not None:  # read only under the loop's autocast: held in its dtype
            hold_frozen(self.frozen, cfg.train.precision)
            if cfg.train.compile:
                compile_blocks(self.frozen)

    @property
    def kind(self) -> str:
        if self.free:
            return "none"
        return "precomputed" if self.table else "frozen copy" if self.frozen is not None else "adapters disabled"

    @torch.no_grad()
    def computed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) reference log-probs of a pair batch's rows, computed now."""
        if self.frozen is not None:
            return sequence_scores(self.frozen, batch)[0]
        was_training = self.policy.training
        self.policy.eval()
        with disable_adapters(self.policy):
            scores = sequence_scores(self.policy, batch)[0]
        self.policy.train(was_training)
        return scores

    def scores(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs, (B,) each."""
        n = batch["index"].numel()
        if self.free:
            zero = torch.zeros(n, device=batch["input_ids"].device)
            return zero, zero
        if split in self.table:
            ref = self.table[split][batch["index"].cpu()].to(batch["input_ids"].device)
            return ref[:, 0], ref[:, 1]
        ref = self.computed(batch)
        return ref[:n], ref[n:]


def pair_loss(
    d: DPOArgs,
    pol: tuple[torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor],
    lengths: tuple[torch.Tensor, torch.Tensor],
    eps: torch.Tensor,
):
    """The configured objective of losses.py -> (loss, implicit reward of chosen, of rejected). `pol`, `ref`,
    `lengths`: (chosen, rejected) summed log-probs and reply lengths, (B,) each; `eps`: cDPO's per-pair flip
    probability (1 - the pair's `probability` for soft labels, else dpo.label_smoothing)."""
    (pw, pl), (rw, rl), (lw, ll) = pol, ref, lengths
    if d.loss == "dpo":
        return L.dpo_loss(pw, pl, rw, rl, d.beta)
    if d.loss == "cdpo":
        return L.dpo_loss(pw, pl, rw, rl, d.beta, eps)
    if d.loss == "ipo":
        return L.ipo_loss(pw, pl, rw, rl, d.beta, lw, ll)
    if d.loss == "simpo":
        return L.simpo_loss(pw, pl, lw, ll, d.beta, d.simpo_gamma)
    return L.orpo_loss(pw, pl, lw, ll, -pw / lw, d.orpo_lambda)


def score(m: GPT, batch: dict[str, torch.Tensor], split: str, ref: Reference, d: DPOArgs):
    """(loss x pairs, stats) of one pair batch: its chosen rows first, then its rejected rows."""
    n = batch["index"].numel()
    logp, lengths = sequence_scores(m, batch)
    pol_w, pol_l, len_w, len_l = logp[:n], logp[n:], lengths[:n].float(), lengths[n:].float()
    ref_w, ref_l = ref.scores(batch, split)
    prob = batch["probability"].to(logp.device)
    eps = torch.where(prob.isnan(), torch.full_like(prob, d.label_smoothing), 1 - prob)
    loss, r_w, r_l = pair_loss(d, (pol_w, pol_l), (ref_w, ref_l), (len_w, len_l), eps)
    if d.rpo_alpha > 0 and d.loss != "orpo":  # ORPO has its own NLL term
        loss = loss + d.rpo_alpha * (-pol_w / len_w).mean()
    margin = r_w - r_l
    # log pi/ref per token of the dataset's replies: the margin's parts. Not a KL (these replies are not the
    # policy's samples): it goes negative as DPO pushes the rejected replies down.
    stats = {
        "rewards/chosen": float(r_w.mean()),
        "rewards/rejected": float(r_l.mean()),
        "margin": float(margin.mean()),
        "accuracy": float((margin > 0).float().mean()),
        "logratio/chosen": float((pol_w - ref_w).detach().sum() / len_w.sum()),
        "logratio/rejected": float((pol_l - ref_l).detach().sum() / len_l.sum()),
    }
    return loss * n, stats


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(m: GPT, s: Setup, ref: Reference, cfg: DPOConfig) -> dict[str, float]:
    """Loss and the pair statistics over the validation pairs, weighted by pairs."""
    if not s.val:
        return {}
    totals: dict[str, float] = {}
    loss_sum = 0.0
    for i in range(0, len(s.val), cfg.train.batch_size):
        chunk = s.val[i : i + cfg.train.batch_size]
        loss, stats = score(m, to_device(pair_batch(chunk, s.tokenizer.pad_id), s.device), "val", ref, cfg.dpo)
        loss_sum += float(loss)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
    return {"val_loss": loss_sum / len(s.val), **{f"val_{k}": v / len(s.val) for k, v in totals.items()}}


def main(cfg: DPOConfig, progress: bool = True) -> dict[str, float]:
    s = setup(cfg)
    prepare_run_dir(cfg, "dpo", s.model)
    s.model.to(s.device)
    ref = Reference(s, cfg)
    sampler = EpochSampler(len(s.train), cfg.train.batch_size, cfg.train.grad_accum, cfg.seed)

    def next_batches(step: int) -> list[dict[str, torch.Tensor]]:
        return [
            to_device(pair_batch([s.train[i] for i in sampler(step, m)], s.tokenizer.pad_id), s.device)
            for m in range(cfg.train.grad_accum)
        ]

    loop = Loop(
        model=s.model,
        args=cfg.train,
        run_dir=s.out,
        next_batches=next_batches,
        device=s.device,
        loss_fn=lambda m, b: score(m, b, "train", ref, cfg.dpo),
        count_fn=lambda b: int(b["index"].numel()),
        evaluate=lambda m: evaluate(m, s, ref, cfg),
        monitor=cfg.monitor,
        frozen_source=functools.partial(base_weights, cfg.model.path),
    )
    resumed = loop.resume() if cfg.resume else False
    trainable, total = trainable_parameters(s.model)
    if progress:
        print(
            f"dpo: {len(s.train)} pairs ({len(s.val)} held out; {s.fit.summary()}), loss {cfg.dpo.loss}, "
            f"beta {cfg.dpo.beta}, "
            f"reference: {ref.kind}; {trainable:,} of {total:,} parameters trainable"
        )
    start = {"pairs": len(s.train), **s.fit.metrics()}
    state = loop.run_logged(resumed, lambda: {**start, **evaluate(s.model, s, ref, cfg)}, progress)
    final = loop.final_model()  # rank 0: the whole model, gathered from its shards
    if final is not None:
        save_model(final, s.out / "final", s.tokenizer)
    return {"step": state.step, **loop.last_eval}
