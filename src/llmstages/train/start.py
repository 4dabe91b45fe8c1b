"""What a stage does before it trains: check the run folder, the device, the precision and the distributed
strategy (`start_run`, which writes nothing), then claim the folder and record the run (`prepare_run_dir`).

A run knows what it trained: the sha256 of its base model's weights is recorded in `run.json` at the start, and a
resume that would read other weights from `model.path` is refused.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmstages.config import RunArgs, write_config
from llmstages.errors import UserError
from llmstages.model.generate import cpu_compiler
from llmstages.outputs import check_run_lock, claim_run_dir, claim_run_lock, run_base, start_run_dir
from llmstages.store.io import resolve_model_path
from llmstages.train import checkpoint as ckpt
from llmstages.train import distributed

# ----------------------------------------------------------------------------------------------------------------
# Devices and precision


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


# ----------------------------------------------------------------------------------------------------------------
# The run folder


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
