"""Scalar heads on the transformer trunk, applied from outside the model: a reward model scores a whole sequence
from its last real token; a value head (PPO) scores every position."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmstages.model.gpt import GPT


class ScalarHead(nn.Module):
    """h (..., d) -> w.h + b (...). Initialised small so that early scores are near the bias."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, std=1 / math.sqrt(d_model + 1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).squeeze(-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token in a right-padded (B, T) mask."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


class RewardModel(nn.Module):
    """r(x, y): the trunk's final hidden state at the last non-padding token, through a scalar head."""

    def __init__(self, backbone: GPT) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ScalarHead(backbone.config.d_model)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone.hidden_states(idx, mask=mask)  # (B, T, d)
        last = h[torch.arange(h.size(0), device=h.device), last_token_index(mask)]
        return self.head(last)  # (B,)
