"""Bottleneck adapters (Houlsby et al. 2019): x + up(act(down(x))), inserted after attention and after the MLP.

The up-projection starts at zero, so a freshly inserted adapter is the identity. Adapters are attached with
forward hooks on each block's `attn` and `mlp`: the base model's modules and parameter names stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """x -> x + up(act(down(dropout(x)))), with down (d -> b) and up (b -> d); up starts at zero."""

    def __init__(self, hidden_size: int, bottleneck: int = 64, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.down_proj = nn.Linear(hidden_size, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up_proj = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return x
        return x + self.up_proj(self.act(self.down_proj(self.dropout(x))))


def _hook(adapter: BottleneckAdapter):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
        return adapter(output)

    return hook


def insert_adapters(model: nn.Module, bottleneck: int = 64, activation: str = "relu", dropout: float = 0.0) -> int:
    """Add `attn_adapter` and `mlp_adapter` to every block of `model` (a GPT); returns how many were added."""
    n = 0
    for block in model.blocks:
        for name in ("attn", "mlp"):
            if hasattr(block, f"{name}_adapter"):
                continue
            ref = next(getattr(block, name).parameters())
            adapter = BottleneckAdapter(model.config.d_model, bottleneck, activation, dropout).to(ref.device, ref.dtype)
            setattr(block, f"{name}_adapter", adapter)
            getattr(block, name).register_forward_hook(_hook(adapter))
            n += 1
    return n
