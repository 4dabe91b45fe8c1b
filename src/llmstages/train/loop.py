"""The training loop every stage shares; the algorithm (what a batch is, what its loss is) comes from the stage.

Per optimizer step: the micro-batches of the step are drawn first, their loss units (target tokens, pairs, ...)
counted, and each micro-batch's summed loss is divided by that total before `backward`. The gradient is then
the gradient of the mean over every unit of the step, the same as one big batch whatever the padding or
accumulation. Then: gradient clipping (norm logged), a NaN/Inf guard, AdamW with warmup + cosine, metrics,
periodic validation and atomic checkpoints; SIGINT/SIGTERM save a checkpoint before exiting.

A run knows what it trained: the sha256 of its base model's weights is recorded in `run.json` at the start, and a
resume, or the final model, that would read other weights from `model.path` is refused. A run that no longer
trains (a NaN/Inf loss or gradient it cannot skip past, or NaN/Inf weights) stops with `TrainingFailed` and writes
neither a checkpoint of it nor `final/`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from llmstages.config import RunArgs, TrainArgs, write_config
from llmstages.errors import UserError
from llmstages.losses import count_targets, lm_loss
from llmstages.model.generate import cpu_compiler
from llmstages.monitor.health import HealthMonitor
from llmstages.monitor.metrics import MetricsLogger, NullLogger
from llmstages.outputs import (
    check_run_lock,
    claim_run_dir,
    claim_run_lock,
    is_disk_full,
    release_run_lock,
    run_base,
    start_run_dir,
)
from llmstages.store.io import resolve_model_path
from llmstages.train import checkpoint as ckpt
from llmstages.train import distributed
from llmstages.train.distributed import Dist
from llmstages.train.frozen import hold_frozen, restore_frozen
from llmstages.train.pipeline import Pipeline

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once the checkpoint is written."""


NOT_TRAINING = (
    "lower train.lr, raise train.warmup_steps or use train.precision=fp32/bf16 (the earlier checkpoints are kept, "
    "final/ is not written)"
)


class TrainingFailed(Exception):
    """The run stopped because it no longer trains (NaN/Inf loss, gradients or weights); the message names the
    step. Not bad input: the command line exits with code 1. The checkpoints written before are kept."""


# ----------------------------------------------------------------------------------------------------------------
# Devices, precision, optimizer, schedule


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """auto (CUDA when present, else the CPU), cpu, cuda or cuda:N; a clear error for anything else, or for CUDA
    on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"{key} must be auto, cpu, cuda or cuda:N, got '{name}'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"{key}={name} but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the device, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX (else it is emulated
    and several times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's capability probes
    return any(bool(getattr(torch.cpu, c, lambda: False)()) for c in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 where the hardware runs it natively, else fp32. The environment variable
    LLMSTAGES_AUTO_PRECISION (fp32 or bf16) decides `auto` instead: a bf16 machine can run every recipe, the demo
    and the test suite on the fp32 arithmetic path (and an fp32 one on bf16, emulated)."""
    if precision == "auto":
        forced = os.environ.get("LLMSTAGES_AUTO_PRECISION", "")
        if forced:
            if forced not in ("fp32", "bf16"):
                raise UserError(f"LLMSTAGES_AUTO_PRECISION must be fp32 or bf16, got '{forced}'")
            return forced
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"train.precision must be auto, fp32, bf16 or fp16, got '{precision}'")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA device (it uses a gradient scaler); use bf16 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.precision=bf16: this GPU does not support bfloat16; use fp16")


def check_compile(compile: bool, device: torch.device) -> None:
    if compile and device.type == "cpu" and cpu_compiler() is None:
        raise UserError(
            "train.compile=true on the CPU needs a C++ compiler (torch.compile builds C++ kernels): install g++ "
            "or set CXX to one, or set train.compile=false"
        )


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
    """AdamW over `groups` (default: `param_groups`); with zero1 a ZeroRedundancyOptimizer, each rank keeping
    the AdamW state of its share of the parameters."""
    groups = groups if groups is not None else param_groups(model, args.weight_decay)
    groups = [g for g in _split_sharded(groups) if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters")
    kw = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    if zero1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **kw)
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


def start_run(run: RunArgs) -> tuple[torch.device, Path | None]:
    """Checks every stage makes before writing anything: the run folder (new, empty or this stage's own:
    outputs.claim_run_dir), device and precision (resolving `auto` in place), the distributed strategy (joining
    the process group under torchrun), and the checkpoint to resume from (checkpoints there need resume=true or
    overwrite=true; the newest readable one is taken). Returns (this process's device, checkpoint or None)."""
    out, args, resume, stage = Path(run.out_dir), run.train, run.resume, run.stage
    claim_run_dir(out, stage, resume, run.overwrite)
    if os.environ.get("RANK", "0") == "0" and out.is_dir():  # under torchrun, rank 0 speaks for the run
        check_run_lock(out)
    device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, device)
    check_precision(args.precision, device)
    check_compile(args.compile, device)
    existing = None if run.overwrite and not resume else ckpt.latest_checkpoint(out / "checkpoints")
    if existing is not None and not resume:
        raise UserError(
            f"{out} already holds checkpoints (newest: {existing.name}); pass resume=true to continue the run, "
            "overwrite=true to start it again, or choose another out_dir"
        )
    if existing is not None:  # the newest that reads; an unreadable newest one is skipped, before anything is written
        existing = ckpt.newest_loadable(out / "checkpoints")
    base = _BASES[out.resolve()] = base_model(run.model_path)  # taken before setup loads it; recorded later
    if existing is not None:
        check_base(out, base)
    d = distributed.setup(run.dist, device, stage)
    if args.precision == "fp16" and d.sharded:
        raise UserError(
            f"train.precision=fp16 under dist.strategy={d.strategy}: the gradient scaler would skip steps rank by "
            "rank; use bf16"
        )
    if d.active and d.is_main:
        print(
            f"{stage}: {d.strategy} on {d.world} processes ({d.device.type}); global batch "
            f"{args.batch_size} x {args.grad_accum} x {d.dp} = {args.batch_size * args.grad_accum * d.dp} rows "
            "per optimizer step"
        )
    return d.device, existing


_BASES: dict[Path, dict[str, str] | None] = {}  # run folder -> its base model, as start_run found it


def base_model(path: str | None) -> dict[str, str] | None:
    """The model directory a stage starts from, `{"path", "sha256"}` (its weights' digest), or None: no
    `model.path`, or one that does not load (setup names the problem when it loads it)."""
    if not path:
        return None
    try:
        folder = resolve_model_path(path).resolve()
        return {"path": str(folder), "sha256": ckpt.weights_digest(folder)} if folder.is_dir() else None
    except (UserError, OSError):
        return None


def check_base(out: Path, base: dict[str, str] | None) -> None:
    """Refuse to resume the run in `out` from another base model than the one it started from."""
    recorded = run_base(out)
    if recorded is None or base is None or base["sha256"] == recorded["sha256"]:
        return
    raise UserError(
        f"model.path {base['path']} is not the model this run started from: its weights' sha256 is "
        f"{base['sha256'][:16]}, {out / 'run.json'} records {recorded['sha256'][:16]} ({recorded.get('path')}); "
        "resume with that model, or start again with overwrite=true (nothing was written)"
    )


def prepare_run_dir(run: RunArgs, record: dict[str, Any], model: nn.Module | None = None) -> None:
    """The first write of a run: the run's lock, its folder with `run.json` (cleared first with overwrite=true;
    the base model's digest recorded) and `record`, the stage's resolved config (`config.to_dict`), as
    `config.yaml` (rank 0; the others wait for it). When resuming, the checkpoint must fit `model` first."""
    from llmstages.model.gpt import ModelConfig
    from llmstages.train.memory import check_batch_fits

    out = Path(run.out_dir)
    if run.resume and model is not None and (path := ckpt.newest_loadable(out / "checkpoints")) is not None:
        ckpt.check_fits(path, model)
    configs = [m.config for m in (model.modules() if model is not None else []) if hasattr(m, "config")]
    configs = [c for c in configs if isinstance(c, ModelConfig)]
    if configs:  # a micro-batch that cannot fit is refused here, not in the first step
        args = run.train
        check_batch_fits(configs[0], args.batch_size, args.seq_len, args.precision, args.activation_checkpointing,
                         distributed.current().device)  # fmt: skip
    d = distributed.current()
    if d.is_main:
        claim_run_lock(out)
        base = _BASES.pop(out.resolve()) if out.resolve() in _BASES else base_model(run.model_path)
        start_run_dir(out, run.stage, run.overwrite and not run.resume, base)
        write_config(record, out / "config.yaml")
    d.barrier()


def accumulate(
    model: Any,
    micro_batches: Sequence[Batch],
    loss_fn: LossFn,
    count_fn: Callable[[Batch], int],
    *,
    autocast_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    total: int | None = None,
    replicas: int = 1,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[float, dict[str, float]]:
    """Forward and backward over the micro-batches of one optimizer step; returns (this rank's summed loss /
    total, stats).

    Each summed loss is divided by `total`, the unit count of the whole step (all ranks together under data
    parallelism), and multiplied by `replicas` (DDP and FSDP average gradients over the data-parallel ranks), so
    gradients equal those of the mean over every unit of the step. `no_sync` (DDP) skips the all-reduce of all
    but the last micro-batch.
    """
    total = total if total is not None else sum(count_fn(b) for b in micro_batches)
    loss_sum = 0.0
    stats: dict[str, float] = {}
    for i, b in enumerate(micro_batches):
        sync = no_sync is None or i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else no_sync():
            with autocast_ctx():
                loss, s = loss_fn(model, b)
            scale(loss * replicas / max(total, 1)).backward()
        loss_sum += float(loss.detach())
        for k, v in s.items():
            stats[k] = stats.get(k, 0.0) + v / len(micro_batches)
    return loss_sum / max(total, 1), stats


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    best_val_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Scalars a stage keeps across resume (saved in each checkpoint's state, restored in place)."""


@dataclass
class Loop:
    """Everything the loop needs from a stage. The stage builds it and calls `run()`.

    Under torchrun the loop applies the distributed strategy (`distributed.wrap`) before building the
    optimizer; `self.model` stays the stage's module (sharded in place under fsdp/tp; for pp the stage's
    `self.pipeline.part`), and `loss_fn` receives what the strategy gives (the model, a DDP view, ...).
    """

    model: nn.Module
    args: TrainArgs
    run_dir: Path
    next_batches: Callable[[int], list[Batch]]
    """This rank's micro-batches of optimizer step `step` (a pure function of the step: resume replays it)."""
    loss_fn: LossFn = lm_loss
    count_fn: Callable[[Batch], int] = count_targets
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    flops_per_token: float | None = None
    on_save: Callable[[LoopState], dict[str, torch.Tensor]] | None = None
    """Extra tensors a stage keeps in each checkpoint (e.g. a value head)."""
    device: torch.device = torch.device("cpu")
    param_groups_fn: Callable[[nn.Module], list[dict[str, Any]]] | None = None
    """The optimizer's parameter groups (default `param_groups`), read after the strategy is applied."""
    monitor: Any = None
    """The stage's `monitor` config section (W&B, MLflow, TensorBoard)."""
    health: HealthMonitor = field(default_factory=HealthMonitor)
    """Flags loss spikes, gradient explosions, NaNs, throughput drops and data stalls (see monitor/health.py)."""
    frozen_source: Callable[[], dict[str, torch.Tensor]] | None = None
    """The frozen weights' originals (e.g. `frozen.base_weights` of the model directory). With it, under bf16/fp16
    (and strategy none, ddp or zero1) the frozen linear weights are held in the compute dtype while training,
    and `final_model()` puts the originals back, so the saved model keeps its dtype and values."""
    state: LoopState = field(default_factory=LoopState)
    _stop_signal: int | None = None

    def __post_init__(self) -> None:
        check_precision(self.args.precision, self.device)
        if self.args.activation_checkpointing:
            apply_activation_checkpointing(self.model, self.args.activation_checkpointing_every)
        if self.args.compile:
            compile_blocks(self.model)
        self.dist: Dist = distributed.current()
        d = self.dist
        self.template = distributed.meta_template(self.model) if d.sharded else None
        holds = self.frozen_source is not None and d.strategy in ("none", "ddp", "zero1")
        self.held = hold_frozen(self.model, self.args.precision) if holds else []
        if d.strategy == "pp":
            self.train_model = Pipeline(self.model, d)
        else:
            self.train_model = distributed.wrap(self.model, d, self.args.precision)
        self.pipeline = self.train_model if d.strategy == "pp" else None
        if self.pipeline is not None:
            self.model = self.pipeline.part
        groups = self.param_groups_fn(self.model) if self.param_groups_fn else None
        self.optimizer = build_optimizer(self.model, self.args, groups, zero1=d.strategy == "zero1")
        self.scaler = torch.amp.GradScaler("cuda") if self.args.precision == "fp16" else None
        self.checkpoints = self.run_dir / "checkpoints"
        self.last_eval: dict[str, float] = {}
        self.resumed_extra: dict[str, torch.Tensor] = {}

    # -- resume --------------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the newest readable checkpoint of the run, if any; True when resumed."""
        path = ckpt.newest_loadable(self.checkpoints)
        if path is None:
            return False
        d = self.dist
        if ckpt.is_sharded(path):
            state, extra = ckpt.load_sharded(path, self.model, self.optimizer, d)
        else:
            if d.sharded:
                raise UserError(
                    f"{path} is a single-file checkpoint; dist.strategy={d.strategy} resumes sharded checkpoints "
                    "only (resume it under ddp, zero1 or one process)"
                )
            state, extra = ckpt.load_checkpoint(path, self.model, self.optimizer)
            if any(k.startswith("r0.") for k in extra):  # per-rank extras of a data-parallel run
                mine = f"r{d.dp_rank}."
                extra = {k.removeprefix(mine): v for k, v in extra.items() if k.startswith(mine)}
        extra_state = self.state.extra  # updated in place: a stage may hold it (PPO's KL controller)
        extra_state.clear()
        extra_state.update(state.get("extra", {}))
        self.state = LoopState(
            step=state["step"],
            tokens_seen=state.get("tokens_seen", 0),
            skipped_steps=state.get("skipped_steps", 0),
            best_val_loss=state.get("best_val_loss"),
            extra=extra_state,
        )
        saved_world = state.get("world_size", 1)
        if saved_world != d.world:  # per-rank extras (a rollout in progress) belong to the old ranks: drop them
            print(
                f"resume: checkpoint written by {saved_world} process(es), this run has {d.world}; "
                "per-process state (e.g. a rollout in progress) is drawn afresh"
            )
            extra = {}
        self.resumed_extra = extra
        return True

    def save(self) -> Path:
        """Write the checkpoint of the current step (every rank takes part). Weights with a NaN/Inf are not saved
        (`TrainingFailed`); a full disk is one line, the earlier checkpoints kept."""
        bad = self._nonfinite_weight()
        if bad is not None:
            raise TrainingFailed(
                f"step {self.state.step}: the weights are NaN/Inf ({bad}); lower train.lr or raise "
                "train.warmup_steps (not saved; the earlier checkpoints are kept, final/ is not written)"
            )
        try:
            return self._save()
        except Exception as e:
            if isinstance(e, UserError) or not is_disk_full(e):
                raise
            prev = ckpt.latest_checkpoint(self.checkpoints)
            kept = f"the earlier checkpoint {prev.name} is kept" if prev is not None else "no earlier checkpoint"
            where = self.checkpoints / f"step_{self.state.step}"
            raise UserError(f"no space left on device: cannot write checkpoint {where} ({kept})") from None

    def _nonfinite_weight(self) -> str | None:
        """The name of a parameter holding a NaN or Inf (on any rank), or None."""
        local = ((n, p.to_local() if hasattr(p, "to_local") else p) for n, p in self.model.named_parameters())
        bad = next((n for n, p in local if not bool(torch.isfinite(p).all())), None)  # (DTensors: this rank's shard)
        if self.dist.active and self.dist.max(float(bad is not None)) > 0:
            return bad or "a parameter of another process"
        return bad

    def _save(self) -> Path:
        d = self.dist
        extra = self.on_save(self.state) if self.on_save else None
        state = {**{k: v for k, v in vars(self.state).items() if k != "step"}, "world_size": d.world}
        if d.sharded:
            return ckpt.save_sharded(
                self.checkpoints,
                self.state.step,
                self.model,
                self.optimizer,
                state,
                self.args.keep_checkpoints,
                extra,
                d,
            )
        if d.strategy == "zero1":
            self.optimizer.consolidate_state_dict(to=0)
        if d.dp > 1 and self.on_save:  # each replica's own extras (e.g. its share of a rollout)
            parts = d.gather_objects({k: v.detach().cpu() for k, v in (extra or {}).items()})
            extra = {f"r{r}.{k}": v for r, part in enumerate(parts or []) for k, v in part.items()}
        path = self.checkpoints / f"step_{self.state.step}"
        if d.is_main:
            path = ckpt.save_checkpoint(
                self.checkpoints, self.state.step, self.model, self.optimizer, state, self.args.keep_checkpoints, extra
            )
        d.barrier()
        return path

    def final_model(self) -> nn.Module | None:
        """The trained model as a plain module to save, on rank 0 (None on the other ranks). Refused when the base
        model the run started from has changed since (its frozen weights are read back from it). The run's lock is
        given back: what is left is writing `final/`."""
        try:
            self._check_base_unchanged()
            model = distributed.export(self.model, self.template, self.dist)
            if model is not None and self.held and self.frozen_source is not None:
                restore_frozen(model, self.held, self.frozen_source())  # the originals, not their bf16 copies
                self.held = []
            return model
        finally:
            if self.dist.is_main:
                release_run_lock(self.run_dir)

    def _check_base_unchanged(self) -> None:
        recorded = run_base(self.run_dir)
        if recorded is None:
            return
        folder = Path(recorded.get("path", ""))
        try:
            now = ckpt.weights_digest(folder) if folder.is_dir() else None
        except OSError:
            now = None
        if now != recorded["sha256"]:
            what = f"its weights' sha256 is now {now[:16]}" if now else "it is gone"
            raise UserError(
                f"{folder}, the model this run started from, changed while it trained ({what}, it was "
                f"{recorded['sha256'][:16]}); final/ is not written: put that model back and resume (resume=true)"
            )

    def loss_sum(self, batch: Batch) -> float:
        """Summed next-token loss of a batch under any strategy (pp: through the pipeline), for validation."""
        if self.pipeline is not None:
            return self.pipeline.loss_sum(batch)
        return float(lm_loss(self.model, batch)[0])

    # -- one step ------------------------------------------------------------------------------------------------
    def _step(self, batches: list[Batch]) -> tuple[float, float, dict[str, float], bool]:
        """One optimizer step. Returns (global mean loss, global grad norm, stats, applied)."""
        args, opt, d = self.args, self.optimizer, self.dist
        for g in opt.param_groups:  # a group may run at a multiple of the schedule (PPO's value head)
            g["lr"] = lr_at(self.state.step, args) * g.get("lr_scale", 1.0)
        scale = self.scaler.scale if self.scaler else (lambda x: x)
        local = sum(self.count_fn(b) for b in batches)
        total = int(d.dp_sum([local])[0])
        if self.pipeline is not None:
            loss_sum = sum(self.pipeline.step(b, total) for b in batches)
            loss, stats = loss_sum / max(total, 1), {}
            self.pipeline.sync_tied()
        else:
            ddp = getattr(self.train_model, "_ddp", None)
            loss, stats = accumulate(
                self.train_model,
                batches,
                self.loss_fn,
                self.count_fn,
                autocast_ctx=lambda: autocast(self.device, args.precision),
                scale=scale,
                total=total,
                replicas=d.dp,
                no_sync=ddp.no_sync if ddp is not None else None,
            )
            if d.dp > 1:  # every replica's share of the loss; stats averaged over replicas
                keys = sorted(stats)
                summed = d.dp_sum([loss, *(stats[k] for k in keys)])
                loss, stats = summed[0], {k: v / d.dp for k, v in zip(keys, summed[1:])}
        if self.scaler:
            self.scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
        counted = self.pipeline.norm_params(params) if self.pipeline is not None else None
        norm = distributed.clip_grads(params, max_norm, d, counted)
        finite = math.isfinite(loss) and math.isfinite(norm)
        if self.scaler:
            self.scaler.step(opt)  # skips the step itself on inf/nan gradients
            self.scaler.update()
            finite = math.isfinite(loss)
        elif finite:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, norm, stats, finite

    def _oom_message(self, batches: list[Batch]) -> str:
        """What ran out and settings that would fit (the estimate of `llmstages estimate-memory`)."""
        from llmstages.model.gpt import ModelConfig
        from llmstages.train.memory import out_of_memory_advice

        strategy = {"fsdp+tp": "fsdp"}.get(self.dist.strategy, self.dist.strategy)
        if strategy == "fsdp" and not self.dist.args.reshard_after_forward:
            strategy = "fsdp-zero2"
        config = next(
            (c for m in self.model.modules() if isinstance(c := getattr(m, "config", None), ModelConfig)), None
        )
        if config is None:
            return "out of memory; lower train.batch_size (raise train.grad_accum) or turn on activation checkpointing"
        sizes = [(p.numel(), p.requires_grad) for p in self.model.parameters()]
        frozen = sum(n for n, trains in sizes if not trains) > sum(n for n, _ in sizes) / 2  # adapters on a base
        rows, seq = batches[0]["input_ids"].shape
        return out_of_memory_advice(
            config,
            "lora" if frozen else "full",
            strategy,
            self.dist.world,
            self.args.precision,
            rows,
            seq,
            self.args.activation_checkpointing,
            self.args.grad_accum,
            self.device.type,
        )

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self, log: MetricsLogger | NullLogger, progress: bool = True) -> LoopState:
        args, st, d = self.args, self.state, self.dist
        progress = progress and d.is_main
        peak = peak_flops(self.device, args.precision, args.peak_flops)
        old_handlers = self._install_signal_handlers()
        bad_in_a_row = 0
        bar = tqdm(
            total=args.max_steps,
            initial=st.step,
            desc="train",
            disable=not progress,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        window_tokens, window_start = 0, time.perf_counter()
        start, profiler = st.step, None
        try:
            self.model.train()
            while st.step < args.max_steps:
                if profiler is None and args.profile_steps > 0 and st.step == start + 1:
                    profiler = self._start_profiler()
                t_fetch = time.perf_counter()
                batches = self.next_batches(st.step)
                n_tokens = sum(int(b["input_ids"].numel()) for b in batches) * d.dp
                t_step = time.perf_counter()
                try:
                    loss, norm, stats, applied = self._step(batches)
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    oom = isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
                    if not oom:  # the CPU allocator raises a plain RuntimeError
                        raise
                    raise UserError(self._oom_message(batches)) from None
                if not applied:
                    bad_in_a_row += 1
                    st.skipped_steps += 1
                    log.log({"step": st.step + 1, "event": "skipped_step", "loss": loss, "grad_norm": norm})
                    if bad_in_a_row >= args.max_bad_steps:
                        raise TrainingFailed(
                            f"step {st.step + 1}: the loss or gradient was NaN/Inf for {bad_in_a_row} steps in a "
                            f"row; {NOT_TRAINING}"
                        )
                else:
                    bad_in_a_row = 0
                t_end = time.perf_counter()
                for flag in self.health.check(
                    st.step + 1, loss, norm, n_tokens / max(t_end - t_step, 1e-9), t_step - t_fetch, t_end - t_step
                ):
                    log.log(flag)
                    if progress:
                        tqdm.write(f"health: step {flag['step']}: {flag['kind'].replace('_', ' ')}: {flag['detail']}")
                st.step += 1
                st.tokens_seen += n_tokens
                window_tokens += n_tokens
                if st.step % args.log_every == 0 or st.step == args.max_steps or st.step == 1:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_start, 1e-9)
                    window_tokens, window_start = 0, now
                    rec = {
                        "step": st.step,
                        "loss": loss,
                        "lr": lr_at(st.step - 1, args),
                        "grad_norm": norm,
                        "tokens_per_s": tps,
                        "tokens_seen": st.tokens_seen,
                        **stats,
                    }
                    if peak and self.flops_per_token:
                        rec["mfu"] = self.flops_per_token * tps / peak / max(d.world, 1)
                    log.log(rec)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                bar.update(1)
                if profiler is not None and st.step == start + 1 + args.profile_steps:
                    self._stop_profiler(profiler, progress)
                    profiler = None
                if self.evaluate and (st.step % args.eval_every == 0 or st.step == args.max_steps):
                    self._validate(log)
                    window_start = time.perf_counter()  # tokens/s counts training time, not validation
                stop = self._stop_signal if not d.active else int(d.max(float(self._stop_signal or 0))) or None
                if stop is not None:
                    path = self.save()
                    raise Interrupted(f"stopped by signal {stop} at step {st.step}; saved {path}")
                if st.step % args.save_every == 0 and st.step < args.max_steps:
                    self.save()
            if bad_in_a_row:  # the model's last steps could not train: it is not a model to save
                raise TrainingFailed(
                    f"step {st.step}: the run ended with {bad_in_a_row} step(s) in a row skipped for a NaN/Inf loss "
                    f"or gradient; {NOT_TRAINING}"
                )
            self.save()
        finally:
            bar.close()
            self._restore_signal_handlers(old_handlers)
            if profiler is not None:  # the run ended inside the profiled window
                self._stop_profiler(profiler, progress)
        return st

    def _start_profiler(self) -> Any:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        prof = profile(activities=acts, record_shapes=True)
        prof.__enter__()
        return prof

    def _stop_profiler(self, prof: Any, progress: bool) -> None:
        prof.__exit__(None, None, None)
        where = self.run_dir / "profile"
        where.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(where / f"trace_rank{self.dist.rank}.json"))
        if self.dist.is_main:
            key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=15)
            (where / "top_operators.txt").write_text(table + "\n")
            if progress:
                tqdm.write(f"profile of {self.args.profile_steps} steps -> {where}/trace_rank0.json\n{table}")

    def run_logged(
        self, resumed: bool, start: Callable[[], dict[str, Any]] | None = None, progress: bool = True
    ) -> LoopState:
        """`run` with the run's metrics sinks (rank 0 only): a resumed run keeps its records up to the
        checkpoint; a fresh one first logs `start()` (evaluated in eval mode without gradients, on every rank)
        as its step-0 record."""
        log: MetricsLogger | NullLogger = NullLogger()
        if self.dist.is_main:
            tb = self.monitor.tensorboard if self.monitor is not None else True
            log = MetricsLogger(self.run_dir, self.state.step if resumed else None, tb, self.monitor)
        try:
            if not resumed and start is not None:
                self.model.eval()
                with torch.no_grad(), autocast(self.device, self.args.precision), distributed.gathered(self.model):
                    log.log({"step": 0, "event": "start", **start()})  # in the precision of every later eval
                self.model.train()
            return self.run(log, progress=progress)
        except BaseException:
            if self.dist.is_main:  # the run is over: another may take the folder
                release_run_lock(self.run_dir)
            raise
        finally:
            log.close()

    def _validate(self, log: MetricsLogger | NullLogger) -> None:
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.args.precision), distributed.gathered(self.model):
            metrics = self.evaluate(self.model)
        self.model.train()
        if "val_loss" in metrics:
            v = metrics["val_loss"]
            self.state.best_val_loss = v if self.state.best_val_loss is None else min(v, self.state.best_val_loss)
        self.last_eval = metrics
        log.log({"step": self.state.step, **metrics})

    def _install_signal_handlers(self) -> dict[int, Any]:
        def handler(signum, frame):  # noqa: ARG001
            self._stop_signal = signum

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                old[sig] = signal.signal(sig, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict[int, Any]) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)


class EpochSampler:
    """Indices of the examples in micro-batch `micro` of step `step`: epoch-wise shuffles of range(n), a pure
    function of (seed, step, micro), so that a resumed run draws exactly what an uninterrupted one would.

    Under data parallelism each global micro-batch holds batch_size x replicas examples and data-parallel rank r
    takes the r-th run of batch_size of them (default: this process's place, `distributed.current()`): the
    ranks together draw what one process with batch_size x replicas draws."""

    def __init__(
        self, n: int, batch_size: int, grad_accum: int, seed: int, rank: int | None = None, replicas: int | None = None
    ) -> None:
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        d = distributed.current()
        self.rank = d.dp_rank if rank is None else rank
        self.replicas = d.dp if replicas is None else replicas
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms[epoch] = random.Random(self.seed * 1_000_003 + epoch).sample(range(self.n), self.n)
        return self._perms[epoch]

    def __call__(self, step: int, micro: int) -> list[int]:
        first = (step * self.grad_accum + micro) * self.batch_size * self.replicas + self.rank * self.batch_size
        return [self._perm(k // self.n)[k % self.n] for k in range(first, first + self.batch_size)]
