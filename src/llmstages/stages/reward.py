"""Stage 3b, the reward model: a scalar head on the language model's trunk, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l) - margin).

    llmstages reward --config configs/reward/full.yaml data.path=[prefs.jsonl]

The head reads the final hidden state of the last real token. The trunk is fine-tuned fully or through
LoRA/adapters (merged into the weights when saved; over an NF4 base, saved as the base plus the adapter).
`final/` is a model directory plus `score_head.safetensors`, which PPO, GRPO and evaluation load with
`load_reward_model`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmstages import losses as L
from llmstages.config import RewardConfig, to_dict
from llmstages.data.lengths import Tally, train_window
from llmstages.data.preference import Pair, pair_batch, split_pairs, tokenize_pairs
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model.heads import RewardModel
from llmstages.peft import merge_lora, peft_config, prepare_policy, trainable_parameters
from llmstages.rl.pairs import builtin_preference_pairs
from llmstages.store import load_model_and_tokenizer, save_model
from llmstages.store.heads import save_head
from llmstages.train.frozen import base_weights
from llmstages.train.loop import EpochSampler, Trainer, fit
from llmstages.train.prepare import prepare_model
from llmstages.train.start import prepare_run_dir, start_run

# Calibration: accuracy of the predicted order within bins of |r_w - r_l|.
MARGIN_BINS = (0.0, 0.5, 1.0, 2.0, float("inf"))


def calibration(margins: np.ndarray) -> dict[str, float]:
    out = {}
    for lo, hi in zip(MARGIN_BINS[:-1], MARGIN_BINS[1:]):
        sel = (np.abs(margins) >= lo) & (np.abs(margins) < hi)
        if sel.any():
            out[f"calibration/acc_margin_{lo:g}-{hi:g}"] = float((margins[sel] > 0).mean())
    return out


@dataclass
class Setup:
    out: Path
    device: torch.device
    model: RewardModel
    tokenizer: Tokenizer
    train: list[Pair]
    val: list[Pair]
    fit: Tally
    """Pairs cut or dropped to fit the window (data/lengths.py), training and held-out together."""


def setup(cfg: RewardConfig) -> Setup:
    """Check the config, load the trunk, apply PEFT, build the pairs (sampled from the trunk's model and
    oracle-labelled for the built-in world) and put a fresh scalar head on it; writes nothing."""
    device, _ = start_run(cfg.run_args("reward"))
    if not cfg.model.path:
        raise UserError("set model.path to the model directory the reward model starts from (often the SFT model)")
    torch.manual_seed(cfg.seed)
    backbone, tok = load_model_and_tokenizer(cfg.model.path, quantize_base=cfg.peft.quantize_base)
    prepare_policy(backbone, cfg.peft.method, **cfg.peft.options())  # a LoRA SFT model is merged first
    builtin = None
    if not cfg.data.path:
        builtin = builtin_preference_pairs(backbone, tok, cfg.world_seed, cfg.seed, samples=cfg.data.samples)
    train_pairs, val_pairs = split_pairs(cfg.data, cfg.seed, builtin)
    limit, name = train_window(cfg.train.seq_len, backbone.config.block_size, shifted=False)
    train, fit = tokenize_pairs(train_pairs, tok, limit, name, cfg.data.max_dropped)  # too long: cut or dropped
    val, val_fit = tokenize_pairs(val_pairs, tok, limit, name, cfg.data.max_dropped)
    model = RewardModel(backbone).to(device)  # the head is created after PEFT froze the trunk: it trains
    return Setup(Path(cfg.out_dir), device, model, tok, train, val, fit + val_fit)


def batch_of(s: Setup, pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """A pair batch on the device, each row the whole conversation (the head reads its last token)."""
    return {k: v.to(s.device) for k, v in pair_batch(pairs, s.tokenizer.pad_id, whole=True).items()}


def rewards(m: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x, y_w), r(x, y_l)), (B,) each: a pair batch holds its chosen rows first, then its rejected rows."""
    n = batch["index"].numel()
    r = m(batch["input_ids"], batch["mask"])
    return r[:n], r[n:]


def pair_loss(m: RewardModel, batch: dict[str, torch.Tensor], margin: float):
    """(Bradley-Terry loss x pairs, stats) of one batch."""
    r_w, r_l = rewards(m, batch)
    loss = L.bradley_terry_loss(r_w, r_l, margin) * r_w.numel()
    gap = (r_w - r_l).detach()
    return loss, {"accuracy": float((gap > 0).float().mean()), "margin": float(gap.mean())}


def evaluate(m: RewardModel, s: Setup, cfg: RewardConfig) -> dict[str, float]:
    """Loss, accuracy, mean margin and calibration over the held-out pairs."""
    if not s.val:
        return {}
    margins, loss = [], 0.0
    for i in range(0, len(s.val), cfg.train.batch_size):
        r_w, r_l = rewards(m, batch_of(s, s.val[i : i + cfg.train.batch_size]))
        loss += float(L.bradley_terry_loss(r_w, r_l, cfg.margin)) * r_w.numel()
        margins.append((r_w - r_l).float().cpu().numpy())
    mg = np.concatenate(margins)
    return {
        "val_loss": loss / len(s.val),
        "val_accuracy": float((mg > 0).mean()),
        "val_margin": float(mg.mean()),
        **calibration(mg),
    }


def main(cfg: RewardConfig, progress: bool = True) -> dict[str, float]:
    s = setup(cfg)
    prepare_run_dir(cfg.run_args("reward"), to_dict(cfg), s.model)
    sampler = EpochSampler(len(s.train), cfg.train.batch_size, cfg.train.grad_accum, cfg.seed)

    def batches(start: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The grad_accum micro-batches of pairs of each step."""
        for step in itertools.count(start):
            yield [batch_of(s, [s.train[i] for i in sampler(step, m)]) for m in range(cfg.train.grad_accum)]

    def save_final(final: RewardModel) -> None:
        # a reward model is used as a whole: saved merged into the original weights, except over an NF4 base
        # (QLoRA), where it is saved as the base as loaded plus the adapter: it scores as it trained, over the
        # base quantized again on load (`load_model`), and `export` merges it into the original weights
        cfg_peft = peft_config(final.backbone)
        if cfg_peft is not None and cfg_peft["method"] in ("lora", "dora") and "quantize_base" not in cfg_peft:
            merge_lora(final.backbone)
        save_model(final.backbone, s.out / "final", s.tokenizer)
        save_head(final.head, s.out / "final", kind="reward")

    model = prepare_model(s.model, cfg.train, frozen_source=functools.partial(base_weights, cfg.model.path))
    trainer = Trainer(model, cfg.train, s.out, device=s.device)
    trainable, total = trainable_parameters(s.model)
    if progress:
        print(
            f"reward: {len(s.train)} pairs ({len(s.val)} held out; {s.fit.summary()}); {trainable:,} of {total:,} "
            "parameters trainable"
        )
    start = {"pairs": len(s.train), **s.fit.metrics()}
    result = fit(
        trainer,
        batches,
        lambda m, b: pair_loss(m, b, cfg.margin),
        lambda b: int(b["index"].numel()),
        evaluate=lambda m: evaluate(m, s, cfg),
        first_record=lambda: {**start, **evaluate(s.model, s, cfg)},
        save_final=save_final,
        resume=cfg.resume,
        monitor=cfg.monitor,
        progress=progress,
    )
    if progress and trainer.last_eval:
        print(f"reward: done; held-out accuracy {trainer.last_eval.get('val_accuracy', float('nan')):.1%}")
    return result
