"""fp32 matrix products on a CPU through oneDNN, where torch would use its BLAS.

torch multiplies fp32 CPU matrices through its BLAS (MKL in the x86 builds) and bf16 ones through oneDNN. On a
2-core AMD EPYC with AVX512, MKL ran the products of a 135M model's training step (1,024 rows) at 210 GFLOP/s
and oneDNN at 425-450, 2.0-2.15x; the output head while decoding 1-64 rows 2.5-3.1x (`python
benchmarks/matmul.py`; MKL chooses its code path by CPU vendor). So the model's linear layers, the LoRA and NF4
products and the fused losses multiply fp32 CPU tensors here. Both are IEEE fp32 products; the sums run in
another order, so the last bits differ from torch's `@`, as they do between two CPUs. The backward multiplies
through oneDNN too:

    y = x W^T + b,   dx = dy W,   dW = dy^T x,   db = sum over rows of dy

Only plain CPU fp32 tensors outside autocast take this path (bf16 is oneDNN's already; a DTensor or a GPU tensor
keep torch's own). In a graph torch.compile builds, `linear` is one operator (llmstages::linear), so that
inductor keeps its products; `mm` and `addmm_` there stay torch's. LLMSTAGES_CPU_MATMUL=blas turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

_ONEDNN = os.environ.get("LLMSTAGES_CPU_MATMUL", "onednn") != "blas" and torch.backends.mkldnn.is_available()
_PLAIN = (torch.Tensor, nn.Parameter)
ADD_AT_ONCE = 1 << 22
"""Elements of the output `addmm_` adds at a time: oneDNN writes a new tensor, so this bounds its temporary."""


def fp32_through_onednn() -> bool:
    """Whether fp32 CPU products go through oneDNN in this process (oneDNN built in, LLMSTAGES_CPU_MATMUL not blas)."""
    return _ONEDNN


def _onednn(*ts: torch.Tensor | None) -> bool:
    """Whether the product of `ts` goes through oneDNN: all plain, non-empty, strided fp32 CPU tensors, outside
    autocast, with oneDNN on (`torch.backends.mkldnn.flags`)."""
    return (
        _ONEDNN
        and all(t is None or (type(t) in _PLAIN and t.dtype == torch.float32 and t.device.type == "cpu") for t in ts)
        and all(t is None or (t.layout == torch.strided and t.numel() > 0) for t in ts)
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def _needs_grad(*ts: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _xwt(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T + b through oneDNN (strided x and w are read as they are; b must be contiguous)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None if b is None else b.contiguous(), "none", [], "")


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (K, N), into `out` if given, as torch.mm / `@` would (autocast included); through oneDNN
    for fp32 CPU tensors that need no gradient (backward passes, products under no_grad), outside compile."""
    if not _onednn(a, b) or _needs_grad(a, b) or torch.compiler.is_compiling():
        return a @ b if out is None else torch.mm(a, b, out=out)
    return _xwt(a, b.t()) if out is None else out.copy_(_xwt(a, b.t()))


def addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c (M, N) += a (M, K) @ b (K, N) in place, as torch's `c.addmm_(a, b)`; through oneDNN for fp32 CPU
    tensors that need no gradient, outside compile, `ADD_AT_ONCE` elements of c at a time."""
    if not _onednn(c, a, b) or _needs_grad(c, a, b) or torch.compiler.is_compiling():
        return c.addmm_(a, b)
    rows = max(1, ADD_AT_ONCE // c.shape[1])
    for i in range(0, c.shape[0], rows):
        c[i : i + rows].add_(_xwt(a[i : i + rows], b.t()))
    return c


def _forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) W^T + b through oneDNN on 2-D rows; the output is not a view (as F.linear's is not)."""
    return torch.ops.aten._unsafe_view(_xwt(x.reshape(-1, x.shape[-1]), w, b), (*x.shape[:-1], w.shape[0]))


def _backward(product, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, needs: tuple[bool, ...]) -> tuple:  # noqa: ANN001
    """(dx, dW, db) = (dy W, dy^T x, rows' sum of dy), each where `needs` it; `product(a, m)` is a m^T."""
    g = grad.reshape(-1, grad.shape[-1])  # (rows, out)
    dx = product(grad, w.t()) if needs[0] else None
    dw = product(g.t(), x.reshape(-1, x.shape[-1]).t()) if needs[1] else None
    return dx, dw, g.sum(0) if needs[2] else None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return _forward(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        return _backward(_xwt, x, w, grad, ctx.needs_input_grad)


@torch.library.custom_op("llmstages::linear", mutates_args=())
def _compiled_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`linear` as an operator torch.compile keeps whole in its graph (its own products would be torch's)."""
    return _forward(x, w, b)


@_compiled_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _compiled_linear_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.has_bias = inputs[2] is not None


def _compiled_linear_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    x, w = ctx.saved_tensors
    needs = (*ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2])
    return _backward(lambda a, m: _compiled_linear(a, m, None), x, w, grad, needs)


_compiled_linear.register_autograd(_compiled_linear_backward, setup_context=_compiled_linear_setup)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b): x (..., K), w (N, K), b (N,) -> (..., N); through oneDNN for fp32 CPU tensors."""
    if not _onednn(x, w, b):
        return F.linear(x, w, b)
    if torch.compiler.is_compiling():  # an operator in the graph, with the same products and gradients
        return _compiled_linear(x, w, b)
    if _needs_grad(x, w, b):
        return _Linear.apply(x, w, b)
    return _xwt(x, w, b)


class Linear(nn.Linear):
    """nn.Linear whose product is `linear`'s: the same parameters, state dict and init."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
