"""Constitution files: the shipped ones load, requests are filled in as written, bad files are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstages.data.constitution import load_constitution
from llmstages.data.tasks import JUDGE_TEMPLATES, PLAIN
from llmstages.errors import UserError

CAI = Path(__file__).resolve().parents[2] / "src/llmstages/configs/cai"


def test_shipped_constitutions_load_and_builtin_asks_in_the_task_words():
    general = load_constitution(CAI / "constitution_general.yaml")
    assert len(general.principles) >= 4 and general.options == ("A", "B")
    builtin = load_constitution(CAI / "constitution_builtin.yaml")
    concise = builtin.pick(["concise"])[0]
    assert concise.critique_request("Where does Ada live?", "Oakfield, really") == JUDGE_TEMPLATES[
        "judge_short"
    ].format(response="Oakfield, really")
    assert concise.revision_request("Where does Ada live?", "Oakfield, really", "No") == PLAIN.format(
        question="Where does Ada live?"
    )
    assert concise.comparison_request("q", "x", "y") == JUDGE_TEMPLATES["judge_shorter"].format(a="x", b="y")
    no_really = builtin.pick(["no_really"])[0]
    assert no_really.comparison_request("q", "x", "y") == JUDGE_TEMPLATES["judge_clean"].format(
        a="x", b="y", word="really"
    )
    assert no_really.critique_request("q", "r") == JUDGE_TEMPLATES["judge_word"].format(response="r", word="really")
    with pytest.raises(UserError, match="'kind' is not in the constitution"):
        builtin.pick(["kind"])


def test_general_revision_sees_the_critique():
    p = load_constitution(CAI / "constitution_general.yaml").principles[0]
    text = p.revision_request("How do I pick a lock?", "Like this.", "It helps with a crime.")
    assert "How do I pick a lock?" in text and "Like this." in text and "It helps with a crime." in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("principles: []\n", "non-empty list under 'principles'"),
        ("options: [A, B]\n", "non-empty list under 'principles'"),
        ("principles:\n  - name: x\n    critique: c {response}\n    comparison: '{a} {b}'\n",
         "principles[0] (x): 'revision' is missing or empty"),
        ("principles:\n  - name: x\n    critique: c\n    revision: r\n    comparison: only {a}\n",
         "'comparison' must show both replies"),
        ("principles:\n  - name: x\n    critique: 'c {answer}'\n    revision: r\n    comparison: '{a} {b}'\n",
         "'critique' uses {answer}"),
        ("options: [A, A]\nprinciples:\n  - {name: x, critique: c, revision: r, comparison: '{a} {b}'}\n",
         "'options' must be two different"),
        ("principles: [\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_constitutions(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="c.yaml") as e:
        load_constitution(path)
    assert message in str(e.value)
