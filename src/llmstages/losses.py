"""Losses as pure functions of tensors (lm_loss: of a model's hidden states and head). Each docstring gives the
formula; later stages add their own here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmstages.matmul import Linear, addmm_, mm

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token negative log-likelihood, -1/N sum_t log p(y_t | x_<t), over targets != ignore_index.

    logits: (B, T, V) already aligned with targets (B, T): position t predicts targets[:, t].
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets for next-token prediction: labels moved one step left, the last position ignored. (B, T)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), ignore_index)], dim=1)


LOGITS_AT_ONCE = 1 << 25
"""The most logits the fused losses hold at a time (128 MB in fp32)."""


def chunk_rows(vocab: int, most: int = 512) -> int:
    """Rows of logits the fused losses compute at a time: 512, fewer where a large vocabulary would make a chunk
    of more than LOGITS_AT_ONCE values (220 rows for Qwen2's 151,936 tokens)."""
    return max(1, min(most, LOGITS_AT_ONCE // vocab))


def _product_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the fused losses multiply hidden states by the head in: a half head's own (QLoRA holds it so,
    train/frozen.py), else the autocast dtype where autocast is on (what it would cast both to, as for any
    product), else h's. Chosen once in the forward and kept for the backward, which runs outside autocast: the
    head is cast once per call, not once per chunk, and the backward recomputes the logits the forward had."""
    if w.dtype != torch.float32:
        return w.dtype
    device = h.device.type
    if torch.is_autocast_enabled(device) and h.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return h.dtype


def _add_head_grad(dw: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, dt: torch.dtype) -> None:
    """dW += dz^T h in fp32 for dz (c, V), h (c, d). Through `matmul.addmm_` (oneDNN on a CPU) where the head's
    products run in fp32; torch's own product where they run in half precision, as before matmul.py."""
    if dt == torch.float32:
        addmm_(dw, dz.t(), h.float())
    else:
        dw.addmm_(dz.t(), h.float())


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (h @ W^T) against targets, computed in row chunks without keeping the logits.

    For one row with logits z = W h and target y: loss = logsumexp(z) - z_y, and d loss / d z = softmax(z) - e_y.
    Forward computes the loss and, when gradients are needed, dz per chunk and from it dh = dz W and
    dW = dz^T h; backward only scales them. Peak memory is one chunk of logits instead of all (N, V) of them.
    """

    @staticmethod
    def forward(ctx, h, w, targets, ignore_index: int, chunk: int):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # e.g. no dW for a frozen head (PEFT)
        need_grad = need_h or need_w
        dt = _product_dtype(h, w)
        wc = w.to(dt)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        for s in range(0, h.size(0), chunk):
            hc, tc = h[s : s + chunk].to(dt), targets[s : s + chunk]
            valid = tc != ignore_index
            tc = tc.masked_fill(~valid, 0)
            z = mm(hc, wc.t()).float()  # (c, V)
            top = z.amax(-1)
            z_y = z.gather(1, tc[:, None]).squeeze(1)
            z = z.sub_(top[:, None]).exp_()  # softmax's numerator e, in place: p = e / sum(e)
            sums = z.sum(-1)
            total += ((top + sums.log() - z_y) * valid).sum()  # logsumexp(z) - z_y
            if need_grad:
                z.mul_((valid / sums)[:, None])  # p on the rows with a target, 0 elsewhere
                z[torch.arange(z.size(0), device=z.device), tc] -= valid.to(z.dtype)
                zc = z.to(dt)
                if need_h and dt == h.dtype:
                    mm(zc, wc, out=dh[s : s + chunk])
                elif need_h:
                    dh[s : s + chunk] = mm(zc, wc)
                if need_w:  # dW = dz^T h accumulates in fp32 from h as given
                    _add_head_grad(dw, z, h[s : s + chunk], dt)
        ctx.need = (need_h, need_w)
        if need_grad:
            ctx.save_for_backward(dh if need_h else h.new_empty(0), dw.to(w.dtype) if need_w else w.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        dh, dw = ctx.saved_tensors
        need_h, need_w = ctx.need
        # scaled in place: a full head's dW is as large as the embedding, and a copy of it would be held at the
        # start of the backward, when the activations are too (a second backward through the graph is refused)
        return (
            dh.mul_(grad.to(dh.dtype)) if need_h else None,
            dw.mul_(grad.to(dw.dtype)) if need_w else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk: int | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight^T, targets) without materialising the (N, V) logits ("fused linear CE").

    hidden: (..., d) final hidden states; weight: (V, d) output head; targets: (...) with `ignore_index` for
    positions not trained. reduction "sum" gives -sum_t log p(y_t), "mean" divides by the number of targets.
    `chunk`: rows of logits at a time (default `chunk_rows`).
    """
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    total = _LinearCrossEntropy.apply(h, weight, t, ignore_index, chunk or chunk_rows(weight.size(0)))
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / (t != ignore_index).sum().clamp(min=1)


def head_weight(head: nn.Module) -> torch.Tensor | None:
    """The one (V, d) matrix `head` multiplies by, for the fused losses: a bias-free nn.Linear's weight, or what a
    head carrying an adapter gives as `effective_weight()` (LoRA/DoRA: W + s B A, differentiable in A and B);
    None where no single matrix is the head (a bias, dropout on an adapter): the losses then take its logits."""
    if type(head) in (nn.Linear, Linear):
        return head.weight if head.bias is None else None
    effective = getattr(head, "effective_weight", None)
    return effective() if callable(effective) else None


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """-sum_t log p(y_t) of the logits head(hidden): fused and chunked (linear_cross_entropy) where the head is one
    matrix (`head_weight`: a plain nn.Linear, or a LoRA/DoRA head); otherwise through its full logits."""
    w = head_weight(head)
    if w is not None:
        return linear_cross_entropy(hidden, w, targets, reduction="sum")
    logits = head(hidden).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The language-model objective of pre-training and SFT: summed next-token cross-entropy over the targets
    != IGNORE_INDEX (the caller divides by count_targets). The model gives `hidden_states` and `lm_head`."""
    hidden = model.hidden_states(batch["input_ids"], mask=batch.get("mask"), position_ids=batch.get("position_ids"))
    return head_cross_entropy(hidden, model.lm_head, batch["targets"]), {}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """The number of trained positions of a batch (targets != IGNORE_INDEX)."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------------------------
# Masked reductions and normalisation


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum of x where mask is 1 (over `dim`, or everything)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over `dim` or everything; 0 where the mask is empty."""
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / std over the masked entries (unbiased variance); `shift_mean=False` keeps the mean
    (PPO whitens advantages fully and rewards without shifting)."""
    mask = torch.ones_like(x) if mask is None else mask
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


# ----------------------------------------------------------------------------------------------------------------
# Reward model


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0):
    """-log sigmoid(r_chosen - r_rejected - margin), mean over pairs (Bradley & Terry 1952; with a margin as in
    Llama 2, Touvron et al. 2023). Two rewards equal and margin 0 give log 2."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


# ----------------------------------------------------------------------------------------------------------------
# Direct preference optimisation and relatives. Inputs are per-sequence summed log-probabilities of the
# completion tokens (prompt masked): policy and reference, chosen (w) and rejected (l).


def dpo_loss(pol_w, pol_l, ref_w, ref_l, beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))).

    With label_smoothing eps > 0 it is conservative DPO (cDPO, Mitchell 2023): labels flipped with prob. eps,
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). Returns (loss, chosen rewards, rejected rewards),
    the rewards being beta * (pi - ref) per pair (detached).
    """
    h = (pol_w - ref_w) - (pol_l - ref_l)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss.mean(), (beta * (pol_w - ref_w)).detach(), (beta * (pol_l - ref_l)).detach()


def ipo_loss(pol_w, pol_l, ref_w, ref_l, beta: float = 0.1, len_w=None, len_l=None):
    """IPO (Azar et al. 2023): (h - 1 / (2 beta))^2 with h the log-ratio difference. The paper uses
    per-token averages of log-probs: pass the completion lengths to average (TRL does the same)."""
    if len_w is not None:
        pol_w, ref_w = pol_w / len_w, ref_w / len_w
        pol_l, ref_l = pol_l / len_l, ref_l / len_l
    h = (pol_w - ref_w) - (pol_l - ref_l)
    return ((h - 1 / (2 * beta)) ** 2).mean(), (beta * (pol_w - ref_w)).detach(), (beta * (pol_l - ref_l)).detach()


def hinge_loss(pol_w, pol_l, ref_w, ref_l, beta: float = 0.1):
    """Hinge on the DPO log-ratio difference h = (pi_w - ref_w) - (pi_l - ref_l): max(0, 1 - beta * h), mean over
    pairs. SLiC-HF's calibration loss (Zhao et al. 2023), max(0, delta - log pi(y_w)/pi(y_l)), with the reference
    subtracted as in DPO and margin delta = 1 / beta (TRL's loss_type="hinge"). A pair whose h already exceeds
    1 / beta adds nothing and no gradient. Returns (loss, chosen rewards, rejected rewards), the rewards being
    beta * (pi - ref) per pair (detached), as dpo_loss."""
    h = (pol_w - ref_w) - (pol_l - ref_l)
    loss = torch.relu(1 - beta * h)
    return loss.mean(), (beta * (pol_w - ref_w)).detach(), (beta * (pol_l - ref_l)).detach()


def simpo_loss(pol_w, pol_l, len_w, len_l, beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) -
    gamma). Returns (loss, chosen rewards, rejected rewards) with rewards beta * mean token log-prob."""
    rw, rl = beta * pol_w / len_w, beta * pol_l / len_l
    return -F.logsigmoid(rw - rl - gamma).mean(), rw.detach(), rl.detach()


def orpo_loss(pol_w, pol_l, len_w, len_l, nll_w, lam: float = 0.1):
    """ORPO (Hong et al. 2024), reference-free: NLL(y_w) - lam * log sigmoid(log odds(y_w) - log odds(y_l)),
    odds(y) = p / (1 - p) with p = exp(mean token log-prob). `nll_w` is the chosen completion's mean NLL."""

    def log_odds(logp_mean):
        return logp_mean - torch.log1p(-torch.exp(logp_mean).clamp(max=1 - 1e-6))

    ratio = log_odds(pol_w / len_w) - log_odds(pol_l / len_l)
    loss = nll_w - lam * F.logsigmoid(ratio)
    return loss.mean(), (lam * pol_w / len_w).detach(), (lam * pol_l / len_l).detach()


# ----------------------------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017) and GRPO (Shao et al. 2024)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || ref) from samples of pi, with r = ref/pi (Schulman 2020, "Approximating
    KL divergence"): k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = (r - 1) - log r
    (unbiased and non-negative)."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"KL estimator must be k1, k2 or k3, got {kind!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    rewards, values, mask: (B, T). delta_t = r_t + gamma V_{t+1} - V_t (V after the last valid token is 0);
    A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = advantages + values), zero where masked.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2):
    """Clipped surrogate: -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = exp(logp - old_logp), masked mean.
    Returns (loss, clip fraction, approximate KL (k3) between old and new policy)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped < unclipped).float(), mask)
    approx_kl = masked_mean(kl_estimate(old_logp, logp, "k3"), mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip: float = 0.2, beta: float = 0.04):
    """GRPO's objective (Shao et al. 2024), summed over response tokens (the caller divides by their count):
        sum_t mask_t [ -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta k3(pi, ref)_t ],
    rho_t = exp(logp - old_logp); logp, old_logp, ref_logp, mask: (B, T); advantages: (B,), one per reply.
    Returns (loss, mean k3 per token, clip fraction), the last two detached."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    pg = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = kl_estimate(logp, ref_logp, "k3")
    loss = ((pg + beta * kl) * mask).sum()
    clip_frac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
    return loss, masked_mean(kl.detach(), mask), clip_frac.detach()


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), masked mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return masked_mean(loss, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dim: logsumexp(z) - sum softmax(z) z. Shape logits.shape[:-1]."""
    logits = logits.float()
    p = torch.softmax(logits, -1)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True):
    """GRPO: each reward minus its group's mean, divided by the group's standard deviation (unbiased) when
    `scale`. rewards: (N * G,) ordered group by group. A group of equal rewards gets advantage 0."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(-1, keepdim=True)
    if scale:
        centred = centred / (r.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


class _LinearLogprobs(torch.autograd.Function):
    """Per-row log p(target) and entropy of softmax((h @ W^T) / T), in row chunks without keeping the logits.

    With z = W h / T, lse = logsumexp(z), p = softmax(z): log p_y = z_y - lse and H = lse - sum_j p_j z_j, so
    d log p_y / dz = e_y - p and dH / dz = -p * (log p + H). Backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, h, w, targets, inv_t: float, chunk: int):  # type: ignore[override]
        dt = _product_dtype(h, w)
        wc = w.to(dt)
        logp = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        ent = torch.empty_like(logp)
        lse_all = torch.empty_like(logp)
        for s in range(0, h.size(0), chunk):
            z = mm(h[s : s + chunk].to(dt), wc.t()).float()  # (c, V)
            if inv_t != 1.0:
                z.mul_(inv_t)
            top = z.amax(-1)
            e = (z - top[:, None]).exp_()  # softmax's numerator: p = e / sum(e)
            total = e.sum(-1)
            lse = top + total.log()
            logp[s : s + chunk] = z.gather(1, targets[s : s + chunk, None]).squeeze(1) - lse
            ent[s : s + chunk] = lse - e.mul_(z).sum(-1) / total  # H = lse - sum_j p_j z_j
            lse_all[s : s + chunk] = lse
        ctx.save_for_backward(h, w, targets, lse_all, ent)
        ctx.inv_t, ctx.chunk, ctx.dt = inv_t, chunk, dt
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):  # type: ignore[override]
        h, w, targets, lse_all, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dt = ctx.dt
        wc = w.to(dt)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        # dz = inv_t * (p * (a log p + b) + e_y g_logp) with a = -g_ent and b = -(g_ent H + g_logp), per row
        with_ent = bool(g_ent.ne(0).any())  # the entropy often only logged: its gradient is then zero
        a, b = -g_ent * ctx.inv_t, -(g_ent * ent + g_logp) * ctx.inv_t
        for s in range(0, h.size(0), ctx.chunk):
            hc, sl = h[s : s + ctx.chunk].to(dt), slice(s, s + ctx.chunk)
            logq = mm(hc, wc.t()).float()
            if ctx.inv_t != 1.0:
                logq.mul_(ctx.inv_t)
            logq.sub_(lse_all[sl, None])  # log p, (c, V)
            p = logq.exp()
            dz = logq.mul_(a[sl, None]).add_(b[sl, None]).mul_(p) if with_ent else p.mul_(b[sl, None])
            dz[torch.arange(dz.size(0), device=dz.device), targets[sl]] += g_logp[sl] * ctx.inv_t
            if need_h:
                dh[sl] = mm(dz.to(dt), wc)
            if need_w:
                _add_head_grad(dw, dz, h[sl], dt)
        return dh, dw.to(w.dtype) if need_w else None, None, None, None


def head_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target_t), entropy_t) of softmax(head(hidden) / temperature) at each position, both 0 where the
    target is ignored; hidden (B, T, d), targets (B, T). Only the target positions are computed, and where the head
    is one matrix (`head_weight`) in chunks without the (tokens x vocab) logits (`_LinearLogprobs`); any other head
    through its logits. Equal to token_logprobs / entropy_from_logits of head(hidden) / temperature, with their
    gradients."""
    valid = targets != ignore_index
    rows = valid.reshape(-1).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.size(-1)).index_select(0, rows)
    t = targets.reshape(-1).index_select(0, rows)
    w = head_weight(head)
    if w is not None:
        logp, ent = _LinearLogprobs.apply(h, w, t, 1.0 / temperature, chunk or chunk_rows(w.size(0)))
    else:
        z = head(h).float() / temperature
        logp = torch.log_softmax(z, -1).gather(1, t[:, None]).squeeze(1)
        ent = entropy_from_logits(z)
    out_logp = logp.new_zeros(valid.numel()).index_copy(0, rows, logp).view(targets.shape)
    out_ent = ent.new_zeros(valid.numel()).index_copy(0, rows, ent).view(targets.shape)
    return out_logp, out_ent


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log p(target_t) at each position, 0 where the target is ignored. logits (B, T, V), targets (B, T)."""
    mask = targets != ignore_index
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.masked_fill(~mask, 0)[..., None]).squeeze(-1)
    return logp * mask


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """(sum of target log-probs per row, number of targets per row): what DPO-style losses take. Prompt tokens
    carry ignore_index in `targets`, so only the completion counts."""
    mask = targets != ignore_index
    return token_logprobs(logits, targets, ignore_index).sum(-1), mask.sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# The GRPO family: one clipped policy-gradient objective, normalised per sequence, per token or by a constant,
# with a token- or sequence-level importance ratio; and the advantage estimators that feed it.

POLICY_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "gspo")
ADVANTAGE_ESTIMATORS = ("group", "rloo", "reinforce_pp")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "grpo",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    max_length: int | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy loss of the GRPO family, one step, as TRL's GRPOTrainer computes it.

    logp, old_logp, ref_logp, mask: (B, T) per-token log-probs of the B replies under the policy, the policy that
    sampled them and the reference; advantages: (B,), one per reply. With the ratio rho and A_i the reply's
    advantage, each token's term is
        l_it = -min(rho A_i, clip(rho, 1 - clip_low, 1 + clip_high) A_i) + beta * KL_it,
    KL_it the `kl_estimator` (k1/k2/k3: kl_estimate) of KL(pi || ref); beta 0 needs no reference (ref_logp None).
    clip_high None is clip_low (symmetric); clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025).
    The ratio and the normalisation depend on `loss_type` (n_i = sum_t mask_it, the length of reply i):
        grpo     rho_it = exp(logp - old_logp); loss = 1/B sum_i 1/n_i sum_t l_it  (Shao et al. 2024, DeepSeekMath)
        dr_grpo  rho_it; loss = sum_it l_it / (B * max_length): no length bias  (Liu et al. 2025, "Understanding
                 R1-Zero-like training"); max_length is the step's new-token limit, a constant
        dapo     rho_it; loss = sum_it l_it / sum_i n_i, every token of the batch weighted alike  (Yu et al. 2025)
        bnpo     the same sum over the active tokens of this batch (TRL's bnpo normalises each micro-batch on its
                 own, dapo over the whole generation batch; they agree for one micro-batch per step)
        gspo     one ratio per reply, s_i = exp(1/n_i sum_t (logp - old_logp)_it), clipped at the sequence level:
                 loss = 1/B sum_i [-min(s_i A_i, clip(s_i) A_i) + beta/n_i sum_t KL_it]  (Zheng et al. 2025, GSPO)
    Sums run over mask_it = 1 only. reduction "sum" returns the numerator whose division by
    policy_loss_normalizer(mask, loss_type, max_length) is the "mean" loss: a loop that sums losses over
    micro-batches and divides by the summed normalisers keeps grpo, dr_grpo and dapo exact under accumulation.
    Stats (detached): clip_low_fraction (rho < 1 - clip_low with A < 0: the clip binds below), clip_high_fraction
    (rho > 1 + clip_high with A > 0), clip_fraction (either), ratio_mean, and kl (mean over tokens) when beta > 0;
    fractions are over tokens, or over replies for gspo. TRL logs the same clip_ratio/low_mean, high_mean.
    """
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(POLICY_LOSS_TYPES)}, got {loss_type!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.to(logp.dtype)
    lengths = mask.sum(-1).clamp(min=1)  # (B,)
    log_ratio = logp - old_logp  # (B, T)
    if loss_type == "gspo":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / lengths[:, None]  # (B, 1)
    ratio = torch.exp(log_ratio)  # (B, T), or (B, 1) for gspo
    a = advantages[:, None].to(ratio.dtype)
    terms = -torch.min(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)  # (B, T) or (B, 1)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("policy_loss: beta != 0 needs ref_logp")
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        terms = terms + beta * kl  # (B, T)
        stats["kl"] = masked_mean(kl.detach(), mask)
    terms = terms.expand_as(mask)
    if loss_type in ("grpo", "gspo"):
        numerator = ((terms * mask).sum(-1) / lengths).sum()
    else:
        numerator = (terms * mask).sum()
    low = ((ratio < 1 - clip_low) & (a < 0)).to(mask.dtype)
    high = ((ratio > 1 + clip_high) & (a > 0)).to(mask.dtype)
    stat_mask = torch.ones_like(ratio) if loss_type == "gspo" else mask
    stats["clip_low_fraction"] = masked_mean(low, stat_mask).detach()
    stats["clip_high_fraction"] = masked_mean(high, stat_mask).detach()
    stats["clip_fraction"] = masked_mean(torch.maximum(low, high), stat_mask).detach()
    stats["ratio_mean"] = masked_mean(ratio.detach(), stat_mask)
    if reduction == "sum":
        return numerator, stats
    return numerator / policy_loss_normalizer(mask, loss_type, max_length), stats


def policy_loss_normalizer(mask: torch.Tensor, loss_type: str, max_length: int | None = None) -> int:
    """What policy_loss(..., reduction="sum") is divided by to give its mean: the number of replies B (grpo,
    gspo), B * max_length (dr_grpo) or the number of active tokens sum(mask) (dapo, bnpo), at least 1. mask: (B, T).
    An int, so that it serves as a training loop's count of a micro-batch's units (fit's count_fn)."""
    if loss_type in ("grpo", "gspo"):
        return max(mask.size(0), 1)
    if loss_type == "dr_grpo":
        if max_length is None:
            raise ValueError("dr_grpo normalises by a constant: pass max_length (the new-token limit)")
        return mask.size(0) * max_length
    if loss_type in ("dapo", "bnpo"):
        return max(int(mask.sum()), 1)
    raise ValueError(f"loss_type must be one of {', '.join(POLICY_LOSS_TYPES)}, got {loss_type!r}")


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): each reward minus the mean of the other
    G - 1 rewards of its group, A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_group).
    rewards: (N * G,) ordered group by group; G >= 2. Not scaled (TRL's RLOOTrainer can whiten over the batch
    on top: normalize_advantages)."""
    if group_size < 2:
        raise ValueError(f"RLOO needs a group of at least 2, got {group_size}")
    r = rewards.view(-1, group_size)
    return (r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, "REINFORCE++", arXiv 2501.03262, the variant for outcome rewards
    with several samples per prompt, as OpenRLHF's `reinforce_baseline`): subtract the group's mean reward, then
    normalise over the whole batch, A = (a - mean_batch(a)) / (std_batch(a) + eps) with a = r - mean_group(r)
    and the unbiased std over all N * G replies. Differences from OpenRLHF: one advantage per reply (no KL folded
    into a per-token return, the KL is a loss term here), normalised over replies rather than over tokens (a long
    reply does not weigh more in the statistics). rewards: (N * G,) ordered group by group."""
    r = rewards.view(-1, group_size)
    a = (r - r.mean(-1, keepdim=True)).reshape(-1)
    return (a - a.mean()) / (a.std() + eps)


def advantages(
    rewards: torch.Tensor, group_size: int, estimator: str = "group", scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """One advantage per reply from its scalar reward, by `estimator`: group (GRPO's group_advantages, divided
    by the group's std when `scale`), rloo (rloo_advantages) or reinforce_pp (reinforce_pp_advantages); `scale`
    concerns group only. rewards: (N * G,) ordered group by group; returns (N * G,)."""
    if estimator == "group":
        return group_advantages(rewards, group_size, eps, scale)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_size)
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, group_size, eps)
    raise ValueError(f"advantage estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got {estimator!r}")


# ----------------------------------------------------------------------------------------------------------------
# KTO (Ethayarajh et al. 2024): unpaired desirable / undesirable completions. Inputs are per-sequence summed
# log-probs of the completion tokens, as for DPO.


def kto_reference_point(kl_pol: torch.Tensor, kl_ref: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0, an estimate of KL(pi || ref): the mean of log pi(y'|x) - log ref(y'|x) over
    mismatched pairs (each prompt x with another row's completion y', TRL shifts the completions by one within
    the batch), detached and clamped at 0 (a KL is not negative). kl_pol, kl_ref: (B,) summed log-probs.
    Returns a scalar tensor."""
    return (kl_pol - kl_ref).mean().detach().clamp(min=0)


def kto_loss(
    pol: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7), mean over rows of
        w_d (1 - sigmoid(beta (h - z0)))  for desirable rows,  w_u (1 - sigmoid(beta (z0 - h)))  for undesirable,
    h = pol - ref, the row's log-ratio; z0 from kto_reference_point (no gradient). pol, ref: (B,) summed
    completion log-probs; desirable: (B,) bool. Returns (loss, rewards beta * h per row, detached)."""
    h = pol - ref
    z0 = torch.as_tensor(z0, dtype=h.dtype, device=h.device)
    desirable = desirable.to(torch.bool)
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (h - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - h))),
    )
    return loss.mean(), (beta * h).detach()
