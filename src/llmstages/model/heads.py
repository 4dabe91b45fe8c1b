"""Scalar heads on the transformer trunk, applied from outside the model: a reward model scores a whole sequence
from its last real token; a value head (PPO) scores every position."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmstages.errors import UserError
from llmstages.model.gpt import GPT

HEAD_FILE, HEAD_CONFIG = "score_head.safetensors", "score_head.json"


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


def save_head(head: ScalarHead, path: str | Path, kind: str) -> None:
    path = Path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path / HEAD_FILE))
    (path / HEAD_CONFIG).write_text(json.dumps({"kind": kind, "pooling": "last_token"}) + "\n")


def load_reward_model(path: str | Path, device: torch.device | str = "cpu") -> RewardModel:
    """A reward-model directory: a model directory plus `score_head.safetensors`."""
    from llmstages.model.io import load_model

    path = Path(path)
    if not (path / HEAD_FILE).is_file():
        raise UserError(f"{path}: not a reward model (no {HEAD_FILE}); train one with `llmstages reward`")
    rm = RewardModel(load_model(path, device=device))
    try:
        rm.head.load_state_dict(load_file(str(path / HEAD_FILE)))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path / HEAD_FILE}: does not fit the model ({e})") from None
    return rm.to(device)
