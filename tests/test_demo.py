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
    # What a few steps do on every machine and precision, by a wide margin (fp32 and bf16, seeds 0-2: README):
    # pre-training beats a third of the unigram model's perplexity (3.1-3.4 against 26); SFT at least halves its
    # held-out loss (10-12 nats to 2.1-2.3); DPO's held-out pairs move towards the chosen replies (loss 0.39-0.54
    # from log 2, margin 0.8-2.0 from 0). Outcomes judged by sampling (held-out accuracy 0-0.25 after 40 steps, win
    # rates 0.46-0.56) are coin tosses at this size: their targets are the full demo's, checked by the sweep.
    entropy = read_metrics(tmp_path / "pretrain")[0]["unigram_entropy"]
    assert stages["pretrain"]["val_ppl"] < math.exp(entropy) / 3
    sft = [r for r in read_metrics(tmp_path / "sft") if "val_loss" in r]
    assert sft[0]["step"] == 0 and sft[-1]["val_loss"] < 0.5 * sft[0]["val_loss"], sft
    dpo = [r for r in read_metrics(tmp_path / "dpo") if "val_loss" in r]
    assert dpo[0]["val_margin"] == 0.0 and abs(dpo[0]["val_loss"] - math.log(2)) < 1e-6  # policy = reference
    assert dpo[-1]["val_loss"] < math.log(2) - 0.05 and dpo[-1]["val_margin"] > 0.2, dpo[-1]
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
