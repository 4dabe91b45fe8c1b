"""`make bench`: run every benchmark in sequence and write benchmarks/RESULTS.md (machine, date, commands, numbers)."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "matmul.py",  # fp32 products: torch's BLAS against oneDNN, a few seconds
    "train_step.py",
    "generate.py",
    "pretrain_throughput.py",
    "peft_memory.py",
    "ppo_iteration.py",
    "scaling.py",
    "finetune_vs_hf.py --compile",
    "memory_vs_hf.py",  # LoRA, QLoRA, 8-bit AdamW at the 360M and 0.5B shapes: about 25 min
    "demo_sweep.py",  # the full demo over seeds and thread counts: about an hour on 2 cores
    "grpo_step.py",  # one GRPO step, ours against TRL's GRPOTrainer, fp32 and bf16, 2 rounds: about 30 min
    "rl_real.py",  # GRPO on SmolLM2-135M-Instruct: ours, ours at TRL's samples and TRL, 2 seeds: about 2.5 h
    "qlora_quality.py",  # QLoRA against LoRA SFT on SmolLM2-135M-Instruct, 2 seeds, bf16 and fp32: about 30 min
    "qlora_large.py",  # QLoRA SFT at the Llama-3-8B shape, 2 steps: about 7 min and 32 GB of disk
]


def main() -> None:
    sys.path.insert(0, str(HERE))
    from common import machine

    parts = [f"# Benchmark results\n\nMachine: {machine()}. Date: {datetime.date.today()}.\n"
             "Each benchmark alternates its contenders in one process and reports medians; ratios are the "
             "figures to read, absolute numbers move with the machine's load.\n"]  # fmt: skip
    for name in BENCHMARKS:
        script, *options = name.split()
        cmd = [sys.executable, str(HERE / script), *options]
        print(f"running {name} ...", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        body = "\n".join(line for line in out.stdout.splitlines() if line.startswith(("|", "#")))
        if out.returncode:
            body += f"\n\nFAILED (exit {out.returncode}):\n```\n{out.stderr[-2000:]}\n```"
        parts.append(f"## {name}\n\n`python benchmarks/{name}`\n\n{body}\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
