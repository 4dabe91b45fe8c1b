"""The demo over seeds, thread counts and arithmetic paths: does every target hold at the minimum, not on one lucky
trajectory of one machine?

    python benchmarks/demo_sweep.py [--out runs/sweep] [--untuned SEED,WORLD_SEED (default 7,5)]

Runs the full `llmstages demo` for (seed, world_seed) = (0,0), (1,1), (2,2), (0,0) once more with one thread
(torch.set_num_threads(1): another reduction order), and (0,0) once more on the other arithmetic path: where the
CPU runs bf16 natively (so `precision: auto` trains in bf16), with LLMSTAGES_AUTO_PRECISION=fp32; on a CPU
without native bf16, the bf16 run is skipped with the reason (emulated bf16 is several times slower and no user
would pick it). Each run has its own process and folder under --out; a finished run (its summary.json) is reused.
Prints every target's min / median / max over the runs with met or missed at the worst run, each run's CPU,
precision, figures and time (the sum of its steps' times, so a step re-run alone counts once); `--untuned` adds
a pair that no recipe was tuned on, shown beside the sweep and not counted in it. `llmstages report runs/sweep/*`
draws them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llmstages.demo import TARGETS, check_targets

# (seed, world_seed, threads, precision `auto` is forced to); None: torch's default threads, the machine's precision
SWEEP = [(0, 0, None, None), (1, 1, None, None), (2, 2, None, None), (0, 0, 1, None)]
RUN = """import sys, torch
threads = int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
from llmstages.cli import main
sys.exit(main(["demo", "--out", sys.argv[1], "--seed", sys.argv[2], "--world-seed", sys.argv[3]]))
"""


def name(seed: int, world: int, threads: int | None, precision: str | None = None) -> str:
    return f"s{seed}-w{world}" + (f"-t{threads}" if threads else "") + (f"-{precision}" if precision else "")


def other_path() -> tuple[tuple[int, int, None, str] | None, str]:
    """The (0,0) run on the arithmetic path `auto` does not take here, or None and why it is skipped."""
    import torch

    from llmstages.train.start import fast_bf16

    if fast_bf16(torch.device("cpu")):
        return (0, 0, None, "fp32"), "bf16 machine: (0,0) again at fp32"
    return None, "skipped the bf16 run: this CPU has no AVX512-BF16 or AMX, so bf16 would be emulated"


def run(out: Path, seed: int, world: int, threads: int | None, precision: str | None = None) -> dict:
    """The run's summary.json, training it first unless it is there; wall seconds in sweep.json beside it."""
    folder = out / name(seed, world, threads, precision)
    if not (folder / "summary.json").is_file():
        print(f"running demo {folder} ...", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-c", RUN, str(folder), str(seed), str(world), str(threads or 0)]
        env = {**os.environ, "LLMSTAGES_AUTO_PRECISION": precision} if precision else None
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env)
        if done.returncode:
            raise SystemExit(f"demo {folder} failed (exit {done.returncode})")
        (folder / "sweep.json").write_text(json.dumps({"wall_s": round(time.perf_counter() - t0, 1)}) + "\n")
    summary = json.loads((folder / "summary.json").read_text())
    wall = json.loads((folder / "sweep.json").read_text())["wall_s"] if (folder / "sweep.json").is_file() else None
    return {"name": folder.name, "summary": summary, "wall_s": wall}


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--untuned", default="7,5", help="SEED,WORLD_SEED of a pair no recipe was tuned on ('': none)")
    args = p.parse_args()
    out = Path(args.out)
    other, why = other_path()
    runs = [run(out, *spec) for spec in SWEEP + ([other] if other else [])]
    extra = [run(out, *map(int, args.untuned.split(",")), None)] if args.untuned else []
    machine = runs[0]["summary"].get("machine", {})
    print(f"# demo sweep: {', '.join(r['name'] for r in runs)}"
          + (f"; untuned {extra[0]['name']}" if extra else "")
          + f"; {machine.get('cpu', '?')}, native bf16 {'yes' if machine.get('native_bf16') else 'no'}"
          + f"; {why}")  # fmt: skip
    head = "| stage | figure | target | min | median | max | at the min |"
    cols = "|---|---|---|---|---|---|---|"
    if extra:
        head, cols = head + f" {extra[0]['name']} (untuned) |", cols + "---|"
    print(head)
    print(cols)
    checked = [check_targets(r["summary"]["stages"]) for r in runs]
    untuned = check_targets(extra[0]["summary"]["stages"]) if extra else None
    met_all = 0
    for i, t in enumerate(TARGETS):
        rows = [c[i] for c in checked]
        values = [r["value"] for r in rows if r["value"] is not None]
        met = all(r["met"] for r in rows)
        met_all += met
        lo, mid, hi = (min(values), statistics.median(values), max(values)) if values else (None, None, None)
        line = (
            f"| {t.stage} | {t.metric} | {t.says} | {fmt(lo)} | {fmt(mid)} | {fmt(hi)} | {'met' if met else 'MISSED'} |"
        )
        if untuned is not None:
            u = untuned[i]
            line += f" {fmt(u['value'])} ({'met' if u['met'] else 'MISSED'}) |"
        print(line)
    print(f"# {met_all} of {len(TARGETS)} targets met in every run of the sweep")
    print("| run | seed | world seed | CPU | precision | threads | time (its steps, summed) | targets met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs + extra:
        s = r["summary"]
        met = sum(bool(t["met"]) for t in check_targets(s["stages"]))
        wall = f"{s['seconds_total'] / 60:.1f} min" if s.get("seconds_total") else "-"
        m = s["machine"]
        precision = m.get("precision") or ("bf16" if m.get("native_bf16") else "fp32")  # older runs: auto's choice
        print(f"| {r['name']} | {s['seed']} | {s['world_seed']} | {m.get('cpu', '?')} | {precision} | "
              f"{m['threads']} | {wall} | {met} of {len(TARGETS)} |")  # fmt: skip
    print("| headline (every run) | " + " | ".join(r["name"] for r in runs + extra) + " |")
    print("|---|" + "---|" * len(runs + extra))
    for stage, key in (("dpo", "kl"), ("ppo", "kl"), ("grpo", "kl"), ("dpo", "win_ceiling"),
                       ("pretrain", "val_loss"), ("sft", "fact_accuracy")):  # fmt: skip
        vals = [r["summary"]["stages"][stage].get(key) for r in runs + extra]
        print(f"| {stage} {key} | " + " | ".join(fmt(v) for v in vals) + " |")


if __name__ == "__main__":
    main()
