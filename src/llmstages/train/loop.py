"""The training loop every stage shares; the algorithm (what a batch is, what its loss is) comes from the stage.

Per optimizer step: the micro-batches of the step are drawn first, their loss units (target tokens, pairs, ...)
counted, and each micro-batch's summed loss is divided by that total before `backward`. The gradient is then
the gradient of the mean over every unit of the step, the same as one big batch whatever the padding or
accumulation. Then: gradient clipping (norm logged), a NaN/Inf guard, AdamW with warmup + cosine, metrics,
periodic validation and atomic checkpoints; SIGINT/SIGTERM save a checkpoint before exiting.
"""

from __future__ import annotations

import contextlib
import math
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

from llmstages.config import TrainArgs
from llmstages.errors import UserError
from llmstages.losses import IGNORE_INDEX, linear_cross_entropy
from llmstages.monitor.metrics import MetricsLogger
from llmstages.train import checkpoint as ckpt

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once the checkpoint is written."""


# ----------------------------------------------------------------------------------------------------------------
# Devices, precision, optimizer, schedule


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available on this machine")
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
    cpu = getattr(torch._C, "_cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks) if cpu is not None else False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 where the hardware runs it natively, else fp32."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"train.precision must be auto, fp32, bf16 or fp16, got '{precision}'")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA device (it uses a gradient scaler); use bf16 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.precision=bf16: this GPU does not support bfloat16; use fp16")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never norms, biases or embeddings (nor a head tied to the embedding)."""
    no_decay: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            no_decay.add(id(m.weight))
    decay, rest, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in no_decay else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    groups = param_groups(model, args.weight_decay)
    if not any(g["params"] for g in groups):
        raise UserError("the model has no trainable parameters")
    kw = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
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
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "A10G": (125e12, 31e12),
    "L4": (121e12, 30e12), "L40S": (362e12, 91.6e12), "RTX 4090": (165e12, 82.6e12), "V100": (125e12, 15.7e12),
}  # fmt: skip


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


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        if not hasattr(block, "_forward_without_checkpoint"):
            block._forward_without_checkpoint = block.forward
            block.forward = partial(checkpoint, block._forward_without_checkpoint, use_reentrant=False)


def start_run(out: Path, args: TrainArgs, resume: bool) -> tuple[torch.device, Path | None]:
    """Checks every stage makes before writing anything: device and precision (resolving `auto` in place),
    positive step settings, and the run directory: checkpoints there need resume=true, and a checkpoint to
    resume from must be readable. Returns (device, checkpoint to resume from or None)."""
    device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, device)
    check_precision(args.precision, device)
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "save_every", "log_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"train.{name} must be positive, got {getattr(args, name)}")
    existing = ckpt.latest_checkpoint(out / "checkpoints")
    if existing is not None and not resume:
        raise UserError(
            f"{out} already holds checkpoints (newest: {existing.name}); pass resume=true to continue the run, "
            "or choose another out_dir"
        )
    if existing is not None:
        ckpt.read_checkpoint(existing)  # a corrupted checkpoint fails here, before anything is written
    return device, existing


# ----------------------------------------------------------------------------------------------------------------
# Language-model loss (pre-training and SFT)


def lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed next-token cross-entropy over target tokens != IGNORE_INDEX (the loop divides by the count)."""
    hidden = model.hidden_states(batch["input_ids"], mask=batch.get("mask"), position_ids=batch.get("position_ids"))
    if type(model.lm_head) is nn.Linear:  # fused and chunked; a wrapped head (e.g. LoRA) takes the plain path
        loss = linear_cross_entropy(hidden, model.lm_head.weight, batch["targets"], reduction="sum")
    else:
        logits = model.lm_head(hidden).float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch["targets"].reshape(-1), reduction="sum"
        )
    return loss, {}


def count_targets(batch: Batch) -> int:
    return int((batch["targets"] != IGNORE_INDEX).sum())


def accumulate(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    loss_fn: LossFn,
    count_fn: Callable[[Batch], int],
    *,
    autocast_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    total: int | None = None,
) -> tuple[float, dict[str, float]]:
    """Forward and backward over the micro-batches of one optimizer step; returns (mean loss, stats).

    Each summed loss is divided by `total`, the unit count of the whole step (all ranks together under data
    parallelism), so gradients equal those of the mean over every unit of the step.
    """
    total = total if total is not None else sum(count_fn(b) for b in micro_batches)
    loss_sum = 0.0
    stats: dict[str, float] = {}
    for b in micro_batches:
        with autocast_ctx():
            loss, s = loss_fn(model, b)
        scale(loss / max(total, 1)).backward()
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


@dataclass
class Loop:
    """Everything the loop needs from a stage. The stage builds it and calls `run()`."""

    model: nn.Module
    args: TrainArgs
    run_dir: Path
    next_batches: Callable[[int], list[Batch]]
    """Micro-batches of optimizer step `step` (a pure function of the step: resume replays it exactly)."""
    loss_fn: LossFn = lm_loss
    count_fn: Callable[[Batch], int] = count_targets
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    flops_per_token: float | None = None
    on_save: Callable[[LoopState], dict[str, torch.Tensor]] | None = None
    """Extra tensors a stage keeps in each checkpoint (e.g. a value head)."""
    device: torch.device = torch.device("cpu")
    optimizer: torch.optim.Optimizer | None = None
    state: LoopState = field(default_factory=LoopState)
    _stop_signal: int | None = None

    def __post_init__(self) -> None:
        check_precision(self.args.precision, self.device)
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model, self.args)
        self.scaler = torch.amp.GradScaler("cuda") if self.args.precision == "fp16" else None
        self.checkpoints = self.run_dir / "checkpoints"
        self.last_eval: dict[str, float] = {}

    # -- resume --------------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the newest checkpoint of the run, if any; True when resumed."""
        path = ckpt.latest_checkpoint(self.checkpoints)
        if path is None:
            return False
        state, extra = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.state = LoopState(
            step=state["step"], tokens_seen=state.get("tokens_seen", 0),
            skipped_steps=state.get("skipped_steps", 0), best_val_loss=state.get("best_val_loss"),
            extra=state.get("extra", {}),
        )  # fmt: skip
        self.resumed_extra = extra
        return True

    def save(self) -> Path:
        extra = self.on_save(self.state) if self.on_save else None
        state = {k: v for k, v in vars(self.state).items() if k != "step"}
        return ckpt.save_checkpoint(
            self.checkpoints, self.state.step, self.model, self.optimizer, state, self.args.keep_checkpoints, extra
        )

    # -- one step ------------------------------------------------------------------------------------------------
    def _step(self, batches: list[Batch]) -> tuple[float, float, dict[str, float], bool]:
        """One optimizer step. Returns (loss, grad norm, stats, applied)."""
        args, opt = self.args, self.optimizer
        for g in opt.param_groups:  # a group may run at a multiple of the schedule (PPO's value head)
            g["lr"] = lr_at(self.state.step, args) * g.get("lr_scale", 1.0)
        scale = self.scaler.scale if self.scaler else (lambda x: x)
        loss, stats = accumulate(
            self.model, batches, self.loss_fn, self.count_fn,
            autocast_ctx=lambda: autocast(self.device, args.precision), scale=scale,
        )  # fmt: skip
        if self.scaler:
            self.scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = math.isfinite(loss) and math.isfinite(norm)
        if self.scaler:
            self.scaler.step(opt)  # skips the step itself on inf/nan gradients
            self.scaler.update()
            finite = math.isfinite(loss)
        elif finite:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, norm, stats, finite

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self, log: MetricsLogger, progress: bool = True) -> LoopState:
        args, st = self.args, self.state
        peak = peak_flops(self.device, args.precision, args.peak_flops)
        old_handlers = self._install_signal_handlers()
        bad_in_a_row = 0
        bar = tqdm(total=args.max_steps, initial=st.step, desc="train", disable=not progress, mininterval=0.5,
                   dynamic_ncols=True)  # fmt: skip
        window_tokens, window_start = 0, time.perf_counter()
        try:
            self.model.train()
            while st.step < args.max_steps:
                batches = self.next_batches(st.step)
                n_tokens = sum(int(b["input_ids"].numel()) for b in batches)
                loss, norm, stats, applied = self._step(batches)
                if not applied:
                    bad_in_a_row += 1
                    st.skipped_steps += 1
                    log.log({"step": st.step + 1, "event": "skipped_step", "loss": loss, "grad_norm": norm})
                    if bad_in_a_row >= args.max_bad_steps:
                        raise UserError(
                            f"loss or gradient was NaN/Inf for {bad_in_a_row} steps in a row (step {st.step + 1}); "
                            "lower train.lr, raise train.warmup_steps or use train.precision=fp32/bf16"
                        )
                else:
                    bad_in_a_row = 0
                st.step += 1
                st.tokens_seen += n_tokens
                window_tokens += n_tokens
                if st.step % args.log_every == 0 or st.step == args.max_steps or st.step == 1:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_start, 1e-9)
                    window_tokens, window_start = 0, now
                    rec = {"step": st.step, "loss": loss, "lr": lr_at(st.step - 1, args), "grad_norm": norm,
                           "tokens_per_s": tps, "tokens_seen": st.tokens_seen, **stats}  # fmt: skip
                    if peak and self.flops_per_token:
                        rec["mfu"] = self.flops_per_token * tps / peak
                    log.log(rec)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                bar.update(1)
                if self.evaluate and (st.step % args.eval_every == 0 or st.step == args.max_steps):
                    self._validate(log)
                if self._stop_signal is not None:
                    path = self.save()
                    raise Interrupted(f"stopped by signal {self._stop_signal} at step {st.step}; saved {path}")
                if st.step % args.save_every == 0 and st.step < args.max_steps:
                    self.save()
            self.save()
        finally:
            bar.close()
            self._restore_signal_handlers(old_handlers)
        return st

    def run_logged(
        self, resumed: bool, start: Callable[[], dict[str, Any]] | None = None, progress: bool = True
    ) -> LoopState:
        """`run` with the run's metrics sinks: a resumed run keeps its records up to the checkpoint; a fresh one
        first logs `start()` (evaluated in eval mode without gradients) as its step-0 record."""
        log = MetricsLogger(self.run_dir, resume_step=self.state.step if resumed else None)
        try:
            if not resumed and start is not None:
                self.model.eval()
                with torch.no_grad():
                    log.log({"step": 0, "event": "start", **start()})
                self.model.train()
            return self.run(log, progress=progress)
        finally:
            log.close()

    def _validate(self, log: MetricsLogger) -> None:
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.args.precision):
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
    function of (seed, step, micro), so that a resumed run draws exactly what an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int) -> None:
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms[epoch] = random.Random(self.seed * 1_000_003 + epoch).sample(range(self.n), self.n)
        return self._perms[epoch]

    def __call__(self, step: int, micro: int) -> list[int]:
        first = (step * self.grad_accum + micro) * self.batch_size
        return [self._perm(k // self.n)[k % self.n] for k in range(first, first + self.batch_size)]


def batches_from(fn: Callable[[int, int], Batch], grad_accum: int) -> Callable[[int], list[Batch]]:
    """Turn `fn(step, micro)` into the loop's `next_batches(step)`."""

    def next_batches(step: int) -> list[Batch]:
        return [fn(step, m) for m in range(grad_accum)]

    return next_batches
