"""The full pre-training loop (data loading, LR schedule, clipping, logging) against the bare model step.

    python benchmarks/pretrain_throughput.py [--rounds 5] [--steps 4] [--precision fp32 bf16]

Same model and batch shape as train_step.py (6 layers, d=384, vocab 8192, batch 8 x 256), same optimizer.
"bare": forward, backward and AdamW on one fixed batch. "loop": `fit` drawing batches from token shards
of the built-in corpus, with metrics to JSONL and TensorBoard every step (checkpoint writes left out: they are
periodic I/O whose cost depends on the disk). Rounds alternate; the overhead is 1 - loop/bare tokens/s.
MFU is against the best matmul FLOP/s measured in this process for the same dtype.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median  # noqa: E402
from train_step import SIZE  # noqa: E402

from llmstages.config import TrainArgs  # noqa: E402
from llmstages.data.builtin import builtin_corpus  # noqa: E402
from llmstages.data.text import TokenShards, prepare_shards  # noqa: E402
from llmstages.data.tokenizer import train_bpe  # noqa: E402
from llmstages.losses import count_targets, lm_loss  # noqa: E402
from llmstages.model import GPT, flops_per_token, preset  # noqa: E402
from llmstages.monitor.metrics import MetricsLogger  # noqa: E402
from llmstages.train.loop import Trainer, accumulate, fit  # noqa: E402
from llmstages.train.optim import build_optimizer  # noqa: E402
from llmstages.train.prepare import prepare_model  # noqa: E402
from llmstages.train.start import autocast, fast_bf16  # noqa: E402


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    ap.add_argument("--precision", nargs="+", default=None, help="default: fp32, plus bf16 where it is native")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.precision is None:  # emulated bf16 (CPUs without AMX / AVX512-BF16) runs for tens of minutes
        args.precision = ["fp32", "bf16"] if fast_bf16(device) else ["fp32"]
    cfg = preset("llama_tiny", n_layers=SIZE["n_layers"], d_model=SIZE["d_model"], n_heads=SIZE["n_heads"],
                 n_kv_heads=SIZE["n_heads"], vocab_size=SIZE["vocab_size"], block_size=SIZE["seq"],
                 tie_embeddings=False, d_ff=1024)  # fmt: skip
    B, T = SIZE["batch"], SIZE["seq"]
    print(f"# pretrain loop vs bare step: {SIZE}, {machine()}; {args.rounds} rounds x {args.steps} steps, medians")
    print("| precision | bare tok/s | loop tok/s | loop overhead | MFU (loop) | matmul peak TFLOP/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        docs = builtin_corpus(0, 1.0)
        tok = train_bpe(docs, 2048)
        prepare_shards(docs, tok, Path(d) / "data", workers=1)
        shards = TokenShards.open(Path(d) / "data")
        for precision in args.precision:
            torch.manual_seed(0)
            model = GPT(cfg).to(device)
            targs = TrainArgs(max_steps=0, batch_size=B, seq_len=T, lr=1e-4, warmup_steps=1, precision=precision,
                              log_every=1, eval_every=10**9, save_every=10**9, device=args.device)  # fmt: skip

            def batch(step: int, targs=targs) -> list[dict]:
                x, y = shards.batch("train", (0, step, 0, 0), targs.batch_size, targs.seq_len)
                return [{"input_ids": torch.from_numpy(x).to(device), "targets": torch.from_numpy(y).to(device)}]

            run_dir = Path(d) / f"run-{precision}"
            trainer = Trainer(prepare_model(model, targs), targs, run_dir, device=device)
            trainer.save = lambda: None  # checkpoint I/O left out (see the docstring)
            log = MetricsLogger(run_dir)
            fixed = batch(0)
            opt = build_optimizer(model, targs)

            def bare(fixed=fixed, opt=opt, precision=precision, model=model) -> None:
                for _ in range(args.steps):
                    accumulate(model, fixed, lm_loss, count_targets, autocast_ctx=lambda: autocast(device, precision))
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            def looped(trainer=trainer, log=log, batch=batch) -> None:
                trainer.args.max_steps += args.steps
                steps = lambda start: (batch(step) for step in itertools.count(start))  # noqa: E731
                fit(trainer, steps, log=log, flops_per_token=flops_per_token(cfg, T), progress=False)

            times: dict[str, list[float]] = {"bare": [], "loop": []}
            bare()
            looped()  # warm-up
            for _ in range(args.rounds):
                for name, fn in (("bare", bare), ("loop", looped)):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - t0)
            log.close()
            tps = {k: args.steps * B * T / median(v) for k, v in times.items()}
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            peak = matmul_peak(dtype, args.device)
            mfu = flops_per_token(cfg, T) * tps["loop"] / peak
            print(f"| {precision} | {tps['bare']:.0f} | {tps['loop']:.0f} | {1 - tps['loop'] / tps['bare']:+.1%} | "
                  f"{mfu:.1%} | {peak / 1e12:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
