"""fp32 products through oneDNN (matmul.py): the same products as torch's, and only where they should be."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from llmstages import losses as L
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


@pytest.mark.parametrize("bias", ["none", "plain", "strided", "expanded"])
def test_linear_and_its_gradients_are_the_float64_products_to_fp32_rounding(bias):
    base, w, g = torch.randn(3, 5, 48), torch.randn(40, 48), torch.randn(3, 3, 40)
    b = {"none": None, "plain": torch.randn(40), "strided": torch.randn(80), "expanded": torch.randn(1)}[bias]
    view = {"none": None, "plain": lambda t: t, "strided": lambda t: t[::2], "expanded": lambda t: t.expand(40)}[bias]

    def run(fn, dtype):  # the product of a strided view of `base`, (3, 3, 48), and the gradients of the leaves
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (base, w, b) if t is not None]
        y = fn(leaves[0][:, ::2], leaves[1], view(leaves[2]) if b is not None else None)
        y.backward(g.to(dtype))
        return [y.detach(), *(t.grad for t in leaves)], y

    (got, y), (want, _), (torch32, _) = (
        run(matmul.linear, torch.float32),
        *(run(F.linear, dt) for dt in (torch.float64, torch.float32)),
    )
    assert y._base is None  # as F.linear's output: an in-place op after it keeps its gradient
    for a, b64, t in zip(got, want, torch32, strict=True):
        close_to_float64(a, b64, t)


def test_no_rows_a_frozen_weight_and_a_second_derivative():
    x, w = torch.randn(0, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    matmul.linear(x, w).sum().backward()  # no rows: torch's own product, a zero dW
    assert torch.equal(w.grad, torch.zeros(16, 32))
    x, w = torch.randn(6, 32, requires_grad=True), torch.randn(16, 32)
    y = matmul.linear(x, w)
    assert y._base is None  # as F.linear's: an in-place op after it keeps its gradient
    y.sum().backward()
    assert w.grad is None
    close_to_float64(x.grad, torch.ones(6, 16).double() @ w.double(), torch.ones(6, 16) @ w)
    x = torch.randn(6, 32, requires_grad=True)
    (dx,) = torch.autograd.grad(matmul.linear(x, w).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):  # oneDNN's product has no second derivative: refused
        dx.sum().backward()


def test_mm_and_addmm_are_the_products_in_blocks_and_leave_gradients_to_torch(monkeypatch):
    a, b, c = torch.randn(7, 32), torch.randn(32, 9), torch.randn(7, 9)
    close_to_float64(matmul.mm(a, b), a.double() @ b.double(), a @ b)
    out = torch.empty(7, 9)
    close_to_float64(matmul.mm(a, b, out=out), a.double() @ b.double(), a @ b)
    assert out.abs().sum() > 0
    monkeypatch.setattr(matmul, "ADD_AT_ONCE", 20)  # 2 rows of c at a time
    close_to_float64(matmul.addmm_(c.clone(), a, b), c.double() + a.double() @ b.double(), c + a @ b)
    ag = a.clone().requires_grad_()
    matmul.mm(ag, b).sum().backward()  # a product that needs a gradient is torch's
    assert torch.equal(ag.grad, torch.ones(7, 9) @ b.t())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: torch's products, as autocast casts them
        assert torch.equal(matmul.mm(a, b), a @ b) and matmul.mm(a, b).dtype == torch.bfloat16
        assert torch.equal(matmul.addmm_(c.clone(), a, b), c.clone().addmm_(a, b))


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
    x, w = x.float(), w.float()
    with torch.backends.mkldnn.flags(enabled=False):
        assert onednn_calls(lambda: matmul.linear(x, w)) == 0
    assert onednn_calls(lambda: matmul.linear(x, w)) == 1


def test_llmstages_cpu_matmul_blas_keeps_torchs_products():
    code = (
        "import torch, torch.nn.functional as F\n"
        "from llmstages import matmul\n"
        "x, w = torch.randn(64, 96), torch.randn(80, 96)\n"
        "assert torch.equal(matmul.linear(x, w), F.linear(x, w))\n"
        "assert torch.equal(matmul.mm(x, w.t()), x @ w.t())\n"
        "assert not matmul._onednn(x, w)\n"
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


def test_the_fused_losses_of_a_half_precision_run_keep_torchs_products():
    """bf16 runs are what they were before matmul.py: autocast's, and the fp32 dW a half head accumulates."""
    head = matmul.Linear(32, 50, bias=False)
    h, t = torch.randn(2, 6, 32), torch.randint(0, 50, (2, 6))

    def both_losses(hidden, cast=False):  # forward under autocast if `cast`, backward outside it, as a loop does
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            logp, ent = L.head_logprobs(hidden, head, t)
            loss = logp.sum() + ent.sum() + L.linear_cross_entropy(hidden, head.weight, t)
        loss.backward()

    assert onednn_calls(lambda: both_losses(h.clone().requires_grad_(), cast=True)) == 0
    head.bfloat16()
    assert onednn_calls(lambda: both_losses(h.bfloat16().requires_grad_())) == 0
    head.float()
    assert onednn_calls(lambda: both_losses(h.clone().requires_grad_())) > 0  # fp32: oneDNN's


def test_a_compiled_model_keeps_the_onednn_products_and_their_gradients():
    from llmstages.model.generate import can_compile

    if not can_compile() or not matmul.fp32_through_onednn():
        pytest.skip("no C++ compiler for torch.compile here, or oneDNN switched off")
    model = GPT(preset("llama_tiny"))
    eager = GPT(preset("llama_tiny"))
    eager.load_state_dict(model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    compiled = torch.compile(model)
    compiled(ids).sum().backward()  # compiles, forward and backward
    model.zero_grad()
    n_linear = 7 * model.config.n_layers + 1
    assert onednn_calls(lambda: compiled(ids).sum().backward()) == 3 * n_linear  # llmstages::linear in the graph
    eager(ids).sum().backward()
    torch.testing.assert_close(compiled(ids), eager(ids), rtol=1e-5, atol=1e-5)
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-3)
