"""Losses against closed-form values worked out by hand, and GAE against a slow direct sum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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
    # hinge (SLiC-HF): h = 2 and h = -2 (rejected and chosen swapped); beta 0.25: relu(1 - 0.5) and relu(1 + 0.5)
    pw, pl = t(-1.0, -3.0), t(-3.0, -1.0)
    loss, rw, rl = L.hinge_loss(pw, pl, t(-2.0, -2.0), t(-2.0, -2.0), beta=0.25)
    assert math.isclose(loss, (0.5 + 1.5) / 2) and torch.equal(rw, t(0.25, -0.25)) and torch.equal(rl, t(-0.25, 0.25))
    # past the margin (beta h = 1.5 > 1) a pair adds neither loss nor gradient
    pw.requires_grad_()
    loss, _, _ = L.hinge_loss(pw, pl, t(-2.0, -2.0), t(-2.0, -2.0), beta=0.75)
    loss.backward()
    assert math.isclose(loss, (0 + 2.5) / 2) and torch.equal(pw.grad, t(0.0, -0.375))  # d/dpi_w: -beta / 2 pairs
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


@pytest.mark.parametrize("dora", [False, True])
def test_a_head_carrying_lora_is_fused_and_equals_its_logits(dora):
    """A LoRA/DoRA output head (peft.target_modules naming lm_head) goes through the fused losses as its one
    matrix (`effective_weight`), no (tokens x vocab) logits: the cross-entropy, log-probs and entropies equal those
    of the head's own forward (W x + s B A x), with the gradients of the hidden states and of A, B and DoRA's
    magnitudes, fp32."""
    from llmstages.peft import LoRALinear

    torch.manual_seed(0)
    head = LoRALinear.from_linear(torch.nn.Linear(16, 300, bias=False), rank=4, alpha=8, use_dora=dora)
    with torch.no_grad():
        head.lora_B.weight.normal_(0, 0.1)  # off zero, so that the adapter counts
        if dora:
            head.lora_magnitude_vector.mul_(torch.rand(300) + 0.5)
    assert L.head_weight(head) is not None  # fused, not the fallback
    params = [p for p in head.parameters() if p.requires_grad]
    hidden = torch.randn(3, 400, 16, requires_grad=True)
    targets = torch.randint(0, 300, (3, 400))
    targets[:, :150] = L.IGNORE_INDEX
    mask = (targets != L.IGNORE_INDEX).float()
    b = torch.randn(3, 400)

    def grads(loss):
        return torch.autograd.grad(loss, [hidden, *params])

    got = L.head_cross_entropy(hidden, head, targets)
    logits = head(hidden)  # the layer's own forward: the base product plus the adapter's path
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1), reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    for g, w in zip(grads(got), grads(want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    logp, ent = L.head_logprobs(hidden, head, targets, 0.7)
    want_logp, want_ent = L.token_logprobs(head(hidden) / 0.7, targets), L.entropy_from_logits(head(hidden) / 0.7)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent * mask, want_ent * mask, rtol=1e-5, atol=1e-5)
    got_g = grads(logp.sum() + (ent * b * mask).sum())
    for g, w in zip(got_g, grads(want_logp.sum() + (want_ent * b * mask).sum())):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_head_that_is_not_one_matrix_goes_through_its_logits():
    """Dropout on a LoRA head's input while training, or a bias: no single matrix is the head, so `head_weight`
    says so (None) and the losses take its logits."""
    from llmstages.peft import LoRALinear

    head = LoRALinear.from_linear(torch.nn.Linear(16, 30, bias=False), rank=2, dropout=0.1)
    assert L.head_weight(head.train()) is None and L.head_weight(head.eval()) is not None
    assert L.head_weight(torch.nn.Linear(16, 30, bias=True)) is None


def test_chunks_shrink_for_a_large_vocabulary_and_do_not_change_the_result():
    """At most 2^25 logits at a time: 512 rows up to a 65,536-token vocabulary, 220 for Qwen2's 151,936; the loss
    and gradients do not depend on the chunk (rows are independent; d W sums over chunks)."""
    assert L.chunk_rows(49152) == 512 and L.chunk_rows(151936) == 220 and L.chunk_rows(1 << 26) == 1
    torch.manual_seed(0)
    h, w, t = (
        torch.randn(50, 8, requires_grad=True),
        torch.randn(30, 8, requires_grad=True),
        torch.randint(0, 30, (50,)),
    )
    grads = []
    for chunk in (None, 7):
        loss = L.linear_cross_entropy(h, w, t, chunk=chunk)
        grads.append((loss, *torch.autograd.grad(loss, (h, w))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_head_under_autocast_multiplies_as_autocast_does_for_an_unfused_head(temperature, head_dtype):
    """Under bf16 autocast, or with the head held in bf16 (QLoRA, train/frozen.py), the fused losses multiply in
    bf16, in the forward and in the backward (which runs outside autocast and recomputes the logits the forward
    had): the loss, log-probs and entropies of an unfused head under bf16 autocast (logits as bf16, the rest in
    fp32), and d h within one bf16 step of the largest (its product is bf16 in both)."""
    torch.manual_seed(0)
    V, d, n = 1000, 64, 700  # two chunks of 512 rows
    w = (torch.randn(V, d) * 0.5).bfloat16().to(head_dtype)
    h = torch.randn(n, d)
    t = torch.randint(0, V, (n,))
    t[::7] = L.IGNORE_INDEX
    head = torch.nn.Linear(d, V, bias=False)
    head.weight = torch.nn.Parameter(w, requires_grad=False)

    def unfused(hh, temp=1.0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.linear(hh, w.float()).float() / temp

    valid = t != L.IGNORE_INDEX
    for fused, plain in (
        (
            lambda hh: L.linear_cross_entropy(hh, w, t, reduction="sum"),
            lambda hh: F.cross_entropy(unfused(hh), t, reduction="sum"),
        ),
        (
            lambda hh: sum(x.sum() for x in L.head_logprobs(hh[None], head, t[None], temperature)),
            lambda hh: sum(x.sum() for x in _plain_logprobs(unfused(hh, temperature), t, valid)),
        ),
    ):
        h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused(h1)
        want = plain(h2)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
        assert h1.grad.dtype == torch.float32
        assert (h1.grad - h2.grad).abs().max() <= 2**-7 * h2.grad.abs().max()


def _plain_logprobs(z, t, valid):
    logsm = torch.log_softmax(z, -1)
    logp = logsm.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * valid
    ent = -(logsm.exp() * logsm).sum(-1) * valid
    return logp, ent


# ----------------------------------------------------------------------------------------------------------------
# The GRPO family. One 2 x 3 rollout worked by hand: row 0 has ratios (1.5, 0.7, 1) and A = 1, row 1 ratios
# (1.1, 0.5) and A = -2 with a third, masked token whose huge ratio must not count. Clip [1 - 0.2, 1 + 0.28].


def _rollout():
    log_ratio = torch.tensor(
        [[math.log(1.5), math.log(0.7), 0.0], [math.log(1.1), math.log(0.5), 9.0]], dtype=torch.float64
    )
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    return old + log_ratio, old, t(1.0, -2.0), mask


def _term(rho: float, a: float, lo: float = 0.2, hi: float = 0.28) -> float:
    return -min(rho * a, min(max(rho, 1 - lo), 1 + hi) * a)


# row 0, A = 1: 1.5 clips to 1.28, 0.7 is not clipped (A > 0, the min keeps 0.7), 1 stays -> -1.28, -0.7, -1
# row 1, A = -2: 1.1 stays -> 2.2; 0.5 clips up to 0.8 -> max(1.0, 1.6) = 1.6
ROW0, ROW1 = [-1.28, -0.7, -1.0], [2.2, 1.6]


def test_the_hand_worked_terms_are_the_formula():
    assert [_term(r, 1.0) for r in (1.5, 0.7, 1.0)] == pytest.approx(ROW0)
    assert [_term(r, -2.0) for r in (1.1, 0.5)] == pytest.approx(ROW1)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (sum(ROW0) / 3 + sum(ROW1) / 2) / 2),  # mean per reply, then over replies
        ("dr_grpo", (sum(ROW0) + sum(ROW1)) / (2 * 4)),  # B * max_length, max_length = 4
        ("dapo", (sum(ROW0) + sum(ROW1)) / 5),  # every token of the batch alike
        ("bnpo", (sum(ROW0) + sum(ROW1)) / 5),  # active tokens of this batch
    ],
)
def test_policy_loss_types_closed_form(loss_type, expected):
    logp, old, adv, mask = _rollout()
    loss, stats = L.policy_loss(logp, old, adv, mask, loss_type, clip_low=0.2, clip_high=0.28, max_length=4)
    assert math.isclose(loss, expected, rel_tol=1e-9)
    # one token clipped below (row 1's 0.5 with A < 0), one above (row 0's 1.5 with A > 0), of 5 active tokens
    assert math.isclose(stats["clip_low_fraction"], 0.2) and math.isclose(stats["clip_high_fraction"], 0.2)
    assert math.isclose(stats["clip_fraction"], 0.4) and "kl" not in stats
    # the sum form divided by its normaliser is the mean form
    num, _ = L.policy_loss(logp, old, adv, mask, loss_type, 0.2, 0.28, max_length=4, reduction="sum")
    assert math.isclose(num / L.policy_loss_normalizer(mask, loss_type, max_length=4), expected, rel_tol=1e-9)


def test_gspo_closed_form_and_its_sequence_ratio():
    logp, old, adv, mask = _rollout()
    # s_0 = (1.5 * 0.7 * 1)^(1/3) = 1.0164 (inside [0.8, 1.28]) -> -s_0; s_1 = (1.1 * 0.5)^(1/2) = 0.7416, A = -2:
    # clipped up to 0.8 -> 1.6. The masked token of row 1 is not in its mean.
    s0, s1 = 1.05 ** (1 / 3), 0.55**0.5
    loss, stats = L.policy_loss(logp, old, adv, mask, "gspo", clip_low=0.2, clip_high=0.28)
    assert math.isclose(loss, (_term(s0, 1.0) + _term(s1, -2.0)) / 2, rel_tol=1e-9)
    assert math.isclose(loss, (-s0 + 1.6) / 2, rel_tol=1e-9)
    assert math.isclose(stats["ratio_mean"], (s0 + s1) / 2, rel_tol=1e-9)
    assert stats["clip_low_fraction"] == 0.5 and stats["clip_high_fraction"] == 0.0  # over replies
    # one reply unclipped: loss = -s A with s = exp(mean log ratio), so d loss / d logp_t = -A s / n
    lp = logp[:1].clone().requires_grad_(True)
    loss, stats = L.policy_loss(lp, old[:1], t(3.0), mask[:1], "gspo", clip_low=0.2, clip_high=0.28)
    loss.backward()
    assert math.isclose(stats["ratio_mean"], math.exp((math.log(1.5) + math.log(0.7)) / 3), rel_tol=1e-9)
    torch.testing.assert_close(lp.grad, torch.full((1, 3), -3.0 * s0 / 3, dtype=torch.float64))


def test_ratio_one_gives_minus_the_mean_advantage_and_the_kl_term():
    """On-policy (old = pi): the clip is inactive and the terms are -A_i + beta KL_it. KL to a reference with
    log r = ref - pi = (log 2, 0) on row 0 and (log 1/2) on row 1: k3 = r - 1 - log r, k1 = -log r."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    ref = logp + torch.tensor([[LOG2, 0.0], [-LOG2, 7.0]], dtype=torch.float64)
    adv, beta = t(0.5, -1.0), 0.1
    k3 = [[1 - LOG2, 0.0], [-0.5 + LOG2]]
    k1 = [[-LOG2, 0.0], [LOG2]]
    expect = {
        "grpo": (-0.5 + 1.0) / 2,
        "gspo": (-0.5 + 1.0) / 2,
        "dapo": (2 * -0.5 + 1.0) / 3,
        "bnpo": (2 * -0.5 + 1.0) / 3,
        "dr_grpo": (2 * -0.5 + 1.0) / (2 * 5),
    }
    for loss_type, value in expect.items():
        loss, stats = L.policy_loss(logp, logp, adv, mask, loss_type, max_length=5)
        assert math.isclose(loss, value, abs_tol=1e-12), loss_type
        assert stats["clip_fraction"] == 0 and math.isclose(stats["ratio_mean"], 1.0)
    for kind, kl in (("k3", k3), ("k1", k1)):
        per_reply = (sum(kl[0]) / 2 + kl[1][0]) / 2
        per_token = (sum(kl[0]) + kl[1][0]) / 3
        loss, stats = L.policy_loss(logp, logp, adv, mask, "grpo", ref_logp=ref, beta=beta, kl_estimator=kind)
        assert math.isclose(loss, (-0.5 + 1.0) / 2 + beta * per_reply, rel_tol=1e-9)
        assert math.isclose(stats["kl"], per_token, rel_tol=1e-9, abs_tol=1e-12)
        loss, _ = L.policy_loss(logp, logp, adv, mask, "gspo", ref_logp=ref, beta=beta, kl_estimator=kind)
        assert math.isclose(loss, (-0.5 + 1.0) / 2 + beta * per_reply, rel_tol=1e-9)
        loss, _ = L.policy_loss(logp, logp, adv, mask, "dapo", ref_logp=ref, beta=beta, kl_estimator=kind)
        assert math.isclose(loss, (2 * -0.5 + 1.0) / 3 + beta * per_token, rel_tol=1e-9)
    with pytest.raises(ValueError, match="ref_logp"):
        L.policy_loss(logp, logp, adv, mask, "grpo", beta=0.1)


def test_equal_lengths_grpo_dapo_and_dr_grpo_agree_up_to_the_constant():
    g = torch.Generator().manual_seed(1)
    logp, old = torch.randn(4, 6, generator=g).double(), torch.randn(4, 6, generator=g).double()
    adv, mask = torch.randn(4, generator=g).double(), torch.ones(4, 6, dtype=torch.float64)
    grpo, _ = L.policy_loss(logp, old, adv, mask, "grpo", 0.2, 0.28)
    dapo, _ = L.policy_loss(logp, old, adv, mask, "dapo", 0.2, 0.28)
    dr, _ = L.policy_loss(logp, old, adv, mask, "dr_grpo", 0.2, 0.28, max_length=10)
    assert math.isclose(grpo, dapo, rel_tol=1e-12) and math.isclose(dr, grpo * 6 / 10, rel_tol=1e-12)
    # one token per reply: the sequence ratio is the token ratio, so gspo is grpo
    gspo, _ = L.policy_loss(logp[:, :1], old[:, :1], adv, mask[:, :1], "gspo", 0.2, 0.28)
    grpo1, _ = L.policy_loss(logp[:, :1], old[:, :1], adv, mask[:, :1], "grpo", 0.2, 0.28)
    assert math.isclose(gspo, grpo1, rel_tol=1e-12)
    # the old function is the dapo numerator with a symmetric clip and beta 0 (on what the stage calls today)
    old_form, _, _ = L.grpo_loss(logp, old, logp, adv, mask, clip=0.2, beta=0.0)
    num, _ = L.policy_loss(logp, old, adv, mask, "dapo", 0.2, reduction="sum")
    assert math.isclose(old_form, num, rel_tol=1e-12)


def test_clip_higher_is_asymmetric():
    """DAPO's clip-higher: with clip_low 0.2 and clip_high 0.28 a ratio of 1.25 on a positive advantage is no longer
    clipped (term -1.25 instead of -1.2), while 0.75 on a negative advantage is still clipped up to 0.8."""
    mask = torch.ones(1, 1, dtype=torch.float64)
    up = torch.tensor([[math.log(1.25)]], dtype=torch.float64)
    down = torch.tensor([[math.log(0.75)]], dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    sym, s = L.policy_loss(up, zero, t(1.0), mask, "dapo", clip_low=0.2)
    asym, a = L.policy_loss(up, zero, t(1.0), mask, "dapo", clip_low=0.2, clip_high=0.28)
    assert math.isclose(sym, -1.2) and math.isclose(asym, -1.25)
    assert s["clip_high_fraction"] == 1.0 and a["clip_high_fraction"] == 0.0
    low, s = L.policy_loss(down, zero, t(-1.0), mask, "dapo", clip_low=0.2, clip_high=0.28)
    assert math.isclose(low, 0.8) and s["clip_low_fraction"] == 1.0 and s["clip_high_fraction"] == 0.0
    # the gradient of a clipped token is zero, of an unclipped one -A rho
    lp = up.clone().requires_grad_(True)
    L.policy_loss(lp, zero, t(1.0), mask, "dapo", clip_low=0.2)[0].backward()
    assert lp.grad.item() == 0.0
    lp = up.clone().requires_grad_(True)
    L.policy_loss(lp, zero, t(1.0), mask, "dapo", clip_low=0.2, clip_high=0.28)[0].backward()
    assert math.isclose(lp.grad.item(), -1.25)


def test_policy_loss_refuses_unknown_options():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="loss_type"):
        L.policy_loss(x, x, torch.zeros(1), x, "ppo")
    with pytest.raises(ValueError, match="max_length"):
        L.policy_loss(x, x, torch.zeros(1), x, "dr_grpo")
    with pytest.raises(ValueError, match="estimator"):
        L.advantages(torch.zeros(2), 2, "gae")


def test_advantage_estimators_closed_form():
    # groups (1, 2, 6) and (0, 0, 3): means 3 and 1, deviations (-2, -1, 3) and (-1, -1, 2),
    # unbiased variances 14 / 2 = 7 and 6 / 2 = 3
    r = t(1.0, 2.0, 6.0, 0.0, 0.0, 3.0)
    s7, s3 = math.sqrt(7), math.sqrt(3)
    group = [-2 / s7, -1 / s7, 3 / s7, -1 / s3, -1 / s3, 2 / s3]
    torch.testing.assert_close(L.advantages(r, 3, "group"), t(*group), rtol=1e-5, atol=0)
    torch.testing.assert_close(L.advantages(r, 3, "group", scale=False), t(-2.0, -1.0, 3.0, -1.0, -1.0, 2.0))
    # RLOO: r_i minus the mean of the two others: 1 - 4, 2 - 3.5, 6 - 1.5; 0 - 1.5, 0 - 1.5, 3 - 0
    torch.testing.assert_close(L.advantages(r, 3, "rloo"), t(-3.0, -1.5, 4.5, -1.5, -1.5, 3.0))
    # REINFORCE++-baseline: the deviations (mean 0) over their batch std, sqrt(20 / 5) = 2
    rpp = L.advantages(r, 3, "reinforce_pp")
    torch.testing.assert_close(rpp, t(-1.0, -0.5, 1.5, -0.5, -0.5, 1.0), rtol=1e-5, atol=0)
    # a group of equal rewards gets 0 from group and rloo alike
    assert L.advantages(t(2.0, 2.0), 2, "rloo").abs().sum() == 0 and L.advantages(t(2.0, 2.0), 2).abs().sum() == 0
    # rloo is G / (G - 1) times the unscaled group advantage
    torch.testing.assert_close(L.advantages(r, 3, "rloo"), 1.5 * L.advantages(r, 3, "group", scale=False))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_closed_form():
    # z0 from the mismatched rows: mean of (-6 + 6.5, -7 + 6, -1 + 2) = (0.5 - 1 + 1) / 3 = 1/6
    kl_pol = t(-6.0, -7.0, -1.0).requires_grad_(True)
    z0 = L.kto_reference_point(kl_pol, t(-6.5, -6.0, -2.0))
    assert math.isclose(z0, 1 / 6, rel_tol=1e-12) and not z0.requires_grad
    assert L.kto_reference_point(t(-1.0), t(0.0)) == 0  # clamped: a KL is not negative
    # log-ratios h = (1, -1, 0.5), rows desirable, undesirable, undesirable; beta 0.5, w_d 1, w_u 1.5
    pol, ref = t(-3.0, -5.0, -2.0), t(-4.0, -4.0, -2.5)
    des = torch.tensor([True, False, False])
    loss, rewards = L.kto_loss(pol, ref, des, z0, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    expected = (
        (1 - _sigmoid(0.5 * (1 - 1 / 6)))
        + 1.5 * (1 - _sigmoid(0.5 * (1 / 6 + 1)))
        + 1.5 * (1 - _sigmoid(0.5 * (1 / 6 - 0.5)))
    ) / 3
    assert math.isclose(loss, expected, rel_tol=1e-12)
    torch.testing.assert_close(rewards, t(0.5, -0.5, 0.25))
    # at h = z0 every row loses w / 2
    loss, _ = L.kto_loss(t(1.0, 1.0), t(1.0, 1.0), torch.tensor([True, False]), 0.0, 0.1, 2.0, 4.0)
    assert math.isclose(loss, (1.0 + 2.0) / 2)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_the_sum_form_is_exact_under_accumulation(loss_type):
    """A loop summing policy_loss(reduction="sum") over micro-batches and dividing by the summed
    policy_loss_normalizer (fit's count_fn) gets the loss of the whole batch at once, replies of any length."""
    g = torch.Generator().manual_seed(2)
    logp, old = torch.randn(5, 4, generator=g).double(), torch.randn(5, 4, generator=g).double()
    adv = torch.randn(5, generator=g).double()
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    kw = dict(loss_type=loss_type, clip_low=0.2, clip_high=0.28, max_length=6)
    whole, _ = L.policy_loss(logp, old, adv, mask, **kw)
    parts = [slice(0, 2), slice(2, 5)]
    num = sum(L.policy_loss(logp[p], old[p], adv[p], mask[p], reduction="sum", **kw)[0] for p in parts)
    total = sum(L.policy_loss_normalizer(mask[p], loss_type, max_length=6) for p in parts)
    assert isinstance(total, int)
    assert math.isclose(num / total, whole, rel_tol=1e-12)
