"""Slow (make test-slow): pre-train the tiny model long enough to store the built-in facts, SFT it, then align it
(reward model, DPO, PPO, GRPO, Constitutional AI with the shipped recipes) and judge every model on held-out
people's questions.

Measured figures are in the README; the thresholds here sit well below them so that noise does not fail the
test, and well above what an untrained or format-less model gets (0% exact match before SFT).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmstages.cli import main
from llmstages.monitor.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    code = main(["pretrain", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), f"out_dir={out}",
                 "train.max_steps=500", "train.eval_every=250", "train.save_every=250"])  # fmt: skip
    assert code == 0
    return out / "final"


@pytest.fixture(scope="module")
def sft_lora(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    assert main(["sft", "--config", str(ROOT / "configs/sft/lora.yaml"), f"model.path={pretrained}",
                 f"out_dir={out}"]) == 0  # fmt: skip
    return out


def test_lora_sft_raises_heldout_accuracy(sft_lora):
    records = read_metrics(sft_lora)
    before = records[0]["task_accuracy"]
    after = [r["task_accuracy"] for r in records if "task_accuracy" in r][-1]
    assert before < 0.05  # measured: 0.0 (the base model has never seen the chat format)
    assert after > 0.6, after  # measured: 0.76 (README)


def judge(model: Path, reference: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model), "--reference", str(reference), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_reward_model_agrees_with_the_oracle(sft_lora, tmp_path):
    run = tmp_path / "rm"
    assert main(["reward", "--config", str(ROOT / "configs/reward/full.yaml"), f"model.path={sft_lora / 'final'}",
                 f"out_dir={run}"]) == 0  # fmt: skip
    held_out_pairs = [r["val_accuracy"] for r in read_metrics(run) if "val_accuracy" in r][-1]
    # pairs of the SFT model's replies to held-out people's questions that the oracle scores differently
    result = judge(sft_lora / "final", sft_lora / "final", tmp_path, "--judge", str(run / "final"))
    assert result["judge_pairs"] > 100
    # measured 0.858 on the held-out people's pairs with 8 samples per question (the target: 0.85; 0.842
    # with 4), and 0.868 with 4 on an earlier SFT model
    assert result["judge_accuracy"] >= 0.85 and held_out_pairs >= 0.75, (held_out_pairs, result)


@pytest.mark.parametrize("stage", ["dpo", "ppo", "grpo"])
def test_alignment_beats_sft_under_the_oracle(sft_lora, tmp_path, stage):
    run = tmp_path / stage
    assert main([stage, "--config", str(ROOT / f"configs/{stage}/lora.yaml"), f"model.path={sft_lora / 'final'}",
                 f"out_dir={run}"]) == 0  # fmt: skip
    result = judge(run / "final", sft_lora / "final", tmp_path)
    assert result["reward"] > result["reference_reward"] + 0.3, result
    floor = 0.65 if stage in ("dpo", "ppo") else 0.6  # the target for DPO and PPO; GRPO measured 0.65
    assert result["win_rate"] >= floor, result
    assert 0.0 < result["kl"] < 2.0, result  # reported, and bounded: the KL term keeps the policy near SFT


def test_constitutional_ai_lowers_violations_without_the_oracle(sft_lora, tmp_path):
    run = tmp_path / "cai"
    assert main(["cai", "run", "--config", str(ROOT / "configs/cai/builtin.yaml"), f"model.path={sft_lora / 'final'}",
                 f"out_dir={run}"]) == 0  # fmt: skip
    labels = tmp_path / "labels.json"
    assert main(["eval", "--labels", str(run / "label" / "pairs.jsonl"), "--out", str(labels)]) == 0
    assert json.loads(labels.read_text())["label_agreement"] > 0.7  # measured 0.90
    result = judge(run / "dpo" / "final", sft_lora / "final", tmp_path)
    # measured: 66% -> 32% violations (the SFT reference's samples against the CAI model's)
    assert result["violation_rate"] < result["reference_violation_rate"] - 0.15, result


@pytest.mark.parametrize(("method", "floor"), [("full", 0.1)])
def test_sft_raises_heldout_exact_match(pretrained, tmp_path, method, floor):
    code = main(["sft", "--config", str(ROOT / f"configs/sft/{method}.yaml"), f"model.path={pretrained}",
                 f"out_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    records = read_metrics(tmp_path)
    before = records[0]["task_accuracy"]
    after = [r["task_accuracy"] for r in records if "task_accuracy" in r][-1]
    assert before < 0.05  # measured: 0.0 (the base model has never seen the chat format)
    assert after > floor, after  # measured: full 0.16 (README; its LR is owed a sweep)
