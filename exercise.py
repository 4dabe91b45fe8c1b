"""The seed guide's API, as a thin facade over the `llmstages` package.

    from exercise import TrainingConfig, SimpleLLM
    model = SimpleLLM(TrainingConfig(vocab_size=10000, hidden_size=512, num_layers=6, num_heads=8))
    outputs = model(input_ids)          # {"logits": (B, T, V), "loss": next-token loss on input_ids}

Run as a script (`python exercise.py`, or `torchrun --nproc_per_node=2 exercise.py`) it trains a small model for
a few steps with DistributedDataParallel when launched by torchrun, and prints per-rank and global losses.
"""

from __future__ import annotations

import builtins
import os
from dataclasses import dataclass

import torch
from torch import nn

from llmstages.losses import IGNORE_INDEX, cross_entropy, shift_labels
from llmstages.model import GPT, ModelConfig, generate, num_params
from llmstages.peft import BottleneckAdapter, LoRALinear, apply_adapters, apply_lora, disable_adapters, merge_lora
from llmstages.store import load_model, save_model

# `from exercise import *` hands on torch and nn too: the guide's benchmark snippet uses torch after it.
__all__ = [
    "GPT", "AdapterLayer", "BottleneckAdapter", "LoRALayer", "LoRALinear", "ModelConfig", "SimpleLLM",
    "TrainingConfig", "apply_adapters", "apply_lora", "disable_adapters", "generate", "load_model", "merge_lora",
    "nn", "save_model", "torch",
]  # fmt: skip
# `python -m memory_profiler exercise.py` puts `profile` into builtins: main's lines are then measured.
profile = getattr(builtins, "profile", lambda fn: fn)


@dataclass
class TrainingConfig:
    """The seed's configuration names; `model_config()` maps them onto `llmstages.model.ModelConfig`."""

    vocab_size: int = 10000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_seq_length: int = 512
    architecture: str = "llama"
    """ "llama" (RMSNorm, RoPE, SwiGLU) or "gpt2" (LayerNorm, learned positions, GELU)."""
    dropout: float = 0.0
    batch_size: int = 8
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    max_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0

    def model_config(self) -> ModelConfig:
        arch = dict(family="llama")
        if self.architecture == "gpt2":
            arch = dict(family="gpt2", norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, out_bias=True,
                        mlp_bias=True, tie_embeddings=True)  # fmt: skip
        return ModelConfig(
            vocab_size=self.vocab_size, d_model=self.hidden_size, n_layers=self.num_layers,
            n_heads=self.num_heads, n_kv_heads=self.num_kv_heads, d_ff=self.intermediate_size,
            block_size=self.max_seq_length, dropout=self.dropout, **arch,
        )  # fmt: skip


class SimpleLLM(nn.Module):
    """A decoder-only language model (`self.model`, an `llmstages` GPT) with the seed's dict-returning forward."""

    def __init__(self, config: TrainingConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GPT(config.model_config())

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"logits": (B, T, V), "loss": mean next-token NLL}. Without `labels` the loss is on `input_ids`
        itself; label -100 and positions where `attention_mask` is 0 are not trained."""
        logits = self.model(input_ids, mask=attention_mask)
        labels = input_ids if labels is None else labels
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"logits": logits, "loss": cross_entropy(logits, shift_labels(labels))}


def LoRALayer(linear_layer: nn.Linear, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0) -> LoRALinear:  # noqa: N802
    """The seed's name: `linear_layer` frozen, plus a trainable rank-`rank` update scaled by alpha / rank."""
    return LoRALinear.from_linear(linear_layer, rank=rank, alpha=alpha, dropout=dropout)


def AdapterLayer(hidden_size: int, adapter_size: int = 64, dropout: float = 0.0) -> BottleneckAdapter:  # noqa: N802
    """The seed's name: a bottleneck adapter x + up(relu(down(x))) with `adapter_size` hidden units."""
    return BottleneckAdapter(hidden_size, adapter_size, activation="relu", dropout=dropout)


def _batch(step: int, batch_size: int, seq_len: int, vocab: int) -> torch.Tensor:
    """Arithmetic sequences (start + stride * i) mod vocab: learnable, and the same on every rank for a step."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (batch_size, 1), generator=g)
    stride = torch.randint(1, 6, (batch_size, 1), generator=g)
    return (start + stride * torch.arange(seq_len)) % vocab


@profile
def main() -> None:
    """A short (optionally distributed) training run: each rank trains on its slice of every global batch."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    cfg = TrainingConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, max_seq_length=64,
                         batch_size=8, learning_rate=3e-3, max_steps=int(os.environ.get("STEPS", "30")))  # fmt: skip
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = SimpleLLM(cfg).to(device)
    if rank == 0:
        print(f"world size {world}; {num_params(model):,} parameters; global batch {cfg.batch_size * world}")
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    for step in range(cfg.max_steps):
        batch = _batch(step, cfg.batch_size * world, 32, cfg.vocab_size)
        local = batch[rank * cfg.batch_size : (rank + 1) * cfg.batch_size].to(device)
        loss = ddp(local)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages gradients over ranks here
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
            global_loss /= world
        if step % 10 == 0 or step == cfg.max_steps - 1:
            print(f"rank {rank} step {step:3d} local loss {loss.item():.4f} global loss {global_loss.item():.4f}")
    if world > 1:
        del ddp  # its reducer holds the process group: let it go before the group is torn down
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(f"done: final global loss {global_loss.item():.4f}")


if __name__ == "__main__":
    main()
