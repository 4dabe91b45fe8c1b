"""Pipeline parallelism (dist.strategy=pp) with torch.distributed.pipelining: rank k keeps a run of consecutive
blocks (the first rank also the embeddings, the last the final norm and LM head) and micro-batches flow
through the ranks under a GPipe or 1F1B schedule.

    torchrun --nproc_per_node=2 -m llmstages pretrain --config configs/pretrain/tiny.yaml dist.strategy=pp

Each stage keeps the full model's parameter names (`blocks.3.attn.q_proj.weight` stays that on rank 1), so
checkpoints and the exported model read like the single-process ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmstages.errors import UserError
from llmstages.losses import IGNORE_INDEX
from llmstages.model.gpt import GPT
from llmstages.train.distributed import Dist


def split_layers(n_layers: int, stages: int) -> list[range]:
    """Consecutive blocks per stage, the first stages taking one more when they do not divide evenly."""
    per, extra = divmod(n_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = per + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class StagePart(nn.Module):
    """The blocks `layers` of `model` (and its input or output end): tokens or hidden states in, hidden states or
    logits out. Plain causal attention over full rows (pre-training batches have no padding)."""

    def __init__(self, model: GPT, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.config = model.config
        self.first, self.last = first, last
        if first:
            self.tok_emb = model.tok_emb
            if model.config.pos == "learned":
                self.pos_emb = model.pos_emb
            self.drop = model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if last:
            self.norm, self.lm_head = model.norm, model.lm_head
        if model.config.pos == "rope":
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)
        if self.first:
            x = self.tok_emb(x)
            if self.config.pos == "learned":
                x = x + self.pos_emb(pos)[None]
            x = self.drop(x)
        rope = None
        if self.config.pos == "rope":
            rope = (self.rope_cos[pos][None, None].to(x.dtype), self.rope_sin[pos][None, None].to(x.dtype))
        for block in self.blocks.values():
            x = block(x, rope, None, True)
        return self.lm_head(self.norm(x)) if self.last else x


class Pipeline:
    """This rank's stage and the schedule that drives it. `step(batch, total)` runs forward and backward over
    one micro-batch (split into dist.microbatches pipeline chunks) with the loss summed over target tokens and
    divided by `total`; it returns the summed loss (on the last stage; 0 elsewhere)."""

    def __init__(self, model: GPT, d: Dist) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if not isinstance(model, GPT):
            raise UserError("dist.strategy=pp splits a plain language model (pretrain)")
        if model.config.n_layers < d.pp:
            raise UserError(f"dist.strategy=pp: {model.config.n_layers} blocks cannot fill {d.pp} stages")
        layers = split_layers(model.config.n_layers, d.pp)[d.rank]
        self.first, self.last = d.rank == 0, d.rank == d.pp - 1
        self.part = StagePart(model, layers, self.first, self.last).to(d.device)
        self.d, self.total = d, 1
        # A tied embedding / LM head lives on the first and the last stage: each copy gets its own part of the
        # gradient, summed over the two after the backward (`sync_tied`), so both copies take the same update.
        self.tied = model.tok_emb.weight if model.config.tie_embeddings and d.pp > 1 else None
        self.tied_group = None
        if self.tied is not None:
            import torch.distributed as dist

            # every rank takes part in making a group; with 2 stages the whole job is the group
            self.tied_group = dist.new_group([0, d.pp - 1]) if d.pp > 2 else None
        stage = PipelineStage(self.part, d.rank, d.pp, d.device)
        cls = ScheduleGPipe if d.args.schedule == "gpipe" else Schedule1F1B
        self.schedule = cls(stage, d.args.microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = logits.float().flatten(0, 1)
        return F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / self.total

    def _run(self, batch: dict[str, torch.Tensor], train: bool) -> float:
        if batch["input_ids"].shape[0] % self.d.args.microbatches:
            raise UserError(
                f"dist.microbatches={self.d.args.microbatches} does not divide train.batch_size="
                f"{batch['input_ids'].shape[0]}"
            )
        run = self.schedule.step if train else self.schedule.eval
        losses: list[torch.Tensor] = []
        args = (batch["input_ids"],) if self.first else ()
        kw = {"target": batch["targets"], "losses": losses} if self.last else {}
        run(*args, **kw)
        local = sum(float(x) for x in losses) * self.total
        return self.d.sum([local])[0]  # from the last stage to every rank

    def step(self, batch: dict[str, torch.Tensor], total: int) -> float:
        self.total = max(total, 1)
        return self._run(batch, train=True)

    def sync_tied(self) -> None:
        """Sum the tied weight's gradient over the first and last stages (middle stages do not hold it)."""
        import torch.distributed as dist

        if self.tied is None or not (self.first or self.last):
            return
        if self.tied.grad is None:
            self.tied.grad = torch.zeros_like(self.tied)
        dist.all_reduce(self.tied.grad, group=self.tied_group)

    def norm_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters whose gradients count in the global norm: the tied weight once (on the first stage)."""
        if self.tied is None or self.first:
            return params
        return [p for p in params if p is not self.tied]

    @torch.no_grad()
    def loss_sum(self, batch: dict[str, torch.Tensor]) -> float:
        """Summed next-token loss of a batch, forward only (validation)."""
        self.total = 1
        return self._run(batch, train=False)
