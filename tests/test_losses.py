"""Losses against closed-form values worked out by hand, and GAE against a slow direct sum."""

from __future__ import annotations

import math

import pytest
import torch

from llmstages import losses as L

LOG2 = math.log(2)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_bradley_terry():
    assert math.isclose(L.bradley_terry_loss(t(1.0), t(1.0)), LOG2)  # -log sigmoid(0)
    # r_w - r_l = 2, margin 1: -log sigmoid(1) = log(1 + e^-1)
    assert math.isclose(L.bradley_terry_loss(t(3.0), t(1.0), margin=1.0), math.log1p(math.exp(-1)))


def test_dpo_family_closed_forms():
    same = t(-5.0, -7.0)
    loss, rw, rl = L.dpo_loss(same, same - 1, same, same - 1, beta=0.1)
    assert math.isclose(loss, LOG2) and torch.all(rw == 0) and torch.all(rl == 0)  # policy == reference
    # h = (pi_w - ref_w) - (pi_l - ref_l) = (-1 - -2) - (-3 - -2) = 2; beta 0.5: -log sigmoid(1)
    loss, rw, rl = L.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert math.isclose(loss, math.log1p(math.exp(-1))) and math.isclose(rw, 0.5) and math.isclose(rl, -0.5)
    # cDPO with eps: (1 - eps) log(1 + e^-1) + eps log(1 + e^1)
    loss, _, _ = L.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.25)
    assert math.isclose(loss, 0.75 * math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.exp(1)))
    # IPO: h = 0, beta = 0.5: (0 - 1/(2*0.5))^2 = 1; with lengths, log-probs are averaged first
    assert math.isclose(L.ipo_loss(same, same, same, same, beta=0.5)[0], 1.0)
    loss, _, _ = L.ipo_loss(t(-4.0), t(-8.0), t(-6.0), t(-6.0), beta=0.25, len_w=t(2.0), len_l=t(4.0))
    assert math.isclose(loss, (1.5 - 2.0) ** 2)  # h = (-2 - -3) - (-2 - -1.5) = 1.5; 1/(2 beta) = 2
    # SimPO, equal per-token log-probs: -log sigmoid(-gamma) = log(1 + e^gamma)
    loss, _, _ = L.simpo_loss(t(-6.0), t(-3.0), t(4.0), t(2.0), beta=2.0, gamma=0.5)
    assert math.isclose(loss, math.log1p(math.exp(0.5)))
    # ORPO, equal odds: nll + lam * log 2
    loss, _, _ = L.orpo_loss(t(-2.0), t(-2.0), t(2.0), t(2.0), nll_w=t(1.0), lam=0.1)
    assert math.isclose(loss, 1.0 + 0.1 * LOG2)


def test_kl_estimators():
    logp, ref = t(0.0), t(math.log(0.5))  # log r = log(ref / pi) = -log 2
    assert math.isclose(L.kl_estimate(logp, ref, "k1"), LOG2)
    assert math.isclose(L.kl_estimate(logp, ref, "k2"), 0.5 * LOG2**2)
    assert math.isclose(L.kl_estimate(logp, ref, "k3"), 0.5 - 1 + LOG2)
    # Exact expectation under pi of k1 and k3 equals KL(pi || ref) for a categorical distribution.
    pi, q = t(0.5, 0.3, 0.2), t(0.2, 0.2, 0.6)
    kl = float((pi * (pi / q).log()).sum())
    for kind in ("k1", "k3"):
        assert math.isclose(float((pi * L.kl_estimate(pi.log(), q.log(), kind)).sum()), kl, rel_tol=1e-12)
    with pytest.raises(ValueError):
        L.kl_estimate(logp, ref, "k4")


def _gae_slow(rewards, values, mask, gamma, lam):
    """Direct sum: A_t = sum_l (gamma lam)^l delta_{t+l} over the valid tokens of each row."""
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        v = list(values[b, :n]) + [0.0]
        deltas = [float(rewards[b, i] + gamma * v[i + 1] - v[i]) for i in range(n)]
        for i in range(n):
            out[b, i] = sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i))
    return out


def test_gae_against_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 7, generator=g, dtype=torch.float64)
    values = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.arange(7)[None] < torch.tensor([7, 5, 1, 3])[:, None]).double()
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
        adv, ret = L.gae(rewards, values, mask, gamma, lam)
        expected = _gae_slow(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, expected)
        torch.testing.assert_close(ret, (expected + values) * mask)


def test_ppo_losses():
    mask = t(1.0, 1.0)
    loss, frac, kl = L.ppo_policy_loss(t(0.0, 0.0), t(0.0, 0.0), t(1.0, -2.0), mask)
    assert math.isclose(loss, 0.5) and frac == 0 and kl == 0  # ratio 1: -mean(A)
    # ratio 1.5 with A = 1: clipped to 1.2; ratio 0.5 with A = -1: min(-0.5, -0.8) = -0.8 (clipped)
    loss, frac, _ = L.ppo_policy_loss(t(math.log(1.5), math.log(0.5)), t(0.0, 0.0), t(1.0, -1.0), mask)
    assert math.isclose(loss, (-1.2 + 0.8) / 2) and frac == 1.0
    # value: V = 2, V_old = 0, R = 1.5, clip 0.5 -> max((0.5)^2, (0.5 - 1.5)^2) / 2 = 0.5
    assert math.isclose(L.ppo_value_loss(t(2.0), t(0.0), t(1.5), t(1.0), clip=0.5), 0.5)


def test_grpo_loss_closed_form():
    # row 0: ratios 1.5 and 0.5 with A = 1 -> -min(1.5, 1.2) - min(0.5, 0.8) = -1.7; k3 with r = ref/pi:
    # r = 2/3 -> (r - 1) - log r, r = 2 -> 1 - log 2. Row 1 is masked out: its huge values must not count.
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [5.0, 5.0]])
    old, ref = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [-9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, kl, frac = L.grpo_loss(logp, old, ref, torch.tensor([1.0, 3.0]), mask, clip=0.2, beta=0.1)
    k3 = [(2 / 3 - 1) - math.log(2 / 3), 1 - math.log(2)]
    assert math.isclose(loss, -1.7 + 0.1 * sum(k3), rel_tol=1e-6)
    assert math.isclose(kl, sum(k3) / 2, rel_tol=1e-6) and frac == 1.0
    # negative advantage: ratio 1.5, A = -1 -> -min(-1.5, -1.2) = 1.5 (the unclipped side binds)
    loss, _, _ = L.grpo_loss(logp[:1, :1], old[:1, :1], logp[:1, :1], torch.tensor([-1.0]), mask[:1, :1], 0.2, 0.1)
    assert math.isclose(loss, 1.5, rel_tol=1e-6)


def test_entropy_whiten_groups_and_masks():
    assert math.isclose(L.entropy_from_logits(torch.zeros(1, 8)), math.log(8), rel_tol=1e-6)
    x = t(1.0, 2.0, 3.0, 100.0)
    m = t(1.0, 1.0, 1.0, 0.0)
    w = L.whiten(x, m)
    assert math.isclose(L.masked_mean(w, m), 0.0, abs_tol=1e-12) and w[3] == 0
    assert math.isclose(float(L.masked_sum(w**2, m) / 2), 1.0, rel_tol=1e-6)  # unbiased variance 1
    adv = L.group_advantages(t(1.0, 2.0, 3.0, 5.0, 5.0, 5.0), group_size=3)
    torch.testing.assert_close(adv, t(-1.0, 0.0, 1.0, 0.0, 0.0, 0.0), atol=1e-5, rtol=0)
    assert math.isclose(L.masked_mean(t(1.0, 3.0, 9.0), t(1.0, 1.0, 0.0)), 2.0)


def test_dpo_on_sequence_logprobs_equals_the_textbook_formula_from_logits():
    """Summed completion log-probs (prompt masked) from a real model, then sigmoid DPO, against a direct loop."""
    from llmstages.model import GPT, preset

    torch.manual_seed(0)
    policy = GPT(preset("llama_tiny", vocab_size=64, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1)).eval()
    reference = GPT(preset("llama_tiny", vocab_size=64, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1)).eval()
    prompt = [5, 6, 7]
    chosen, rejected = [8, 9, 10, 1], [11, 1]

    def batch(completion):
        ids = torch.tensor([prompt + completion])
        targets = ids[:, 1:].clone()
        targets[:, : len(prompt) - 1] = L.IGNORE_INDEX  # predictions of prompt tokens are not counted
        return ids[:, :-1], targets

    def ours(model, completion):
        x, y = batch(completion)
        with torch.no_grad():
            return L.sequence_logprobs(model(x), y)[0]

    def textbook(model, completion):  # log pi(y | x) = sum_t log softmax(logits at t-1)[y_t], looped
        seq = prompt + completion
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0]
        return sum(float(torch.log_softmax(logits[t - 1], -1)[seq[t]]) for t in range(len(prompt), len(seq)))

    beta = 0.3
    loss, _, _ = L.dpo_loss(ours(policy, chosen), ours(policy, rejected), ours(reference, chosen),
                            ours(reference, rejected), beta=beta)  # fmt: skip
    h = (textbook(policy, chosen) - textbook(reference, chosen)) - (
        textbook(policy, rejected) - textbook(reference, rejected)
    )
    assert math.isclose(float(loss), math.log1p(math.exp(-beta * h)), rel_tol=1e-5)
    assert int(L.sequence_logprobs(torch.zeros(1, 6, 64), batch(chosen)[1])[1]) == len(chosen)


@pytest.mark.parametrize("wrapped", [False, True])
def test_head_cross_entropy_against_full_logits(wrapped):
    """The fused, chunked head (a plain nn.Linear) and the plain path (any other head) against F.cross_entropy on
    the whole (N, V) logits: the summed loss and the gradients of the hidden states and the head."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=False)
    head = torch.nn.Sequential(linear) if wrapped else linear
    hidden = torch.randn(3, 700, 16, requires_grad=True)  # 2100 rows: more than one chunk of 512
    targets = torch.randint(0, 50, (3, 700))
    targets[0, :100] = L.IGNORE_INDEX
    got = L.head_cross_entropy(hidden, head, targets)
    g_h, g_w = torch.autograd.grad(got, (hidden, linear.weight))
    want = torch.nn.functional.cross_entropy((hidden @ linear.weight.t()).reshape(-1, 50), targets.reshape(-1),
                                             reduction="sum")  # fmt: skip
    w_h, w_w = torch.autograd.grad(want, (hidden, linear.weight))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g_h, w_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w, w_w, rtol=1e-4, atol=1e-4)
    assert L.count_targets({"targets": targets}) == 2000


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_logprobs_equal_the_plain_ones_with_gradients(wrapped, temperature):
    """Chunked log-probs and entropies (what DPO, GRPO and PPO train on) against token_logprobs and
    entropy_from_logits of the full logits: values and the gradients of hidden states and head, fp32, 1e-5."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 300, bias=False)
    head = torch.nn.Sequential(linear) if wrapped else linear
    hidden = torch.randn(3, 400, 16, requires_grad=True)  # 1200 positions: several chunks of 512
    targets = torch.randint(0, 300, (3, 400))
    targets[:, :150] = L.IGNORE_INDEX  # prompt positions
    a, b = torch.randn(3, 400), torch.randn(3, 400)  # an arbitrary upstream gradient for each output
    mask = (targets != L.IGNORE_INDEX).float()

    def grads(logp, ent):
        return torch.autograd.grad((logp * a).sum() + (ent * b * mask).sum(), (hidden, linear.weight))

    logp, ent = L.head_logprobs(hidden, head, targets, temperature)
    logits = (hidden @ linear.weight.t()) / temperature
    want_logp, want_ent = L.token_logprobs(logits, targets), L.entropy_from_logits(logits) * mask
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent * mask, want_ent, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(logp, ent), grads(want_logp, want_ent)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
