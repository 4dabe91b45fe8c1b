"""Slow (make test-slow): the full demo on (seed, world_seed) = (0, 0) meets every target of `llmstages.demo.TARGETS`
(fact recall after pre-training, held-out SFT accuracy, reward-model accuracy, DPO/PPO/GRPO win rates against
SFT, Constitutional AI's violations, fact accuracy and label agreement), and full fine-tuning from the same base
raises held-out exact match. The figures over seeds and thread counts are in the README (benchmarks/demo_sweep.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmstages.cli import main
from llmstages.demo import TARGETS
from llmstages.monitor.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "s0-w0"
    assert main(["demo", "--out", str(out), "--seed", "0", "--world-seed", "0"]) == 0
    return out


def test_the_demo_meets_every_target(demo):
    summary = json.loads((demo / "summary.json").read_text())
    assert len(summary["targets"]) == len(TARGETS)
    missed = [t for t in summary["targets"] if not t["met"]]
    assert not missed, missed
    # the judges are sound: the KL to SFT stays bounded, and win rates sit under their ceilings
    for stage in ("dpo", "ppo", "grpo"):
        s = summary["stages"][stage]
        assert 0.0 < s["kl"] < 2.0 and s["win_rate_vs_sft"] <= s["win_ceiling"] + 1e-9, (stage, s)


def test_full_fine_tuning_raises_heldout_exact_match(demo, tmp_path):
    code = main(["sft", "--config", str(ROOT / "configs/sft/full.yaml"), f"model.path={demo / 'pretrain' / 'final'}",
                 f"out_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    records = read_metrics(tmp_path)
    before = records[0]["task_accuracy"]
    after = [r["task_accuracy"] for r in records if "task_accuracy" in r][-1]
    assert before < 0.05  # the base model has never seen the chat format
    assert after > 0.1, after  # measured: full 0.16 (README; its LR is owed a sweep)
