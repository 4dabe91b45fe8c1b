"""Preparing a stage's model for training, in one explicit call (`prepare_model`), in this order:

1. activation checkpointing (recompute blocks in the backward pass instead of keeping their activations);
2. `torch.compile` of the transformer blocks (train.compile);
3. frozen linear weights held in the compute dtype under bf16/fp16 (`frozen.hold_frozen`; strategies none, ddp
   and zero1; under QLoRA the token embedding and output head too), the originals read back from the model
   directory when the final model is saved (so are the weights QLoRA holds in NF4);
4. the parallel strategy of the run: DDP, ZeRO-1, FSDP2, tensor parallel (the module sharded in place), or this
   process's stage of a pipeline.

What comes back says what training runs: `module`, the stage's model (under pp this process's part of it), and
`forward`, what a loss function is handed (the module itself, or its DDP wrapper).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from llmstages.config import TrainArgs
from llmstages.errors import UserError
from llmstages.train import distributed
from llmstages.train.distributed import Dist
from llmstages.train.frozen import hold_frozen, quantized_weights
from llmstages.train.pipeline import Pipeline


@dataclass
class Prepared:
    """A model ready to train, and what preparing it changed."""

    module: nn.Module
    """The stage's model (sharded in place under fsdp/tp; under pp this process's part of it)."""
    forward: nn.Module
    """What the loss function calls: `module`, its DDP wrapper, or the pipeline."""
    dist: Dist
    pipeline: Pipeline | None = None
    template: nn.Module | None = None
    """A copy on the meta device of the unsharded model, to gather the shards into a plain model at the end."""
    held: list[str] = field(default_factory=list)
    """The frozen parameters held in the compute dtype (names in `module`); restored from `frozen_source`."""
    frozen_source: Callable[[], Mapping[str, torch.Tensor]] | None = None


def prepare_model(
    model: nn.Module,
    args: TrainArgs,
    frozen_source: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> Prepared:
    """Apply activation checkpointing, compile, the bf16 hold of frozen weights and the parallel strategy
    (`distributed.current()`) to `model`, on its device, in that order. `frozen_source` returns the originals of the
    frozen weights (`frozen.base_weights` of the model directory): without it nothing is held."""
    if args.activation_checkpointing:
        apply_activation_checkpointing(model, args.activation_checkpointing_every)
    if args.compile:
        compile_blocks(model)
    d = distributed.current()
    template = distributed.meta_template(model) if d.sharded else None
    holds = frozen_source is not None and d.strategy in ("none", "ddp", "zero1")
    held = hold_frozen(model, args.precision) + quantized_weights(model) if holds else []
    if d.strategy == "pp":
        pipeline = Pipeline(model, d)
        return Prepared(pipeline.part, pipeline, d, pipeline, template, held, frozen_source)
    return Prepared(model, distributed.wrap(model, d, args.precision), d, None, template, held, frozen_source)


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> None:
    """Recompute every `every`-th transformer block (1: all of them) in the backward pass instead of keeping its
    activations: less memory for about one more forward of those blocks."""
    from torch.utils.checkpoint import checkpoint

    if every < 1:
        raise UserError(f"train.activation_checkpointing_every must be at least 1, got {every}")
    for i, block in enumerate(distributed.transformer_blocks(model)):
        if i % every == 0 and not hasattr(block, "_forward_without_checkpoint"):
            block._forward_without_checkpoint = block.forward
            block.forward = partial(checkpoint, block._forward_without_checkpoint, use_reentrant=False)


def compile_blocks(model: nn.Module) -> None:
    """`torch.compile` every transformer block of `model` (a policy's, a critic's, a reward model's trunk) for
    the calls without a KV cache: training and evaluation forwards. Decoding with a cache runs the block as it
    was (its positions change every token, which would recompile each step). All blocks share one compiled
    function, so a 30-layer model compiles one graph per kind of call, not 30; a deep copy of the model (a
    frozen reference) stays compiled and runs its own weights."""
    # each kind of call is a graph (training and evaluation, held and fp32 weights, LoRA on and off, a new
    # length before shapes turn dynamic), and all stages of one process share the function: room for them all
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in distributed.transformer_blocks(model):
        if not hasattr(block, "_forward_uncompiled"):
            block._forward_uncompiled = block.forward  # activation checkpointing, if applied, is inside
            block.forward = partial(_compiled_unless_cached, block)


_compiled_block: Callable[..., torch.Tensor] | None = None


def _run_block(block: nn.Module, *args: Any) -> torch.Tensor:
    return block._forward_uncompiled(*args)


def _compiled_unless_cached(
    block: nn.Module, x: torch.Tensor, rope: Any, mask: torch.Tensor | None, is_causal: bool, cache: Any = None
) -> torch.Tensor:
    global _compiled_block
    if cache is not None:
        return block._forward_uncompiled(x, rope, mask, is_causal, cache)
    if _compiled_block is None:
        _compiled_block = torch.compile(_run_block)
    return _compiled_block(block, x, rope, mask, is_causal)
