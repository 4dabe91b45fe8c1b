"""The PPO stage end to end: shared and separate critics, LoRA and full, metrics, exact resume mid-rollout."""

from __future__ import annotations

import pytest

from llmstages.cli import main
from llmstages.monitor.metrics import read_metrics
from tests.helpers import builtin_base, stop_after_step, trace

FAST = [
    "train.max_steps=8", "train.log_every=1", "train.eval_every=4", "train.save_every=100", "train.precision=fp32",
    "train.lr=1e-3", "ppo.rollout_size=8", "ppo.minibatches=2", "ppo.ppo_epochs=2", "ppo.max_new_tokens=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("ppo") / "base")


def _ppo(base, out, *extra):
    return main(["ppo", f"model.path={base}", f"out_dir={out}", *FAST, *extra])


@pytest.mark.parametrize(
    "extra",
    [["peft.method=lora"], ["peft.method=none", "ppo.critic=separate"], ["peft.method=lora", "ppo.target_kl=0.01"]],
    ids=["lora", "full-separate", "adaptive"],
)
def test_runs_and_logs(base_dir, tmp_path, extra):
    assert _ppo(base_dir, tmp_path, *extra) == 0
    steps = [r for r in read_metrics(tmp_path) if "policy_loss" in r]
    assert len(steps) == 8
    keys = {"reward_mean", "reward_std", "kl_k1", "entropy", "clip_fraction", "kl_old_new_k3", "value_loss",
            "explained_variance", "response_length", "rollout_tokens_per_s", "tokens_per_s"}  # fmt: skip
    assert keys <= set(steps[0])
    assert steps[0]["kl_k1"] == pytest.approx(0.0, abs=1e-5) and steps[0]["clip_fraction"] == 0.0
    assert steps[0]["kl_old_new_k3"] == pytest.approx(0.0, abs=1e-6)  # first minibatch: policy == pi_old
    assert (tmp_path / "final/model.safetensors").is_file()
    # every KL metric names its estimator (kl_coef is the penalty's weight): k1 may go negative on a rollout,
    # k3 = (r - 1) - log r cannot
    kls = {k for r in steps for k in r if "kl" in k} - {"kl_coef"}
    assert kls == {"kl_k1", "kl_old_new_k3"} and all(r["kl_old_new_k3"] >= 0 for r in steps)


def test_exact_resume_in_the_middle_of_a_rollout(base_dir, tmp_path, monkeypatch):
    assert _ppo(base_dir, tmp_path / "a", "peft.method=lora") == 0
    stop_after_step(monkeypatch, 1)
    assert _ppo(base_dir, tmp_path / "b", "peft.method=lora") == 130
    monkeypatch.undo()
    assert _ppo(base_dir, tmp_path / "b", "peft.method=lora", "resume=true") == 0

    assert trace(tmp_path / "b", "value_loss", "loss", "reward_mean") == trace(
        tmp_path / "a", "value_loss", "loss", "reward_mean"
    )


def test_bad_settings(base_dir, tmp_path, capsys):
    assert _ppo(base_dir, tmp_path / "x", "ppo.critic=twin") == 2
    assert "ppo.critic must be one of shared, separate" in capsys.readouterr().err
    assert _ppo(base_dir, tmp_path / "x", "ppo.rollout_size=7") == 2
    assert "not divisible" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compile_and_activation_checkpointing_reach_every_model_and_change_no_step(base_dir, tmp_path, monkeypatch):
    """train.compile compiles the policy, the separate critic and the frozen reference, and with activation
    checkpointing the first update's figures equal the eager run's (decoding stays eager: the same rollout)."""
    import llmstages.rl.rollout as rollout
    import llmstages.train.prepare as prepare

    compiled = []
    for module in (prepare, rollout):
        real = module.compile_blocks
        monkeypatch.setattr(module, "compile_blocks", lambda m, real=real: compiled.append(m) or real(m))
    args = ["peft.method=none", "ppo.critic=separate", "train.max_steps=2"]
    assert _ppo(base_dir, tmp_path / "eager", *args) == 0
    assert not compiled
    fast_args = [*args, "train.compile=true", "train.activation_checkpointing=true"]
    assert _ppo(base_dir, tmp_path / "compiled", *fast_args) == 0
    blocks = [sum(1 for b in m.modules() if hasattr(b, "_forward_uncompiled")) for m in compiled]
    assert len(compiled) == 2 and blocks[1] == 2 * blocks[0] > 0  # the reference; the loop's policy + critic
    eager, fast = ([r for r in read_metrics(tmp_path / run) if "policy_loss" in r] for run in ("eager", "compiled"))
    for key in ("reward_mean", "policy_loss", "value_loss", "entropy", "loss"):
        assert fast[0][key] == pytest.approx(eager[0][key], rel=1e-4, abs=1e-6), key


def test_columns_reach_the_reward_functions_and_each_is_logged(base_dir, tmp_path):
    from tests.stages.test_grpo import check_column_calls, column_reward_run

    data, rewards, module = column_reward_run(tmp_path, "ppo_column_fns")
    assert _ppo(base_dir, tmp_path / "run", data, *rewards, "peft.method=lora") == 0
    # 8 steps = 2 rollouts of 8 prompts, one reply each; records of a rollout's steps repeat its statistics
    records = [r for r in read_metrics(tmp_path / "run") if "reward/level" not in r or r["step"] in (1, 5)]
    check_column_calls(module.CALLS, 8, 1, records)


def test_exact_resume_keeps_each_reward_logged(base_dir, tmp_path, monkeypatch):
    """The rollout's reward/NAME statistics go into the checkpoint with it: a run resumed mid-rollout logs them as
    the uninterrupted run does."""
    from tests.stages.test_grpo import column_reward_run

    data, rewards, _ = column_reward_run(tmp_path, "ppo_resume_fns")
    run = [data, *rewards, "peft.method=lora"]
    assert _ppo(base_dir, tmp_path / "a", *run) == 0
    stop_after_step(monkeypatch, 1)
    assert _ppo(base_dir, tmp_path / "b", *run) == 130
    monkeypatch.undo()
    assert _ppo(base_dir, tmp_path / "b", *run, "resume=true") == 0
    keys = ("reward/level", "reward/half", "reward_mean", "loss")
    assert trace(tmp_path / "b", *keys) == trace(tmp_path / "a", *keys)
    assert len(trace(tmp_path / "a", "reward/level")) == 8


def test_builtin_arithmetic_with_verifiable_rewards(base_dir, tmp_path):
    """data.builtin=arithmetic: PPO trains on the problems' training split with the `answer` column reaching
    llmstages.rewards:accuracy, each reward logged by name."""
    fns = "reward.fns=[llmstages.rewards:accuracy,llmstages.rewards:format]"
    extra = ["data.builtin=arithmetic", "data.arithmetic_train=100", fns, "peft.method=lora", "train.max_steps=2"]
    assert _ppo(base_dir, tmp_path, *extra, "train.eval_every=2") == 0
    records = read_metrics(tmp_path)
    steps = [r for r in records if "reward/accuracy" in r]
    assert len(steps) == 2 and all(0 <= r["reward/format"] <= 1 for r in steps)
    assert any("eval_reward" in r for r in records)
