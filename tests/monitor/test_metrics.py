"""metrics.jsonl survives what crashes leave: a torn last line is dropped, a damaged earlier one is named."""

from __future__ import annotations

import json

import pytest

from llmstages.errors import UserError
from llmstages.monitor.metrics import MetricsLogger, read_metrics


def test_a_torn_last_line_is_dropped_and_resume_truncates_past_it(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    MetricsLogger(tmp_path, resume_step=2, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(tmp_path)
