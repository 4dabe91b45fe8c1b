"""Distributed strategies side by side: tokens/s at 1 and 2 processes, and memory per rank for ZeRO-1/2/3 vs DDP.

    python benchmarks/scaling.py [--nproc 2] [--steps 8]

Throughput: the same global batch (16 x 128 tokens, a 4-layer d=256 Llama) trained for --steps optimizer steps by
`fit` under each strategy: one process (none), then 2 processes with ddp, zero1, fsdp (ZeRO-3), fsdp with
reshard_after_forward=false (ZeRO-2), tp and pp, all in one torchrun launch (gloo on CPU). tokens/s is the global
rate over steps 2..N (the first step builds buckets and shards).

Memory: a model where the optimizer state dominates (8 layers, d=768, vocab 8192, ~64M parameters; batch 1 x 64
tokens so activations are negligible). After one step, each rank's local bytes of parameters + AdamW state
(DTensor shards counted by their local part) and the peak resident memory added by the step (VmHWM after
clearing it). ZeRO-3's parameters + optimizer per rank should be close to 1/N of DDP's.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median  # noqa: E402

from llmstages.config import DistArgs, TrainArgs  # noqa: E402
from llmstages.model import GPT, preset  # noqa: E402
from llmstages.train import distributed  # noqa: E402
from llmstages.train.loop import Trainer, fit  # noqa: E402
from llmstages.train.prepare import prepare_model  # noqa: E402

SPEED = dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, vocab_size=4096, block_size=128, tie_embeddings=False)
MEMORY = dict(n_layers=8, d_model=768, n_heads=12, n_kv_heads=12, vocab_size=8192, block_size=64, tie_embeddings=False)
GLOBAL_BATCH, SEQ = 16, 128
STRATEGIES = [("ddp", {}), ("zero1", {}), ("fsdp", {}), ("fsdp", {"reshard_after_forward": False}), ("tp", {}),
              ("pp", {"microbatches": 4})]  # fmt: skip


class Records:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, r: dict) -> None:
        self.rows.append(r)

    def close(self) -> None:
        pass


def local_bytes(loop: Trainer) -> int:
    """Bytes of this rank's parameters and optimizer state (local shards only)."""
    from torch.distributed.tensor import DTensor

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(size(p) for p in {id(p): p for p in loop.model.parameters()}.values())
    opt = loop.optimizer
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps the shard's AdamW in .optim
    state = sum(size(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return params + state


def hwm_reset() -> None:
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak then includes the set-up
        Path("/proc/self/clear_refs").write_text("5")


def rss(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(strategy: str, extra: dict, size: dict, batch: int, seq: int, steps: int, out: Path) -> dict:
    """One training run of `steps` steps under `strategy` in this process group; rank 0's figures."""
    d = distributed.setup(DistArgs(strategy=strategy, **extra), torch.device("cpu"), "pretrain")
    torch.manual_seed(0)
    model = GPT(preset("llama_tiny", **size))
    args = TrainArgs(max_steps=steps, batch_size=batch // d.dp, seq_len=seq, warmup_steps=1, log_every=steps,
                     eval_every=10**6, save_every=10**6, precision="fp32", device="cpu")  # fmt: skip
    rows = d.rows(batch)

    def next_batches(step: int) -> list[dict]:
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, size["vocab_size"], (batch, seq + 1), generator=g)[rows]
        return [{"input_ids": x[:, :-1], "targets": x[:, 1:]}]

    trainer = Trainer(prepare_model(model, args), args, out)
    trainer.save = lambda: out  # no checkpoint writes in a benchmark
    before = rss("VmRSS")
    hwm_reset()
    rec = Records()
    fit(trainer, lambda start: (next_batches(s) for s in itertools.count(start)), log=rec, progress=False)
    peak = rss("VmHWM") - before
    tps = rec.rows[-1]["tokens_per_s"]
    return {"tokens_per_s": tps, "state_mib": local_bytes(trainer) / 2**20, "step_peak_mib": peak, "dp": d.dp}


def worker(spec: dict) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, extra in STRATEGIES:
            name = strategy + ("-zero2" if extra.get("reshard_after_forward") is False else "")
            r = run(strategy, extra, SPEED, GLOBAL_BATCH, SEQ, spec["steps"], Path(tmp))
            m = run(strategy, extra, MEMORY, 2 * distributed.current().world, 64, 1, Path(tmp)) if strategy not in (
                "tp", "pp") else {}  # fmt: skip
            results.append({"name": name, **r, **{f"mem_{k}": v for k, v in m.items()}})
    if distributed.current().is_main:
        Path(spec["out"]).write_text(json.dumps(results))
    distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="launches; medians are reported")
    args = ap.parse_args()
    print(f"# scaling: {SPEED}, global batch {GLOBAL_BATCH} x {SEQ}, {args.steps} steps; memory model {MEMORY}; "
          f"{machine()}; gloo, {args.nproc} processes x 1 thread; {args.rounds} launches, medians")  # fmt: skip
    torch.set_num_threads(1)
    runs: list[list[dict]] = []
    single: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            single.append(run("none", {}, SPEED, GLOBAL_BATCH, SEQ, args.steps, Path(tmp))["tokens_per_s"])
            base = run("none", {}, MEMORY, 2 * args.nproc, 64, 1, Path(tmp))
            spec = Path(tmp) / "spec.json"
            out = Path(tmp) / "out.json"
            spec.write_text(json.dumps({"steps": args.steps, "out": str(out)}))
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", __file__,
                   "--worker", str(spec)]  # fmt: skip
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"launch failed ({time.perf_counter() - t0:.0f} s):\n{r.stderr[-3000:]}")
            runs.append(json.loads(out.read_text()))
    one = median(single)
    print("| strategy | processes | tokens/s | vs 1 process | params + AdamW state per rank (MiB) | vs ddp | "
          "peak added by a step per rank (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(f"| none | 1 | {one:,.0f} | 1.00 | {base['state_mib']:,.0f} | | {base['step_peak_mib']:,.0f} |")
    names = [r["name"] for r in runs[0]]
    ddp_state = median([r["mem_state_mib"] for rr in runs for r in rr if r["name"] == "ddp"])
    for name in names:
        rows = [r for rr in runs for r in rr if r["name"] == name]
        tps = median([r["tokens_per_s"] for r in rows])
        if "mem_state_mib" in rows[0]:
            state = median([r["mem_state_mib"] for r in rows])
            peak = median([r["mem_step_peak_mib"] for r in rows])
            mem = f"{state:,.0f} | {state / ddp_state:.2f} | {peak:,.0f}"
        else:
            mem = "| |"
        print(f"| {name} | {args.nproc} | {tps:,.0f} | {tps / one:.2f} | {mem} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
