"""Our GRPO-family, KTO and DPO-family losses against TRL's (the independent reference, trl==1.16.0), on a tiny HF
Llama.

What is compared, exactly: TRL's own loss code, `GRPOTrainer._compute_loss`, `KTOTrainer._compute_loss` and
`DPOTrainer._compute_loss`, run unbound on a stand-in for the trainer that holds only the attributes those methods
read (loss type, clip range, beta, max completion length; an accelerator of one process). The model is a tiny random
HF Llama patched with TRL's `add_fused_lm_head`, so TRL computes its per-token log-probs its own way (its chunked
fused head), from prompts, completions, advantages, old and reference log-probs (KTO: labels, reference log-probs of
the rows and of the mismatched KL rows) that the test supplies; DPO scores its pairs with a reference model of its
own, itself patched (the policy's weights moved by noise), so the reference log-probs are TRL's too. Ours: the same
model's logits through `token_logprobs`, then `policy_loss` / `kto_reference_point` + `kto_loss` / `dpo_loss`,
`ipo_loss`, `hinge_loss`. The losses and their gradients with respect to every weight of the model must agree to
1e-5 in fp32. Building a whole trainer (datasets, generation, reward functions) would compare nothing more of the
loss and take far longer.
"""

from __future__ import annotations

import contextlib
import types
from collections import defaultdict

import pytest
import torch

from llmstages import losses as L
from tests.helpers import hf_model

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

V = 300


@pytest.fixture(scope="module")
def model():
    """The tiny Llama, with TRL's fused head added once (the patch keeps the plain forward when not asked); its
    outputs are those DPOTrainer asks for, the other trainers' among them."""
    m = hf_model("llama", vocab_size=V).float()
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return m


@pytest.fixture(autouse=True)
def _no_grads_left(model):
    """A test that fails between its backward passes leaves gradients behind; the next one starts without them."""
    yield
    model.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def reference():
    """DPO's reference: the same Llama with every weight moved by noise (0.2 x N(0, 1)), patched as DPOTrainer
    patches its ref_model; chosen-minus-rejected log-ratios of about -4 to 6 on the pairs below."""
    m = hf_model("llama", vocab_size=V).float()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    add_fused_lm_head(m)
    return m.requires_grad_(False)


class _OneProcess:
    """The accelerator calls TRL's loss code makes, for one process."""

    num_processes = 1
    is_main_process = True
    device = torch.device("cpu")

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


def _ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, V, (n,), generator=g).tolist()


def _pad(rows: list[list[int]], width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def _our_logps(model, ids, attn, target_mask):
    """log p of each token where target_mask is 1, from the model's plain logits: (B, T - 1) aligned with ids[:, 1:]."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(target_mask[:, 1:] == 0, L.IGNORE_INDEX)
    return L.token_logprobs(logits, targets)


def _grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _rollout():
    """4 replies (2 prompts x 2), prompts left-padded, completions of lengths 5, 2, 4, 3 right-padded (TRL's layout)."""
    g = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask = _pad([_ids(g, 4), _ids(g, 4), _ids(g, 2), _ids(g, 2)], 4, left=True)
    completion_ids, completion_mask = _pad([_ids(g, n) for n in (5, 2, 4, 3)], 5, left=False)
    return prompt_ids, prompt_mask, completion_ids, completion_mask, g


# loss_type as TRL names it, its importance sampling level, and ours
GRPO_CASES = [
    ("grpo", "token", "grpo"),
    ("dr_grpo", "token", "dr_grpo"),
    ("dapo", "token", "dapo"),
    ("bnpo", "token", "bnpo"),
    ("grpo", "sequence", "gspo"),  # TRL's GSPO: importance_sampling_level="sequence" (its documented setting)
]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("trl_type, level, ours", GRPO_CASES, ids=[c[2] for c in GRPO_CASES])
def test_grpo_family_equals_trl(model, trl_type, level, ours, beta):
    prompt_ids, prompt_mask, completion_ids, completion_mask, g = _rollout()
    B, C = completion_ids.shape
    ids, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    targets = torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1)  # the completion tokens
    with torch.no_grad():
        logp0 = _our_logps(model, ids, attn, targets)[:, -C:]
    # old and reference log-probs away from the policy's, so that ratios leave [1 - 0.2, 1 + 0.28] both ways
    old = (logp0 + 0.4 * torch.randn(B, C, generator=g)) * completion_mask
    ref = (logp0 + 0.3 * torch.randn(B, C, generator=g)) * completion_mask
    adv = torch.tensor([1.0, -1.0, 0.5, -0.7])
    clip_low, clip_high = 0.2, 0.28

    stub = types.SimpleNamespace(
        model=model,
        accelerator=_OneProcess(),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=trl_type,
        importance_sampling_level=level,
        beta=beta,
        epsilon_low=clip_low,
        epsilon_high=clip_high,
        max_completion_length=C + 3,  # dr_grpo's constant: the new-token limit, here longer than any reply
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    stub._get_per_token_logps_and_entropies = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies, stub)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    trl_loss = GRPOTrainer._compute_loss(stub, model, inputs)
    trl_loss.backward()
    trl_grads = _grads(model)

    mask = completion_mask.float()
    logp = _our_logps(model, ids, attn, targets)[:, -C:]
    loss, stats = L.policy_loss(
        logp, old, adv, mask, ours, clip_low, clip_high, ref_logp=ref, beta=beta, max_length=C + 3
    )
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-5)
    for ours_g, trl_g in zip(_grads(model), trl_grads, strict=True):
        torch.testing.assert_close(ours_g, trl_g, rtol=1e-5, atol=1e-5)
    metrics = stub._metrics["eval"]
    assert stats["clip_low_fraction"].item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-6)
    assert stats["clip_high_fraction"].item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-6)
    assert metrics["clip_ratio/region_mean"][0] > 0  # the example does clip
    if beta:
        assert stats["kl"].item() == pytest.approx(metrics["kl"][0], rel=1e-5)


def test_kto_equals_trl(model):
    """KTO on 4 rows (2 desirable), the KL rows pairing each prompt with the previous row's completion as TRL's
    dataset preparation does; reference log-probs supplied (TRL's precompute_ref_log_probs path)."""
    g = torch.Generator().manual_seed(1)
    prompts = [_ids(g, n) for n in (3, 4, 2, 3)]
    completions = [_ids(g, n) for n in (4, 2, 3, 5)]
    kl_completions = [completions[-1]] + completions[:-1]

    def rows(comps):
        full = [p + c for p, c in zip(prompts, comps, strict=True)]
        ids, attn = _pad(full, max(map(len, full)), left=False)
        comp = torch.zeros_like(attn)
        for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
            comp[i, len(p) : len(p) + len(c)] = 1
        return ids, attn, comp

    ids, attn, comp = rows(completions)
    kl_ids, kl_attn, kl_comp = rows(kl_completions)
    labels = torch.tensor([True, False, False, True])
    with torch.no_grad():
        pol0 = _our_logps(model, ids, attn, comp).sum(-1)
        kl0 = _our_logps(model, kl_ids, kl_attn, kl_comp).sum(-1)
    ref = pol0 - torch.tensor([0.3, -0.2, 0.5, -0.4])  # the reference a little away from the policy
    ref_kl = kl0 - torch.tensor([0.6, 0.1, -0.2, 0.4])  # mean KL 0.225 > 0: z0 is not clamped
    beta, w_d, w_u = 0.5, 1.0, 1.33

    stub = types.SimpleNamespace(
        model=model,
        accelerator=_OneProcess(),
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "completion_mask": comp,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attn,
        "KL_completion_mask": kl_comp,
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    trl_loss = KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    trl_loss.backward()
    trl_grads = _grads(model)

    with torch.no_grad():
        kl_pol = _our_logps(model, kl_ids, kl_attn, kl_comp).sum(-1)
    z0 = L.kto_reference_point(kl_pol, ref_kl)
    pol = _our_logps(model, ids, attn, comp).sum(-1)
    loss, _ = L.kto_loss(pol, ref, labels, z0, beta, w_d, w_u)
    loss.backward()
    assert z0.item() == pytest.approx(stub._metrics["eval"]["kl"][0], rel=1e-5) and z0 > 0
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-5)
    for ours_g, trl_g in zip(_grads(model), trl_grads, strict=True):
        torch.testing.assert_close(ours_g, trl_g, rtol=1e-5, atol=1e-5)


def _pairs():
    """4 pairs as DPOTrainer's collator lays them out: rows [chosen..., rejected...], prompt + reply right-padded,
    completion_mask marking the reply tokens (lengths 4, 2, 5, 3 chosen; 3, 5, 2, 4 rejected)."""
    g = torch.Generator().manual_seed(2)
    prompts = [_ids(g, n) for n in (3, 4, 2, 3)]
    replies = [_ids(g, n) for n in (4, 2, 5, 3)] + [_ids(g, n) for n in (3, 5, 2, 4)]
    rows = [p + r for p, r in zip(prompts + prompts, replies, strict=True)]
    ids, attn = _pad(rows, max(map(len, rows)), left=False)
    comp = torch.zeros_like(attn)
    for i, (p, r) in enumerate(zip(prompts + prompts, replies, strict=True)):
        comp[i, len(p) : len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def _swapped(batch):
    """The same pairs with chosen and rejected exchanged: each preference label flipped."""
    return {k: torch.cat(v.chunk(2)[::-1]) for k, v in batch.items()}


def _trl_dpo(model, reference, batch, loss_type: str, beta: float):
    """DPOTrainer._compute_loss of one loss type on `batch`, the reference scored by TRL through `reference`;
    -> (loss, the metrics it logged)."""
    stub = types.SimpleNamespace(
        model=model,
        ref_model=reference,
        accelerator=_OneProcess(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        precompute_ref_logps=False,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,  # read by robust, exo_pair and aot only; TRL 1.16's sigmoid has no label smoothing
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        use_weighting=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = DPOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    return loss, stub._metrics["eval"]


def _our_pair_logps(model, reference, batch):
    """(pol_w, pol_l, ref_w, ref_l, len_w, len_l): summed reply log-probs from the models' plain logits, (4,) each."""
    args = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        ref = _our_logps(reference, *args).sum(-1)
    pol = _our_logps(model, *args).sum(-1)
    lengths = batch["completion_mask"].sum(-1).float()
    return (*pol.chunk(2), *ref.chunk(2), *lengths.chunk(2))


# loss_type as TRL names it, ours, beta
DPO_CASES = [("sigmoid", "dpo", 0.25), ("ipo", "ipo", 0.5), ("hinge", "hinge", 0.25)]


@pytest.mark.parametrize("trl_type, ours, beta", DPO_CASES, ids=[c[1] for c in DPO_CASES])
def test_dpo_family_equals_trl(model, reference, trl_type, ours, beta):
    """DPO (sigmoid), IPO and the hinge on 4 pairs whose beta * h spans about -1 to 1.5, so the hinge is past its
    margin on one pair and active on the others. IPO: ipo_loss is given the reply lengths, TRL's per-token average."""
    batch = _pairs()
    trl_loss, metrics = _trl_dpo(model, reference, batch, trl_type, beta)
    trl_loss.backward()
    trl_grads = _grads(model)

    pw, pl, rw, rl, lw, ll = _our_pair_logps(model, reference, batch)
    if ours == "dpo":
        loss, r_w, r_l = L.dpo_loss(pw, pl, rw, rl, beta)
    elif ours == "ipo":
        loss, r_w, r_l = L.ipo_loss(pw, pl, rw, rl, beta, lw, ll)
    else:
        loss, r_w, r_l = L.hinge_loss(pw, pl, rw, rl, beta)
        margin = beta * ((pw - rw) - (pl - rl))
        assert (margin > 1).any() and (margin < 1).any()  # the hinge binds on some pairs and not on others
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-5)
    for ours_g, trl_g in zip(_grads(model), trl_grads, strict=True):
        torch.testing.assert_close(ours_g, trl_g, rtol=1e-5, atol=1e-5)
    # TRL logs beta x the summed log-ratio as the reward for every loss type; ours for IPO is per token
    scale = (lw, ll) if ours == "ipo" else (1.0, 1.0)
    assert (r_w * scale[0]).mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-5)
    assert (r_l * scale[1]).mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-5)


def test_cdpo_equals_trl_on_flipped_labels(model, reference):
    """cDPO (dpo_loss with label_smoothing eps) is DPO's expected loss when each label is flipped with probability
    eps. TRL 1.16's sigmoid loss has no label smoothing (its label_smoothing feeds robust DPO, EXO and AOT), so the
    reference is TRL's sigmoid loss on the pairs and on the same pairs with chosen and rejected exchanged, weighted
    1 - eps and eps."""
    batch, beta, eps = _pairs(), 0.25, 0.2
    kept, _ = _trl_dpo(model, reference, batch, "sigmoid", beta)
    flipped, _ = _trl_dpo(model, reference, _swapped(batch), "sigmoid", beta)
    trl_loss = (1 - eps) * kept + eps * flipped
    trl_loss.backward()
    trl_grads = _grads(model)

    pw, pl, rw, rl, _, _ = _our_pair_logps(model, reference, batch)
    loss, _, _ = L.dpo_loss(pw, pl, rw, rl, beta, label_smoothing=eps)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-5)
    for ours_g, trl_g in zip(_grads(model), trl_grads, strict=True):
        torch.testing.assert_close(ours_g, trl_g, rtol=1e-5, atol=1e-5)
