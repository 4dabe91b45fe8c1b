"""Stage 3b, the reward model: a scalar head on the language model's trunk, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l) - margin).

    llmstages reward --config configs/reward/full.yaml data.path=[prefs.jsonl]

The head reads the final hidden state of the last real token. The trunk is fine-tuned fully or through
LoRA/adapters (merged into the weights when saved). `final/` is a model directory plus `score_head.safetensors`,
which PPO, GRPO and evaluation load with `load_reward_model`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmstages import losses as L
from llmstages.config import RewardConfig
from llmstages.data.preference import pair_batch, split_pairs, tokenize_pair
from llmstages.errors import UserError
from llmstages.model import load_model_and_tokenizer, save_model
from llmstages.model.heads import RewardModel, save_head
from llmstages.peft import merge_lora, peft_config, prepare_policy, trainable_parameters
from llmstages.train.loop import EpochSampler, Loop, prepare_run_dir, start_run
from llmstages.train.rollout import builtin_preference_pairs

# Calibration: accuracy of the predicted order within bins of |r_w - r_l|.
MARGIN_BINS = (0.0, 0.5, 1.0, 2.0, float("inf"))


def calibration(margins: np.ndarray) -> dict[str, float]:
    out = {}
    for lo, hi in zip(MARGIN_BINS[:-1], MARGIN_BINS[1:]):
        sel = (np.abs(margins) >= lo) & (np.abs(margins) < hi)
        if sel.any():
            out[f"calibration/acc_margin_{lo:g}-{hi:g}"] = float((margins[sel] > 0).mean())
    return out


def main(cfg: RewardConfig, progress: bool = True) -> dict[str, float]:
    out = Path(cfg.out_dir)
    device, _ = start_run(cfg, "reward")
    if not cfg.model.path:
        raise UserError("set model.path to the model directory the reward model starts from (often the SFT model)")
    torch.manual_seed(cfg.seed)
    backbone, tok = load_model_and_tokenizer(cfg.model.path)
    prepare_policy(backbone, cfg.peft.method, **cfg.peft.options())  # a LoRA SFT model is merged first
    builtin = (
        None
        if cfg.data.path
        else builtin_preference_pairs(backbone, tok, cfg.world_seed, cfg.seed, samples=cfg.data.samples)
    )  # oracle-labelled
    train_pairs, val_pairs = split_pairs(cfg.data, cfg.seed, builtin)
    train = [tokenize_pair(p, tok, i, cfg.train.seq_len) for i, p in enumerate(train_pairs)]
    val = [tokenize_pair(p, tok, i, cfg.train.seq_len) for i, p in enumerate(val_pairs)]
    model = RewardModel(backbone).to(device)  # the head is created after PEFT froze the trunk: it trains
    prepare_run_dir(cfg, "reward", model)
    pad = tok.pad_id
    to_device = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731

    def rewards(m: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = batch["index"].numel()
        r = m(batch["input_ids"], batch["mask"])
        return r[:n], r[n:]

    def loss_fn(m: RewardModel, batch: dict[str, torch.Tensor]):
        r_w, r_l = rewards(m, batch)
        loss = L.bradley_terry_loss(r_w, r_l, cfg.margin) * r_w.numel()
        margin = (r_w - r_l).detach()
        return loss, {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}

    def evaluate(m: RewardModel) -> dict[str, float]:
        if not val:
            return {}
        margins, loss = [], 0.0
        for s in range(0, len(val), cfg.train.batch_size):
            r_w, r_l = rewards(m, to_device(pair_batch(val[s : s + cfg.train.batch_size], pad, whole=True)))
            loss += float(L.bradley_terry_loss(r_w, r_l, cfg.margin)) * r_w.numel()
            margins.append((r_w - r_l).float().cpu().numpy())
        mg = np.concatenate(margins)
        return {"val_loss": loss / len(val), "val_accuracy": float((mg > 0).mean()), "val_margin": float(mg.mean()),
                **calibration(mg)}  # fmt: skip

    sampler = EpochSampler(len(train), cfg.train.batch_size, cfg.train.grad_accum, cfg.seed)

    def next_batches(step: int) -> list[dict[str, torch.Tensor]]:
        return [
            to_device(pair_batch([train[i] for i in sampler(step, m)], pad, whole=True))
            for m in range(cfg.train.grad_accum)
        ]

    loop = Loop(model=model, args=cfg.train, run_dir=out, next_batches=next_batches, device=device, loss_fn=loss_fn,
                count_fn=lambda b: int(b["index"].numel()), evaluate=evaluate,
                monitor=cfg.monitor)  # fmt: skip
    resumed = loop.resume() if cfg.resume else False
    trainable, total = trainable_parameters(model)
    if progress:
        print(f"reward: {len(train)} pairs ({len(val)} held out); {trainable:,} of {total:,} parameters trainable")
    state = loop.run_logged(resumed, lambda: {"pairs": len(train), **evaluate(model)}, progress)
    final = loop.final_model()  # rank 0: the whole model, gathered from its shards
    if final is not None:
        if peft_config(final.backbone) is not None and peft_config(final.backbone)["method"] in ("lora", "dora"):
            merge_lora(final.backbone)  # a reward model is used as a whole: save it merged
        save_model(final.backbone, out / "final", tok)
        save_head(final.head, out / "final", kind="reward")
    if progress and loop.last_eval:
        print(f"reward: done; held-out accuracy {loop.last_eval.get('val_accuracy', float('nan')):.1%}")
    return {"step": state.step, **loop.last_eval}
