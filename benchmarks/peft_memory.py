"""Peak memory and step time of full fine-tuning vs LoRA vs bottleneck adapters on GPT-2 124M.

    python benchmarks/peft_memory.py [--steps 4] [--batch 4] [--seq 256]

Each method runs in a fresh subprocess (so peaks do not mix): build the model, apply the method, then AdamW
steps on one fixed batch. Peak memory is the process's resident high-water mark (VmHWM) over the resident
size before the model was built, on CPU; max_memory_allocated on CUDA. LoRA: rank 16 on every linear layer
but the head; adapters: bottleneck 64 after attention and MLP. Target: LoRA peak at most 0.6x full.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_mib, machine, median, peak_rss_mib  # noqa: E402

METHODS = ("full", "lora", "adapter")


def child(method: str, steps: int, batch: int, seq: int, device: str) -> dict:
    from llmstages.losses import lm_loss, shift_labels
    from llmstages.model import GPT, preset
    from llmstages.peft import apply_adapters, apply_lora, trainable_parameters

    base = current_rss_mib()
    torch.manual_seed(0)
    model = GPT(preset("gpt2_124m")).to(device)
    if method == "lora":
        apply_lora(model, rank=16, alpha=32, target_modules="all-linear")
    elif method == "adapter":
        apply_adapters(model, bottleneck=64)
    trainable, total = trainable_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    b = {"input_ids": x, "targets": shift_labels(x)}
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _ = lm_loss(model, b)
        (loss / b["targets"].numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib() - base
    return {"peak_mib": peak, "step_s": median(times[1:]), "trainable": trainable, "total": total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch[0], args.seq, args.device)))
        return
    print(f"# PEFT memory: GPT-2 124M, sequences of {args.seq}, fp32, AdamW, {machine()}; "
          f"median of {args.steps - 1} steps after the first")  # fmt: skip
    print("| batch | method | trainable parameters | peak MiB | peak vs full | step s |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch:
        res = {}
        for m in METHODS:
            cmd = [sys.executable, __file__, "--child", m, "--steps", str(args.steps), "--batch", str(batch),
                   "--seq", str(args.seq), "--device", args.device]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[m] = json.loads(out.splitlines()[-1])
        for m in METHODS:
            r = res[m]
            print(f"| {batch} x {args.seq} | {m} | {r['trainable']:,} ({r['trainable'] / r['total']:.2%}) | "
                  f"{r['peak_mib']:.0f} | {r['peak_mib'] / res['full']['peak_mib']:.2f}x | {r['step_s']:.2f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
