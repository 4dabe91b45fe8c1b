"""fp32 matrix products on this CPU: torch's own (`@`, its BLAS: MKL in the x86 builds) against oneDNN's
(`llmstages.matmul`, which the model's linear layers, LoRA and the fused losses use for fp32 CPU tensors).

    python benchmarks/matmul.py [--shape smollm2_135m] [--rounds 5]

The products of one training step's linear layer and of decoding, at the preset's shapes: a block's projections
(d -> d, d -> d_ff, d_ff -> d) and the output head, for 1, 8 and 64 rows (decoding a batch) and 1,024 rows
(8 x 128 tokens of a training step), forward (x W^T) and backward (dy W, dy^T x). Timed alternately, medians;
GFLOP/s and the ratio. The error of each against the float64 product is printed too: both are fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, median  # noqa: E402

from llmstages import matmul
from llmstages.model import preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2_135m")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    cfg = preset(a.shape)
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    print(f"# fp32 products, torch `@` against oneDNN: {a.shape} shapes; {machine()}; {a.rounds} rounds, medians\n")
    cols = ["product", "rows", "torch ms", "oneDNN ms", "torch GFLOP/s", "oneDNN GFLOP/s", "oneDNN / torch"]
    print("| " + " | ".join([*cols, "max error torch / oneDNN"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    cases = []
    for rows in (1, 8, 64, 1024):
        for name, k, n in (("x W^T, d -> d", d, d), ("x W^T, d -> d_ff", d, f), ("x W^T, d_ff -> d", f, d)):
            cases.append((name, rows, torch.randn(rows, k), torch.randn(n, k).t()))  # W (out, in) as held
        cases.append(("x W^T, head d -> V", rows, torch.randn(rows, d), torch.randn(v, d).t() if rows <= 64 else None))
    big = 1024
    cases.append(("dy W, the d -> d_ff layer", big, torch.randn(big, f), torch.randn(f, d)))
    cases.append(("dy^T x, the d_ff -> d layer", d, torch.randn(big, d).t(), torch.randn(big, f)))
    for name, rows, x, w in cases:
        if w is None:  # the head at 1,024 rows: the fused losses multiply it in chunks; skip the 200 MB product
            continue
        times = alternate({"torch": lambda x=x, w=w: x @ w, "onednn": lambda x=x, w=w: matmul.mm(x, w)}, a.rounds)
        t, o = median(times["torch"]), median(times["onednn"])
        flop = 2 * x.shape[0] * x.shape[1] * w.shape[1]
        want = x.double() @ w.double()
        e_t = ((x @ w).double() - want).abs().max().item()
        e_o = (matmul.mm(x, w).double() - want).abs().max().item()
        print(
            f"| {name} | {rows} | {t * 1e3:.3f} | {o * 1e3:.3f} | {flop / t / 1e9:.0f} | {flop / o / 1e9:.0f} "
            f"| {t / o:.2f}x | {e_t:.1e} / {e_o:.1e} |"
        )


if __name__ == "__main__":
    main()
