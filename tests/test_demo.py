"""`llmstages demo --quick` runs to the end and writes its summary."""

from __future__ import annotations

import json

from llmstages.cli import main


def test_quick_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    pre = summary["stages"]["pretrain"]
    assert pre["val_ppl"] < 6 and 0 <= pre["recall"] <= 1  # unigram perplexity of the corpus is about 90
    assert "fact recall" in capsys.readouterr().out
    # A second run reuses the finished stage instead of training again.
    mtime = (tmp_path / "pretrain/final/model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    assert (tmp_path / "pretrain/final/model.safetensors").stat().st_mtime_ns == mtime
