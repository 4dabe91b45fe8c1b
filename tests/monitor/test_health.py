"""The health monitor flags what it should and nothing else; a real run logs its flags and the report shows
them; --profile writes a trace; doctor describes the machine."""

from __future__ import annotations

import json
import math

import pytest

from llmstages.cli import main
from llmstages.monitor.health import HealthMonitor
from llmstages.monitor.metrics import read_metrics

STEADY = dict(norm=1.0, tokens_per_s=1000.0, fetch_s=0.001, step_s=0.1)


def feed(h: HealthMonitor, n: int = 10, loss: float = 2.0) -> None:
    for i in range(n):
        assert h.check(i + 1, loss, **STEADY) == []


def kinds(flags: list[dict]) -> list[str]:
    return [f["kind"] for f in flags]


def test_a_steady_run_raises_nothing():
    feed(HealthMonitor(), 40)


def test_each_problem_is_flagged():
    h = HealthMonitor()
    feed(h)
    assert kinds(h.check(11, 5.0, **STEADY)) == ["loss_spike"]  # 2.5x the median and 3 above it
    assert kinds(h.check(12, 2.0, **{**STEADY, "norm": 50.0})) == ["grad_explosion"]
    assert kinds(h.check(13, math.nan, **STEADY)) == ["non_finite"]
    slow = {**STEADY, "tokens_per_s": 300.0}
    assert [kinds(h.check(14 + i, 2.0, **slow)) for i in range(6)] == [[]] * 4 + [["throughput_drop"], []]
    assert kinds(h.check(20, 2.0, **{**STEADY, "fetch_s": 0.5})) == ["data_stall"]


def test_thresholds_hold_back_noise():
    h = HealthMonitor()
    feed(h, loss=0.1)
    assert h.check(11, 0.3, **STEADY) == []  # 3x a small RL-like loss, but only 0.2 above it
    for i in range(4):  # a few slow steps on a shared machine: a dip, not a drop
        assert h.check(12 + i, 0.1, **{**STEADY, "tokens_per_s": 100.0}) == []
    assert h.check(16, 0.1, **STEADY) == []
    r = HealthMonitor(slowdown=0, stall=False)  # rollout stages
    feed(r)
    assert r.check(11, 2.0, **{**STEADY, "tokens_per_s": 10.0, "fetch_s": 5.0}) == []


PRE = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.block_size=64",
    "data.builtin_size_mb=0.05", "data.vocab_size=400", "data.workers=1", "train.max_steps=12",
    "train.batch_size=4", "train.seq_len=32", "train.log_every=1", "train.warmup_steps=1", "train.eval_every=12",
]  # fmt: skip


def test_a_run_logs_its_flags_and_the_report_shows_them(tmp_path, monkeypatch):
    from llmstages.train import loop as loop_mod

    real = loop_mod.Trainer.forward_backward

    def spiking(self, batches, loss_fn, count_fn):
        loss, stats = real(self, batches, loss_fn, count_fn)
        return (loss * 4 if self.state.step == 9 else loss), stats

    monkeypatch.setattr(loop_mod.Trainer, "forward_backward", spiking)
    assert main(["pretrain", f"out_dir={tmp_path}", *PRE]) == 0
    flags = [r for r in read_metrics(tmp_path) if r.get("event") == "health"]
    assert [(f["step"], f["kind"]) for f in flags if f["kind"] == "loss_spike"] == [(10, "loss_spike")]
    assert main(["report", str(tmp_path)]) == 0
    assert "step 10: loss spike" in (tmp_path / "report.html").read_text()


def test_profile_writes_a_trace_and_the_top_operators(tmp_path, capsys):
    assert main(["pretrain", f"out_dir={tmp_path}", *PRE, "--profile", "2"]) == 0
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    products = ("aten::mm", "addmm", "mkldnn::_linear_pointwise")  # torch's own, or oneDNN's for fp32 on a CPU
    assert any(p in e.get("name", "") for e in trace["traceEvents"] for p in products)
    assert "Self CPU" in (tmp_path / "profile" / "top_operators.txt").read_text()
    assert "profile of 2 steps" in capsys.readouterr().out


def test_doctor_describes_the_machine(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device" in out and "memory" in out and "disk" in out and "optional packages" in out


def test_wandb_offline_and_mlflow_file_store_receive_the_metrics(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = ["pretrain", f"out_dir={tmp_path}", *PRE, "monitor.wandb=true", "monitor.mlflow=true"]
    assert main(argv) == 0
    offline = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0  # no account: a local run to `wandb sync` later
    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())  # the file store the run wrote
    (run,) = client.search_runs([client.get_experiment_by_name("llmstages").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    jsonl = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r and r.get("event") != "health"]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(jsonl)


def test_a_missing_sink_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert main(["pretrain", f"out_dir={tmp_path}", *PRE, "monitor.wandb=true"]) == 2
    assert "monitor.wandb=true needs the wandb package" in capsys.readouterr().err
