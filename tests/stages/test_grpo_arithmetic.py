"""GRPO with verifiable rewards on built-in and GSM8K-format data: the `answer` column reaches the reward functions,
training sees the arithmetic training split and the evaluation scores its held-out problems."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from llmstages.cli import main
from llmstages.data.arithmetic import arithmetic_problems
from llmstages.monitor.metrics import read_metrics
from tests.helpers import builtin_base

FAST = [
    "train.max_steps=2", "train.log_every=1", "train.eval_every=2", "train.save_every=100", "train.warmup_steps=1",
    "train.precision=fp32", "train.lr=1e-3", "grpo.group_size=4", "grpo.prompts_per_step=4", "grpo.max_new_tokens=4",
    "peft.method=lora",
]  # fmt: skip
VERIFIABLE = "llmstages.rewards:accuracy,llmstages.rewards:format"

RECORDER = '''
CALLS = []


def seen(prompts, responses, ended, answer):
    """Records the prompts and answers it is handed; scores nothing."""
    CALLS.append((list(prompts), list(answer)))
    return [0.0] * len(responses)
'''


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("grpo_arithmetic") / "base")


def _recorder(tmp_path, name: str):
    (tmp_path / f"{name}.py").write_text(RECORDER)
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))


def test_builtin_arithmetic_trains_on_its_training_split_and_evaluates_on_the_held_out_one(base_dir, tmp_path):
    module = _recorder(tmp_path, "arith_recorder")
    out = tmp_path / "run"
    argv = ["grpo", f"model.path={base_dir}", f"out_dir={out}", *FAST, "data.builtin=arithmetic",
            "data.arithmetic_train=200", "world_seed=3", f"reward.fns=[{VERIFIABLE},arith_recorder:seen]"]  # fmt: skip
    assert main(argv) == 0
    records = read_metrics(out)
    steps = [r for r in records if "reward_mean" in r]
    assert len(steps) == 2
    for r in steps:
        assert 0 <= r["reward/accuracy"] <= 1 and 0 <= r["reward/format"] <= 1 and r["reward/seen"] == 0.0
        assert r["reward_mean"] == pytest.approx(r["reward/accuracy"] + r["reward/format"])
    assert any("eval_reward" in r for r in records)

    train, held = arithmetic_problems(3, 200, 64)
    answers = {p.question: p.answer for p in train + held}
    train_q, held_q = {p.question for p in train}, {p.question for p in held}
    calls = module.CALLS
    for prompts, answer in calls:  # the `answer` column, aligned with its prompts
        assert answer == [answers[p] for p in prompts]
    training = [c for c in calls if len(c[0]) == 16]  # 4 prompts x group_size 4
    evaluation = [c for c in calls if set(c[0]) & held_q]
    assert len(training) == 2 and all(set(c[0]) <= train_q for c in training)
    assert evaluation and all(set(c[0]) <= held_q for c in evaluation)
    assert {p for c in evaluation for p in c[0]} == held_q  # every held-out problem scored


def test_a_gsm8k_file_trains_and_its_answer_reaches_the_reward_functions(base_dir, tmp_path):
    module = _recorder(tmp_path, "gsm8k_recorder")
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"Ada has {i} apples and buys 2 more. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
            for i in range(20)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["grpo", f"model.path={base_dir}", f"out_dir={out}", *FAST, "train.max_steps=1", f"data.path={data}",
            f"reward.fns=[{VERIFIABLE},gsm8k_recorder:seen]"]  # fmt: skip
    assert main(argv) == 0
    step = next(r for r in read_metrics(out) if "reward_mean" in r)
    assert 0 <= step["reward/accuracy"] <= 1 and "reward/format" in step
    answers = {r["question"]: r["answer"] for r in rows}
    trained = [c for c in module.CALLS if len(c[0]) == 16]
    assert trained and all(a == [answers[p] for p in prompts] for prompts, a in module.CALLS)
