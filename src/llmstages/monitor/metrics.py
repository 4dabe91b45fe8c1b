"""Metric sinks: `metrics.jsonl` (one JSON object per record, always), TensorBoard event files under `tb/`,
and optionally Weights & Biases (offline by default) and MLflow (a local file store by default)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from llmstages.errors import UserError


class MetricsLogger:
    """Writes each record to `metrics.jsonl` and its numbers to TensorBoard (when the package is present).

    On resume, `truncate_after(step)` drops records of steps that will be run again, so the file reads as
    one uninterrupted run.
    """

    def __init__(
        self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True, monitor: Any = None
    ) -> None:
        """A fresh run (`resume_step` None) starts the file anew; a resumed one keeps steps <= resume_step.
        `monitor` (config.MonitorArgs) turns on W&B and MLflow."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._file = open(self.path, "a" if resume_step is not None else "w")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge)
            except ImportError:  # tensorboard not installed: JSONL only
                self._tb = None
        self._wandb = self._mlflow = None
        if monitor is not None and monitor.wandb:
            self._wandb = _start_wandb(Path(run_dir), monitor, resume_step is not None)
        if monitor is not None and monitor.mlflow:
            self._mlflow = _start_mlflow(Path(run_dir), monitor)

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = [line for line, r in _records(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if "step" not in record:
            return
        numbers = {k: v for k, v in record.items() if k != "step" and _number(v)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, record["step"])
        if self._wandb is not None and numbers:
            self._wandb.log(numbers, step=record["step"])
        if self._mlflow is not None and numbers:
            self._mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in numbers.items()}, step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _start_wandb(run_dir: Path, monitor: Any, resumed: bool) -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError("monitor.wandb=true needs the wandb package: pip install 'llmstages[monitor]'") from None
    if monitor.wandb_mode not in ("offline", "online", "disabled"):
        raise UserError(f"monitor.wandb_mode must be offline, online or disabled, got '{monitor.wandb_mode}'")
    id_file = run_dir / "wandb_id.txt"  # one W&B run per run directory, continued on resume
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    run = wandb.init(
        project=monitor.wandb_project,
        dir=str(run_dir),
        mode=monitor.wandb_mode,
        name=run_dir.name,
        id=run_id,
        resume="allow" if run_id else None,
    )
    id_file.write_text(run.id + "\n")
    return run


def _start_mlflow(run_dir: Path, monitor: Any) -> Any:
    try:
        import mlflow
    except ImportError:
        raise UserError("monitor.mlflow=true needs mlflow: pip install 'llmstages[monitor]' (mlflow-skinny)") from None
    if not monitor.mlflow_uri:  # a local file store needs no server or database (MLflow 3 asks to opt in)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(monitor.mlflow_uri or (run_dir.resolve() / "mlruns").as_uri())
    mlflow.set_experiment("llmstages")
    mlflow.start_run(run_name=run_dir.name)
    return mlflow


class NullLogger:
    """The sink of ranks other than 0 in a distributed run: records are dropped."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` (none when it is absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [r for _, r in _records(path)] if path.is_file() else []


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each line of a metrics file. A torn last line (a crash mid-write) is dropped; a bad line
    before it is an error naming file and line."""
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    out = []
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
            out.append((line, json.loads(line)))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if n == len(lines):
                break
            raise UserError(f"{path}:{n}: not a JSON record (the run's metrics file is damaged)") from None
    return out
