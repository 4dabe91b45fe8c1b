"""fp32 products through oneDNN (matmul.py): the same products as torch's, and only where they should be."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from llmstages import matmul
from llmstages.model import GPT, preset


def onednn_calls(fn) -> int:
    """How many products `fn()` sent to oneDNN's fp32 kernel (mkldnn::_linear_pointwise), forward and backward."""
    with profile() as p:
        fn()
    return sum(e.count for e in p.key_averages() if e.key == "mkldnn::_linear_pointwise")


def close_to_float64(got: torch.Tensor, want64: torch.Tensor, torch_fp32: torch.Tensor) -> None:
    """`got` (fp32) is as close to the float64 product as torch's own fp32 product is, within a factor 8."""
    err = (got.double() - want64).abs().max().item()
    ref = (torch_fp32.double() - want64).abs().max().item()
    assert err <= 8 * ref + 1e-6, (err, ref)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_its_gradients_are_the_float64_products_to_fp32_rounding(bias):
    x = torch.randn(3, 5, 48)[:, ::2]  # a strided view: (3, 3, 48)
    w, b = torch.randn(40, 48), torch.randn(40) if bias else None
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if bias else None
    g = torch.randn(3, 3, 40)
    y64 = F.linear(x64, w64, b64)
    y64.backward(g.double())
    xs = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_() if bias else None]
    ts = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_() if bias else None]
    y, yt = matmul.linear(*xs), F.linear(*ts)
    y.backward(g)
    yt.backward(g)
    close_to_float64(y, y64.detach(), yt)
    close_to_float64(xs[0].grad, x64.grad, ts[0].grad)
    close_to_float64(xs[1].grad, w64.grad, ts[1].grad)
    if bias:
        close_to_float64(xs[2].grad, b64.grad, ts[2].grad)


def test_a_frozen_weight_gets_no_gradient_and_mm_addmm_are_the_products():
    x, w = torch.randn(6, 32, requires_grad=True), torch.randn(16, 32)
    matmul.linear(x, w).sum().backward()
    assert w.grad is None
    close_to_float64(x.grad, torch.ones(6, 16).double() @ w.double(), torch.ones(6, 16) @ w)
    a, b, c = torch.randn(7, 32), torch.randn(32, 9), torch.randn(7, 9)
    close_to_float64(matmul.mm(a, b), a.double() @ b.double(), a @ b)
    close_to_float64(matmul.addmm_(c.clone(), a, b), c.double() + a.double() @ b.double(), c + a @ b)


def test_fp32_products_go_through_onednn_and_others_keep_torchs_own():
    if not torch.backends.mkldnn.is_available() or os.environ.get("LLMSTAGES_CPU_MATMUL") == "blas":
        pytest.skip("oneDNN is not in this torch build, or switched off")
    model = GPT(preset("llama_tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    n_linear = 7 * model.config.n_layers + 1  # q, k, v, o, gate, up, down in each block, and the head
    assert onednn_calls(lambda: model(ids)) == n_linear
    assert onednn_calls(lambda: model(ids).sum().backward()) == 3 * n_linear  # y, then dx and dW of each
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's products stay torch's, bit for bit
        assert onednn_calls(lambda: model(ids)) == 0
        x, w = torch.randn(4, 32), torch.randn(8, 32)
        assert torch.equal(matmul.linear(x, w), F.linear(x, w))
    x, w = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(8, 32, dtype=torch.bfloat16)
    assert torch.equal(matmul.linear(x, w), F.linear(x, w)) and onednn_calls(lambda: matmul.linear(x, w)) == 0


def test_llmstages_cpu_matmul_blas_keeps_torchs_products():
    code = (
        "import torch, torch.nn.functional as F\n"
        "from llmstages import matmul\n"
        "x, w = torch.randn(64, 96), torch.randn(80, 96)\n"
        "assert torch.equal(matmul.linear(x, w), F.linear(x, w))\n"
        "assert torch.equal(matmul.mm(x, w.t()), x @ w.t())\n"
    )
    env = {**os.environ, "LLMSTAGES_CPU_MATMUL": "blas"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_linear_keeps_nn_linears_parameters_and_state_dict():
    torch.manual_seed(1)
    ours = matmul.Linear(12, 5)
    torch.manual_seed(1)
    theirs = torch.nn.Linear(12, 5)
    assert isinstance(ours, torch.nn.Linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
