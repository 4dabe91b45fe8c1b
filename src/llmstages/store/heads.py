"""Reward and value heads on disk: a model directory plus `score_head.safetensors` and `score_head.json`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmstages.errors import UserError
from llmstages.model.heads import RewardModel, ScalarHead
from llmstages.store.io import load_model

HEAD_FILE, HEAD_CONFIG = "score_head.safetensors", "score_head.json"


def save_head(head: ScalarHead, path: str | Path, kind: str) -> None:
    path = Path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path / HEAD_FILE))
    (path / HEAD_CONFIG).write_text(json.dumps({"kind": kind, "pooling": "last_token"}) + "\n")


def load_reward_model(path: str | Path, device: torch.device | str = "cpu") -> RewardModel:
    """A reward-model directory: a model directory plus `score_head.safetensors`."""
    path = Path(path)
    if not (path / HEAD_FILE).is_file():
        raise UserError(f"{path}: not a reward model (no {HEAD_FILE}); train one with `llmstages reward`")
    rm = RewardModel(load_model(path, device=device))
    try:
        rm.head.load_state_dict(load_file(str(path / HEAD_FILE)))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path / HEAD_FILE}: does not fit the model ({e})") from None
    return rm.to(device)
