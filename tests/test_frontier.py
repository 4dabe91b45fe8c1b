"""The reward-KL frontier sweep, end to end on a tiny model with a few steps per run."""

from __future__ import annotations

import json

from llmstages.cli import main
from tests.helpers import builtin_base


def test_frontier_sweeps_dpo_and_ppo_and_writes_table_and_plot(tmp_path):
    base = builtin_base(tmp_path / "base")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Where does person {i} live?", "chosen": "Oakfield",
                                         "rejected": "Oakfield, really"}) + "\n" for i in range(20)))  # fmt: skip
    out = tmp_path / "frontier"
    args = ["frontier", "--sft", str(base), "--out", str(out), "--dpo-betas", "0.1", "1.0", "--ppo-kl", "0.1",
            "--samples", "1", "train.max_steps=2", "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
            f"dpo:data.path=[{pairs}]", "ppo:ppo.rollout_size=8", "ppo:ppo.minibatches=1",
            "ppo:ppo.ppo_epochs=1"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "frontier.json").read_text())
    assert [(r["method"], r["knob"]) for r in rows] == [("sft", ""), ("dpo", "beta=0.1"), ("dpo", "beta=1.0"),
                                                         ("ppo", "kl_coef=0.1")]  # fmt: skip
    assert rows[0]["kl"] == 0.0 and all("win_rate" in r and "reward" in r for r in rows)
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "frontier.md").read_text().count("\n") == 2 + len(rows)
    assert (out / "dpo-beta0.1" / "final" / "config.json").is_file()
