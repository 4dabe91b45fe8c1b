"""The GRPO stage end to end: rollouts, group advantages, the oracle or a reward model as reward, resume."""

from __future__ import annotations

import json

import pytest

from llmstages.cli import main
from llmstages.data.builtin import builtin_corpus
from llmstages.data.tokenizer import train_bpe
from llmstages.model import GPT, preset, save_model
from llmstages.monitor.metrics import read_metrics
from tests.helpers import builtin_base, stop_after_step, trace

FAST = [
    "train.max_steps=6", "train.log_every=1", "train.eval_every=3", "train.save_every=100", "train.warmup_steps=1",
    "train.precision=fp32", "train.lr=1e-3", "grpo.group_size=4", "grpo.prompts_per_step=4", "grpo.max_new_tokens=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("grpo") / "base")


def _grpo(base, out, *extra):
    return main(["grpo", f"model.path={base}", f"out_dir={out}", *FAST, *extra])


@pytest.mark.parametrize("method", ["lora", "none"])
def test_runs_and_logs(base_dir, tmp_path, method):
    assert _grpo(base_dir, tmp_path, f"peft.method={method}") == 0
    records = read_metrics(tmp_path)
    steps = [r for r in records if "reward_mean" in r]
    assert len(steps) == 6
    assert {"kl_k3", "clip_fraction", "zero_advantage_groups", "response_length", "rollout_tokens_per_s"} <= set(
        steps[0]
    )
    assert steps[0]["kl_k3"] == pytest.approx(0.0, abs=1e-6)  # the first update starts at the reference
    # every KL metric names its estimator; k3 = (r - 1) - log r is non-negative on every batch
    kls = {k for r in records for k in r if "kl" in k}
    assert kls == {"kl_k3"} and all(r["kl_k3"] >= 0 for r in steps)
    assert any("eval_reward" in r for r in records) and (tmp_path / "final/model.safetensors").is_file()


def test_exact_resume(base_dir, tmp_path, monkeypatch):
    assert _grpo(base_dir, tmp_path / "a", "peft.method=lora") == 0
    stop_after_step(monkeypatch, 2)
    assert _grpo(base_dir, tmp_path / "b", "peft.method=lora") == 130
    monkeypatch.undo()
    assert _grpo(base_dir, tmp_path / "b", "peft.method=lora", "resume=true") == 0
    assert trace(tmp_path / "b", "reward_mean", "loss") == trace(tmp_path / "a", "reward_mean", "loss")


def test_bad_reward_sources(base_dir, tmp_path, capsys):
    assert _grpo(base_dir, tmp_path / "x", "reward.fn=no_such_module:score") == 2
    assert "reward.fn 'no_such_module:score' does not import" in capsys.readouterr().err
    assert _grpo(base_dir, tmp_path / "x", f"reward.model={base_dir}") == 2
    assert "not a reward model" in capsys.readouterr().err
    from llmstages.model.heads import ScalarHead, save_head

    other_tok = train_bpe(builtin_corpus(1, 0.1), 500)
    rm_dir = save_model(GPT(preset("llama_tiny", vocab_size=other_tok.vocab_size, n_layers=1, d_model=32, n_heads=2,
                                   n_kv_heads=1)), tmp_path / "rm", other_tok)  # fmt: skip
    save_head(ScalarHead(32), rm_dir, kind="reward")
    assert _grpo(base_dir, tmp_path / "x", f"reward.model={rm_dir}") == 2
    assert "its tokenizer differs from the policy's" in capsys.readouterr().err
    empty = tmp_path / "p.jsonl"
    empty.write_text("\n")
    assert _grpo(base_dir, tmp_path / "x", f"data.path={empty}") == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_long_prompts_are_cut_from_the_left_to_leave_room_for_the_replies(base_dir, tmp_path, capsys):
    """A prompt longer than the model's context (64) less grpo.max_new_tokens keeps its end, and the run samples and
    trains; a max_new_tokens that leaves no room for a prompt is refused before anything is written."""
    from llmstages.data.chat import prompt_ids
    from llmstages.model import load_tokenizer

    long = "Ada lives in Oakfield and keeps a grey cat. " * 10 + "Where does Ada live?"
    assert len(prompt_ids([{"role": "user", "content": long}], load_tokenizer(base_dir))) > 64
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": long}) + "\n" + json.dumps({"prompt": "Where does Bram live?"}) + "\n")
    assert _grpo(base_dir, tmp_path / "run", f"data.path={data}", "grpo.prompts_per_step=2", "train.max_steps=1") == 0
    assert "grpo: 2 prompts (1 cut from the left to leave room for 4 new tokens)" in capsys.readouterr().out
    start = read_metrics(tmp_path / "run")[0]
    assert start["truncated_examples"] == 1 and start["truncated_eval_prompts"] == 1 and "eval_reward" in start
    assert _grpo(base_dir, tmp_path / "x", f"data.path={data}", "grpo.max_new_tokens=64") == 2
    err = capsys.readouterr().err
    assert "grpo.max_new_tokens=64 leaves no room for a prompt in the model's context of 64 tokens" in err
    assert not (tmp_path / "x").exists()
