"""fp32 matrix products on a CPU through oneDNN, where torch would use its BLAS.

torch multiplies fp32 CPU matrices through its BLAS (MKL in the x86 builds) and bf16 ones through oneDNN. On a
2-core AMD EPYC with AVX512, MKL ran the products of a 135M model's training step (1,024 rows) at 210 GFLOP/s
and oneDNN at 425-450, 2.0-2.15x; the output head while decoding 1-64 rows 2.5-3.1x (`python
benchmarks/matmul.py`; MKL chooses its code path by CPU vendor). So the model's linear layers, the LoRA and NF4
products and the fused losses multiply fp32 CPU tensors here. Both are IEEE fp32 products; the sums run in
another order, so the last bits differ from torch's `@`, as they do between two CPUs. The backward multiplies
through oneDNN too:

    y = x W^T + b,   dx = dy W,   dW = dy^T x,   db = sum over rows of dy

Only plain CPU fp32 tensors outside autocast and torch.compile take this path (bf16 is oneDNN's already; a
DTensor, a GPU tensor or a compiled graph keep torch's own). LLMSTAGES_CPU_MATMUL=blas turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = os.environ.get("LLMSTAGES_CPU_MATMUL", "onednn") != "blas" and torch.backends.mkldnn.is_available()
_PLAIN = (torch.Tensor, nn.Parameter)


def _onednn(*ts: torch.Tensor | None) -> bool:
    """Whether the product of `ts` goes through oneDNN: all plain fp32 CPU tensors, outside autocast and compile."""
    return (
        _ONEDNN
        and all(t is None or (type(t) in _PLAIN and t.dtype == torch.float32 and t.device.type == "cpu") for t in ts)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _xwt(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T + b through oneDNN, for strided views too; no autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., K) @ b (K, N), no autograd: for backward passes and products under no_grad."""
    return _xwt(a, b.t()) if _onednn(a, b) else a @ b


def addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c += a @ b in place (as torch's `c.addmm_(a, b)`, which autocast leaves in c's dtype), no autograd."""
    return c.add_(_xwt(a, b.t())) if _onednn(c, a, b) else c.addmm_(a, b)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return _xwt(x, w, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        dx = _xwt(grad, w.t()) if ctx.needs_input_grad[0] else None  # dy W, (N, in)
        dw = _xwt(grad.t(), x.t()) if ctx.needs_input_grad[1] else None  # dy^T x, (out, in)
        db = grad.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b): x (..., K), w (N, K), b (N,) -> (..., N); through oneDNN for fp32 CPU tensors."""
    if not _onednn(x, w, b):
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
        rows = _Linear.apply(x.reshape(-1, x.shape[-1]), w, b)  # on 2-D rows: a Function's output is no view
        return rows.view(*x.shape[:-1], w.shape[0])
    return _xwt(x, w, b)


class Linear(nn.Linear):
    """nn.Linear whose product is `linear`'s: the same parameters, state dict and init."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
