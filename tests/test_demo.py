"""`llmstages demo --quick` runs every stage to the end, writes summary.json and report.html, and the first
stages visibly do their job; `llmstages report` refuses what is not a run."""

from __future__ import annotations

import json
import math

import yaml

from llmstages.cli import main
from llmstages.demo import TARGETS, run_step
from llmstages.monitor.metrics import read_metrics

KEYS = {
    "pretrain": ["val_ppl"], "sft": ["task_accuracy", "task_accuracy_before"], "reward": ["accuracy"],
    "dpo": ["oracle_reward", "win_rate_vs_sft", "kl"], "ppo": ["oracle_reward", "win_rate_vs_sft", "kl"],
    "grpo": ["oracle_reward", "win_rate_vs_sft"],
    "cai": ["violation_rate_before", "violation_rate_after", "label_agreement"],
}  # fmt: skip


def test_quick_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick", "--seed", "1", "--world-seed", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["seed"], summary["world_seed"]) == (1, 1)
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "cai/sft", "cai/dpo"):
        cfg = yaml.safe_load((tmp_path / stage / "config.yaml").read_text())
        assert (cfg["seed"], cfg["world_seed"]) == (1, 1), stage
    assert "world_seed=1" in json.loads((tmp_path / "pretrain" / "data" / "meta.json").read_text())["source"]
    assert len(summary["targets"]) == len(TARGETS) and all(t["value"] is not None for t in summary["targets"])
    stages = summary["stages"]
    for stage, keys in KEYS.items():
        for k in [*keys, "seconds"]:
            assert stages[stage].get(k) is not None, (stage, k)
    # Pre-training beats the corpus's unigram model; SFT answers more held-out questions than the base; DPO's
    # replies beat the SFT model's more often than not (the oracle judges).
    entropy = read_metrics(tmp_path / "pretrain")[0]["unigram_entropy"]
    assert stages["pretrain"]["val_ppl"] < math.exp(entropy) / 3
    assert stages["sft"]["task_accuracy"] > stages["sft"]["task_accuracy_before"]
    assert stages["dpo"]["win_rate_vs_sft"] > 0.5
    report = (tmp_path / "report.html").read_text()
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "cai_dpo"):
        assert (tmp_path / "plots" / f"{stage}.png").stat().st_size > 10_000
    assert report.count("data:image/png;base64,") >= 8 and "Held-out metrics" in report
    assert "seed 1, world seed 1" in report
    assert "win rate vs SFT" in capsys.readouterr().out
    # A finished step is reused, not trained again.
    assert run_step(tmp_path, "sft", quick=True) == 0.0
    # The folder belongs to that demo: another seed, or a folder of someone else's, is refused.
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    assert "holds a demo run with" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--quick"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and len(list((tmp_path / "mine").iterdir())) == 1


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert main(["report", str(tmp_path / "notes")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
