"""The training loop every stage shares, `fit`; the algorithm (what a batch is, what its loss is) comes from the
stage. A stage reads setup -> prepare -> fit:

    model = prepare_model(model, cfg.train, frozen_source)    # checkpointing, compile, bf16 hold, parallel wrap
    trainer = Trainer(model, cfg.train, run_dir)              # AdamW, the schedule, the step, checkpoints
    fit(trainer, batches, loss_fn, evaluate=..., save_final=...)

Per optimizer step (`fit`): the micro-batches of the step are drawn first and their loss units (target tokens,
pairs, ...) counted; each micro-batch's summed loss is divided by that total before `backward`, so the gradient
is that of the mean over every unit of the step, the same as one big batch whatever the padding or accumulation
(`accumulate`). Then gradient clipping (norm logged), a NaN/Inf guard, AdamW with warmup + cosine, metrics,
periodic validation and atomic checkpoints; SIGINT/SIGTERM save a checkpoint before exiting.

A run that no longer trains (a NaN/Inf loss or gradient it cannot skip past, or NaN/Inf weights) stops with
`TrainingFailed` and writes neither a checkpoint of it nor `final/`. The final model is refused when the base
model the run started from changed on disk while it trained.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from llmstages.config import MonitorArgs, TrainArgs
from llmstages.errors import UserError
from llmstages.losses import count_targets, lm_loss
from llmstages.monitor.health import HealthMonitor
from llmstages.monitor.metrics import MetricsLogger, NullLogger
from llmstages.outputs import is_disk_full, release_run_lock, run_base
from llmstages.peft.nf4 import NF4Weight
from llmstages.train import checkpoint as ckpt
from llmstages.train import distributed
from llmstages.train.frozen import restore_frozen
from llmstages.train.optim import build_optimizer, lr_at, peak_flops
from llmstages.train.prepare import Prepared
from llmstages.train.start import autocast, check_precision

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
Batches = Callable[[int], Iterator[list[Batch]]]
"""This rank's micro-batches of every optimizer step from step `start` on (a pure function of the step: a resumed
run draws what the uninterrupted one did)."""


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once the checkpoint is written."""


NOT_TRAINING = (
    "lower train.lr, raise train.warmup_steps or use train.precision=fp32/bf16 (the earlier checkpoints are kept, "
    "final/ is not written)"
)


class TrainingFailed(Exception):
    """The run stopped because it no longer trains (NaN/Inf loss, gradients or weights); the message names the
    step. Not bad input: the command line exits with code 1. The checkpoints written before are kept."""


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


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    best_val_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Scalars a stage keeps across resume (saved in each checkpoint's state, restored in place)."""


class Trainer:
    """A run's training state: the prepared model, its AdamW (over `param_groups`, default `optim.param_groups`;
    a group's `lr_scale` runs it at a multiple of the schedule), the step, and its checkpoints: `resume`, `save`,
    `final_model`. One optimizer step is `forward_backward` then `optimizer_step`; `fit` runs them.

    `on_save` returns extra tensors a stage keeps in each checkpoint (a rollout in progress); `state` may be
    handed in so that a stage holds its `extra` scalars (PPO's KL coefficient), restored in place on resume."""

    def __init__(
        self,
        model: Prepared,
        args: TrainArgs,
        run_dir: Path,
        *,
        device: torch.device | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        on_save: Callable[[LoopState], dict[str, torch.Tensor]] | None = None,
        state: LoopState | None = None,
    ) -> None:
        self.dist = d = model.dist
        self.device = device if device is not None else d.device
        check_precision(args.precision, self.device)
        self.args, self.run_dir, self.on_save = args, Path(run_dir), on_save
        self.model = model.module
        """The stage's model (under pp this process's part), what is saved and evaluated."""
        self.train_model = model.forward
        """What the loss function is handed (the model or its DDP wrapper)."""
        self.pipeline, self.template = model.pipeline, model.template
        self.held, self.frozen_source = model.held, model.frozen_source
        self.optimizer = build_optimizer(self.model, args, param_groups, zero1=d.strategy == "zero1")
        self.scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
        self.state = state if state is not None else LoopState()
        self.checkpoints = self.run_dir / "checkpoints"
        self.last_eval: dict[str, float] = {}
        self.resumed_extra: dict[str, torch.Tensor] = {}
        self.stop_signal: int | None = None

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

    # -- one optimizer step --------------------------------------------------------------------------------------
    def forward_backward(
        self, batches: list[Batch], loss_fn: LossFn, count_fn: Callable[[Batch], int]
    ) -> tuple[float, dict[str, float]]:
        """Forward and backward over the micro-batches of one step (`accumulate`; pp: through the pipeline);
        returns (the step's mean loss over every unit of every rank, the loss function's stats averaged)."""
        d = self.dist
        total = int(d.dp_sum([sum(count_fn(b) for b in batches)])[0])
        if self.pipeline is not None:
            loss_sum = sum(self.pipeline.step(b, total) for b in batches)
            self.pipeline.sync_tied()
            return loss_sum / max(total, 1), {}
        ddp = getattr(self.train_model, "_ddp", None)
        loss, stats = accumulate(
            self.train_model,
            batches,
            loss_fn,
            count_fn,
            autocast_ctx=lambda: autocast(self.device, self.args.precision),
            scale=self.scaler.scale if self.scaler else (lambda x: x),
            total=total,
            replicas=d.dp,
            no_sync=ddp.no_sync if ddp is not None else None,
        )
        if d.dp > 1:  # every replica's share of the loss; stats averaged over replicas
            keys = sorted(stats)
            summed = d.dp_sum([loss, *(stats[k] for k in keys)])
            loss, stats = summed[0], {k: v / d.dp for k, v in zip(keys, summed[1:])}
        return loss, stats

    def optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Clip the gradients, then take the AdamW step at the scheduled learning rate unless the loss or the
        gradient is NaN/Inf (fp16: the scaler decides). Returns (global gradient norm before clipping, applied)."""
        args, opt = self.args, self.optimizer
        for g in opt.param_groups:  # a group may run at a multiple of the schedule (PPO's value head)
            g["lr"] = lr_at(self.state.step, args) * g.get("lr_scale", 1.0)
        if self.scaler:
            self.scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
        counted = self.pipeline.norm_params(params) if self.pipeline is not None else None
        norm = distributed.clip_grads(params, max_norm, self.dist, counted)
        finite = math.isfinite(loss) and math.isfinite(norm)
        if self.scaler:
            self.scaler.step(opt)  # skips the step itself on inf/nan gradients
            self.scaler.update()
            finite = math.isfinite(loss)
        elif finite:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norm, finite

    def oom_message(self, batches: list[Batch]) -> str:
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
        quantized = any(isinstance(m, NF4Weight) for m in self.model.modules())
        rows, seq = batches[0]["input_ids"].shape
        return out_of_memory_advice(
            config,
            "qlora" if quantized else "lora" if frozen else "full",
            strategy,
            self.dist.world,
            self.args.precision,
            rows,
            seq,
            self.args.activation_checkpointing,
            self.args.grad_accum,
            self.device.type,
            self.args.optimizer,
        )


# ----------------------------------------------------------------------------------------------------------------
# The loop


def fit(
    trainer: Trainer,
    batches: Batches,
    loss_fn: LossFn = lm_loss,
    count_fn: Callable[[Batch], int] = count_targets,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    first_record: Callable[[], dict[str, Any]] | None = None,
    stats: Callable[[], dict[str, float]] | None = None,
    save_final: Callable[[nn.Module], Any] | None = None,
    resume: bool = False,
    on_resume: Callable[[dict[str, torch.Tensor]], None] | None = None,
    monitor: MonitorArgs | None = None,
    health: HealthMonitor | None = None,
    flops_per_token: float | None = None,
    log: MetricsLogger | NullLogger | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train `trainer` to train.max_steps and save the final model; returns {"step", **the last evaluation}.

    batches(start): the micro-batches of each step from `start` on; loss_fn(model, batch) -> (summed loss, stats);
    count_fn(batch): its loss units. evaluate(model) runs every train.eval_every steps and at the end (eval mode,
    no gradients); a fresh run first logs {**first_record(), ...} as step 0; stats() adds a stage's figures to
    each logged step (a rollout's rewards). resume=True continues from the newest checkpoint, handing its extra
    tensors to on_resume; save_final(model) writes the plain trained model (rank 0). `log`: the metrics sink
    (default: the run's, from the `monitor` config section, on rank 0)."""
    args, d = trainer.args, trainer.dist
    resumed = trainer.resume() if resume else False
    if resumed and on_resume is not None:
        on_resume(trainer.resumed_extra)  # e.g. the rollout in progress when the checkpoint was written
    st = trainer.state
    if resumed and progress and d.is_main:
        print(f"resume: continuing at step {st.step} of {args.max_steps}")
    own_log = log is None  # a sink handed in is the caller's to close
    if log is None:
        tb = monitor.tensorboard if monitor is not None else True
        log = MetricsLogger(trainer.run_dir, st.step if resumed else None, tb, monitor) if d.is_main else NullLogger()
    health = health if health is not None else HealthMonitor()
    speed = _Speed(trainer, flops_per_token)
    bar = tqdm(total=args.max_steps, initial=st.step, desc="train", disable=not (progress and d.is_main),
               mininterval=0.5, dynamic_ncols=True)  # fmt: skip
    old_handlers = _catch_stop_signals(trainer)
    try:
        if first_record is not None and not resumed:
            log.log({"step": 0, "event": "start", **_evaluated(trainer, first_record)})
        draw, bad_in_a_row = batches(st.step), 0
        trainer.model.train()
        while st.step < args.max_steps:
            speed.start_profile(st.step)
            t_fetch = time.perf_counter()
            micro = next(draw)
            n_tokens = sum(int(b["input_ids"].numel()) for b in micro) * d.dp
            t_step = time.perf_counter()
            with _out_of_memory_is_advice(trainer, micro):
                loss, step_stats = trainer.forward_backward(micro, loss_fn, count_fn)  # forward and backward
                norm, applied = trainer.optimizer_step(loss)  # clip, then AdamW (not on a NaN/Inf)
            bad_in_a_row = 0 if applied else bad_in_a_row + 1
            if not applied:
                st.skipped_steps += 1
                log.log({"step": st.step + 1, "event": "skipped_step", "loss": loss, "grad_norm": norm})
                if bad_in_a_row >= args.max_bad_steps:
                    raise TrainingFailed(
                        f"step {st.step + 1}: the loss or gradient was NaN/Inf for {bad_in_a_row} steps in a row; "
                        f"{NOT_TRAINING}"
                    )
            t_end = time.perf_counter()
            tps = n_tokens / max(t_end - t_step, 1e-9)
            for flag in health.check(st.step + 1, loss, norm, tps, t_step - t_fetch, t_end - t_step):
                log.log(flag)
                if progress and d.is_main:
                    tqdm.write(f"health: step {flag['step']}: {flag['kind'].replace('_', ' ')}: {flag['detail']}")
            st.step += 1
            st.tokens_seen += n_tokens
            speed.add(n_tokens)
            if st.step % args.log_every == 0 or st.step == args.max_steps or st.step == 1:
                rec = {"step": st.step, "loss": loss, "lr": lr_at(st.step - 1, args), "grad_norm": norm,
                       **speed.measure(), "tokens_seen": st.tokens_seen, **_replica_mean(stats, d),
                       **step_stats}  # fmt: skip
                log.log(rec)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
            bar.update(1)
            speed.stop_profile(st.step, progress)
            if evaluate is not None and (st.step % args.eval_every == 0 or st.step == args.max_steps):
                trainer.last_eval = _validate(trainer, evaluate, log)
                speed.restart()  # tokens/s counts training time, not validation
            stop = trainer.stop_signal if not d.active else int(d.max(float(trainer.stop_signal or 0))) or None
            if stop is not None:
                path = trainer.save()
                raise Interrupted(f"stopped by signal {stop} at step {st.step}; saved {path}")
            if st.step % args.save_every == 0 and st.step < args.max_steps:
                trainer.save()
        if bad_in_a_row:  # the model's last steps could not train: it is not a model to save
            raise TrainingFailed(
                f"step {st.step}: the run ended with {bad_in_a_row} step(s) in a row skipped for a NaN/Inf loss or "
                f"gradient; {NOT_TRAINING}"
            )
        trainer.save()
    except BaseException:
        if d.is_main:  # the run is over: another may take the folder
            release_run_lock(trainer.run_dir)
        raise
    finally:
        bar.close()
        speed.close(progress)
        _restore_signal_handlers(old_handlers)
        if own_log:
            log.close()
    if save_final is not None:
        final = trainer.final_model()  # rank 0: the whole model, gathered from its shards or stages
        if final is not None:
            save_final(final)
    return {"step": st.step, **trainer.last_eval}


def _replica_mean(stats: Callable[[], dict[str, float]] | None, d: distributed.Dist) -> dict[str, float]:
    """A stage's figures of this step (its rollout's), averaged over the data-parallel replicas."""
    got = stats() if stats is not None else {}
    if d.dp == 1 or not got:
        return got
    keys = sorted(got)
    return {k: v / d.dp for k, v in zip(keys, d.dp_sum([got[k] for k in keys]))}


def _evaluated(trainer: Trainer, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn() in eval mode, without gradients, in the run's precision, on the whole model (fsdp: gathered)."""
    trainer.model.eval()
    with torch.no_grad(), autocast(trainer.device, trainer.args.precision), distributed.gathered(trainer.model):
        out = fn()
    trainer.model.train()
    return out


def _validate(
    trainer: Trainer, evaluate: Callable[[nn.Module], dict[str, float]], log: MetricsLogger | NullLogger
) -> dict[str, float]:
    metrics = _evaluated(trainer, lambda: evaluate(trainer.model))
    if "val_loss" in metrics:
        v, best = metrics["val_loss"], trainer.state.best_val_loss
        trainer.state.best_val_loss = v if best is None else min(v, best)
    log.log({"step": trainer.state.step, **metrics})
    return metrics


@contextlib.contextmanager
def _out_of_memory_is_advice(trainer: Trainer, batches: list[Batch]) -> Iterator[None]:
    """Running out of memory in a step is one line: what ran out and settings that would fit."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        oom = isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
        if not oom:  # the CPU allocator raises a plain RuntimeError
            raise
        raise UserError(trainer.oom_message(batches)) from None


def _catch_stop_signals(trainer: Trainer) -> dict[int, Any]:
    """SIGINT/SIGTERM set `trainer.stop_signal`: the loop saves a checkpoint after the step and stops."""
    trainer.stop_signal = None

    def handler(signum, frame):  # noqa: ARG001
        trainer.stop_signal = signum

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            old[sig] = signal.signal(sig, handler)
    return old


def _restore_signal_handlers(old: dict[int, Any]) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)


class _Speed:
    """Tokens/s over the steps since the last logged one (and MFU where the device's peak is known), and the
    profiler of train.profile_steps steps after the first."""

    def __init__(self, trainer: Trainer, flops_per_token: float | None) -> None:
        self.trainer, self.flops_per_token = trainer, flops_per_token
        self.peak = peak_flops(trainer.device, trainer.args.precision, trainer.args.peak_flops)
        self.start_step, self.profiler = trainer.state.step, None
        self.tokens, self.since = 0, time.perf_counter()

    def add(self, n_tokens: int) -> None:
        self.tokens += n_tokens

    def restart(self) -> None:
        self.since = time.perf_counter()

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        tps = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        out = {"tokens_per_s": tps}
        if self.peak and self.flops_per_token:
            out["mfu"] = self.flops_per_token * tps / self.peak / max(self.trainer.dist.world, 1)
        return out

    def start_profile(self, step: int) -> None:
        """Profile train.profile_steps steps from the second of this run on (the first warms up)."""
        if self.profiler is None and self.trainer.args.profile_steps > 0 and step == self.start_step + 1:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.trainer.device.type == "cuda" else [])
            self.profiler = profile(activities=acts, record_shapes=True)
            self.profiler.__enter__()

    def stop_profile(self, step: int, progress: bool) -> None:
        if self.profiler is not None and step == self.start_step + 1 + self.trainer.args.profile_steps:
            self.close(progress)

    def close(self, progress: bool) -> None:
        if self.profiler is None:
            return
        prof, self.profiler = self.profiler, None
        prof.__exit__(None, None, None)
        where = self.trainer.run_dir / "profile"
        where.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(where / f"trace_rank{self.trainer.dist.rank}.json"))
        if self.trainer.dist.is_main:
            key = "self_cuda_time_total" if self.trainer.device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=15)
            (where / "top_operators.txt").write_text(table + "\n")
            if progress:
                tqdm.write(f"profile of {self.trainer.args.profile_steps} steps -> {where}/trace_rank0.json\n{table}")


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
