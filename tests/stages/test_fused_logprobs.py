"""Each alignment stage's log-probs come from hidden states in chunks (losses.head_logprobs), never whole logits:
checked against the plain computation from the model's logits in fp32: values within 1e-5, gradients within 1e-5 of
their norm, with LoRA on every linear layer but the head (a plain head) and on attention and the head (wrapped)."""

from __future__ import annotations

import pytest
import torch

from llmstages import losses as L
from llmstages.model import GPT, preset
from llmstages.model.heads import RewardModel
from llmstages.peft import apply_peft
from llmstages.rl.rollout import policy_logprobs
from llmstages.stages import dpo
from llmstages.stages.ppo import ActorCritic


def model_with_lora(targets: str | list[str]) -> GPT:
    torch.manual_seed(0)
    model = GPT(preset("llama_tiny", vocab_size=300, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, block_size=32))
    apply_peft(model, "lora", rank=4, alpha=8, dropout=0.0, target_modules=targets)
    for n, p in model.named_parameters():  # non-zero B, so that the adapters change the outputs
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def reply_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (4, 20), generator=g)
    targets = torch.randint(0, 300, (4, 20), generator=g)
    targets[:, :8] = L.IGNORE_INDEX  # the prompt
    mask = torch.ones(4, 20, dtype=torch.long)
    mask[0, 15:] = 0  # a shorter, padded row
    targets[0, 15:] = L.IGNORE_INDEX
    return {"input_ids": ids, "targets": targets, "mask": mask, "index": torch.arange(2)}


def grads_of(model: torch.nn.Module, value: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(value, params))


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def close_grads(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Each gradient within 1e-5 of the plain one relative to its norm (an element near zero may differ by more
    than 1e-5 of itself: fp32 sums in another order through the whole network)."""
    assert len(got) == len(want)
    for g, h in zip(got, want):
        assert float((g - h).norm()) <= 1e-5 * float(h.norm()) + 1e-9, (float((g - h).norm()), float(h.norm()))


TARGETS = ["all-linear", ["q_proj", "v_proj", "lm_head"]]  # the head plain, then wrapped


@pytest.mark.parametrize("targets", TARGETS)
def test_dpo_sequence_scores(targets):
    model, batch = model_with_lora(targets), reply_batch()
    got_sum, got_len = dpo.sequence_scores(model, batch)
    want_sum, want_len = L.sequence_logprobs(model(batch["input_ids"], mask=batch["mask"]), batch["targets"])
    close(got_sum, want_sum)
    assert torch.equal(got_len, want_len)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    close_grads(grads_of(model, (got_sum * w).sum()), grads_of(model, (want_sum * w).sum()))


@pytest.mark.parametrize("targets", TARGETS)
def test_grpo_logprobs_at_a_temperature(targets):
    model, batch = model_with_lora(targets), reply_batch()
    got = policy_logprobs(model, batch, 0.7)
    want = L.token_logprobs(model(batch["input_ids"], mask=batch["mask"]) / 0.7, batch["targets"])
    close(got, want)
    a = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    close_grads(grads_of(model, (got * a).sum()), grads_of(model, (want * a).sum()))


@pytest.mark.parametrize("targets", TARGETS)
def test_ppo_logprobs_entropy_and_values(targets):
    policy, batch = model_with_lora(targets), reply_batch()
    ac = ActorCritic(policy, None)
    logp, entropy, values = ac(batch, 0.8)
    logits = policy(batch["input_ids"], mask=batch["mask"]) / 0.8
    tmask = (batch["targets"] != L.IGNORE_INDEX).float()
    want_logp, want_ent = L.token_logprobs(logits, batch["targets"]), L.entropy_from_logits(logits) * tmask
    close(logp, want_logp)
    close(entropy * tmask, want_ent)
    want_values = ac.value_head(policy.hidden_states(batch["input_ids"], mask=batch["mask"]))
    close(values, want_values)
    a, b = torch.randn(logp.shape), torch.randn(logp.shape)
    got = grads_of(ac, (logp * a).sum() + (entropy * tmask * b).sum() + values.sum())
    want = grads_of(ac, (want_logp * a).sum() + (want_ent * b).sum() + want_values.sum())
    close_grads(got, want)


def test_reward_model_reads_hidden_states_and_never_the_lm_head(monkeypatch):
    backbone, batch = model_with_lora("all-linear"), reply_batch()
    rm = RewardModel(backbone)
    want = rm.head(backbone.hidden_states(batch["input_ids"], mask=batch["mask"])[torch.arange(4), [14, 19, 19, 19]])

    def no_logits(*args, **kwargs):
        raise AssertionError("the reward model computed (tokens x vocab) logits")

    monkeypatch.setattr(backbone.lm_head, "forward", no_logits)
    close(rm(batch["input_ids"], batch["mask"]), want)
