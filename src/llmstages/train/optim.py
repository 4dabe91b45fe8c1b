"""The optimizer of every stage: AdamW (or AdamW with 8-bit moments) over parameter groups (no decay on norms,
biases, embeddings), the learning-rate schedule (linear warmup, cosine decay) and the peak FLOP/s behind the
logged MFU."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmstages.config import TrainArgs
from llmstages.errors import UserError
from llmstages.train.adamw8bit import LOW_BIT


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never norms, biases or embeddings (nor a head tied to the embedding)."""
    no_decay: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            no_decay.add(id(m.weight))
        config = getattr(m, "config", None)
        if getattr(config, "tie_embeddings", False) and hasattr(m, "lm_head"):  # also a pipeline's last stage
            no_decay.add(id(m.lm_head.weight))
    decay, rest, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in no_decay else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _split_sharded(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tensor parallelism leaves some parameters plain (embeddings, norms) beside DTensors; the fused and foreach
    AdamW kernels need one kind per group, so a mixed group becomes two with the same settings."""
    from torch.distributed.tensor import DTensor

    out = []
    for g in groups:
        dt = [p for p in g["params"] if isinstance(p, DTensor)]
        plain = [p for p in g["params"] if not isinstance(p, DTensor)]
        out += [{**g, "params": plain}, {**g, "params": dt}] if dt and plain else [g]
    return out


def build_optimizer(
    model: nn.Module, args: TrainArgs, groups: list[dict[str, Any]] | None = None, zero1: bool = False
) -> torch.optim.Optimizer:
    """AdamW (train.optimizer: adamw, or adamw8bit / adamw4bit with 8-bit / 4-bit moments) over `groups`
    (default: `param_groups`); with zero1 a ZeroRedundancyOptimizer, each rank keeping the optimizer state of its
    share of the parameters."""
    groups = groups if groups is not None else param_groups(model, args.weight_decay)
    groups = [g for g in _split_sharded(groups) if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters")
    kw = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    optimizer_class = LOW_BIT.get(args.optimizer, torch.optim.AdamW)
    if zero1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **kw)
    if optimizer_class is not torch.optim.AdamW:
        return optimizer_class(groups, **kw)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # fused kernels unavailable for this device/dtype
        return torch.optim.AdamW(groups, **kw)


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay from `lr` to `min_lr` at `max_steps`."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if step >= args.max_steps:
        return args.min_lr
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


# Peak dense FLOP/s per device for MFU: (bf16/fp16 tensor cores, fp32 non-tensor), vendor data sheets.
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "A10G": (125e12, 31e12),
    "L4": (121e12, 30e12),
    "L40S": (362e12, 91.6e12),
    "RTX 4090": (165e12, 82.6e12),
    "V100": (125e12, 15.7e12),
}


def peak_flops(device: torch.device, precision: str, override: float = 0.0) -> float | None:
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, fp32) in PEAK_FLOPS.items():
        if key in name:
            return half if precision != "fp32" else fp32
    return None
