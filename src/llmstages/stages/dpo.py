"""Stage 3a, direct preference optimisation: DPO and its relatives on (prompt, chosen, rejected) pairs, and KTO
on unpaired (prompt, completion, desirable or not) rows.

    llmstages dpo --config configs/dpo/lora.yaml [dpo.loss=ipo dpo.beta=0.5 ref.precompute=true ...]

setup: load the policy, tokenize the pairs (only the final reply is scored: prompt tokens masked), split off
       validation pairs; nothing is written until that has passed.
main:  the reference is the policy with its adapters disabled (LoRA/adapters: no second copy), a frozen copy
       (full fine-tuning), or log-probs computed once up front (ref.precompute=true). Chosen and rejected go
       through the model in one concatenated forward; the loss comes from losses.py, picked by name.
       KTO (dpo.loss=kto) scores single rows instead, and its reference point z0 from the same prompts each with
       another row's completion (no gradient), as TRL's KTOTrainer does.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmstages import losses as L
from llmstages.config import DPOArgs, DPOConfig, to_dict
from llmstages.data.lengths import Tally, train_window
from llmstages.data.preference import (
    Pair,
    Row,
    feedback_batch,
    pair_batch,
    read_feedback,
    read_preferences,
    split_pairs,
    tokenize_feedback,
    tokenize_pairs,
    unpaired,
)
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model import GPT
from llmstages.peft import disable_adapters, prepare_policy, trainable_parameters
from llmstages.rl.pairs import builtin_preference_pairs
from llmstages.rl.rollout import policy_logprobs
from llmstages.store import load_model_and_tokenizer, save_model
from llmstages.train.frozen import base_weights, hold_frozen
from llmstages.train.loop import EpochSampler, Trainer, fit
from llmstages.train.prepare import compile_blocks, prepare_model
from llmstages.train.start import prepare_run_dir, start_run

REFERENCE_FREE = ("simpo", "orpo")
LOSSES = ("dpo", "cdpo", "ipo", "hinge", "simpo", "orpo", "kto")


@dataclass
class Setup:
    out: Path
    device: torch.device
    model: GPT
    tokenizer: Tokenizer
    train: list[Pair] | list[Row]
    val: list[Pair] | list[Row]
    """Pairs, or KTO's feedback rows."""
    uses_adapters: bool
    """The policy trains adapters: the reference is the policy with them disabled (no second copy)."""
    fit: Tally
    """Pairs cut or dropped to fit the window (data/lengths.py), training and held-out together."""
    kto: bool
    limit: int
    """Tokens a row may hold (KTO's mismatched rows are fitted to it too)."""

    @property
    def unit(self) -> str:
        return "rows" if self.kto else "pairs"

    def batch(self, items: list) -> dict[str, torch.Tensor]:
        """A batch of pairs (pair_batch) or of KTO rows (feedback_batch), on the device."""
        pad = self.tokenizer.pad_id
        return to_device(feedback_batch(items, pad, self.limit) if self.kto else pair_batch(items, pad), self.device)


def setup(cfg: DPOConfig) -> Setup:
    """Check the config, load the policy and the pairs (sampled and oracle-labelled for the built-in world),
    tokenize them and apply PEFT; writes nothing."""
    device, _ = start_run(cfg.run_args("dpo"))
    if not cfg.model.path:
        raise UserError("set model.path to the policy to align (usually the SFT model's final/ directory)")
    if cfg.dpo.loss not in LOSSES:
        raise UserError(f"dpo.loss must be one of {', '.join(LOSSES)}, got '{cfg.dpo.loss}'")
    kto = cfg.dpo.loss == "kto"
    if kto and cfg.ref.precompute:
        raise UserError(
            "ref.precompute does not apply to dpo.loss=kto: its reference point scores each prompt with another "
            "row's completion of the same batch, which changes from step to step; leave it false"
        )
    torch.manual_seed(cfg.seed)
    # the built-in pairs are sampled from the base as saved, before QLoRA quantizes it: loaded whole for them
    quantize = cfg.peft.quantize_base if cfg.data.path else "none"
    model, tok = load_model_and_tokenizer(cfg.model.path, quantize_base=quantize)
    builtin = None
    if not cfg.data.path:
        builtin = builtin_preference_pairs(model, tok, cfg.world_seed, cfg.seed, samples=cfg.data.samples)
    read, tokenize = (read_feedback, tokenize_feedback) if kto else (read_preferences, tokenize_pairs)
    if kto and builtin is not None:
        builtin = unpaired(builtin)  # chosen desirable, rejected not
    train_pairs, val_pairs = split_pairs(cfg.data, cfg.seed, builtin, read)
    if not train_pairs:
        raise UserError(f"no {'feedback row' if kto else 'preference pair'} left for training")
    limit, name = train_window(cfg.train.seq_len, model.config.block_size, shifted=True)
    train, fit = tokenize(train_pairs, tok, limit, name, cfg.data.max_dropped)  # too long: cut or dropped
    val, val_fit = tokenize(val_pairs, tok, limit, name, cfg.data.max_dropped)
    uses_adapters = prepare_policy(model, cfg.peft.method, **cfg.peft.options())  # a LoRA SFT model is merged
    return Setup(Path(cfg.out_dir), device, model, tok, train, val, uses_adapters, fit + val_fit, kto, limit)


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
                    b = s.batch(pairs[i : i + cfg.train.batch_size])
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
    if d.loss == "hinge":
        return L.hinge_loss(pw, pl, rw, rl, d.beta)
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


def kto_score(m: GPT, batch: dict[str, torch.Tensor], split: str, ref: Reference, d: DPOArgs):
    """(loss x rows, stats) of one batch of feedback rows: losses.kto_loss, its reference point z0 from the same
    prompts each with another row's completion (the batch's kl_* rows), scored without gradient."""
    n, good = batch["index"].numel(), batch["desirable"]
    pol = sequence_scores(m, batch)[0]
    mismatched = {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}
    with torch.no_grad():
        z0 = L.kto_reference_point(sequence_scores(m, mismatched)[0], ref.computed(mismatched))
    w_d, w_u = d.kto_desirable_weight, d.kto_undesirable_weight
    loss, rewards = L.kto_loss(pol, ref.computed(batch), good, z0, d.beta, w_d, w_u)
    # z0 estimates KL(policy || reference) from the dataset's completions, not the policy's samples: named as such
    stats = {"kto_z0": float(z0)}
    for name, rows in (("desirable", good), ("undesirable", ~good)):
        if rows.any():  # a batch without such a row leaves the key out
            stats[f"rewards/{name}"] = float(rewards[rows].mean())
    return loss * n, stats


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(m: GPT, s: Setup, ref: Reference, cfg: DPOConfig) -> dict[str, float]:
    """Loss and the statistics over the validation pairs (or rows), weighted by the pairs (rows) that gave them."""
    if not s.val:
        return {}
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    loss_sum = 0.0
    for i in range(0, len(s.val), cfg.train.batch_size):
        chunk = s.val[i : i + cfg.train.batch_size]
        loss, stats = (kto_score if s.kto else score)(m, s.batch(chunk), "val", ref, cfg.dpo)
        loss_sum += float(loss)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
            counts[k] = counts.get(k, 0) + len(chunk)
    return {"val_loss": loss_sum / len(s.val), **{f"val_{k}": v / counts[k] for k, v in totals.items()}}


def main(cfg: DPOConfig, progress: bool = True) -> dict[str, float]:
    s = setup(cfg)
    prepare_run_dir(cfg.run_args("dpo"), to_dict(cfg), s.model)
    s.model.to(s.device)
    ref = Reference(s, cfg)  # a frozen copy is taken of the model as loaded, before it is prepared
    sampler = EpochSampler(len(s.train), cfg.train.batch_size, cfg.train.grad_accum, cfg.seed)

    def batches(start: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The grad_accum micro-batches of pairs (KTO: examples) of each step."""
        for step in itertools.count(start):
            yield [s.batch([s.train[i] for i in sampler(step, m)]) for m in range(cfg.train.grad_accum)]

    loss_fn = kto_score if s.kto else score
    model = prepare_model(s.model, cfg.train, frozen_source=functools.partial(base_weights, cfg.model.path))
    trainer = Trainer(model, cfg.train, s.out, device=s.device)
    trainable, total = trainable_parameters(s.model)
    if progress:
        print(
            f"dpo: {len(s.train)} {s.unit} ({len(s.val)} held out; {s.fit.summary()}), loss {cfg.dpo.loss}, "
            f"beta {cfg.dpo.beta}, "
            f"reference: {ref.kind}; {trainable:,} of {total:,} parameters trainable"
        )
    start = {s.unit: len(s.train), **s.fit.metrics()}
    return fit(
        trainer,
        batches,
        lambda m, b: loss_fn(m, b, "train", ref, cfg.dpo),
        lambda b: int(b["index"].numel()),
        evaluate=lambda m: evaluate(m, s, ref, cfg),
        first_record=lambda: {**start, **evaluate(s.model, s, ref, cfg)},
        save_final=lambda final: save_model(final, s.out / "final", s.tokenizer),
        resume=cfg.resume,
        monitor=cfg.monitor,
        progress=progress,
    )
