"""Losses as pure functions of tensors. Each docstring gives the formula; later stages add their own here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token negative log-likelihood, -1/N sum_t log p(y_t | x_<t), over targets != ignore_index.

    logits: (B, T, V) already aligned with targets (B, T): position t predicts targets[:, t].
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets for next-token prediction: labels moved one step left, the last position ignored. (B, T)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), ignore_index)], dim=1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (h @ W^T) against targets, computed in row chunks without keeping the logits.

    For one row with logits z = W h and target y: loss = logsumexp(z) - z_y, and d loss / d z = softmax(z) - e_y.
    Forward computes the loss and, when gradients are needed, dz per chunk and from it dh = dz W and
    dW = dz^T h; backward only scales them. Peak memory is one chunk of logits instead of all (N, V) of them.
    """

    @staticmethod
    def forward(ctx, h, w, targets, ignore_index: int, chunk: int):  # type: ignore[override]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        wc = w.to(h.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_grad else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        for s in range(0, h.size(0), chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            valid = tc != ignore_index
            tc = tc.masked_fill(~valid, 0)
            z = (hc @ wc.t()).float()  # (c, V)
            lse = torch.logsumexp(z, dim=-1)
            total += ((lse - z.gather(1, tc[:, None]).squeeze(1)) * valid).sum()
            if need_grad:
                z.sub_(lse[:, None]).exp_()  # softmax, in place
                z[torch.arange(z.size(0), device=z.device), tc] -= 1.0
                z.mul_(valid[:, None])
                zc = z.to(h.dtype)
                torch.mm(zc, wc, out=dh[s : s + chunk])
                dw.addmm_(zc.t().float() if zc.dtype != torch.float32 else zc.t(), hc.float())
        if need_grad:
            ctx.save_for_backward(dh, dw.to(w.dtype))
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        dh, dw = ctx.saved_tensors
        return dh * grad.to(dh.dtype), dw * grad.to(dw.dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk: int = 512,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight^T, targets) without materialising the (N, V) logits ("fused linear CE").

    hidden: (..., d) final hidden states; weight: (V, d) output head; targets: (...) with `ignore_index` for
    positions not trained. reduction "sum" gives -sum_t log p(y_t), "mean" divides by the number of targets.
    """
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    total = _LinearCrossEntropy.apply(h, weight, t, ignore_index, chunk)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / (t != ignore_index).sum().clamp(min=1)
