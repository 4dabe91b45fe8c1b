"""Losses as pure functions of tensors. Each docstring gives the formula; later stages add their own here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token negative log-likelihood, -1/N sum_t log p(y_t | x_<t), over targets != ignore_index.

    logits: (B, T, V) already aligned with targets (B, T): position t predicts targets[:, t].
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets for next-token prediction: labels moved one step left, the last position ignored. (B, T)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), ignore_index)], dim=1)
